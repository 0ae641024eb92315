"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

Instead of matching the teacher's probabilities exactly (KL), the student matches their
*relations*, measured by Pearson correlation, which ignores shifts and scales:

* inter-class: per sample, the correlation of the student's and the teacher's class
  probabilities (``1 - mean_n pearson(q_n, p_n)``);
* intra-class: per class, the correlation over the batch of how likely each sample is to be
  that class (``1 - mean_c pearson(q_:c, p_:c)``).

``DIST = inter_weight * inter + intra_weight * intra`` on the distributions at temperature ``T``
(the paper's beta and gamma, 1 and 1 on ImageNet, 2 and 2 on CIFAR-100). Checked against the
reference implementation (``hunto/image_classification_sota``, ``lib/models/losses/dist_kd.py``, linked
from ``hunto/DIST_KD``: cosine similarity of the
centred vectors with ``eps=1e-8``). With several teachers, ``p`` is the aggregated soft target.
With two classes the inter-class correlation of two 2-vectors is always +-1, so only the
intra-class term teaches the student anything; single-label classification only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from medkd.students.losses.dkd import check_weight
from medkd.students.losses.kd import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, HintonKDLoss
from medkd.students.losses.registry import register_loss

PEARSON_EPS = 1e-8


def pearson_correlation(a: Tensor, b: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Row-wise Pearson correlation of two ``(N, D)`` tensors, shape ``(N,)``.

    Examples:
        >>> import torch
        >>> pearson_correlation(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 6.0]]))
        tensor([1.0000])
    """
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """``1 - mean over samples`` of the correlation between the two class distributions."""
    return 1 - pearson_correlation(student_probs, teacher_probs).mean()


def intra_class_relation(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """``1 - mean over classes`` of the correlation of each class' probabilities over the batch."""
    return inter_class_relation(student_probs.transpose(0, 1), teacher_probs.transpose(0, 1))


@register_loss("dist", applies_to="single_label")
class DISTLoss(HintonKDLoss):
    """DIST: ``alpha * CE + (1 - alpha) * T^2 * (inter_weight * inter + intra_weight * intra)``.

    Shapes as :class:`~medkd.students.losses.kd.HintonKDLoss`. The intra-class term needs more
    than one sample in a batch (a correlation over one sample is 0).

    Args:
        inter_weight: weight of the inter-class relation (the paper's beta).
        intra_weight: weight of the intra-class relation (the paper's gamma).
        (and the arguments of :class:`~medkd.students.losses.kd.HintonKDLoss`)

    Examples::

        >>> loss_fn = create_loss("dist", temperature=1.0, alpha=0.5, aggregation="mean")
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
        inter_weight: float = 1.0,
        intra_weight: float = 1.0,
    ) -> None:
        super().__init__(
            temperature, alpha, aggregation, teacher_weights, class_weights, label_smoothing, logit_standardization
        )
        self.inter_weight = check_weight(inter_weight, "inter_weight")
        self.intra_weight = check_weight(intra_weight, "intra_weight")

    def _check_shapes(self, student_logits: Tensor, teacher_logits: Tensor | None) -> None:
        if student_logits.ndim != 2:
            raise ValueError(
                f"student_logits must be (N, C) for dist (single-label classification), "
                f"got shape {tuple(student_logits.shape)}"
            )
        super()._check_shapes(student_logits, teacher_logits)

    def kd_loss(self, student_logits: Tensor, soft_target: Tensor) -> Tensor:
        student_probs = F.softmax(student_logits / self.temperature, dim=1)
        return self.inter_weight * inter_class_relation(
            student_probs, soft_target
        ) + self.intra_weight * intra_class_relation(student_probs, soft_target)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", inter_weight={self.inter_weight}, intra_weight={self.intra_weight}"
