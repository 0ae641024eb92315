"""Logit standardization (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024).

Hinton KD makes the student match the teacher's logits *and their scale*: at a shared temperature
a small student must produce logits as large as the teacher's to match its confidence. The paper
z-scores each sample's logits over the classes before the temperature, ``(z - mean) / std``, so
the student only has to match the teacher's logit *relations*. It is a switch on the KD term of
any softmax loss (``logit_standardization=True`` on :class:`medkd.students.losses.kd.DistillationLoss`);
the hard-label term keeps the raw logits, as in the paper's reference code
(``sunshangquan/logit-standardization-KD``: unbiased std over the classes, ``1e-7`` added).

With two classes the z-scores of any pair of distinct logits are ``±1/sqrt(2)``: only the order
survives, the teacher's confidence is gone, so two-class (binary) logits are refused.
"""

from __future__ import annotations

from torch import Tensor

STANDARDIZATION_EPS = 1e-7
MIN_STANDARDIZED_CLASSES = 3


def standardize_logits(logits: Tensor, dim: int = 1, eps: float = STANDARDIZATION_EPS) -> Tensor:
    """Z-score ``logits`` over the class axis ``dim``: ``(z - mean) / (std + eps)`` (unbiased std).

    Args:
        logits: raw logits, e.g. ``(N, C)``, ``(T, N, C)`` with ``dim=2`` or ``(N, C, H, W)``.
        dim: the class axis.
        eps: added to the standard deviation (constant logits give zeros, not NaN).

    Examples:
        >>> import torch
        >>> standardize_logits(torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([[-1.0000,  0.0000,  1.0000]])
    """
    check_standardizable(logits.shape[dim])
    mean = logits.mean(dim=dim, keepdim=True)
    std = logits.std(dim=dim, keepdim=True)
    return (logits - mean) / (std + eps)


def check_standardizable(num_classes: int) -> None:
    """ValueError unless logits with ``num_classes`` classes can be z-scored meaningfully (>= 3).

    Examples:
        >>> check_standardizable(8)
    """
    if num_classes < MIN_STANDARDIZED_CLASSES:
        raise ValueError(
            f"logit_standardization needs at least {MIN_STANDARDIZED_CLASSES} classes, the logits have {num_classes}: "
            "the z-scores of two logits are always +-0.707, which keeps only their order and drops the teacher's "
            "confidence (use it for multi-class tasks)"
        )
