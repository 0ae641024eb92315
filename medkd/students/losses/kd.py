"""Knowledge-distillation losses: Hinton KD, multi-label KD and pixel-wise KD.

Every loss is an ``nn.Module`` called as ``loss(student_logits, teacher_logits, targets)`` and
returns ``(loss, parts)`` where ``parts`` holds plain floats for logging (``"loss"``, ``"kd"``
and the hard-label term).

Conventions shared by all of them:

* ``teacher_logits`` are raw logits stacked over teachers, ``(T, N, C[, *spatial])``; they are
  combined at temperature ``temperature`` by the ``aggregation`` strategy (see
  :mod:`medkd.students.losses.aggregation`) and never receive gradients.
* ``alpha`` is the weight of the **hard-label** loss::

      loss = alpha * hard(student, targets) + (1 - alpha) * temperature**2 * KL(teacher_T || student_T)

  ``alpha=1`` trains on labels only (the no-KD baseline: exactly the hard loss, and
  ``teacher_logits`` may be ``None``); ``alpha=0`` trains on the teachers only. The ``T**2``
  factor keeps the KD gradients' magnitude independent of the temperature (Hinton et al., 2015).
* ``logit_standardization=True`` z-scores every teacher's and the student's logits over the
  class axis before the temperature, in the KD term only (Sun et al., CVPR 2024; see
  :mod:`medkd.students.losses.standardization`). Any loss of a softmax over classes accepts it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medkd.students.losses.aggregation import (
    Distribution,
    check_temperature,
    class_index_targets,
    multilabel_targets,
)
from medkd.students.losses.registry import create_aggregation, register_loss
from medkd.students.losses.standardization import check_standardizable, standardize_logits

DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.5


def check_alpha(alpha: float) -> float:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not math.isfinite(alpha)
        or not 0 <= alpha <= 1
    ):
        raise ValueError(f"alpha must be a number in [0, 1] (the weight of the hard-label loss), got {alpha!r}")
    return float(alpha)


def _optional_class_weights(weights: Sequence[float] | None, arg: str) -> Tensor | None:
    if weights is None:
        return None
    values = torch.as_tensor(weights, dtype=torch.float32)
    if values.ndim != 1 or values.numel() == 0 or not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"{arg} must be a non-empty list of finite, non-negative numbers, got {weights!r}")
    return values


def _bernoulli_kl(target: Tensor, student_logits: Tensor) -> Tensor:
    """Elementwise KL(Bernoulli(target) || Bernoulli(sigmoid(student_logits))), stable for any logit."""
    return (
        torch.xlogy(target, target)
        + torch.xlogy(1 - target, 1 - target)
        - target * F.logsigmoid(student_logits)
        - (1 - target) * F.logsigmoid(-student_logits)
    )


def _categorical_kl(target: Tensor, student_log_probs: Tensor) -> Tensor:
    """KL(target || student) summed over the class axis (1), one value per sample / pixel."""
    return (torch.xlogy(target, target) - target * student_log_probs).sum(1)


class DistillationLoss(nn.Module):
    """Shared arguments, validation and the ``alpha`` mix of every KD loss.

    Args:
        temperature: softening temperature (> 0) for the teachers and the student.
        alpha: weight of the hard-label loss in [0, 1]; ``1 - alpha`` weighs the KD term.
        aggregation: multi-teacher aggregation strategy name ("mean", "weighted", "confidence").
        teacher_weights: one non-negative weight per teacher, for "weighted" (required) and
            "confidence" (a prior); "mean" rejects them.
        logit_standardization: z-score the teachers' and the student's logits over the class
            axis before the temperature, in the KD term (CVPR 2024); softmax losses only.
    """

    distribution: Distribution = "categorical"
    hard_name = "ce"

    def __init__(
        self,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = DEFAULT_ALPHA,
        aggregation: str = "mean",
        teacher_weights: Sequence[float] | None = None,
        logit_standardization: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)
        self.aggregation_name = aggregation
        self.aggregation = create_aggregation(aggregation, teacher_weights=teacher_weights)
        if not isinstance(logit_standardization, bool):
            raise ValueError(f"logit_standardization must be true or false, got {logit_standardization!r}")
        if logit_standardization and self.distribution != "categorical":
            raise ValueError(
                f"logit_standardization needs a softmax over classes; {type(self).__name__} uses one "
                "sigmoid per label, whose logits are not comparable across labels"
            )
        self.logit_standardization = logit_standardization

    def hard_loss(self, student_logits: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def kd_loss(self, student_logits: Tensor, soft_target: Tensor) -> Tensor:
        """The KD term *without* the ``T**2`` factor."""
        raise NotImplementedError

    def kd_term(self, student_logits: Tensor, soft_target: Tensor, targets: Tensor) -> Tensor:
        """The KD term without ``T**2``; losses that need the labels too (DKD) override this."""
        return self.kd_loss(student_logits, soft_target)

    def soft_target(self, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        """The aggregated teacher distribution at this loss' temperature (of z-scored logits with
        ``logit_standardization``: every teacher is standardised, then the strategy mixes them)."""
        if self.logit_standardization:
            teacher_logits = standardize_logits(teacher_logits, dim=2)
        return self.aggregation(
            teacher_logits, temperature=self.temperature, targets=targets, distribution=self.distribution
        )

    def _check_shapes(self, student_logits: Tensor, teacher_logits: Tensor | None) -> None:
        if student_logits.ndim < 2:
            raise ValueError(f"student_logits must be (N, C[, *spatial]), got shape {tuple(student_logits.shape)}")
        if teacher_logits is not None and tuple(teacher_logits.shape[1:]) != tuple(student_logits.shape):
            raise ValueError(
                f"teacher_logits must be (teachers, *student_logits.shape) = (T, {', '.join(map(str, student_logits.shape))}), "
                f"got {tuple(teacher_logits.shape)}"
            )
        if self.logit_standardization:
            check_standardizable(student_logits.shape[1])

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Distillation loss of one batch.

        Args:
            student_logits: ``(N, C[, *spatial])``, with gradients.
            teacher_logits: raw teacher logits ``(T, N, C[, *spatial])`` (no gradients flow into
                them), or ``None`` when ``alpha == 1``.
            targets: hard labels (shape per loss class).

        Returns:
            ``(loss, parts)``: the scalar loss and floats ``"loss"``, ``"kd"`` (T²-scaled) and the
            hard term (``"ce"``, ``"bce"`` or ``"dice_ce"``).
        """
        self._check_shapes(student_logits, teacher_logits)
        hard = self.hard_loss(student_logits, targets)
        if teacher_logits is None:
            if self.alpha != 1.0:
                raise ValueError(f"teacher_logits are required when alpha < 1 (alpha={self.alpha})")
            return hard, {"loss": float(hard.detach()), self.hard_name: float(hard.detach()), "kd": 0.0}
        target = self.soft_target(teacher_logits.to(student_logits.device), targets).to(student_logits.dtype)
        kd_input = standardize_logits(student_logits, dim=1) if self.logit_standardization else student_logits
        kd = self.kd_term(kd_input, target, targets) * self.temperature**2
        if self.alpha == 1.0:
            loss = hard
        elif self.alpha == 0.0:
            loss = kd
        else:
            loss = self.alpha * hard + (1.0 - self.alpha) * kd
        return loss, {"loss": float(loss.detach()), self.hard_name: float(hard.detach()), "kd": float(kd.detach())}

    def extra_repr(self) -> str:
        text = f"temperature={self.temperature}, alpha={self.alpha}, aggregation={self.aggregation_name!r}"
        return text + (", logit_standardization=True" if self.logit_standardization else "")


@register_loss("hinton_kd", applies_to="single_label")
class HintonKDLoss(DistillationLoss):
    """Hinton KD for single-label classification: ``alpha * CE + (1 - alpha) * T^2 * KL``.

    Shapes: ``student_logits`` (N, C), ``teacher_logits`` (T, N, C), ``targets`` (N,) or
    (N, 1) class indices.

    Args:
        class_weights: optional per-class weights of the cross-entropy term.
        label_smoothing: label smoothing of the cross-entropy term, in [0, 1).
        (and the shared arguments of :class:`DistillationLoss`)

    Examples::

        >>> loss_fn = create_loss("hinton_kd", temperature=4.0, alpha=0.3, aggregation="confidence")
        >>> loss, parts = loss_fn(student_logits, teacher_logits, labels)
    """

    def __init__(
        self,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = DEFAULT_ALPHA,
        aggregation: str = "mean",
        teacher_weights: Sequence[float] | None = None,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        logit_standardization: bool = False,
    ) -> None:
        super().__init__(temperature, alpha, aggregation, teacher_weights, logit_standardization)
        if (
            isinstance(label_smoothing, bool)
            or not isinstance(label_smoothing, numbers.Real)
            or not 0 <= label_smoothing < 1
        ):
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("class_weights", _optional_class_weights(class_weights, "class_weights"), persistent=False)

    def _check_shapes(self, student_logits: Tensor, teacher_logits: Tensor | None) -> None:
        if student_logits.ndim != 2:
            raise ValueError(f"student_logits must be (N, C) for hinton_kd, got shape {tuple(student_logits.shape)}")
        if self.class_weights is not None and self.class_weights.numel() != student_logits.shape[1]:
            raise ValueError(
                f"class_weights has {self.class_weights.numel()} entries but the logits have {student_logits.shape[1]} classes"
            )
        super()._check_shapes(student_logits, teacher_logits)

    def hard_loss(self, student_logits: Tensor, targets: Tensor) -> Tensor:
        labels = class_index_targets(targets.to(student_logits.device), student_logits.shape)
        return F.cross_entropy(student_logits, labels, weight=self.class_weights, label_smoothing=self.label_smoothing)

    def kd_loss(self, student_logits: Tensor, soft_target: Tensor) -> Tensor:
        log_q = F.log_softmax(student_logits / self.temperature, dim=1)
        return _categorical_kl(soft_target, log_q).mean()


@register_loss("multilabel_kd", applies_to="multilabel")
class MultiLabelKDLoss(DistillationLoss):
    """Multi-label KD: ``alpha * BCE + (1 - alpha) * T^2 * mean_label KL(Bern_teacher || Bern_student)``.

    Each label is an independent Bernoulli softened by ``sigmoid(logit / T)``; the binary KL is
    averaged over labels and samples. Shapes: ``student_logits`` (N, C), ``teacher_logits``
    (T, N, C), ``targets`` (N, C) of 0/1.

    Args:
        pos_weight: optional per-label positive weight of the BCE term.
        (and the shared arguments of :class:`DistillationLoss`)
    """

    distribution: Distribution = "bernoulli"
    hard_name = "bce"

    def __init__(
        self,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = DEFAULT_ALPHA,
        aggregation: str = "mean",
        teacher_weights: Sequence[float] | None = None,
        pos_weight: Sequence[float] | None = None,
        logit_standardization: bool = False,
    ) -> None:
        super().__init__(temperature, alpha, aggregation, teacher_weights, logit_standardization)
        self.register_buffer("pos_weight", _optional_class_weights(pos_weight, "pos_weight"), persistent=False)

    def _check_shapes(self, student_logits: Tensor, teacher_logits: Tensor | None) -> None:
        if student_logits.ndim != 2:
            raise ValueError(
                f"student_logits must be (N, labels) for multilabel_kd, got shape {tuple(student_logits.shape)}"
            )
        if self.pos_weight is not None and self.pos_weight.numel() != student_logits.shape[1]:
            raise ValueError(
                f"pos_weight has {self.pos_weight.numel()} entries but the logits have {student_logits.shape[1]} labels"
            )
        super()._check_shapes(student_logits, teacher_logits)

    def hard_loss(self, student_logits: Tensor, targets: Tensor) -> Tensor:
        labels = multilabel_targets(targets.to(student_logits.device), student_logits.shape).to(student_logits.dtype)
        return F.binary_cross_entropy_with_logits(student_logits, labels, pos_weight=self.pos_weight)

    def kd_loss(self, student_logits: Tensor, soft_target: Tensor) -> Tensor:
        return _bernoulli_kl(soft_target, student_logits / self.temperature).mean()


@register_loss("pixel_kd", applies_to="segmentation")
class PixelKDLoss(DistillationLoss):
    """Pixel-wise KD for segmentation: ``alpha * DiceCE + (1 - alpha) * T^2 * mean_pixel KL``.

    The KL over classes is computed at every pixel (voxel) and averaged over pixels and samples;
    the hard term is MONAI's ``DiceCELoss`` (softmax, one-hot labels). Shapes:
    ``student_logits`` (N, C, *spatial), ``teacher_logits`` (T, N, C, *spatial), ``targets``
    (N, *spatial) or (N, 1, *spatial) integer masks.

    Args:
        class_weights: optional per-class weights (MONAI ``DiceCELoss(weight=...)``).
        include_background: whether Dice includes class 0.
        (and the shared arguments of :class:`DistillationLoss`)
    """

    hard_name = "dice_ce"

    def __init__(
        self,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = DEFAULT_ALPHA,
        aggregation: str = "mean",
        teacher_weights: Sequence[float] | None = None,
        class_weights: Sequence[float] | None = None,
        include_background: bool = True,
        logit_standardization: bool = False,
    ) -> None:
        super().__init__(temperature, alpha, aggregation, teacher_weights, logit_standardization)
        from monai.losses import DiceCELoss

        weight = _optional_class_weights(class_weights, "class_weights")
        self.num_class_weights = None if weight is None else weight.numel()
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=include_background, weight=weight)

    def _check_shapes(self, student_logits: Tensor, teacher_logits: Tensor | None) -> None:
        if student_logits.ndim < 3:
            raise ValueError(
                f"student_logits must be (N, C, *spatial) for pixel_kd, got shape {tuple(student_logits.shape)}"
            )
        if self.num_class_weights is not None and self.num_class_weights != student_logits.shape[1]:
            raise ValueError(
                f"class_weights has {self.num_class_weights} entries but the logits have {student_logits.shape[1]} classes"
            )
        super()._check_shapes(student_logits, teacher_logits)

    def hard_loss(self, student_logits: Tensor, targets: Tensor) -> Tensor:
        labels = class_index_targets(targets.to(student_logits.device), student_logits.shape)
        return self.dice_ce(student_logits, labels.unsqueeze(1))

    def kd_loss(self, student_logits: Tensor, soft_target: Tensor) -> Tensor:
        log_q = F.log_softmax(student_logits / self.temperature, dim=1)
        return _categorical_kl(soft_target, log_q).mean()


# Which loss distils which kind of task.
TASK_LOSSES: dict[tuple[str, bool], str] = {
    ("classification", False): "hinton_kd",
    ("classification", True): "multilabel_kd",
    ("segmentation", False): "pixel_kd",
}


def default_loss_name(task: str, multilabel: bool = False) -> str:
    """The registered loss for a task: "hinton_kd", "multilabel_kd" or "pixel_kd"."""
    try:
        return TASK_LOSSES[(task, bool(multilabel))]
    except KeyError:
        raise ValueError(f"no distillation loss for task={task!r} with multilabel={multilabel!r}") from None
