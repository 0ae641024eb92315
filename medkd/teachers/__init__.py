"""Teachers: the model zoo (CNN, ViT and U-Net families), Ray Train loops and inference.

Importing this package registers every teacher architecture, so ``create_teacher`` knows them.

Examples::

    >>> from medkd.teachers import create_teacher, list_teachers, teacher_task
    >>> "resnet18" in list_teachers("cnn")
    True
    >>> teacher_task("unetr")
    'segmentation'
"""

from medkd.teachers import cnn, unet, vit  # noqa: F401  (registration on import)
from medkd.teachers.registry import (
    create_teacher,
    list_teachers,
    register_teacher,
    teacher_family,
    teacher_options,
    teacher_task,
)

__all__ = [
    "create_teacher",
    "list_teachers",
    "register_teacher",
    "teacher_family",
    "teacher_options",
    "teacher_task",
]
