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
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from medkd.platform.fingerprint import fingerprint
from medkd.platform.progress import Progress, send_event
from medkd.platform.softlabels import SoftLabelCache
from medkd.students.candidate import CANDIDATE_FILE, apply_pruning, export_candidate
from medkd.students.compression import count_nonzero_parameters, export_onnx, measure_latency
from medkd.students.distill import DistillConfig, array_teacher_logits, build_student, distill, quality_metric

QUALITY_METRICS = {"val_auc", "val_acc", "val_dice"}
FINETUNE_AFTER_CHANNEL_PRUNING = 0.2  # fraction of the training epochs


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
    return DistillConfig(
        student=params["student"],
        width=float(params.get("width", 1.0)),
        depth=float(params.get("depth", 1.0)),
        temperature=float(params.get("temperature", 1.0)),
        alpha=float(params.get("alpha", 0.5)),
        aggregation=aggregation,
        teacher_weights=weights if aggregation == "weighted" else None,
        lr=float(params.get("lr", 3e-3)),
        epochs=context["epochs"],
        batch_size=context["batch_size"],
        seed=context["seed"],
        prune=params.get("prune", "none"),
        prune_amount=float(params.get("prune_amount", 0.0)) if params.get("prune", "none") != "none" else 0.0,
        quantize=params.get("quantize", "none"),
    )


# --------------------------------------------------------------------------- the trial


def _teacher_logits_source(context: dict[str, Any]):
    cache = SoftLabelCache(context["cache_url"], namespace=context["cache_namespace"], password_env=context["password_env"])
    fps, dataset_fp = context["teacher_fps"], context["dataset_fp"]
    if context["meta"]["task"] == "segmentation":
        return lambda indices: np.stack([cache.fetch(fp, dataset_fp, "train", indices=indices) for fp in fps])
    return array_teacher_logits(np.stack([cache.fetch(fp, dataset_fp, "train") for fp in fps]))


def distill_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """Tune function trainable: distill, compress, export and report one student."""
    torch.set_num_threads(max(1, int(math.floor(context["cpus_per_trial"]))))
    config = trial_distill_config(params, context)
    meta = context["meta"]
    data = ray.get(context["data_refs"][0])
    train_x, train_y = data["train"]
    val_x, val_y = data["val"]
    teacher_logits = _teacher_logits_source(context)
    rng = np.random.default_rng(config.seed)
    calibration = train_x[rng.choice(len(train_x), size=min(len(train_x), 128), replace=False)]
    quality_key = f"val_{quality_metric(meta)}"
    trial_name = tune.get_context().get_trial_name()
    model = build_student(meta, config)

    estimates: dict[str, Any] = {}
    if context["needs_estimates"]:
        # ASHA may stop this trial before it is exported: give Optuna cost estimates of the
        # architecture now so an early-stopped trial still tells it something.
        with tempfile.TemporaryDirectory() as directory:
            probe = apply_pruning(copy.deepcopy(model), config, torch.from_numpy(calibration[:2]))
            path = export_onnx(probe.eval(), torch.from_numpy(calibration[:2]), Path(directory) / "probe.onnx")
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
        tune.report({**estimates, **record, quality_key: value if math.isfinite(value) else 0.0, "final": False})

    distill(model, config, train_images=train_x, train_labels=train_y, teacher_logits=teacher_logits,
            meta=meta, val_images=val_x, val_labels=val_y, on_epoch=on_epoch)
    model = apply_pruning(model, config, torch.from_numpy(calibration[:2]))
    if config.prune == "channels" and config.prune_amount > 0:
        finetune = max(1, round(config.epochs * FINETUNE_AFTER_CHANNEL_PRUNING))
        distill(model, config.model_copy(update={"lr": config.lr / 3}), train_images=train_x, train_labels=train_y,
                teacher_logits=teacher_logits, meta=meta, epochs=finetune)

    with tempfile.TemporaryDirectory() as directory:
        metrics = export_candidate(model, config, meta=meta, calibration=calibration, val_images=val_x,
                                   val_labels=val_y, directory=Path(directory), latency_runs=context["latency_runs"])
        if not math.isfinite(metrics.get(quality_key, float("nan"))):
            metrics[quality_key] = 0.0
        tune.report({**metrics, "epoch": config.epochs, "final": True},
                    checkpoint=tune.Checkpoint.from_directory(directory))


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
    return fingerprint("search", spec.search.model_dump(mode="json"), teacher_fps, dataset_fp, spec.seed, spec.export.latency_runs)


def run_search(
    spec: Any,
    *,
    meta: dict[str, Any],
    data_ref: Any,
    teacher_fps: list[str],
    dataset_fp: str,
    cache_url: str,
    storage_path: str,
    progress: Progress,
    events: Any = None,
    resume: bool = False,
) -> SearchOutcome:
    search = spec.search
    search_fp = search_fingerprint(spec, teacher_fps, dataset_fp)
    name = f"search-{search_fp}"
    experiment_path = str(Path(storage_path) / name) if "://" not in storage_path else f"{storage_path.rstrip('/')}/{name}"
    metrics = [o.metric for o in search.objectives]
    modes = [o.mode for o in search.objectives]
    quality = next((o for o in search.objectives if o.metric in QUALITY_METRICS), None)
    use_asha = search.scheduler == "asha" and quality is not None
    context = {
        "meta": meta,
        "data_refs": [data_ref],
        "cache_url": cache_url,
        "cache_namespace": spec.cache.namespace,
        "password_env": spec.cache.password_env,
        "teacher_fps": teacher_fps,
        "dataset_fp": dataset_fp,
        "epochs": search.epochs,
        "batch_size": search.batch_size,
        "seed": spec.seed if search.seed is None else search.seed,
        "cpus_per_trial": search.cpus_per_trial,
        "constants": constant_params(search.space, len(teacher_fps)),
        "num_teachers": len(teacher_fps),
        "needs_estimates": use_asha and len(metrics) > 1,
        "latency_runs": spec.export.latency_runs,
        "events": events,
    }
    trainable = tune.with_resources(
        tune.with_parameters(distill_trial, context=context),
        {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial},
    )
    if resume and tune.Tuner.can_restore(experiment_path):
        progress.line(f"  resuming search {name} from {experiment_path}")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
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
                max_t=search.epochs + 1, grace_period=min(search.grace_period, search.epochs),
            )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=search.num_trials,
                max_concurrent_trials=search.max_concurrent,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, verbose=0,
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
    return collect_outcome(grid, search_fp=search_fp, experiment_path=experiment_path, metrics=metrics, modes=modes, progress=progress)


def collect_outcome(grid: Any, *, search_fp: str, experiment_path: str, metrics: list[str], modes: list[str], progress: Progress) -> SearchOutcome:
    records: list[TrialRecord] = []
    for result in grid:
        trial_metrics = dict(result.metrics or {})
        trial_id = str(trial_metrics.get("trial_id", result.path.rsplit("/", 1)[-1] if result.path else "?"))
        final = bool(trial_metrics.get("final")) and result.checkpoint is not None
        candidate_config: dict[str, Any] = dict(result.config or {})
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
