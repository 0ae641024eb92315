"""Student model registry (timm-style).

A student architecture is a builder function decorated with :func:`register_student`; the
function's name is the student's name. Builders share one signature, so the search can treat
every student the same way::

    builder(*, spatial_dims, in_channels, num_classes, image_size, width, depth, **kwargs) -> nn.Module

:func:`create_student` validates the shared arguments once (builders may assume them valid)
and forwards architecture-specific ``**kwargs``.

Examples::

    >>> from medkd.students import create_student, list_students
    >>> list_students("cnn")
    ['mobilenet_tiny', 'resnet_tiny']
    >>> net = create_student("resnet_tiny", spatial_dims=2, in_channels=1, num_classes=2,
    ...                      image_size=28, width=0.5)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from torch import nn

from medkd.core.registry import Registry

StudentTask = Literal["classification", "segmentation"]
SUPPORTED_SPATIAL_DIMS = (2, 3)
_TASKS: tuple[str, ...] = ("classification", "segmentation")

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class StudentEntry:
    """What the registry knows about one student architecture."""

    name: str
    family: str
    task: StudentTask
    builder: Callable[..., nn.Module]
    module: str


STUDENTS: Registry[Callable[..., nn.Module]] = Registry("student")


def register_student(
    family: str, *, task: StudentTask = "classification", name: str | None = None
) -> Callable[[BuilderT], BuilderT]:
    """Decorator that registers a student builder under its function name.

    Args:
        family: architecture family ("cnn", "vit", "unet", ...), used to group students.
        task: "classification" (output ``(N, num_classes)``) or "segmentation"
            (output ``(N, num_classes, *spatial)``).
        name: registry name; defaults to the decorated function's ``__name__``.

    Raises:
        ValueError: on an empty ``family``, an unknown ``task`` or a name registered twice.
    """
    if not family:
        raise ValueError("family must be a non-empty string")
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")

    def decorator(builder: BuilderT) -> BuilderT:
        STUDENTS.add(name or builder.__name__, builder, family=family, task=task)
        return builder

    return decorator


def list_students(family: str | None = None) -> list[str]:
    """Sorted names of registered students, optionally only those of one ``family``."""
    return STUDENTS.names() if family is None else STUDENTS.names(family=family)


def is_student(name: str) -> bool:
    return name in STUDENTS


def _entry(name: str) -> StudentEntry:
    entry = STUDENTS.get(name)
    return StudentEntry(name, entry.info["family"], entry.info["task"], entry.obj, entry.module)


def student_family(name: str) -> str:
    """The family ("cnn", "vit", "unet", ...) of a registered student."""
    return _entry(name).family


def student_task(name: str) -> StudentTask:
    """ "classification" or "segmentation" for a registered student."""
    return _entry(name).task


def _positive_multiplier(value: float, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{arg} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{arg} must be a finite number > 0, got {value!r}")
    return float(value)


def _positive_int(value: int, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    return int(value)


def normalize_image_size(image_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """``image_size`` as a tuple of ``spatial_dims`` positive ints (an int is broadcast)."""
    if isinstance(image_size, numbers.Integral):
        sizes = (image_size,) * spatial_dims
    elif isinstance(image_size, Sequence) and not isinstance(image_size, (str, bytes)):
        sizes = tuple(image_size)
    else:
        raise ValueError(f"image_size must be an int or a sequence of ints, got {image_size!r}")
    if len(sizes) != spatial_dims:
        raise ValueError(
            f"image_size must have {spatial_dims} entries for spatial_dims={spatial_dims}, got {image_size!r}"
        )
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"image_size entries must be positive integers, got {image_size!r}")
    return tuple(int(size) for size in sizes)


def create_student(
    name: str,
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: int | Sequence[int],
    width: float = 1.0,
    depth: float = 1.0,
    **kwargs,
) -> nn.Module:
    """Build a registered student.

    Args:
        name: a name from :func:`list_students`.
        spatial_dims: 2 or 3.
        in_channels: channels of the input image (1 for grayscale).
        num_classes: outputs per sample (classes, labels for multi-label, or segmentation
            classes including background).
        image_size: input spatial size, an int (same for every axis) or one per axis. Students
            use it to pick a stem stride, a patch size or a number of U-Net levels.
        width: channel / hidden-size multiplier (> 0); 1.0 is the reference size.
        depth: blocks / layers / levels multiplier (> 0); 1.0 is the reference depth.
        kwargs: architecture-specific options (see each builder's docstring).

    Returns:
        an ``nn.Module`` in training mode whose ``forward`` returns logits only.

    Raises:
        ValueError: unknown ``name`` (the message lists registered names) or an invalid argument
            (the message names it).
    """
    entry = _entry(name)
    if (
        isinstance(spatial_dims, bool)
        or not isinstance(spatial_dims, numbers.Integral)
        or spatial_dims not in SUPPORTED_SPATIAL_DIMS
    ):
        raise ValueError(f"spatial_dims must be one of {SUPPORTED_SPATIAL_DIMS}, got {spatial_dims!r}")
    spatial_dims = int(spatial_dims)
    sizes = normalize_image_size(image_size, spatial_dims)
    return entry.builder(
        spatial_dims=spatial_dims,
        in_channels=_positive_int(in_channels, "in_channels"),
        num_classes=_positive_int(num_classes, "num_classes"),
        image_size=sizes,
        width=_positive_multiplier(width, "width"),
        depth=_positive_multiplier(depth, "depth"),
        **kwargs,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
