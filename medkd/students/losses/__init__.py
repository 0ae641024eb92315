"""Distillation losses and multi-teacher aggregation strategies, built by name.

Examples::

    >>> from medkd.students.losses import create_loss
    >>> loss_fn = create_loss("hinton_kd", temperature=4.0, alpha=0.5, aggregation="mean")
    >>> loss, parts = loss_fn(student_logits, teacher_logits, labels)  # teacher_logits: (T, N, C)
"""

from medkd.students.losses import aggregation, dist, dkd, kd  # noqa: F401  (registers the built-ins)
from medkd.students.losses.aggregation import (
    ConfidenceAggregation,
    MeanAggregation,
    TeacherAggregation,
    WeightedAggregation,
)
from medkd.students.losses.dist import DISTLoss
from medkd.students.losses.dkd import DKDLoss
from medkd.students.losses.families import CLASSIFICATION_LOSSES, resolve_loss_name
from medkd.students.losses.kd import (
    DistillationLoss,
    HintonKDLoss,
    MultiLabelKDLoss,
    PixelKDLoss,
    default_loss_name,
)
from medkd.students.losses.registry import (
    create_aggregation,
    create_loss,
    list_aggregations,
    list_losses,
    register_aggregation,
    register_loss,
)
from medkd.students.losses.standardization import standardize_logits

__all__ = [
    "CLASSIFICATION_LOSSES",
    "DISTLoss",
    "DKDLoss",
    "ConfidenceAggregation",
    "DistillationLoss",
    "HintonKDLoss",
    "MeanAggregation",
    "MultiLabelKDLoss",
    "PixelKDLoss",
    "TeacherAggregation",
    "WeightedAggregation",
    "create_aggregation",
    "create_loss",
    "default_loss_name",
    "list_aggregations",
    "list_losses",
    "register_aggregation",
    "register_loss",
    "resolve_loss_name",
    "standardize_logits",
]
