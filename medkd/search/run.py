"""Stage 3: Ray Tune + Optuna search over students, distillation and compression settings.

Each trial reads the teachers' logits from the soft-label cache (never runs a teacher),
distills a student, compresses and exports it, and reports the quality of the *compressed*
model next to its latency and size. Multi-objective searches use Optuna's multi-objective
sampler; ASHA stops weak trials early on the quality objective.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from medkd.core.fingerprint import fingerprint
from medkd.core.progress import Progress, send_event
from medkd.softlabels.manifest import CacheIntegrityError, CacheMissError
from medkd.softlabels.store import SoftLabelCache
from medkd.students.candidate import CANDIDATE_FILE, apply_pruning, export_candidate
from medkd.students.compression import count_nonzero_parameters, export_onnx, measure_latency
from medkd.students.distill import (
    CachedViews,
    DistillConfig,
    TeacherLogitsFn,
    array_teacher_logits,
    build_student,
    distill,
    evaluate_logits,
    quality_metric,
)
from medkd.data.meta import DatasetMeta

QUALITY_METRICS = {"val_auc", "val_acc", "val_dice"}
FINETUNE_AFTER_CHANNEL_PRUNING = 0.2  # fraction of the training epochs
CALIBRATION_SAMPLES = 128  # training images that calibrate INT8 activation ranges


class SearchInterrupted(RuntimeError):
    """The search stopped before all its trials finished (Ctrl-C, lost driver); resumable."""


class TrialRecord(BaseModel):
    trial_id: str
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint: str | None
    final: bool
    pareto: bool = False


class SearchOutcome(BaseModel):
    fingerprint: str
    experiment_path: str
    objectives: list[dict[str, str]]
    trials: list[TrialRecord]
    pareto: list[str]

    def pareto_trials(self) -> list[TrialRecord]:
        by_id = {t.trial_id: t for t in self.trials}
        return [by_id[i] for i in self.pareto]


# --------------------------------------------------------------------------- search space


def _suggest(trial: Any, name: str, dimension: Any) -> Any:
    if isinstance(dimension, list):
        return dimension[0] if len(dimension) == 1 else trial.suggest_categorical(name, dimension)
    if dimension.low == dimension.high:
        return dimension.low
    return trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log)


class define_space:
    """Optuna define-by-run space: conditional dimensions are only sampled when they matter.

    A class rather than a closure so Tune can pickle the searcher into its experiment state.
    """

    def __init__(self, space: Any, num_teachers: int) -> None:
        self.space, self.num_teachers = space, num_teachers

    def __call__(self, trial: Any) -> None:
        space = self.space
        _suggest(trial, "student", space.student)
        _suggest(trial, "width", space.width)
        _suggest(trial, "depth", space.depth)
        _suggest(trial, "lr", space.lr)
        alpha = _suggest(trial, "alpha", space.alpha)
        if alpha < 1:
            _suggest(trial, "temperature", space.temperature)
            aggregation = _suggest(trial, "aggregation", space.aggregation)
            if aggregation == "weighted" and self.num_teachers > 1:
                for index in range(self.num_teachers):
                    _suggest(trial, f"teacher_weight_{index}", space.teacher_weight)
        prune = _suggest(trial, "prune", space.prune)
        if prune != "none":
            _suggest(trial, "prune_amount", space.prune_amount)
        _suggest(trial, "quantize", space.quantize)


def constant_params(space: Any, num_teachers: int) -> dict[str, Any]:
    """Values of single-valued dimensions (Optuna only sees dimensions with a choice)."""
    constants: dict[str, Any] = {}
    for name in ("student", "width", "depth", "lr", "alpha", "temperature", "aggregation", "prune", "prune_amount", "quantize"):
        dimension = getattr(space, name)
        if isinstance(dimension, list) and len(dimension) == 1:
            constants[name] = dimension[0]
        elif not isinstance(dimension, list) and dimension.low == dimension.high:
            constants[name] = dimension.low
    return constants


def trial_distill_config(params: dict[str, Any], context: dict[str, Any]) -> DistillConfig:
    params = {**context["constants"], **params}
    weights = [params[f"teacher_weight_{i}"] for i in range(context["num_teachers"]) if f"teacher_weight_{i}" in params]
    aggregation = params.get("aggregation", "mean")
    if aggregation == "weighted" and (not weights or sum(weights) <= 0):
        weights = [1.0] * context["num_teachers"]
    if aggregation == "confidence" and context.get("teacher_prior"):
        weights = list(context["teacher_prior"])
    return DistillConfig(
        student=params["student"],
        width=float(params.get("width", 1.0)),
        depth=float(params.get("depth", 1.0)),
        temperature=float(params.get("temperature", 1.0)),
        alpha=float(params.get("alpha", 0.5)),
        aggregation=aggregation,
        teacher_weights=weights if aggregation in ("weighted", "confidence") and weights else None,
        lr=float(params.get("lr", 3e-3)),
        epochs=context["epochs"],
        batch_size=context["batch_size"],
        ema_epochs=context.get("ema_epochs"),
        seed=context["seed"],
        prune=params.get("prune", "none"),
        prune_amount=float(params.get("prune_amount", 0.0)) if params.get("prune", "none") != "none" else 0.0,
        quantize=params.get("quantize", "none"),
    )


MIN_TEACHER_PRIOR = 0.05  # a teacher no better than chance on val keeps this share of trust


def teacher_prior(val_logits: list[np.ndarray], val_labels: np.ndarray, meta: DatasetMeta) -> list[float]:
    """Per-teacher trust from held-out skill, the prior of the ``confidence`` aggregation.

    Skill is the validation quality above chance — ``2 * AUC - 1`` (the Gini coefficient) for
    classification, Dice for segmentation — floored at :data:`MIN_TEACHER_PRIOR`, normalised.
    CA-MKD's per-sample weights (``softmax(-CE)``) only compare teachers sample by sample; a
    teacher that is weak everywhere (near-uniform logits) still gets a large share there, and
    its soft labels dilute the ensemble's. The prior discounts it by what val says of it.
    """
    name = quality_metric(meta)
    skills = []
    for logits in val_logits:
        quality = float(evaluate_logits(logits, val_labels, meta)[name])
        skill = 2 * quality - 1 if name == "auc" else quality
        skills.append(max(skill, MIN_TEACHER_PRIOR) if math.isfinite(skill) else MIN_TEACHER_PRIOR)
    total = sum(skills)
    return [round(skill / total, 6) for skill in skills]


# --------------------------------------------------------------------------- the trial


def trial_augmentation(context: dict[str, Any], seed: int) -> Any:
    """The student's training augmentation (``search.augment``), or ``None`` when it is off.

    Teacher logits are cached for the un-augmented training images, so the KD target of an
    augmented view is its source image's; mild, label-preserving views (flips, small affine)
    keep that target valid.
    """
    if not context.get("augment"):
        return None
    from medkd.data import AugmentSpec, build_augmentation

    spec = AugmentSpec.model_validate(context["augment"])
    if not spec.enabled:
        return None
    return build_augmentation(spec, context["meta"].spatial_dims, context["meta"].task, seed=seed)


RecoverFn = Callable[[int, "int | None"], None]  # (teacher index, view) -> entry restored in the cache


def cached_teacher_logits(cache: SoftLabelCache, teacher_fps: list[str], dataset_fp: str, *,
                          segmentation: bool, view: int | None = None, recover: RecoverFn | None = None) -> TeacherLogitsFn:
    """``indices -> (T, B, ...)`` teacher logits of the training split (or of one cached view) from Redis.

    Classification logits are small: the whole split is fetched once. Per-pixel segmentation
    logits are fetched per batch. An entry lost or corrupted meanwhile is restored by
    ``recover(teacher_index, view)`` (from the teacher checkpoint) and read again; without
    ``recover`` the cache's error is raised.
    """
    def fetch(t: int, indices: np.ndarray | None) -> np.ndarray:
        try:
            return cache.fetch(teacher_fps[t], dataset_fp, "train", indices=indices, view=view)
        except (CacheMissError, CacheIntegrityError):
            if recover is None:
                raise
            recover(t, view)
            return cache.fetch(teacher_fps[t], dataset_fp, "train", indices=indices, view=view)

    if segmentation:
        return lambda indices: np.stack([fetch(t, indices) for t in range(len(teacher_fps))])
    return array_teacher_logits(np.stack([fetch(t, None) for t in range(len(teacher_fps))]))


def cached_views(cache: SoftLabelCache, teacher_fps: list[str], views_dataset_fp: str, num_views: int, *,
                 segmentation: bool, recover: RecoverFn | None = None) -> CachedViews:
    """The FKD views of the soft-label stage (``cache.views``): parameters from the manifests, logits from Redis.

    Raises:
        CacheMissError: a view is missing for a teacher (and ``recover`` is None).
        ValueError: the teachers' manifests disagree on a view's parameters (they must have seen
            the same augmented images).
    """
    def read(k: int) -> tuple[list[Any], list[int]]:
        manifests = [cache.manifest(fp, views_dataset_fp, "train", view=k) for fp in teacher_fps]
        return manifests, [t for t, m in enumerate(manifests) if m is None or m.view_params is None]

    params = []
    for k in range(num_views):
        manifests, missing = read(k)
        if missing and recover is not None:
            for t in missing:
                recover(t, k)
            manifests, missing = read(k)
        if missing:
            raise CacheMissError(f"augmented view {k} of {views_dataset_fp} is not cached for teacher(s) "
                                 f"{[teacher_fps[t] for t in missing]}")
        if any(manifest.view_params != manifests[0].view_params for manifest in manifests[1:]):
            raise ValueError(f"teachers disagree on the parameters of augmented view {k} of {views_dataset_fp}")
        params.append(manifests[0].view_params)
    per_view = [cached_teacher_logits(cache, teacher_fps, views_dataset_fp, segmentation=segmentation, view=k,
                                      recover=recover)
                for k in range(num_views)]
    return CachedViews(params, lambda k, indices: per_view[k](indices))


def cache_recovery(cache: SoftLabelCache, context: dict[str, Any], train_images: np.ndarray) -> RecoverFn | None:
    """``recover(teacher_index, view)``: restore a lost train entry from the teacher's checkpoint (see
    :func:`medkd.softlabels.compute.recover_train_logits`); None when the context has no teacher artifacts."""
    artifacts = context.get("teacher_artifacts")
    if not artifacts:
        return None
    from medkd.softlabels.compute import recover_train_logits, view_params
    from medkd.teachers.train import TeacherArtifact

    meta, views = context["meta"], context.get("views") or {}

    def recover(t: int, view: int | None) -> None:
        artifact = TeacherArtifact.model_validate_json(artifacts[t])
        send_event(context["events"], {"kind": "message", "message": f"  soft labels of teacher {artifact.name} "
                                       f"(train{'' if view is None else f', view {view}'}) lost from the cache: recomputing"})
        if view is None:
            recover_train_logits(cache, artifact, dataset_fp=context["dataset_fp"], meta=meta, images=train_images,
                                 cache_options=context["cache_options"])
            return
        from medkd.data import AugmentSpec

        params = view_params(AugmentSpec.model_validate(context["augment"]), len(train_images), seed=views["seed"],
                             view=view, meta=meta)
        recover_train_logits(cache, artifact, dataset_fp=views["views_dataset_fp"], meta=meta, images=train_images,
                             cache_options=context["cache_options"], view=view, view_params=params)

    return recover


def teacher_logits_source(context: dict[str, Any], train_images: np.ndarray) -> tuple[TeacherLogitsFn, CachedViews | None]:
    """The cached teacher logits of train and, with FKD views, of the views (a trial's and the final training's)."""
    cache = SoftLabelCache(context["cache_url"], namespace=context["cache_namespace"], password_env=context["password_env"])
    fps, dataset_fp = context["teacher_fps"], context["dataset_fp"]
    segmentation = context["meta"].task == "segmentation"
    recover = cache_recovery(cache, context, train_images)
    originals = cached_teacher_logits(cache, fps, dataset_fp, segmentation=segmentation, recover=recover)
    views = context.get("views")
    if not views:
        return originals, None
    return originals, cached_views(cache, fps, views["views_dataset_fp"], views["views"], segmentation=segmentation,
                                   recover=recover)


def calibration_samples(train_images: np.ndarray, seed: int, size: int = CALIBRATION_SAMPLES) -> np.ndarray:
    """A seeded random subset of the training images for INT8 calibration (and export examples)."""
    rng = np.random.default_rng(seed)
    return train_images[rng.choice(len(train_images), size=min(len(train_images), size), replace=False)]


def train_candidate(
    model: torch.nn.Module,
    config: DistillConfig,
    *,
    meta: DatasetMeta,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    teacher_logits: Any,
    augment: Any,
    directory: Path,
    latency_runs: int,
    on_epoch: Any = None,
    views: CachedViews | None = None,
) -> dict[str, Any]:
    """Distill ``model``, prune (and fine-tune) and export the compressed candidate to ``directory``.

    The one recipe behind every search trial; benchmarks call it too (e.g. with
    ``teacher_logits=None`` and ``alpha=1`` for the no-KD baseline), so what they compare is
    trained and compressed exactly as the served model. With ``views`` (cached FKD views) the
    student trains on those instead of ``augment``. Returns :func:`export_candidate`'s metrics
    (quality of the compressed model on ``val``).
    """
    train_x, train_y = train
    val_x, val_y = val
    calibration = calibration_samples(train_x, config.seed)
    if views is not None:
        augment = None
    distill(model, config, train_images=train_x, train_labels=train_y, teacher_logits=teacher_logits,
            meta=meta, val_images=val_x, val_labels=val_y, augment=augment, views=views, on_epoch=on_epoch)
    model = apply_pruning(model, config, torch.from_numpy(calibration[:2]))
    if config.prune == "channels" and config.prune_amount > 0:
        finetune = max(1, round(config.epochs * FINETUNE_AFTER_CHANNEL_PRUNING))
        # A short, low-rate fine-tune of the one pruned model: no weight average (its horizon
        # would span most of it), no soup.
        distill(model, config.model_copy(update={"lr": config.lr / 3, "ema_epochs": None, "branches": 1}),
                train_images=train_x, train_labels=train_y,
                teacher_logits=teacher_logits, meta=meta, epochs=finetune, augment=augment, views=views)
    return export_candidate(model, config, meta=meta, calibration=calibration, val_images=val_x,
                            val_labels=val_y, directory=directory, latency_runs=latency_runs)


def distill_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """Tune function trainable: distill, compress, export and report one student."""
    torch.set_num_threads(max(1, int(math.floor(context["cpus_per_trial"]))))
    config = trial_distill_config(params, context)
    meta = context["meta"]
    data = ray.get(context["data_refs"][0])
    train_x, _ = data["train"]
    teacher_logits, views = teacher_logits_source(context, train_x)
    probe_input = torch.from_numpy(calibration_samples(train_x, config.seed, 2))
    quality_key = f"val_{quality_metric(meta)}"
    trial_name = tune.get_context().get_trial_name()
    model = build_student(meta, config)

    estimates: dict[str, Any] = {}
    if context["needs_estimates"]:
        # Until the compressed model exists, report cost estimates of the architecture: Tune
        # requires every objective in every report, and ASHA may stop the trial before export.
        with tempfile.TemporaryDirectory() as directory:
            probe = apply_pruning(copy.deepcopy(model), config, probe_input)
            path = export_onnx(probe.eval(), probe_input, Path(directory) / "probe.onnx")
            bytes_per_param = {"int8_static": 1, "int8_dynamic": 1, "fp16": 2}.get(config.quantize, 4)
            params_count = int(count_nonzero_parameters(probe))
            estimates = {
                "latency_ms": float(measure_latency(path, (1, *train_x.shape[1:]), runs=10).median_ms),
                "params": params_count,
                "model_bytes": params_count * bytes_per_param,
            }

    def on_epoch(record: dict[str, Any]) -> None:
        value = float(record.get(quality_key, float("nan")))
        send_event(context["events"], {"kind": "trial_epoch", "trial": trial_name, "epoch": record["epoch"],
                                       "epochs": config.epochs, "metric": quality_key, "value": value})
        if record["epoch"] < config.epochs:
            # The last epoch is reported once, by the final (compressed, exported) result: an
            # intermediate report there would let ASHA stop a fully trained trial at its last rung
            # before it is exported.
            tune.report({**estimates, **record, quality_key: value if math.isfinite(value) else 0.0, "final": False})

    with tempfile.TemporaryDirectory() as directory:
        metrics = train_candidate(model, config, meta=meta, train=data["train"], val=data["val"],
                                  teacher_logits=teacher_logits, augment=trial_augmentation(context, config.seed),
                                  directory=Path(directory), latency_runs=context["latency_runs"], on_epoch=on_epoch,
                                  views=views)
        if not math.isfinite(metrics.get(quality_key, float("nan"))):
            metrics[quality_key] = 0.0
        tune.report({**metrics, "epoch": config.epochs, "final": True},
                    checkpoint=tune.Checkpoint.from_directory(directory))


# --------------------------------------------------------------------------- progress


class TrialProgress(tune.Callback):
    """Shows trials as they start and end: the running count and the best so far (runs in the driver)."""

    def __init__(self, progress: Progress, total: int, metrics: list[str], modes: list[str] | None = None) -> None:
        self.progress, self.metrics = progress, metrics
        progress.trials_started(total, metric=metrics[0] if metrics else None, mode=(modes or ["max"])[0])

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.progress.trial_started(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        shown = {m: result[m] for m in self.metrics if isinstance(result.get(m), (int, float))}
        self.progress.trial_finished(trial.trial_id, "done" if result.get("final") else "stopped", shown)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.progress.trial_finished(trial.trial_id, "failed", {})
        self.progress.line(f"    trial {trial.trial_id} failed: see {trial.local_path}")


# --------------------------------------------------------------------------- Pareto front


def pareto_front(points: list[list[float]], modes: list[str]) -> list[int]:
    """Indices of the non-dominated points (ties kept)."""
    signs = np.array([1.0 if mode == "max" else -1.0 for mode in modes])
    values = np.asarray(points, dtype=np.float64) * signs
    front = []
    for i, row in enumerate(values):
        dominated = np.any(np.all(values >= row, axis=1) & np.any(values > row, axis=1))
        if not dominated:
            front.append(i)
    return front


# --------------------------------------------------------------------------- the stage


def search_fingerprint(spec: Any, teacher_fps: list[str], dataset_fp: str) -> str:
    parts = ["search", spec.search.fingerprint_fields(), teacher_fps, dataset_fp, spec.seed, spec.export.latency_runs]
    if spec.cache.views:
        # Students train on the cached views: another search. Appended only when on, so the
        # fingerprints of existing view-less searches do not change.
        parts.append({"views": spec.cache.views})
    return fingerprint(*parts)


def search_context(spec: Any, *, meta: DatasetMeta, data_ref: Any, teacher_fps: list[str], dataset_fp: str,
                   cache_url: str, events: Any = None, views: dict[str, Any] | None = None,
                   teachers: list[Any] | None = None) -> dict[str, Any]:
    """What a student's training needs besides its config: data, cache access, the search's budget and views."""
    search = spec.search
    return {
        "meta": meta,
        "data_refs": [data_ref],
        "cache_url": cache_url,
        "cache_namespace": spec.cache.namespace,
        "password_env": spec.cache.password_env,
        "teacher_fps": teacher_fps,
        "dataset_fp": dataset_fp,
        "epochs": search.epochs,
        "batch_size": search.batch_size,
        "ema_epochs": search.ema_epochs,
        "seed": spec.seed if search.seed is None else search.seed,
        "cpus_per_trial": search.cpus_per_trial,
        "constants": constant_params(search.space, len(teacher_fps)),
        "num_teachers": len(teacher_fps),
        # Tune checks every report carries every objective: cost objectives need estimates
        # until the compressed model exists (set by the search).
        "needs_estimates": False,
        "latency_runs": spec.export.latency_runs,
        "augment": search.augment.model_dump(mode="json") if search.augment is not None else None,
        "events": events,
        # FKD: {"views": K, "views_dataset_fp": ..., "seed": ...} from the soft-label stage, or None.
        "views": views or None,
        # Lets a trial restore soft labels lost from the cache mid-search from the teacher checkpoints.
        "teacher_artifacts": [a.model_dump_json() for a in teachers or []],
        "cache_options": {"encoding": spec.cache.encoding, "compression": spec.cache.compression, "topk": spec.cache.topk},
    }


def run_search(
    spec: Any,
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
) -> SearchOutcome:
    search = spec.search
    search_fp = search_fingerprint(spec, teacher_fps, dataset_fp)
    name = f"search-{search_fp}"
    experiment_path = str(Path(storage_path) / name) if "://" not in storage_path else f"{storage_path.rstrip('/')}/{name}"
    metrics = [o.metric for o in search.objectives]
    modes = [o.mode for o in search.objectives]
    quality = next((o for o in search.objectives if o.metric in QUALITY_METRICS), None)
    use_asha = search.scheduler == "asha" and quality is not None
    context = search_context(spec, meta=meta, data_ref=data_ref, teacher_fps=teacher_fps, dataset_fp=dataset_fp,
                             cache_url=cache_url, events=events, views=views, teachers=teachers)
    context["needs_estimates"] = any(m not in QUALITY_METRICS for m in metrics)
    if len(teacher_fps) > 1:
        cache = SoftLabelCache(cache_url, namespace=spec.cache.namespace, password_env=spec.cache.password_env)
        val_labels = ray.get(data_ref)["val"][1]
        context["teacher_prior"] = teacher_prior(
            [cache.fetch(fp, dataset_fp, "val") for fp in teacher_fps], val_labels, meta
        )
        progress.line("  teacher prior (confidence aggregation, from val skill): "
                      + ", ".join(f"{w:.2f}" for w in context["teacher_prior"]))
    trainable = tune.with_resources(
        tune.with_parameters(distill_trial, context=context),
        {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial},
    )
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # medkd prints its own trial lines
    restorable = "://" not in experiment_path and tune.Tuner.can_restore(experiment_path)
    if resume and restorable:
        progress.line(f"  resuming search {name} from {experiment_path}")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if restorable:
            aside = f"{experiment_path}.interrupted-{int(time.time())}"
            progress.line(f"  an interrupted search exists (use --resume to continue it); starting over, old one kept at {aside}")
            os.rename(experiment_path, aside)
        searcher = OptunaSearch(
            space=define_space(search.space, len(teacher_fps)),
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0],
            seed=context["seed"],
        )
        scheduler = None
        if use_asha:
            scheduler = ASHAScheduler(
                metric=quality.metric, mode=quality.mode, time_attr="training_iteration",
                max_t=search.epochs, grace_period=min(search.grace_period, search.epochs),
            )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=search.num_trials,
                max_concurrent_trials=search.max_concurrent,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, verbose=0,
                callbacks=[TrialProgress(progress, search.num_trials, metrics, modes)],
                failure_config=tune.FailureConfig(max_failures=1),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
    progress.line(
        f"  {search.num_trials} trials, {search.max_concurrent} at a time, objectives "
        + ", ".join(f"{m} ({mode})" for m, mode in zip(metrics, modes))
        + (", ASHA early stopping" if use_asha else "")
    )
    grid = tuner.fit()
    done = grid.num_terminated + grid.num_errors
    if done < search.num_trials:
        raise SearchInterrupted(
            f"search {name} interrupted after {done}/{search.num_trials} trials; its state is saved in "
            f"{experiment_path} — run the same command with --resume to continue it"
        )
    return collect_outcome(grid, search_fp=search_fp, experiment_path=experiment_path, metrics=metrics, modes=modes,
                           progress=progress, context=context)


def collect_outcome(grid: Any, *, search_fp: str, experiment_path: str, metrics: list[str], modes: list[str],
                    progress: Progress, context: dict[str, Any]) -> SearchOutcome:
    records: list[TrialRecord] = []
    for result in grid:
        trial_metrics = dict(result.metrics or {})
        trial_id = str(trial_metrics.get("trial_id", result.path.rsplit("/", 1)[-1] if result.path else "?"))
        final = bool(trial_metrics.get("final")) and result.checkpoint is not None
        candidate_config = trial_distill_config(dict(result.config or {}), context).model_dump()
        if final:
            with result.checkpoint.as_directory() as directory:
                candidate = json.loads((Path(directory) / CANDIDATE_FILE).read_text())
            candidate_config = candidate["config"]
        keep = {k: v for k, v in trial_metrics.items() if isinstance(v, (int, float, str, bool)) and k not in ("config",)}
        records.append(TrialRecord(
            trial_id=trial_id,
            status="error" if result.error else ("completed" if final else "stopped early"),
            config=candidate_config,
            metrics=keep,
            checkpoint=result.checkpoint.path if result.checkpoint is not None else None,
            final=final,
        ))
    finished = [r for r in records if r.final and all(m in r.metrics for m in metrics)]
    front_ids: list[str] = []
    if finished:
        indices = pareto_front([[float(r.metrics[m]) for m in metrics] for r in finished], modes)
        # Best first by the first objective.
        sign = -1.0 if modes[0] == "max" else 1.0
        front = sorted((finished[i] for i in indices), key=lambda r: sign * float(r.metrics[metrics[0]]))
        front_ids = [r.trial_id for r in front]
        for record in records:
            record.pareto = record.trial_id in front_ids
    progress.line(f"  {len(finished)}/{len(records)} trials finished, {len(front_ids)} on the Pareto front")
    return SearchOutcome(
        fingerprint=search_fp,
        experiment_path=experiment_path,
        objectives=[{"metric": m, "mode": mode} for m, mode in zip(metrics, modes)],
        trials=records,
        pareto=front_ids,
    )
