"""Multi-teacher aggregation: turn stacked teacher logits into one soft target per sample.

Every strategy works on raw teacher logits ``(T, N, C[, *spatial])`` (as cached, so the
temperature can change without re-running a teacher) and returns the target distribution
``(N, C[, *spatial])`` at temperature ``temperature``:

* ``distribution="categorical"``: softmax over classes (multi-class and segmentation); the
  result sums to 1 over ``C``.
* ``distribution="bernoulli"``: one sigmoid per label (multi-label); the result is each
  label's probability of being present.

The target is ``sum_t w_t * p_t`` where ``p_t`` is teacher ``t``'s softened distribution and
the weights ``w_t`` (non-negative, summing to 1 over teachers) come from the strategy:

* ``"mean"``: ``w_t = 1 / T``.
* ``"weighted"``: fixed ``teacher_weights``, normalised.
* ``"confidence"``: per sample (per pixel for segmentation), confidence-adaptive as in CA-MKD
  (Zhang et al., ICASSP 2022): ``w_t = softmax_t(-CE(teacher_t, label))``, so a teacher that is
  right about a sample counts more. Without labels it falls back to
  ``softmax_t(-entropy(teacher_t))`` (confident teachers count more). Optional
  ``teacher_weights`` act as a prior: ``w_t ∝ prior_t * exp(-CE_t)``. The confidence scores
  use the teachers' unsoftened (T=1) predictions, whatever the distillation temperature.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medkd.students.losses.registry import register_aggregation

Distribution = Literal["categorical", "bernoulli"]
DISTRIBUTIONS: tuple[str, ...] = ("categorical", "bernoulli")
CLASS_DIM = 2  # class axis of stacked teacher logits (T, N, C, *spatial)


def validate_teacher_weights(teacher_weights: Sequence[float] | None) -> tuple[float, ...] | None:
    """Check ``teacher_weights``: finite, non-negative numbers, not all zero."""
    if teacher_weights is None:
        return None
    if (
        isinstance(teacher_weights, (str, bytes))
        or not isinstance(teacher_weights, Sequence)
        or len(teacher_weights) == 0
    ):
        raise ValueError(f"teacher_weights must be a non-empty sequence of numbers, got {teacher_weights!r}")
    weights = []
    for w in teacher_weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise ValueError(f"teacher_weights must be finite and non-negative, got {list(teacher_weights)!r}")
        weights.append(float(w))
    if sum(weights) <= 0:
        raise ValueError(f"teacher_weights must not all be zero, got {weights!r}")
    return tuple(weights)


def check_temperature(temperature: float) -> float:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def check_teacher_logits(teacher_logits: Tensor) -> None:
    if not isinstance(teacher_logits, Tensor) or teacher_logits.ndim < 3:
        shape = tuple(teacher_logits.shape) if isinstance(teacher_logits, Tensor) else type(teacher_logits).__name__
        raise ValueError(f"teacher_logits must be stacked as (teachers, N, C[, *spatial]), got {shape}")
    if teacher_logits.shape[0] == 0:
        raise ValueError("teacher_logits must hold at least one teacher (its first axis is empty)")


def class_index_targets(targets: Tensor, logits_shape: Sequence[int], arg: str = "targets") -> Tensor:
    """Integer class targets ``(N, *spatial)`` for logits ``(N, C, *spatial)``.

    Accepts ``(N, *spatial)`` or ``(N, 1, *spatial)`` (MedMNIST labels are ``(N, 1)``).
    """
    expected = (logits_shape[0], *logits_shape[2:])
    if tuple(targets.shape) == (logits_shape[0], 1, *logits_shape[2:]):
        targets = targets.squeeze(1)
    if tuple(targets.shape) != expected:
        raise ValueError(
            f"{arg} must have shape {expected} (or with a singleton channel axis), got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() and not torch.equal(targets, targets.round()):
        raise ValueError(f"{arg} must hold integer class indices")
    targets = targets.long()
    if targets.numel() and (targets.min() < 0 or targets.max() >= logits_shape[1]):
        raise ValueError(f"{arg} must hold class indices in [0, {logits_shape[1] - 1}]")
    return targets


def multilabel_targets(targets: Tensor, logits_shape: Sequence[int], arg: str = "targets") -> Tensor:
    """Float 0/1 label targets with exactly the logits' shape ``(N, C[, *spatial])``."""
    if tuple(targets.shape) != tuple(logits_shape):
        raise ValueError(
            f"{arg} must have the logits' shape {tuple(logits_shape)} for multi-label, got {tuple(targets.shape)}"
        )
    return targets.float()


def soften(teacher_logits: Tensor, temperature: float, distribution: Distribution) -> Tensor:
    """Each teacher's distribution at ``temperature``: softmax over classes or sigmoid per label."""
    scaled = teacher_logits.float() / temperature
    return scaled.softmax(dim=CLASS_DIM) if distribution == "categorical" else scaled.sigmoid()


class TeacherAggregation(nn.Module):
    """Base class: subclasses implement :meth:`weights`; :meth:`forward` mixes the teachers."""

    def weights(self, teacher_logits: Tensor, targets: Tensor | None, distribution: Distribution) -> Tensor:
        """Per-teacher weights, normalised over teachers, broadcastable to ``(T, N, *spatial)``."""
        raise NotImplementedError

    def forward(
        self,
        teacher_logits: Tensor,
        *,
        temperature: float,
        targets: Tensor | None = None,
        distribution: Distribution = "categorical",
    ) -> Tensor:
        """The aggregated soft target ``(N, C[, *spatial])`` (float32)."""
        check_teacher_logits(teacher_logits)
        check_temperature(temperature)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        teacher_logits = teacher_logits.detach()
        probs = soften(teacher_logits, temperature, distribution)
        w = self.weights(teacher_logits, targets, distribution).to(probs)
        w = w.reshape(w.shape[0], *([1] * (probs.ndim - 1))) if w.ndim == 1 else w.unsqueeze(CLASS_DIM)
        return (w * probs).sum(0)


@register_aggregation("mean")
class MeanAggregation(TeacherAggregation):
    """Uniform average of the teachers' softened distributions."""

    def __init__(self, teacher_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if teacher_weights is not None:
            raise ValueError(
                "teacher_weights are not used by aggregation 'mean' (it weighs teachers equally); use 'weighted'"
            )

    def weights(self, teacher_logits: Tensor, targets: Tensor | None, distribution: Distribution) -> Tensor:
        n_teachers = teacher_logits.shape[0]
        return torch.full((n_teachers,), 1.0 / n_teachers, device=teacher_logits.device)


def _fixed_weights(prior: tuple[float, ...], n_teachers: int, device: torch.device) -> Tensor:
    if len(prior) != n_teachers:
        raise ValueError(f"teacher_weights has {len(prior)} entries but teacher_logits stacks {n_teachers} teachers")
    w = torch.tensor(prior, dtype=torch.float32, device=device)
    return w / w.sum()


@register_aggregation("weighted")
class WeightedAggregation(TeacherAggregation):
    """Fixed per-teacher weights (normalised to sum to 1)."""

    def __init__(self, teacher_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if teacher_weights is None:
            raise ValueError("teacher_weights is required for aggregation 'weighted' (one weight per teacher)")
        self.teacher_weights = validate_teacher_weights(teacher_weights)

    def weights(self, teacher_logits: Tensor, targets: Tensor | None, distribution: Distribution) -> Tensor:
        return _fixed_weights(self.teacher_weights, teacher_logits.shape[0], teacher_logits.device)


@register_aggregation("confidence")
class ConfidenceAggregation(TeacherAggregation):
    """Confidence-adaptive per-sample (per-pixel) teacher weights, as in CA-MKD.

    Args:
        teacher_weights: optional prior per teacher, multiplied into the adaptive weights.
    """

    def __init__(self, teacher_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.teacher_weights = validate_teacher_weights(teacher_weights)

    @staticmethod
    def _scores(teacher_logits: Tensor, targets: Tensor | None, distribution: Distribution) -> Tensor:
        """Per-teacher loss-like scores (lower = more trustworthy), shape ``(T, N, *spatial)``."""
        logits = teacher_logits.float()
        n_teachers, logits_shape = logits.shape[0], logits.shape[1:]
        if distribution == "categorical":
            log_p = logits.log_softmax(dim=CLASS_DIM)
            if targets is None:
                return -(log_p.exp() * log_p).sum(CLASS_DIM)
            labels = class_index_targets(targets.to(logits.device), logits_shape)
            index = labels.unsqueeze(0).expand(n_teachers, *labels.shape).unsqueeze(CLASS_DIM)
            return -log_p.gather(CLASS_DIM, index).squeeze(CLASS_DIM)
        if targets is None:
            p = logits.sigmoid()
            entropy = F.binary_cross_entropy_with_logits(logits, p, reduction="none")
            return entropy.mean(CLASS_DIM)
        labels = multilabel_targets(targets.to(logits.device), logits_shape)
        bce = F.binary_cross_entropy_with_logits(logits, labels.expand_as(logits), reduction="none")
        return bce.mean(CLASS_DIM)

    def weights(self, teacher_logits: Tensor, targets: Tensor | None, distribution: Distribution) -> Tensor:
        scores = -self._scores(teacher_logits, targets, distribution)
        if self.teacher_weights is not None:
            prior = _fixed_weights(self.teacher_weights, teacher_logits.shape[0], teacher_logits.device)
            scores = scores + prior.log().reshape(-1, *([1] * (scores.ndim - 1)))
        return scores.softmax(dim=0)
