"""Calibrated probabilities and clinical operating points of a served classifier, fitted on val.

* **Temperature scaling** (Guo et al., ICML 2017): one scalar ``T > 0`` divides the logits
  before the softmax (sigmoid per label for multi-label), chosen to minimise the negative
  log-likelihood of the validation labels. It changes the confidence, never the argmax, so
  accuracy and AUC stay as they are; the expected calibration error (15 equal-width bins, see
  :func:`medkd.core.metrics.expected_calibration_error`) is reported before and after.
* **Operating points**: ``argmax`` (the most probable class; 0.5 per label for multi-label)
  and, for binary tasks with a target sensitivity, the highest threshold on the calibrated
  probability of the positive class whose val sensitivity reaches the target. The decision at
  a point is :meth:`OperatingPoint.decide`; the server returns the decision at the point the
  export chose (``ModelMetadata.operating_point``).

Examples:
    >>> calibration = fit_calibration(val_logits, val_labels)  # doctest: +SKIP
    >>> points = choose_operating_points(calibrated_probabilities(val_logits, calibration.temperature),
    ...                                  val_labels, target_sensitivity=0.9)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medkd.core.metrics import ECE_BINS, MULTILABEL_THRESHOLD, NOISE_STANDARD_ERRORS, classification_metrics
from medkd.core.temperature import (  # noqa: F401  (re-exported: the registry's calibration API)
    TEMPERATURE_BOUNDS,
    fit_temperature,
    negative_log_likelihood,
    sample_nll,
    scaled_probabilities,
)

ARGMAX = "argmax"


class Calibration(BaseModel):
    """The applied temperature and the val ECE before and after it."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["temperature"] = "temperature"
    temperature: float = Field(gt=0, description="the applied temperature (1.0: probabilities left as trained)")
    ece_before: float | None = Field(None, description="val ECE of the raw probabilities (15 bins)")
    ece_after: float | None = Field(None, description="val ECE of the calibrated probabilities (15 bins)")
    nll_before: float | None = None
    nll_after: float | None = None
    fitted_temperature: float | None = Field(None, description="the T minimising val NLL, applied or not")
    nll_gain: float | None = Field(None, description="val NLL at T = 1 minus at the fitted T (mean over samples)")
    nll_gain_se: float | None = Field(None, description="standard error of that mean gain")

    @property
    def within_noise(self) -> bool:
        """Whether a fitted temperature was left unapplied because its val gain was within the noise."""
        return self.fitted_temperature is not None and self.fitted_temperature != self.temperature


class OperatingPoint(BaseModel):
    """How calibrated probabilities become a decision.

    ``kind="argmax"``: the most probable class (multi-label: every label with p >= 0.5).
    ``kind="threshold"``: binary only; ``positive_class`` when its probability >= ``threshold``.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    kind: Literal["argmax", "threshold"]
    threshold: float | None = Field(None, ge=0, le=1)
    positive_class: int | None = Field(None, ge=0, le=1)
    target_sensitivity: float | None = Field(None, gt=0, le=1)
    val: dict[str, float] = Field(default_factory=dict, description="sensitivity, specificity, acc on val")

    def decide(self, probs: np.ndarray, *, multilabel: bool = False) -> np.ndarray:
        """Decisions for calibrated probabilities ``(N, C)``: class indices ``(N,)``, or 0/1 ``(N, C)``
        for multi-label.

        Examples:
            >>> point = OperatingPoint(name="sens>=0.9", kind="threshold", threshold=0.2, positive_class=1)
            >>> point.decide(np.array([[0.7, 0.3], [0.9, 0.1]])).tolist()
            [1, 0]
        """
        probs = np.asarray(probs, dtype=np.float64)
        if self.kind == ARGMAX:
            return (probs >= MULTILABEL_THRESHOLD).astype(np.int64) if multilabel else probs.argmax(axis=1)
        if multilabel or probs.shape[1] != 2 or self.threshold is None or self.positive_class is None:
            raise ValueError(
                f"operating point {self.name!r}: a threshold applies to binary single-label probabilities "
                f"(N, 2) only, got shape {probs.shape}{' (multi-label)' if multilabel else ''}"
            )
        positive = probs[:, self.positive_class] >= self.threshold
        return np.where(positive, self.positive_class, 1 - self.positive_class)


def calibrated_probabilities(logits: np.ndarray, temperature: float = 1.0, *, multilabel: bool = False) -> np.ndarray:
    """Probabilities ``(N, C)`` of ``logits / temperature`` in float64 (a binary single logit becomes
    two columns), the one formula the export and the server share.

    Examples:
        >>> calibrated_probabilities(np.array([[0.0, 2.0]]), 2.0).round(3).tolist()
        [[0.269, 0.731]]
    """
    return scaled_probabilities(logits, temperature, multilabel=multilabel)


def fit_calibration(logits: np.ndarray, labels: np.ndarray, *, multilabel: bool = False) -> Calibration:
    """Temperature scaling fitted on val (:func:`medkd.core.temperature.fit_temperature`), with ECE and
    NLL before and after.

    The fitted temperature is applied only when it lowers the val NLL by more than
    :data:`~medkd.core.metrics.NOISE_STANDARD_ERRORS` standard errors of the mean per-sample gain; otherwise the model's
    own probabilities are kept (T = 1) and the fit is recorded. On a few dozen val images the NLL
    minimum moves with the draw of the split: BreastMNIST's 78 gave T = 1.03 for a val NLL gain
    of 0.0002, and val ECE rose from 0.054 to 0.063 under it.

    Args:
        logits: ``(N, C)`` val logits of the served (compressed) model; ``(N, 1)`` for a single logit.
        labels: ``(N,)``/``(N, 1)`` class indices, or ``(N, C)`` 0/1 for multi-label.
        multilabel: one sigmoid per label.

    Raises:
        ValueError: empty or non-finite logits, or labels that do not fit them (naming which).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> labels = rng.integers(0, 3, 500)
        >>> logits = 6.0 * np.eye(3)[labels] + rng.normal(0, 3, (500, 3))  # over-confident
        >>> fit_calibration(logits, labels).temperature > 1
        True
    """
    fitted = fit_temperature(logits, labels, multilabel=multilabel)
    logits = np.asarray(logits, dtype=np.float64)
    gains = sample_nll(logits, labels, 1.0, multilabel=multilabel) - sample_nll(
        logits, labels, fitted, multilabel=multilabel
    )
    gain = float(np.mean(gains))
    gain_se = float(np.std(gains, ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else 0.0
    temperature = fitted if gain > NOISE_STANDARD_ERRORS * gain_se else 1.0
    return Calibration(
        temperature=temperature,
        fitted_temperature=fitted,
        nll_gain=round(gain, 8),
        nll_gain_se=round(gain_se, 8),
        ece_before=_ece(logits, labels, 1.0, multilabel),
        ece_after=_ece(logits, labels, temperature, multilabel),
        nll_before=negative_log_likelihood(logits, labels, 1.0, multilabel=multilabel),
        nll_after=negative_log_likelihood(logits, labels, temperature, multilabel=multilabel),
    )


def _ece(logits: np.ndarray, labels: np.ndarray, temperature: float, multilabel: bool) -> float:
    probs = calibrated_probabilities(logits, temperature, multilabel=multilabel)
    return float(classification_metrics(probs, labels, multilabel=multilabel)["ece"])


def decision_metrics(
    decisions: np.ndarray, labels: np.ndarray, *, num_classes: int, multilabel: bool = False, positive_class: int = 1
) -> dict[str, float]:
    """Accuracy, balanced accuracy and (binary: of ``positive_class``; otherwise macro) sensitivity and
    specificity of decisions.

    Examples:
        >>> decision_metrics(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]), num_classes=2)["sensitivity"]
        1.0
    """
    decisions = np.asarray(decisions)
    if multilabel:
        truth = np.asarray(labels).reshape(decisions.shape).astype(bool)
        predicted = decisions.astype(bool)
        sens = _mean_ratio((truth & predicted).sum(0), truth.sum(0))
        spec = _mean_ratio((~truth & ~predicted).sum(0), (~truth).sum(0))
        return {
            "acc": float(np.mean(truth == predicted)),
            "balanced_acc": (sens + spec) / 2,
            "sensitivity": sens,
            "specificity": spec,
        }
    truth = np.asarray(labels).reshape(-1).astype(np.int64)
    per_sens = [_ratio(np.sum((truth == k) & (decisions == k)), np.sum(truth == k)) for k in range(num_classes)]
    per_spec = [_ratio(np.sum((truth != k) & (decisions != k)), np.sum(truth != k)) for k in range(num_classes)]
    binary = num_classes == 2
    sens = per_sens[positive_class] if binary else _nanmean(per_sens)
    spec = per_spec[positive_class] if binary else _nanmean(per_spec)
    return {
        "acc": float(np.mean(truth == decisions)),
        "balanced_acc": _nanmean(per_sens),
        "sensitivity": sens,
        "specificity": spec,
    }


def choose_operating_points(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    multilabel: bool = False,
    target_sensitivity: float | None = None,
    positive_class: int = 1,
) -> list[OperatingPoint]:
    """The operating points chosen on val: ``argmax`` and, for a binary task with a target, the
    highest threshold on ``p[positive_class]`` whose val sensitivity is at least the target.

    Args:
        probs: calibrated val probabilities ``(N, C)``.
        labels: val labels.
        target_sensitivity: in (0, 1]; ``None`` gives ``argmax`` only.
        positive_class: the class whose detection the sensitivity counts (0 or 1).

    Raises:
        ValueError: a target for a task that is not binary single-label, or val without positives.

    Examples:
        >>> probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
        >>> points = choose_operating_points(probs, np.array([0, 1, 1, 1]), target_sensitivity=1.0)
        >>> [p.name for p in points], points[1].threshold
        (['argmax', 'sensitivity>=1.00'], 0.2)
    """
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1]
    argmax = OperatingPoint(name=ARGMAX, kind="argmax")
    argmax.val = decision_metrics(
        argmax.decide(probs, multilabel=multilabel),
        labels,
        num_classes=num_classes,
        multilabel=multilabel,
        positive_class=positive_class,
    )
    points = [argmax]
    if target_sensitivity is None:
        return points
    if multilabel or num_classes != 2:
        raise ValueError(
            f"export.target_sensitivity: a sensitivity threshold needs a binary single-label task, this one "
            f"has {num_classes} {'labels' if multilabel else 'classes'}"
        )
    truth = np.asarray(labels).reshape(-1) == positive_class
    if not truth.any():
        raise ValueError(f"export.target_sensitivity: val has no sample of the positive class {positive_class}")
    scores = np.sort(probs[truth, positive_class])[::-1]
    needed = max(1, math.ceil(target_sensitivity * len(scores) - 1e-9))
    point = OperatingPoint(
        name=f"sensitivity>={target_sensitivity:.2f}",
        kind="threshold",
        threshold=float(scores[needed - 1]),
        positive_class=positive_class,
        target_sensitivity=target_sensitivity,
    )
    point.val = decision_metrics(point.decide(probs), labels, num_classes=2, positive_class=positive_class)
    return points + [point]


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator > 0 else float("nan")


def _mean_ratio(numerators: np.ndarray, denominators: np.ndarray) -> float:
    return _nanmean([_ratio(n, d) for n, d in zip(numerators, denominators, strict=True)])


def _nanmean(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


__all__ = [
    "ARGMAX",
    "Calibration",
    "ECE_BINS",
    "OperatingPoint",
    "calibrated_probabilities",
    "choose_operating_points",
    "decision_metrics",
    "fit_calibration",
    "negative_log_likelihood",
]
