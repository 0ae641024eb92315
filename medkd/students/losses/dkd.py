"""Decoupled knowledge distillation (DKD; Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

The KL of Hinton KD splits per sample into a target-class part and a non-target part::

    KL(p || q) = TCKD + (1 - p_gt) * NCKD
    TCKD = KL([p_gt, 1 - p_gt] || [q_gt, 1 - q_gt])          (binary: is it the labelled class?)
    NCKD = KL(p_other / (1 - p_gt) || q_other / (1 - q_gt))   (how the rest is spread)

where ``p`` is the teacher's and ``q`` the student's distribution at temperature ``T`` and
``gt`` the labelled class. In KD the factor ``1 - p_gt`` suppresses NCKD exactly on the samples
the teacher is sure of; DKD weighs both parts freely::

    DKD = tckd_weight * TCKD + nckd_weight * NCKD

(the paper's ``alpha`` and ``beta``; here ``alpha`` stays the hard-label weight of every medkd
loss). Checked against the reference implementation (``megvii-research/mdistiller``,
``distillers/DKD.py``), which masks the labelled class with ``-1000`` before a softmax; here
it is masked with ``-inf`` and the teacher's part is renormalised, the same values without the
constant. With several teachers, ``p`` is the aggregated soft target (see
:mod:`medkd.students.losses.aggregation`), so NCKD renormalises the teachers' mixture. Two
classes leave no spread to learn (NCKD = 0), and DKD with ``tckd_weight=1`` is then exactly
Hinton KD. Single-label classification only.

**Warm-up** (the paper's training detail, ``mdistiller``'s ``DKD.WARMUP``): the DKD term is scaled
by ``min(epoch / warmup_epochs, 1)``, linearly from ``1 / warmup_epochs`` at the first epoch to
1 — a fresh student's logits are noise, and the NCKD weight of 8 would otherwise dominate its
first steps. The reference warms up over 20 of 240 CIFAR epochs; by default here over the same
share of each training (:data:`DEFAULT_WARMUP_SHARE`, e.g. 3.3 of 40 epochs). The training loop
tells the loss its epoch through :meth:`DKDLoss.set_epoch`; a loss never told scales by 1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medkd.students.losses.aggregation import class_index_targets
from medkd.students.losses.kd import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, HintonKDLoss
from medkd.students.losses.registry import register_loss

DEFAULT_TCKD_WEIGHT = 1.0
DEFAULT_NCKD_WEIGHT = 8.0  # the paper's CIFAR-100 setting
DEFAULT_WARMUP_SHARE = 20 / 240  # mdistiller's CIFAR-100 DKD: 20 warm-up epochs of 240


def warmup_factor(epoch: int, warmup_epochs: float) -> float:
    """The reference's linear warm-up: ``min(epoch / warmup_epochs, 1)`` for 1-based ``epoch`` (0 epochs: off).

    Examples:
        >>> [warmup_factor(e, 4) for e in (1, 2, 4, 9)]
        [0.25, 0.5, 1.0, 1.0]
        >>> warmup_factor(1, 0)
        1.0
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(epoch / warmup_epochs, 1.0)


def check_weight(value: float, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{arg} must be a finite number >= 0, got {value!r}")
    return float(value)


def dkd_parts(student_logits: Tensor, soft_target: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-sample TCKD and NCKD (without ``T**2``) of student logits against a teacher distribution.

    Args:
        student_logits: ``(N, C)`` raw student logits.
        soft_target: ``(N, C)`` the teacher distribution at ``temperature`` (rows sum to 1).
        labels: ``(N,)`` class indices.
        temperature: the student's softening temperature.

    Returns:
        ``(tckd, nckd)``, each of shape ``(N,)``.

    Examples:
        >>> tckd, nckd = dkd_parts(student, teacher_probs, labels, temperature=4.0)
        >>> kl = tckd + (1 - teacher_probs.gather(1, labels[:, None]).squeeze(1)) * nckd
    """
    gt_mask = F.one_hot(labels, student_logits.shape[1]).bool()
    scaled = student_logits / temperature
    log_norm = scaled.logsumexp(1)
    log_q_gt = scaled.gather(1, labels[:, None]).squeeze(1) - log_norm
    log_q_rest = scaled.masked_fill(gt_mask, float("-inf")).logsumexp(1) - log_norm
    p_gt = (soft_target * gt_mask).sum(1)
    p_rest = (soft_target * ~gt_mask).sum(1)
    tckd = (torch.xlogy(p_gt, p_gt) - p_gt * log_q_gt) + (torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest)

    p_hat = soft_target.masked_fill(gt_mask, 0.0) / p_rest.clamp_min(torch.finfo(soft_target.dtype).tiny)[:, None]
    log_q_hat = F.log_softmax(scaled.masked_fill(gt_mask, float("-inf")), dim=1)
    log_q_hat = torch.where(gt_mask, torch.zeros_like(log_q_hat), log_q_hat)
    nckd = (torch.xlogy(p_hat, p_hat) - p_hat * log_q_hat).sum(1)
    return tckd, nckd


@register_loss("dkd", applies_to="single_label")
class DKDLoss(HintonKDLoss):
    """DKD: ``alpha * CE + (1 - alpha) * T^2 * (tckd_weight * TCKD + nckd_weight * NCKD)``.

    Shapes as :class:`~medkd.students.losses.kd.HintonKDLoss`: ``student_logits`` (N, C),
    ``teacher_logits`` (T, N, C), ``targets`` (N,) or (N, 1) class indices.

    Args:
        tckd_weight: weight of the target-class term (the paper's alpha, 1.0).
        nckd_weight: weight of the non-target-class term (the paper's beta; 8.0 on CIFAR-100,
            0.5 on ImageNet).
        warmup_epochs: epochs of the linear warm-up of the DKD term; None: the reference's share
            (:data:`DEFAULT_WARMUP_SHARE`) of the epochs :meth:`set_epoch` is told; 0: off.
        (and the arguments of :class:`~medkd.students.losses.kd.HintonKDLoss`)

    Examples::

        >>> loss_fn = create_loss("dkd", temperature=4.0, alpha=0.5, nckd_weight=8.0, aggregation="confidence")
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
        tckd_weight: float = DEFAULT_TCKD_WEIGHT,
        nckd_weight: float = DEFAULT_NCKD_WEIGHT,
        warmup_epochs: float | None = None,
    ) -> None:
        super().__init__(
            temperature, alpha, aggregation, teacher_weights, class_weights, label_smoothing, logit_standardization
        )
        self.tckd_weight = check_weight(tckd_weight, "tckd_weight")
        self.nckd_weight = check_weight(nckd_weight, "nckd_weight")
        self.warmup_epochs = None if warmup_epochs is None else check_weight(warmup_epochs, "warmup_epochs")
        self.warmup = 1.0  # the factor of the current epoch (1 until set_epoch is called)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Tell the loss the 1-based ``epoch`` of ``epochs`` that starts: sets the warm-up factor.

        Raises:
            ValueError: ``epoch`` outside ``[1, epochs]``.

        Examples:
            >>> loss_fn = DKDLoss(warmup_epochs=4)
            >>> loss_fn.set_epoch(1, 40); loss_fn.warmup
            0.25
        """
        if not 1 <= epoch <= epochs:
            raise ValueError(f"epoch must lie in [1, epochs={epochs}], got {epoch}")
        warmup = DEFAULT_WARMUP_SHARE * epochs if self.warmup_epochs is None else self.warmup_epochs
        self.warmup = warmup_factor(epoch, warmup)

    def _check_shapes(self, student_logits: Tensor, teacher_logits: Tensor | None) -> None:
        if student_logits.ndim != 2:
            raise ValueError(
                f"student_logits must be (N, C) for dkd (single-label classification), "
                f"got shape {tuple(student_logits.shape)}"
            )
        super()._check_shapes(student_logits, teacher_logits)

    def kd_term(self, student_logits: Tensor, soft_target: Tensor, targets: Tensor) -> Tensor:
        labels = class_index_targets(targets.to(student_logits.device), student_logits.shape)
        tckd, nckd = dkd_parts(student_logits, soft_target, labels, self.temperature)
        return self.warmup * (self.tckd_weight * tckd + self.nckd_weight * nckd).mean()

    def extra_repr(self) -> str:
        warmup = "share" if self.warmup_epochs is None else self.warmup_epochs
        return (
            super().extra_repr()
            + f", tckd_weight={self.tckd_weight}, nckd_weight={self.nckd_weight}, warmup_epochs={warmup}"
        )
