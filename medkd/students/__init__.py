"""Students: the student model zoo and the distillation losses.

Importing this package registers every built-in student (``resnet_tiny``, ``mobilenet_tiny``,
``vit_micro``, ``unet_small``) and every loss and aggregation strategy.

Other parts of the students stage live in their own modules and are imported explicitly
(``medkd.students.distill``, ``medkd.search.run``, ``medkd.students.compression``), so
this package stays light to import in Ray workers.
"""

from medkd.students import cnn, unet, vit  # noqa: F401  (registers the student families)
from medkd.students.losses import create_aggregation, create_loss, list_aggregations, list_losses
from medkd.students.registry import (
    count_parameters,
    create_student,
    is_student,
    list_students,
    register_student,
    student_family,
    student_task,
)

__all__ = [
    "count_parameters",
    "create_aggregation",
    "create_loss",
    "create_student",
    "is_student",
    "list_aggregations",
    "list_losses",
    "list_students",
    "register_student",
    "student_family",
    "student_task",
]
