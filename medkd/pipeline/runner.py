"""The pipeline runner: one job spec, seven stages, each skipped when its output already exists.

    teachers -> soft labels -> search -> final training -> export -> serve -> report

Every stage's output is persisted under ``output_dir`` (or in the soft-label cache) and keyed
by fingerprints, so a re-run or a crashed run resumes where it stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from medkd.core.contribution import leave_one_out
from medkd.core.metrics import classification_metrics, ensemble_probabilities
from medkd.core.progress import Progress, RemoteEvents
from medkd.data import load_dataset
from medkd.data.meta import DatasetMeta
from medkd.pipeline.demo import demo_request
from medkd.pipeline.leftovers import end_leftovers_of_dead_driver, record_driver
from medkd.pipeline.report import print_results_table, write_report
from medkd.pipeline.results import RESULTS_FILE, Results, StageRecord
from medkd.pipeline.tracking import Tracker
from medkd.registry.export import choose, export_models, selection_evidence
from medkd.registry.layout import METADATA_FILE, MODEL_FILE
from medkd.registry.metadata import ModelMetadata
from medkd.registry.teacher_selection import decision_lines, select_teachers_for
from medkd.search.context import distilled_teachers, search_context
from medkd.search.final import train_final
from medkd.search.run import SearchOutcome, run_search, search_fingerprint
from medkd.serve.app import deploy, serve_until_stopped, undeploy
from medkd.softlabels.compute import cache_teacher_logits, cache_view_logits, start_missing_logits
from medkd.softlabels.redis_server import ManagedRedisServer
from medkd.softlabels.store import SoftLabelCache
from medkd.spec.job import JobSpec
from medkd.students.distill import evaluate_logits
from medkd.teachers.train import train_teachers

STAGES = ("teachers", "soft_labels", "search", "final", "export", "serve", "report")


class PipelineError(RuntimeError):
    """A stage failed; everything computed before it is kept."""


def init_ray(spec: JobSpec) -> bool:
    """Connect to the configured cluster or start a local one; returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if spec.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=spec.ray.address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(
            address="local",
            num_cpus=spec.ray.num_cpus,
            num_gpus=spec.ray.num_gpus,
            include_dashboard=True,  # Train's cleanup needs the state API: without it an early-stopped trial never frees its CPU
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=False,
        )
    return True


class Pipeline:
    """Runs a job spec end to end."""

    def __init__(
        self,
        spec: JobSpec,
        *,
        progress: Progress | None = None,
        resume: bool = False,
        keep_serving: bool = False,
        serve: bool = True,
    ) -> None:
        self.spec = spec
        self.progress = progress or Progress()
        self.resume = resume
        self.keep_serving = keep_serving
        self.serve_enabled = serve and spec.serve.enabled
        self.output_dir = Path(spec.output_dir).resolve()
        self.results = Results(job=spec.name, job_fingerprint=spec.fingerprint())
        self.soft_label_tasks: dict[str, Any] = {}  # teacher name -> its soft labels' Ray task, started early

    # ------------------------------------------------------------------ helpers

    def _stage(self, index: int, name: str, fn: Callable[[], str]) -> None:
        with self.progress.stage(index, len(STAGES), name):
            started = time.perf_counter()
            try:
                status = fn()
            except Exception as error:
                self.results.stages[name] = StageRecord(
                    status="failed",
                    seconds=round(time.perf_counter() - started, 2),
                    error=f"{type(error).__name__}: {error}",
                )
                self._write_results()
                raise
            seconds = time.perf_counter() - started
            self.results.stages[name] = StageRecord(status=status, seconds=round(seconds, 2))
            self.progress.line(f"   {name}: {status} ({seconds:.1f}s)")

    def _write_results(self) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return self.results.write(self.output_dir)

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        import ray

        spec = self.spec
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "job.json").write_text(spec.model_dump_json(indent=2))
        left = end_leftovers_of_dead_driver(self.output_dir)
        if left is not None and left[1]:
            self.progress.line(
                f"ended {len(left[1])} process(es) left by the killed run of this job "
                f"(driver pid {left[0].pid}): {left[1]}"
            )
        self.progress.line(f"job {spec.name} ({spec.fingerprint()}) -> {self.output_dir}")
        self.tracker = Tracker.open(spec, self.output_dir)  # a store that cannot be used fails before any training
        if self.tracker is not None:
            self.results.tracking = {
                "uri": self.tracker.uri,
                "experiment": self.tracker.experiment,
                "experiment_id": self.tracker.experiment_id,
            }
            self.progress.line(f"tracking: MLflow experiment {self.tracker.experiment!r} at {self.tracker.uri}")

        dataset = load_dataset(spec.data)  # validated before any training starts
        self.dataset, self.meta = dataset, DatasetMeta.of(dataset)
        summary = dataset.summary()
        self.results.dataset = {
            "name": dataset.name,
            "fingerprint": dataset.fingerprint,
            "task": dataset.task,
            "multilabel": dataset.multilabel,
            "image_size": list(dataset.image_size),
            "class_names": list(dataset.class_names),
            **summary,
        }
        sizes = {k: len(v.images) for k, v in dataset.splits.items()}
        self.progress.line(f"dataset {dataset.name} ({dataset.fingerprint}): {sizes}, {dataset.num_classes} classes")

        with ExitStack() as stack:
            stack.callback(self.progress.close)  # last: the live bars stay on screen as last drawn
            if spec.cache.redis_url is None:
                server = ManagedRedisServer().start()
                stack.callback(server.stop)
                cache_url = server.url
                self.progress.line(f"soft-label cache: managed redis-server on 127.0.0.1:{server.port}")
            else:
                cache_url = spec.cache.redis_url
                self.progress.line("soft-label cache: " + cache_url.split("@")[-1])
            self.cache = SoftLabelCache(cache_url, namespace=spec.cache.namespace, password_env=spec.cache.password_env)
            self.cache_url = cache_url

            started_ray = init_ray(spec)
            if started_ray:
                stack.callback(ray.shutdown)
            # The session of the local cluster this driver started (not one it joined): what a
            # killed driver leaves behind.
            local = started_ray and not (spec.ray.address or os.environ.get("RAY_ADDRESS"))
            node = getattr(ray._private.worker, "_global_node", None) if local else None
            record_driver(self.output_dir, node.get_session_dir_path() if node is not None else None)
            self.storage_path = spec.ray.storage_path or str(self.output_dir / "ray")
            resources = ray.cluster_resources()
            self.progress.line(f"ray: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU")
            events = RemoteEvents(self.progress)
            stack.callback(events.close)
            self.events = events.queue
            self.data_ref = ray.put({name: (s.images, s.labels) for name, s in dataset.splits.items()})

            self._stage(1, "teachers", self._teachers)
            self._stage(2, "soft_labels", self._soft_labels)
            self._stage(3, "search", self._search)
            self._stage(4, "final", self._final)
            self._stage(5, "export", self._export)
            self._stage(6, "serve", self._serve)
            self._stage(7, "report", self._report)
            self._write_results()
            if self.keep_serving and self.serve_enabled:
                self._serve_until_interrupted()
        return self.results.as_dict()

    def _serve_until_interrupted(self) -> None:
        self.progress.line(f"serving at {self.results.serve['url']} — Ctrl-C or SIGTERM to stop")
        # Ctrl-C and SIGTERM alike: drain in-flight requests and undeploy; the ExitStack of run()
        # then ends the Ray instance and the managed redis-server, so no process is left behind.
        serve_until_stopped()
        self.progress.line("endpoint stopped")

    # ------------------------------------------------------------------ stages

    def _teachers(self) -> str:
        self.teachers, status = train_teachers(
            self.spec,
            self.dataset,
            self.data_ref,
            output_dir=self.output_dir,
            storage_path=self.storage_path,
            progress=self.progress,
            events=self.events,
            on_ready=self._start_soft_labels,
        )
        self.results.teachers = [
            {
                "name": t.name,
                "model": t.model,
                "family": t.family,
                "params": t.params,
                "fingerprint": t.fingerprint,
                "checkpoint": t.checkpoint,
                "epochs_run": t.epochs_run,
                "best_epoch": t.best_epoch,
                "train_seconds": round(t.train_seconds, 1),
                "status": status[t.name],
                "history": t.history,
            }
            for t in self.teachers
        ]
        return "ran" if any(s == "ran" for s in status.values()) else "skipped"

    def _start_soft_labels(self, teacher: Any) -> None:
        """Start a ready teacher's soft labels while slower teachers still train (stage 2 collects them)."""
        try:
            self.soft_label_tasks[teacher.name] = start_missing_logits(
                self.cache,
                teacher,
                dataset_fp=self.dataset.fingerprint,
                meta=self.meta,
                data_ref=self.data_ref,
                progress=self.progress,
            )
        except Exception as error:  # the cache is checked again, with a clear error, in stage 2
            self.progress.line(f"  soft labels {teacher.name}: not started early ({type(error).__name__}: {error})")

    def _soft_labels(self) -> str:
        spec = self.spec
        options = {"encoding": spec.cache.encoding, "compression": spec.cache.compression, "topk": spec.cache.topk}
        hits_before, misses_before = self._cache_counters()
        report = cache_teacher_logits(
            self.cache,
            self.teachers,
            dataset_fp=self.dataset.fingerprint,
            meta=self.meta,
            data_ref=self.data_ref,
            cache_options=options,
            progress=self.progress,
            started_tasks=self.soft_label_tasks,
        )
        # Teacher quality on val and test comes from the cached logits: no teacher re-runs.

        logits = {
            t.name: {s: self.cache.fetch(t.fingerprint, self.dataset.fingerprint, s) for s in ("val", "test")}
            for t in self.teachers
        }
        for entry in self.results.teachers:
            for split in ("val", "test"):
                entry[f"{split}_metrics"] = evaluate_logits(
                    logits[entry["name"]][split], self.dataset.splits[split].labels, self.meta
                )
        ensemble = {}
        for split in ("val", "test"):
            stacked = [logits[t.name][split] for t in self.teachers]
            if self.meta.task == "segmentation":
                probs = ensemble_probabilities(stacked)  # mean of per-pixel softmax over teachers
                ensemble[split] = evaluate_logits(
                    np.log(np.clip(probs, 1e-8, 1.0)), self.dataset.splits[split].labels, self.meta
                )
            else:
                probs = ensemble_probabilities(stacked, multilabel=self.meta.multilabel)

                ensemble[split] = classification_metrics(
                    probs, self.dataset.splits[split].labels, multilabel=self.meta.multilabel
                )
        self.results.ensemble = {f"{s}_metrics": m for s, m in ensemble.items()}
        if self.meta.task != "segmentation" and len(self.teachers) > 1:
            # Evidence for teachers[i].distill and search.teacher_selection, so on val only.
            self.results.ensemble["leave_one_out"] = {
                "split": "val",
                **leave_one_out(
                    {t.name: logits[t.name]["val"] for t in self.teachers},
                    self.dataset.splits["val"].labels,
                    multilabel=self.meta.multilabel,
                ),
            }
        spec = self._select_teachers({t.name: logits[t.name]["val"] for t in self.teachers})
        distilled = set(self.results.ensemble["distilled"])
        views = None
        if spec.cache.views:
            views = cache_view_logits(
                self.cache,
                [t for t in self.teachers if t.name in distilled],  # only the soft labels students read
                dataset_fp=self.dataset.fingerprint,
                meta=self.meta,
                data_ref=self.data_ref,
                num_train=len(self.dataset.splits["train"].images),
                views=spec.cache.views,
                augment=spec.search.augment,
                seed=spec.seed,
                cache_options=options,
                progress=self.progress,
            )
        hits_after, misses_after = self._cache_counters()
        self.results.soft_labels = {
            "namespace": spec.cache.namespace,
            "encoding": spec.cache.encoding,
            "teachers": report,
            "bytes": sum(info["bytes"] for r in report.values() for info in r["splits"].values()),
            "hits": sum(1 for r in report.values() for info in r["splits"].values() if info["hit"]),
            "misses": sum(1 for r in report.values() for info in r["splits"].values() if not info["hit"]),
            "cache_reads": {"hits": hits_after - hits_before, "misses": misses_after - misses_before},
            "views": views,
        }
        ran = any(r["status"] == "ran" for r in report.values()) or bool(views and views["computed"])
        if self.tracker is not None:  # here, where the teachers' val/test metrics are known
            self.tracker.log_teachers(self.results.teachers, self.spec)
        return "ran" if ran else "skipped"

    def _select_teachers(self, val_logits: dict[str, np.ndarray]) -> JobSpec:
        """``search.teacher_selection`` on the cached val logits: the teachers it drops get ``distill: false``
        in ``self.spec`` (so the search, its fingerprint and the final training follow); returns that spec."""
        selection = select_teachers_for(
            self.spec, val_logits, self.dataset.splits["val"].labels, multilabel=self.meta.multilabel
        )
        for line in decision_lines(selection):
            self.progress.line(f"  {line}")
        self.results.ensemble["distilled"] = selection.kept
        self.results.ensemble["teacher_selection"] = selection.model_dump(mode="json")
        if selection.dropped:
            teachers = [
                t.model_copy(update={"distill": False}) if t.name in selection.dropped else t
                for t in self.spec.teachers
            ]
            self.spec = self.spec.model_copy(update={"teachers": teachers})
        return self.spec

    def _cache_counters(self) -> tuple[int, int]:
        stats = self.cache.stats()
        return int(stats.get("hits", 0)), int(stats.get("misses", 0))

    def _search(self) -> str:
        teacher_fps, distilled = distilled_teachers(self.spec, [t.fingerprint for t in self.teachers], self.teachers)
        search_fp = search_fingerprint(self.spec, teacher_fps, self.dataset.fingerprint)
        outcome_path = self.output_dir / "search" / f"{search_fp}.json"
        status = "skipped"
        if outcome_path.is_file():
            self.outcome = SearchOutcome.model_validate_json(outcome_path.read_text())
            self.progress.line(f"  search {search_fp}: skipped, {len(self.outcome.trials)} trials found")
        else:
            self.outcome = run_search(
                self.spec,
                meta=self.meta,
                data_ref=self.data_ref,
                teacher_fps=teacher_fps,
                dataset_fp=self.dataset.fingerprint,
                cache_url=self.cache_url,
                storage_path=self.storage_path,
                progress=self.progress,
                events=self.events,
                resume=self.resume,
                views=self.results.soft_labels.get("views"),
                teachers=distilled,
                callbacks=[self.tracker.search_callback(search_fp)] if self.tracker is not None else None,
            )
            if any(t.final for t in self.outcome.trials):
                outcome_path.parent.mkdir(parents=True, exist_ok=True)
                outcome_path.write_text(self.outcome.model_dump_json(indent=2))
            status = "ran"
        self.results.search = {
            "fingerprint": self.outcome.fingerprint,
            "experiment_path": self.outcome.experiment_path,
            "objectives": self.outcome.objectives,
            "pareto": self.outcome.pareto,
        }
        self.results.trials = [t.model_dump() for t in self.outcome.trials]
        return status

    def _final(self) -> str:
        self.final = None
        if not self.spec.search.final_training:
            return "skipped"
        context = search_context(
            self.spec,
            meta=self.meta,
            data_ref=self.data_ref,
            teacher_fps=[t.fingerprint for t in self.teachers],
            dataset_fp=self.dataset.fingerprint,
            cache_url=self.cache_url,
            events=self.events,
            views=self.results.soft_labels.get("views"),
            teachers=self.teachers,
        )
        self.final, status = train_final(
            self.spec,
            self.outcome,
            choose(self.outcome, self.spec.export.select, selection_evidence(self.spec, self.dataset, self.meta)),
            context=context,
            output_dir=self.output_dir,
            progress=self.progress,
        )
        self.results.final = self.final.model_dump()
        return status

    def _export(self) -> str:
        exported = export_models(
            self.spec,
            self.outcome,
            dataset=self.dataset,
            meta=self.meta,
            teachers=self.teachers,
            soft_labels=self.results.soft_labels["teachers"],
            output_dir=self.output_dir,
            progress=self.progress,
            final=self.final,
        )
        selected = exported["selected"]
        self.model_dir = Path(selected["path"])
        metadata = ModelMetadata.model_validate_json((self.model_dir / METADATA_FILE).read_text())
        dump = metadata.model_dump(mode="json")
        self.results.best = {
            "model_id": selected["model_id"],
            "trial_id": selected["trial_id"],
            "config": metadata.config,
            "params": metadata.metrics.params,
            "onnx_path": str(self.model_dir / MODEL_FILE),
            "size_bytes": metadata.metrics.model_bytes,
            "fp32_bytes": metadata.metrics.fp32_bytes,
            "latency_ms": metadata.metrics.latency_ms,
            "val_metrics": metadata.metrics.val,
            "test_metrics": metadata.metrics.test,
            "parity": dump["parity"],
            "final_training": dump["final_training"],
            "calibration": dump["calibration"],
            "operating_points": dump["operating_points"],
            "operating_point": metadata.operating_point,
        }
        self.results.selection = exported["selection"]
        if self.results.final is not None and "final" in exported["selection"]:
            # The final training is served only when val does not say it is worse (registry.selection.compare_final).
            self.results.final["served"] = exported["selection"]["final"]["served"] == "final"
        self.results.pareto_models = exported["pareto"]
        if self.tracker is not None:
            model_ids = {e["trial_id"]: e["model_id"] for e in exported["pareto"]}
            self.tracker.log_trials(self.outcome, selected["trial_id"], model_ids)
            self.tracker.log_students(exported["pareto"], selected["model_id"])
        return "ran"

    def _serve(self) -> str:
        if not self.serve_enabled:
            self.results.serve = {"enabled": False}
            return "skipped"

        url = deploy(self.model_dir, self.spec.serve)
        self.progress.line(f"  serving {self.results.best['model_id']} at {url}")
        try:
            answer = demo_request(url, self.dataset, self.output_dir)
            truth = "" if answer["true_label"] is None else f", true label {answer['true_label']}"
            self.progress.line(f"  demo request (test image 0{truth}): {answer['answer']}")
            self.results.serve = {
                "url": url,
                "replicas": {"min": self.spec.serve.min_replicas, "max": self.spec.serve.max_replicas},
                "demo": answer,
                "kept_running": self.keep_serving,
            }
        finally:
            if not self.keep_serving:
                undeploy()
        return "ran"

    def _report(self) -> str:
        self._write_results()
        path = write_report(self.results.as_dict(), self.output_dir)
        self.results.report = str(path)
        self._write_results()
        print_results_table(self.results.as_dict(), self.progress)
        self.progress.line(f"results: {self.output_dir / RESULTS_FILE}")
        self.progress.line(f"report:  {path}")
        return "ran"


def run_job(spec: JobSpec, **kwargs: Any) -> dict[str, Any]:
    return Pipeline(spec, **kwargs).run()
