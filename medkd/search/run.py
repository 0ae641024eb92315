"""Stage 3: Ray Tune + Optuna search over students, distillation and compression settings.

Each trial reads the teachers' logits from the soft-label cache (never runs a teacher),
distills a student, compresses and exports it, and reports the quality of the *compressed*
model next to its latency and size. Multi-objective searches use Optuna's multi-objective
sampler; ASHA stops weak trials early on the quality objective (the mean of val AUC and val
accuracy by default, see :func:`asha_metric`).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from medkd.core.devices import limit_cpu_threads, reserved_gpu_device
from medkd.core.fingerprint import fingerprint
from medkd.core.progress import Progress, send_event
from medkd.data.meta import DatasetMeta
from medkd.search.context import TrialContext, distilled_teachers, search_context
from medkd.search.ordering import longest_first_sampler, student_flops
from medkd.search.outcome import SearchOutcome, TrialRecord, collect_outcome, pareto_front  # noqa: F401  (re-exported)
from medkd.search.recipe import calibration_samples, teacher_logits_source, train_candidate, trial_augmentation
from medkd.search.space import define_space, teacher_prior, teacher_temperatures, trial_distill_config
from medkd.search.trial_checkpoint import EpochCheckpoints, die_if_a_test_asks, restored_training_state
from medkd.softlabels.store import SoftLabelCache
from medkd.spec.job import JobSpec
from medkd.students.candidate import apply_pruning
from medkd.students.compression import bytes_per_weight, count_nonzero_parameters, export_onnx, measure_latency
from medkd.students.distill import (
    build_student,
    quality_metric,
)
from medkd.students.losses.families import check_loss_space

QUALITY_METRICS = {"val_auc", "val_acc", "val_dice"}
#: What ASHA ranks on when the objectives hold several quality metrics (val AUC and val accuracy by default).
QUALITY_MEAN = "val_quality_mean"
#: A trial's training-state checkpoints kept on storage (and its final candidate among them).
KEPT_TRIAL_CHECKPOINTS = 3
#: Seconds between snapshots of the experiment state (Tune's ``TUNE_GLOBAL_CHECKPOINT_S``).
TRIAL_STATE_SNAPSHOT_S = 2


def asha_metric(objectives: list[Any]) -> tuple[str, str] | None:
    """The metric and mode ASHA stops trials on: the quality objective; with several quality objectives
    of mode max (``val_auc`` and ``val_acc`` by default), their mean, reported as ``val_quality_mean``
    (both lie in [0, 1], so neither dominates); None without a quality objective.

    Examples:
        >>> from medkd.spec.search import SearchSpec
        >>> asha_metric(SearchSpec().objectives)
        ('val_quality_mean', 'max')
        >>> asha_metric(SearchSpec(objectives=[{"metric": "val_dice", "mode": "max"}]).objectives)
        ('val_dice', 'max')
    """
    qualities = [o for o in objectives if o.metric in QUALITY_METRICS]
    if not qualities:
        return None
    if len(qualities) > 1 and all(o.mode == "max" for o in qualities):
        return QUALITY_MEAN, "max"
    return qualities[0].metric, qualities[0].mode


def quality_mean(record: dict[str, Any], qualities: list[str] | None) -> dict[str, float]:
    """``{QUALITY_MEAN: mean}`` of ``qualities`` in ``record`` (a missing or NaN one counts 0), or ``{}``.

    Examples:
        >>> quality_mean({"val_auc": 0.9, "val_acc": 0.8}, ["val_auc", "val_acc"])
        {'val_quality_mean': 0.85}
        >>> quality_mean({"val_auc": 0.9}, None)
        {}
    """
    if not qualities:
        return {}
    values = [record.get(name) for name in qualities]
    finite = [float(v) if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in values]
    return {QUALITY_MEAN: round(sum(finite) / len(finite), 12)}


class SearchInterrupted(RuntimeError):
    """The search stopped before all its trials finished (Ctrl-C, lost driver); resumable."""


def distill_trial(params: dict[str, Any], context: TrialContext) -> None:
    """Tune function trainable: distill, compress, export and report one student.

    Every epoch but the last is reported with a checkpoint of the training state; a retried or
    restored trial resumes from it and reports ``resumed_from_epoch`` (see ``trial_checkpoint``).
    """
    # A trial that holds a GPU distils on it; a declared GPU that is unusable stops it (no silent CPU).
    device = reserved_gpu_device("search.gpus_per_trial")
    resume = restored_training_state()
    resumed_from = {"resumed_from_epoch": resume.epoch if resume is not None else 0}
    limit_cpu_threads(context.cpus_per_trial)
    config = trial_distill_config(params, context)
    meta = context.meta
    data = ray.get(context.data_refs[0])
    train_x, _ = data["train"]
    teacher_logits, views = teacher_logits_source(context, train_x)
    probe_input = torch.from_numpy(calibration_samples(train_x, config.seed, 2))
    quality_key = f"val_{quality_metric(meta)}"
    trial_name = tune.get_context().get_trial_name()
    model = build_student(meta, config)

    estimates: dict[str, Any] = {}
    if context.needs_estimates:
        # Until the compressed model exists, report cost estimates of the architecture: Tune
        # requires every objective in every report, and ASHA may stop the trial before export.
        with tempfile.TemporaryDirectory() as directory:
            probe = apply_pruning(copy.deepcopy(model), config, probe_input)
            path = export_onnx(probe.eval(), probe_input, Path(directory) / "probe.onnx")
            params_count = int(count_nonzero_parameters(probe))
            estimates = {
                "latency_ms": float(measure_latency(path, (1, *train_x.shape[1:]), runs=10).median_ms),
                "params": params_count,
                "model_bytes": params_count * bytes_per_weight(config.quantize),
            }

    def on_epoch(record: dict[str, Any]) -> None:
        value = float(record.get(quality_key, float("nan")))
        send_event(
            context.events,
            {
                "kind": "trial_epoch",
                "trial": trial_name,
                "epoch": record["epoch"],
                "epochs": config.epochs,
                "metric": quality_key,
                "value": value,
            },
        )
        if record["epoch"] < config.epochs:
            # The last epoch is reported once, by the final (compressed, exported) result: an
            # intermediate report there would let ASHA stop a fully trained trial at its last rung
            # before it is exported.
            checkpoints.report(
                {
                    **estimates,
                    **record,
                    quality_key: value if math.isfinite(value) else 0.0,
                    **quality_mean(record, context.asha_qualities),
                    "final": False,
                    **resumed_from,
                }
            )
            die_if_a_test_asks(record["epoch"])

    checkpoints = EpochCheckpoints()
    with tempfile.TemporaryDirectory() as directory:
        metrics = train_candidate(
            model,
            config,
            meta=meta,
            train=data["train"],
            val=data["val"],
            teacher_logits=teacher_logits,
            augment=trial_augmentation(context.augment, context.meta, config.seed),
            directory=Path(directory),
            latency_runs=context.latency_runs,
            on_epoch=on_epoch,
            views=views,
            device=device,
            resume=resume,
            on_state=checkpoints.save,
        )
        checkpoints.discard()
        if not math.isfinite(metrics.get(quality_key, float("nan"))):
            metrics[quality_key] = 0.0
        tune.report(
            {
                **metrics,
                **quality_mean(metrics, context.asha_qualities),
                "epoch": config.epochs,
                "final": True,
                **resumed_from,
            },
            checkpoint=tune.Checkpoint.from_directory(directory),
        )


# --------------------------------------------------------------------------- progress


#: The running driver's Progress. Tune pickles its callbacks into the experiment state, so a search
#: restored by a new driver (``--resume``) gets back a TrialProgress of the old one; it reports here.
_driver_progress: Progress | None = None


class TrialProgress(tune.Callback):
    """Shows trials as they start and end: the running count and the best so far (runs in the driver)."""

    def __init__(self, progress: Progress, total: int, metrics: list[str], modes: list[str] | None = None) -> None:
        self._progress, self.total, self.metrics, self.modes = progress, total, metrics, modes or ["max"]
        progress.trials_started(total, metric=metrics[0] if metrics else None, mode=self.modes[0])

    def __getstate__(self) -> dict[str, Any]:
        return {"total": self.total, "metrics": self.metrics, "modes": self.modes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._progress = None

    @property
    def progress(self) -> Progress:
        return self._progress or _driver_progress or Progress(quiet=True)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.progress.trial_started(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        shown = {m: result[m] for m in self.metrics if isinstance(result.get(m), (int, float))}
        self.progress.trial_finished(trial.trial_id, "done" if result.get("final") else "stopped", shown)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.progress.trial_finished(trial.trial_id, "failed", {})
        self.progress.line(f"    trial {trial.trial_id} failed: see {trial.local_path}")


def _drop_superseded_checkpoints(grid: Any) -> None:
    """Once every trial has ended, each needs only its latest checkpoint (the candidate, or where
    ASHA stopped it); the earlier training states kept for a restore go."""
    for result in grid:
        if result.checkpoint is None or not result.path or "://" in result.path:
            continue
        latest = Path(result.checkpoint.path).name
        for directory in Path(result.path).glob("checkpoint_*"):
            if directory.name != latest:
                shutil.rmtree(directory, ignore_errors=True)


def _trial_done(result: Any) -> bool:
    """Whether a trial of the grid ended for good: it finished or its scheduler stopped it (its last
    result says ``done``), or it failed. A trial still running when the search was interrupted
    (Ctrl-C) is TERMINATED too, but not done: the saved state resumes it."""
    return result.error is not None or bool((result.metrics or {}).get("done"))


def _keep_trial_checkpoints_restorable() -> None:
    """Tune deletes a trial's older checkpoints as it registers a new one, while the experiment
    state it snapshots every ``TUNE_GLOBAL_CHECKPOINT_S`` (10 s or more by default) may still name
    an older one; a driver killed in between left a trial that could not be restored. With the
    snapshot at most ``TRIAL_STATE_SNAPSHOT_S`` old and the last ``KEPT_TRIAL_CHECKPOINTS`` kept,
    the checkpoint it names still exists unless a trial checkpoints that often within it."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(TRIAL_STATE_SNAPSHOT_S))


# --------------------------------------------------------------------------- the stage


def search_fingerprint(spec: JobSpec, teacher_fps: list[str], dataset_fp: str) -> str:
    parts = ["search", spec.search.fingerprint_fields(), teacher_fps, dataset_fp, spec.seed, spec.export.latency_runs]
    if spec.cache.views:
        # Students train on the cached views: another search. Appended only when on, so the
        # fingerprints of existing view-less searches do not change.
        parts.append({"views": spec.cache.views})
    return fingerprint(*parts)


def run_search(
    spec: JobSpec,
    *,
    meta: DatasetMeta,
    data_ref: Any,
    teacher_fps: list[str],
    dataset_fp: str,
    cache_url: str,
    storage_path: str,
    progress: Progress,
    events: Any = None,
    resume: bool = False,
    views: dict[str, Any] | None = None,
    teachers: list[Any] | None = None,
    callbacks: list[tune.Callback] | None = None,
) -> SearchOutcome:
    """Run the search's trials on Ray Tune and collect their outcome.

    Args:
        callbacks: more Tune callbacks for the trials (e.g. MLflow logging), beside medkd's progress lines.
    """
    search = spec.search
    # Only the teachers students learn from: the fingerprint, the prior and the space follow them.
    teacher_fps, teachers = distilled_teachers(spec, teacher_fps, teachers)
    search_fp = search_fingerprint(spec, teacher_fps, dataset_fp)
    name = f"search-{search_fp}"
    experiment_path = (
        str(Path(storage_path) / name) if "://" not in storage_path else f"{storage_path.rstrip('/')}/{name}"
    )
    metrics = [o.metric for o in search.objectives]
    modes = [o.mode for o in search.objectives]
    ranked_on = asha_metric(search.objectives)
    use_asha = search.scheduler == "asha" and ranked_on is not None
    context = search_context(
        spec,
        meta=meta,
        data_ref=data_ref,
        teacher_fps=teacher_fps,
        dataset_fp=dataset_fp,
        cache_url=cache_url,
        events=events,
        views=views,
        teachers=teachers,
    )
    context.needs_estimates = any(m not in QUALITY_METRICS for m in metrics)
    if ranked_on is not None and ranked_on[0] == QUALITY_MEAN:
        context.asha_qualities = [m for m in metrics if m in QUALITY_METRICS]
    check_loss_space(
        search.space.loss,
        search.space.logit_standardization,
        task=meta.task,
        multilabel=meta.multilabel,
        num_classes=meta.num_classes,
    )
    if len(teacher_fps) > 1 or search.calibrate_teachers:
        cache = SoftLabelCache(cache_url, namespace=spec.cache.namespace, password_env=spec.cache.password_env)
        val_labels = ray.get(data_ref)["val"][1]
        val_logits = [cache.fetch(fp, dataset_fp, "val") for fp in teacher_fps]
        if search.calibrate_teachers:
            context.teacher_temperatures = teacher_temperatures(val_logits, val_labels, meta)
            progress.line(
                "  teacher soft labels calibrated on val, temperatures: "
                + ", ".join(f"{t:.3f}" for t in context.teacher_temperatures)
            )
            val_logits = [logits / t for logits, t in zip(val_logits, context.teacher_temperatures)]
        if len(teacher_fps) > 1:
            context.teacher_prior = teacher_prior(val_logits, val_labels, meta)
            progress.line(
                "  teacher prior (confidence aggregation, from val skill): "
                + ", ".join(f"{w:.2f}" for w in context.teacher_prior)
            )
    trainable = tune.with_resources(
        tune.with_parameters(distill_trial, context=context),
        search.trial_resources(),
    )
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # medkd prints its own trial lines
    restorable = "://" not in experiment_path and tune.Tuner.can_restore(experiment_path)
    if resume and restorable:
        progress.line(f"  resuming search {name} from {experiment_path}")
        progress.trials_started(search.num_trials, metric=metrics[0], mode=modes[0])
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if restorable:
            aside = f"{experiment_path}.interrupted-{int(time.time())}"
            progress.line(
                f"  an interrupted search exists (use --resume to continue it); starting over, old one kept at {aside}"
            )
            os.rename(experiment_path, aside)
        space = define_space(search.space, len(teacher_fps))
        sampling: dict[str, Any] = {"seed": context.seed}
        if search.num_trials > search.max_concurrent:
            # The same configurations as the sampler alone would draw; the start-up ones run longest first.
            sampler, first = longest_first_sampler(
                space,
                ["maximize" if mode == "max" else "minimize" for mode in modes],
                search.num_trials,
                context.seed,
                cost=lambda params: student_flops(meta, params, context),
            )
            sampling = {"sampler": sampler, "points_to_evaluate": first}
        searcher = OptunaSearch(
            space=space,
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0],
            **sampling,
        )
        scheduler = None
        if use_asha:
            scheduler = ASHAScheduler(
                metric=ranked_on[0],
                mode=ranked_on[1],
                time_attr="training_iteration",
                max_t=search.epochs,
                grace_period=min(search.grace_period, search.epochs),
            )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=search.num_trials,
                max_concurrent_trials=search.max_concurrent,
                # A trial's process costs ~10 CPU-s to start (worker, imports, the trainable): the
                # next trial with the same resources runs in it. Trials share no state (each seeds
                # itself and opens its own cache client); a failed trial's process is never reused.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                verbose=0,
                callbacks=[TrialProgress(progress, search.num_trials, metrics, modes), *(callbacks or [])],
                failure_config=tune.FailureConfig(max_failures=1),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=KEPT_TRIAL_CHECKPOINTS),
            ),
        )
    progress.line(
        f"  {search.num_trials} trials, {search.max_concurrent} at a time"
        + (", the randomly drawn start-up trials longest first" if search.num_trials > search.max_concurrent else "")
        + ", objectives "
        + ", ".join(f"{m} ({mode})" for m, mode in zip(metrics, modes))
        + (f", ASHA early stopping on {ranked_on[0]}" if use_asha else "")
    )
    global _driver_progress
    _driver_progress = progress
    _keep_trial_checkpoints_restorable()
    try:
        grid = tuner.fit()
    finally:
        _driver_progress = None
    done = sum(1 for result in grid if _trial_done(result))
    if done == search.num_trials:
        _drop_superseded_checkpoints(grid)
    if done < search.num_trials:
        raise SearchInterrupted(
            f"search {name} interrupted after {done}/{search.num_trials} trials; its state is saved in "
            f"{experiment_path} — run the same command with --resume to continue it"
        )
    return collect_outcome(
        grid,
        search_fp=search_fp,
        experiment_path=experiment_path,
        metrics=metrics,
        modes=modes,
        progress=progress,
        context=context,
    )
