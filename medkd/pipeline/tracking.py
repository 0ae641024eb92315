"""Optional MLflow tracking of a pipeline run (the job spec's ``tracking:`` section).

Three kinds of run go into one experiment, told apart by the tag ``medkd.kind``:

- ``teacher``: one per teacher fingerprint; its spec as params, the per-epoch training history as
  metric steps, the kept checkpoint's val/test metrics, the checkpoint path as a tag.
- ``trial``: one per search trial, made by Ray Tune's ``MLflowLoggerCallback`` while the search
  runs (sampled params, every reported result); after the export each gets its status, Pareto
  rank and whether it was selected. A trial whose run is missing (the search ran with tracking
  off, then was skipped as already done) is logged from the search outcome instead.
- ``student``: one per exported registry entry; registry id, metrics, ONNX path, size, latency,
  the lineage (teacher fingerprints, search trial, job) as tags and ``metadata.json`` as artifact.

Logging is idempotent: a teacher or student that already has its run (same fingerprint or
registry id) is not logged again, so re-running a job that skipped its stages adds nothing but
what was missing and keeps the ``selected`` tags current.

MLflow is an optional dependency (``pip install 'medkd[tracking]'``): it is imported only when
tracking is on.

Examples:
    >>> tracker = Tracker.open(spec, output_dir)  # doctest: +SKIP
    >>> tracker.log_teachers(results["teachers"], spec)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from medkd.registry.layout import METADATA_FILE, MODEL_FILE
from medkd.registry.metadata import ModelMetadata
from medkd.search.outcome import SearchOutcome
from medkd.spec.job import JobSpec

TRACKING_DIR = "mlruns"
KIND = "medkd.kind"
#: Registry files up to this size are copied into the run as artifacts (metadata.json always is).
MAX_ARTIFACT_BYTES = 2 * 1024 * 1024
_PARAM_VALUE_CHARS = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """Tracking is on but MLflow cannot be used (not installed, store unreachable); names the field."""


def default_tracking_uri(output_dir: Path) -> str:
    """``sqlite:///<output_dir>/mlruns/mlflow.db``: the local store when ``tracking.uri`` is null.

    Examples:
        >>> default_tracking_uri(Path("/runs/job"))
        'sqlite:////runs/job/mlruns/mlflow.db'
    """
    return f"sqlite:///{Path(output_dir).resolve() / TRACKING_DIR / 'mlflow.db'}"


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a/b`` keys (MLflow's and Tune's convention).

    Examples:
        >>> flatten({"lr": 0.1, "augment": {"flip": 0.5}})
        {'lr': 0.1, 'augment/flip': 0.5}
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def numeric(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers (and booleans as 0/1) of a flat or nested dict, for MLflow metrics.

    Examples:
        >>> numeric({"auc": 0.9, "node": "10.0.0.1", "per_class": [1, 2], "ok": True}, "val/")
        {'val/auc': 0.9, 'val/ok': 1.0}
    """
    return {
        f"{prefix}{key}": float(value)
        for key, value in flatten(values).items()
        if isinstance(value, (int, float)) and math.isfinite(float(value))
    }


class Tracker:
    """Logs a run's teachers, trials and exported students to one MLflow experiment.

    Args:
        client: an ``mlflow.MlflowClient`` on the tracking URI.
        uri: the tracking URI.
        experiment: the experiment's name.
        experiment_id: its id.
        job: the job's name and fingerprint, set as tags on every run.
        output_dir: the run's output folder (tagged on students, to keep one ``selected`` per run).
    """

    def __init__(
        self, client: Any, *, uri: str, experiment: str, experiment_id: str, job: tuple[str, str], output_dir: Path
    ) -> None:
        self.client, self.uri, self.experiment, self.experiment_id = client, uri, experiment, experiment_id
        self.job_tags = {"medkd.job": job[0], "medkd.job_fingerprint": job[1]}
        self.output_dir = Path(output_dir)

    @classmethod
    def open(cls, spec: JobSpec, output_dir: Path) -> Tracker | None:
        """The tracker for ``spec`` (None when ``tracking.enabled`` is false); the experiment is
        created when missing, so a bad store fails here, before anything is trained.

        Raises:
            TrackingError: MLflow is not installed, or the store at ``tracking.uri`` cannot be used.
        """
        tracking = spec.tracking
        if not tracking.enabled:
            return None
        try:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException
        except ImportError as error:
            raise TrackingError(
                f"tracking.enabled: MLflow is not installed ({error}); pip install 'medkd[tracking]'"
            ) from None
        output_dir = Path(output_dir).resolve()
        uri = tracking.uri or default_tracking_uri(output_dir)
        experiment = tracking.experiment or spec.name
        where = "tracking.uri" if tracking.uri else f"tracking (default store {uri})"
        try:
            if tracking.uri is None:
                (output_dir / TRACKING_DIR).mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"tracking.experiment: {experiment!r} is deleted in {uri}; restore it "
                    "(mlflow experiments restore) or name another experiment"
                )
            if found is not None:
                experiment_id = found.experiment_id
            else:
                artifacts = (output_dir / TRACKING_DIR / "artifacts").as_uri() if tracking.uri is None else None
                experiment_id = client.create_experiment(experiment, artifact_location=artifacts)
        except TrackingError:
            raise
        except MlflowException as error:
            raise TrackingError(f"{where}: MLflow cannot use {uri!r}: {error.message}") from None
        except Exception as error:  # e.g. SQLAlchemy's OperationalError for a database it cannot open
            raise TrackingError(f"{where}: MLflow cannot use {uri!r}: {type(error).__name__}: {error}") from error
        return cls(
            client,
            uri=uri,
            experiment=experiment,
            experiment_id=experiment_id,
            job=(spec.name, spec.fingerprint()),
            output_dir=output_dir,
        )

    # ------------------------------------------------------------------ helpers

    def _runs(self, kind: str, **tags: str) -> list[Any]:
        conditions = [f"tags.`{KIND}` = '{kind}'"] + [f"tags.`medkd.{k}` = '{v}'" for k, v in tags.items()]
        return self.client.search_runs([self.experiment_id], filter_string=" and ".join(conditions), max_results=5000)

    def _new_run(
        self,
        kind: str,
        name: str,
        *,
        params: dict[str, Any],
        metrics: dict[str, float],
        tags: dict[str, str],
        steps: dict[int, dict[str, float]] | None = None,
    ) -> str:
        from mlflow.entities import Metric, Param

        run = self.client.create_run(self.experiment_id, run_name=name, tags={KIND: kind, **self.job_tags, **tags})
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        entries = [Metric(k, v, now, 0) for k, v in metrics.items()]
        entries += [Metric(k, v, now, step) for step, values in (steps or {}).items() for k, v in values.items()]
        params_list = [Param(k, str(v)[:_PARAM_VALUE_CHARS]) for k, v in flatten(params).items()]
        # MLflow takes at most 1000 metrics and 100 params per batch.
        for start in range(0, len(entries), 1000):
            self.client.log_batch(run_id, metrics=entries[start : start + 1000])
        for start in range(0, len(params_list), 100):
            self.client.log_batch(run_id, params=params_list[start : start + 100])
        return run_id

    def _set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # ------------------------------------------------------------------ teachers

    def log_teachers(self, teachers: list[dict[str, Any]], spec: JobSpec) -> int:
        """One run per teacher (``results["teachers"]`` after the soft-label stage); returns how many were new.

        Args:
            teachers: the teachers' records (name, model, fingerprint, checkpoint, history, val/test metrics).
            spec: the job spec, whose teacher entries are logged as params.
        """
        specs = {t.name: t for t in spec.teachers}
        new = 0
        for teacher in teachers:
            if self._runs("teacher", fingerprint=teacher["fingerprint"]):
                continue
            metrics = {
                "params": float(teacher["params"]),
                "epochs_run": float(teacher["epochs_run"]),
                "best_epoch": float(teacher["best_epoch"]),
                "train_seconds": float(teacher["train_seconds"]),
                **numeric(teacher.get("val_metrics") or {}, "val/"),
                **numeric(teacher.get("test_metrics") or {}, "test/"),
            }
            history = {
                int(record["epoch"]): {k: v for k, v in numeric(record).items() if k != "epoch"}
                for record in teacher.get("history") or []
            }
            run_id = self._new_run(
                "teacher",
                f"teacher {teacher['name']}",
                params=specs[teacher["name"]].model_dump(mode="json"),
                metrics=metrics,
                steps=history,
                tags={
                    "medkd.fingerprint": teacher["fingerprint"],
                    "medkd.teacher": teacher["name"],
                    "medkd.model": teacher["model"],
                    "medkd.family": teacher["family"],
                    "medkd.checkpoint": teacher["checkpoint"],
                    "medkd.distill": str(specs[teacher["name"]].distill).lower(),
                },
            )
            self.client.set_terminated(run_id)
            new += 1
        return new

    # ------------------------------------------------------------------ trials

    def search_callback(self, search_fp: str) -> Any:
        """Ray Tune's ``MLflowLoggerCallback`` for the search ``search_fp``: a run per trial, made and
        filled in the driver while the trials report."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION

        class BatchedMLflowLoggerCallback(MLflowLoggerCallback):
            """The stock callback logs a result one metric per request (0.7 s a result on SQLite on a
            loaded 2-core machine, blocking Tune's driver loop); this logs it as one batch."""

            def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
                step = result.get(TIMESTEPS_TOTAL) or result[TRAINING_ITERATION]
                now = int(time.time() * 1000)
                metrics = [Metric(k, v, now, step) for k, v in numeric(result).items()]
                client = MlflowClient(tracking_uri=self.tracking_uri)  # per call, as the stock callback does
                for start in range(0, len(metrics), 1000):
                    client.log_batch(self._trial_runs[trial], metrics=metrics[start : start + 1000])

        return BatchedMLflowLoggerCallback(
            tracking_uri=self.uri,
            experiment_name=self.experiment,
            tags={KIND: "trial", **self.job_tags, "medkd.search_fingerprint": search_fp},
        )

    def log_trials(self, outcome: SearchOutcome, selected_trial: str, model_ids: dict[str, str]) -> int:
        """Status, Pareto rank and selection on every trial's run; returns how many runs had to be made here.

        Args:
            outcome: the search outcome (its trials and Pareto front, best first).
            selected_trial: the trial whose student is served.
            model_ids: registry id of each exported trial, by trial id.
        """
        runs = sorted(self._runs("trial", search_fingerprint=outcome.fingerprint), key=lambda r: r.info.start_time or 0)
        by_trial: dict[str, Any] = {}
        for trial in outcome.trials:
            for run in runs:  # the latest run of a trial wins (a resumed search may have made two)
                tags = run.data.tags
                # Tune names a trial's run <trainable>_<trial_id>; runs made here carry medkd.trial_id.
                if tags.get("medkd.trial_id") == trial.trial_id or tags.get("trial_name", "").endswith(
                    f"_{trial.trial_id}"
                ):
                    by_trial[trial.trial_id] = run
        made = 0
        for trial in outcome.trials:
            run = by_trial.get(trial.trial_id)
            run_id = run.info.run_id if run is not None else None
            if run_id is None:
                run_id = self._new_run(
                    "trial",
                    f"trial {trial.trial_id}",
                    params=trial.config,
                    metrics=numeric(trial.metrics),
                    tags={"medkd.search_fingerprint": outcome.fingerprint, "medkd.logged_from": "search outcome"},
                )
                self.client.set_terminated(run_id, status="FAILED" if trial.status == "error" else "FINISHED")
                made += 1
            rank = outcome.pareto.index(trial.trial_id) if trial.trial_id in outcome.pareto else None
            tags = {
                "medkd.trial_id": trial.trial_id,
                "medkd.status": trial.status,
                "medkd.pareto": str(rank is not None).lower(),
                "medkd.pareto_rank": "" if rank is None else str(rank),
                "medkd.selected": str(trial.trial_id == selected_trial).lower(),
            }
            if trial.trial_id in model_ids:
                tags["medkd.model_id"] = model_ids[trial.trial_id]
            self._set_tags(run_id, tags)
            if rank is not None and (run is None or run.data.metrics.get("pareto_rank") != rank):
                self.client.log_metric(run_id, "pareto_rank", float(rank))  # once, not on every re-run
        return made

    # ------------------------------------------------------------------ students

    def log_students(self, exported: list[dict[str, Any]], selected_model: str) -> int:
        """One run per exported registry entry; returns how many were new. The ``selected`` tag is
        kept on the served entry only (among this output folder's students).

        Args:
            exported: the export's entries (``model_id``, ``pareto_rank``, ``trial_id``, ``path``).
            selected_model: the registry id that is served.
        """
        new = 0
        for entry in exported:
            existing = self._runs("student", model_id=entry["model_id"])
            if existing:
                self._set_tags(
                    existing[0].info.run_id, {"medkd.selected": str(entry["model_id"] == selected_model).lower()}
                )
                continue
            path = Path(entry["path"])
            metadata = ModelMetadata.model_validate_json((path / METADATA_FILE).read_text())
            model_metrics = metadata.metrics.model_dump() if metadata.metrics else {}
            onnx = path / MODEL_FILE
            tags = {
                "medkd.model_id": entry["model_id"],
                "medkd.registry_path": str(path),
                "medkd.onnx_path": str(onnx),
                "medkd.output_dir": str(self.output_dir),
                "medkd.selected": str(entry["model_id"] == selected_model).lower(),
                "medkd.trial_id": entry["trial_id"],
                "medkd.pareto_rank": "" if entry.get("pareto_rank") is None else str(entry["pareto_rank"]),
                "medkd.operating_point": metadata.operating_point,
            }
            if metadata.search is not None:
                tags["medkd.search_fingerprint"] = metadata.search.fingerprint
            if metadata.dataset:
                tags["medkd.dataset_fingerprint"] = str(metadata.dataset.get("fingerprint", ""))
            if metadata.final_training is not None:
                tags["medkd.final_training_fingerprint"] = metadata.final_training.fingerprint
            tags.update({f"medkd.teacher.{t.name}": t.fingerprint for t in metadata.teachers})
            metrics = {
                **numeric(model_metrics.get("val") or {}, "val/"),
                **numeric(model_metrics.get("test") or {}, "test/"),
                **numeric({k: v for k, v in model_metrics.items() if k not in ("val", "test")}),
                "onnx_bytes": float(onnx.stat().st_size) if onnx.is_file() else float("nan"),
            }
            if metadata.calibration is not None:
                metrics.update(numeric(metadata.calibration.model_dump(), "calibration/"))
            run_id = self._new_run(
                "student",
                entry["model_id"],
                params=metadata.config,
                metrics={k: v for k, v in metrics.items() if math.isfinite(v)},
                tags=tags,
            )
            self.client.log_artifact(run_id, str(path / METADATA_FILE))
            if onnx.is_file() and onnx.stat().st_size <= MAX_ARTIFACT_BYTES:
                self.client.log_artifact(run_id, str(onnx))
            self.client.set_terminated(run_id)
            new += 1
        for run in self._runs("student", selected="true", output_dir=str(self.output_dir)):
            if run.data.tags.get("medkd.model_id") != selected_model:
                self._set_tags(run.info.run_id, {"medkd.selected": "false"})
        return new
