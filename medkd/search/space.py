"""The search space: how Optuna samples a trial's parameters, and how they become a ``DistillConfig``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medkd.core.temperature import fit_temperature
from medkd.data.meta import DatasetMeta
from medkd.search.context import TrialContext
from medkd.students.distill import DistillConfig, evaluate_logits, quality_metric


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
            for name in ("loss", "logit_standardization"):
                if getattr(space, name) is not None:
                    _suggest(trial, name, getattr(space, name))
            if aggregation == "weighted" and self.num_teachers > 1:
                for index in range(self.num_teachers):
                    _suggest(trial, f"teacher_weight_{index}", space.teacher_weight)
        prune = _suggest(trial, "prune", space.prune)
        if prune != "none":
            _suggest(trial, "prune_amount", space.prune_amount)
        _suggest(trial, "quantize", space.quantize)


def trial_distill_config(params: dict[str, Any], context: TrialContext) -> DistillConfig:
    params = {**context.constants, **params}
    weights = [params[f"teacher_weight_{i}"] for i in range(context.num_teachers) if f"teacher_weight_{i}" in params]
    aggregation = params.get("aggregation", "mean")
    if aggregation == "weighted" and (not weights or sum(weights) <= 0):
        weights = [1.0] * context.num_teachers
    if aggregation == "confidence" and context.teacher_prior:
        weights = list(context.teacher_prior)
    return DistillConfig(
        student=params["student"],
        width=float(params.get("width", 1.0)),
        depth=float(params.get("depth", 1.0)),
        temperature=float(params.get("temperature", 1.0)),
        alpha=float(params.get("alpha", 0.5)),
        aggregation=aggregation,
        teacher_weights=weights if aggregation in ("weighted", "confidence") and weights else None,
        teacher_temperatures=context.teacher_temperatures,
        loss=params.get("loss"),
        logit_standardization=bool(params.get("logit_standardization", False)),
        lr=float(params.get("lr", 3e-3)),
        epochs=context.epochs,
        batch_size=context.batch_size,
        ema_epochs=context.ema_epochs,
        seed=context.seed,
        prune=params.get("prune", "none"),
        prune_amount=float(params.get("prune_amount", 0.0)) if params.get("prune", "none") != "none" else 0.0,
        quantize=params.get("quantize", "none"),
        cpu_precision=context.cpu_precision,
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


def teacher_temperatures(val_logits: list[np.ndarray], val_labels: np.ndarray, meta: DatasetMeta) -> list[float]:
    """Per-teacher temperature scaling fitted on val (``search.calibrate_teachers``): each teacher's
    logits divided by its temperature have the lowest val NLL (:func:`medkd.core.temperature.fit_temperature`).

    Raises:
        ValueError: a segmentation task (per-pixel logits are not calibrated here), naming the field.

    Examples::

        >>> teacher_temperatures([cnn_val_logits, vit_val_logits], val_labels, meta)
        [1.42, 0.87]
    """
    if meta.task != "classification":
        raise ValueError("search.calibrate_teachers: teacher calibration is for classification tasks")
    return [fit_temperature(logits, val_labels, multilabel=meta.multilabel) for logits in val_logits]
