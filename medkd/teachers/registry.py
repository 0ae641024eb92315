"""Teacher model registry (timm-style).

A teacher architecture is a small builder function decorated with :func:`register_teacher`;
the function's name is the teacher's registry name and the decorator's ``family`` groups it
("cnn", "vit" or "unet"). Every builder takes the same keyword-only core arguments and may
declare its own architecture options after them::

    @register_teacher("cnn")
    def resnet18(*, spatial_dims, in_channels, num_classes, image_size, dropout=0.0, stem="auto"):
        ...

:func:`create_teacher` validates the core arguments once (builders receive them clean, with
``image_size`` as a tuple of ``spatial_dims`` ints), rejects options the builder does not
declare, and turns a failure inside the network constructor into a ``ValueError`` that names
the teacher.

Examples::

    >>> from medkd.teachers import create_teacher, list_teachers
    >>> list_teachers("unet")
    ['basicunet', 'segresnet', 'unet', 'unetr']
    >>> net = create_teacher("resnet18", spatial_dims=2, in_channels=1, num_classes=2, image_size=28)
    >>> net = create_teacher("vit", spatial_dims=3, in_channels=1, num_classes=11, image_size=28,
    ...                      num_layers=4)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torch import nn

from medkd.core.registry import Registry

TeacherTask = Literal["classification", "segmentation"]

FAMILY_TASKS: dict[str, TeacherTask] = {
    "cnn": "classification",
    "vit": "classification",
    "unet": "segmentation",
}
SUPPORTED_SPATIAL_DIMS = (2, 3)
CORE_ARGUMENTS = ("spatial_dims", "in_channels", "num_classes", "image_size")

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class TeacherEntry:
    """What the registry knows about one teacher architecture."""

    name: str
    family: str
    builder: Callable[..., nn.Module]
    spatial_dims: tuple[int, ...]
    options: tuple[str, ...]
    revision: int

    @property
    def task(self) -> TeacherTask:
        return FAMILY_TASKS[self.family]


TEACHERS: Registry[Callable[..., nn.Module]] = Registry("teacher")


def register_teacher(
    family: str, *, spatial_dims: Sequence[int] = SUPPORTED_SPATIAL_DIMS, revision: int = 1
) -> Callable[[BuilderT], BuilderT]:
    """Decorator that registers a teacher builder under its function name.

    Args:
        family: "cnn", "vit" (classification, output ``(N, num_classes)`` logits) or "unet"
            (segmentation, output ``(N, num_classes, *spatial)`` logits).
        spatial_dims: the spatial dimensionalities the builder supports.
        revision: raised when a fix changes what the builder trains into for the same spec; a
            revision above 1 enters the teacher's fingerprint, so teachers trained by the
            earlier builder are trained again rather than reused from disk or the cache.

    Raises:
        ValueError: an unknown family, a builder missing a core argument, or a name that is
            already registered by a different function.
    """
    if family not in FAMILY_TASKS:
        raise ValueError(f"family must be one of {sorted(FAMILY_TASKS)}, got {family!r}")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
        raise ValueError(f"revision must be an int >= 1, got {revision!r}")
    dims = tuple(spatial_dims)
    if not dims or any(d not in SUPPORTED_SPATIAL_DIMS for d in dims):
        raise ValueError(f"spatial_dims must be a non-empty subset of {SUPPORTED_SPATIAL_DIMS}, got {spatial_dims!r}")

    def decorator(builder: BuilderT) -> BuilderT:
        name = builder.__name__
        parameters = inspect.signature(builder).parameters
        missing = [arg for arg in CORE_ARGUMENTS if arg not in parameters]
        if missing:
            raise ValueError(f"teacher builder {name!r} must accept keyword arguments {missing}")
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            raise ValueError(f"teacher builder {name!r} must list its options explicitly, not take **kwargs")
        options = tuple(arg for arg in parameters if arg not in CORE_ARGUMENTS)
        TEACHERS.add(
            name,
            builder,
            family=family,
            task=FAMILY_TASKS[family],
            spatial_dims=dims,
            options=options,
            revision=revision,
        )
        return builder

    return decorator


def list_teachers(family: str | None = None) -> list[str]:
    """Sorted names of the registered teachers, optionally only those of one ``family``."""
    if family is not None and family not in FAMILY_TASKS:
        raise ValueError(f"family must be one of {sorted(FAMILY_TASKS)} or None, got {family!r}")
    return TEACHERS.names() if family is None else TEACHERS.names(family=family)


def _entry(name: str) -> TeacherEntry:
    entry = TEACHERS.get(name)
    info = entry.info
    return TeacherEntry(name, info["family"], entry.obj, info["spatial_dims"], info["options"], info["revision"])


def teacher_family(name: str) -> str:
    """The family ("cnn", "vit" or "unet") of a registered teacher."""
    return _entry(name).family


def teacher_revision(name: str) -> int:
    """The builder revision of a registered teacher (see :func:`register_teacher`)."""
    return _entry(name).revision


def teacher_task(name: str) -> TeacherTask:
    """ "classification" or "segmentation" for a registered teacher."""
    return _entry(name).task


def teacher_options(name: str) -> tuple[str, ...]:
    """The architecture options (keyword arguments beyond the core ones) a teacher accepts."""
    return _entry(name).options


def _positive_int(value: Any, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    return value


def normalize_image_size(image_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """``image_size`` as a tuple of ``spatial_dims`` positive ints (an int is broadcast)."""
    sizes = (image_size,) * spatial_dims if isinstance(image_size, int) else tuple(image_size)
    if len(sizes) != spatial_dims:
        raise ValueError(
            f"image_size must have {spatial_dims} entries for spatial_dims={spatial_dims}, got {image_size!r}"
        )
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"image_size entries must be positive integers, got {image_size!r}")
    return sizes


def create_teacher(
    name: str,
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: int | Sequence[int],
    **kwargs: Any,
) -> nn.Module:
    """Build a registered teacher with freshly initialised weights (nothing is downloaded).

    Args:
        name: a name from :func:`list_teachers`.
        spatial_dims: 2 or 3 (see each builder for the ones it supports).
        in_channels: channels of the input image (1 for grayscale, 3 for RGB).
        num_classes: classification: number of classes (2 for binary, read as a softmax over two
            logits) or of labels for multi-label; segmentation: number of classes including the
            background (at least 2).
        image_size: the input's spatial size, an int (same for every axis) or one per axis.
            Builders use it to choose a stem, a patch size or a padding.
        kwargs: architecture options; :func:`teacher_options` lists the ones a teacher accepts.

    Returns:
        an ``nn.Module`` in training mode whose ``forward`` returns a logits tensor only:
        ``(N, num_classes)`` for classification, ``(N, num_classes, *image_size)`` for
        segmentation.

    Raises:
        ValueError: unknown ``name`` (the message lists the available ones), an unsupported
            ``spatial_dims``, an invalid core argument or option, or an unknown option (the
            message names it and lists the accepted ones).

    Examples::

        >>> net = create_teacher("unet", spatial_dims=3, in_channels=1, num_classes=3,
        ...                      image_size=(32, 32, 16), channels=(8, 16, 32), strides=(2, 2))
    """
    entry = _entry(name)
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims not in entry.spatial_dims:
        raise ValueError(f"teacher {name!r} supports spatial_dims {entry.spatial_dims}, got {spatial_dims!r}")
    _positive_int(in_channels, "in_channels")
    _positive_int(num_classes, "num_classes")
    if entry.task == "segmentation" and num_classes < 2:
        raise ValueError(
            f"num_classes must be >= 2 for segmentation teacher {name!r} (background counts as a class), got {num_classes}"
        )
    sizes = normalize_image_size(image_size, spatial_dims)
    unknown = sorted(set(kwargs) - set(entry.options))
    if unknown:
        accepted = ", ".join(entry.options) or "none"
        raise ValueError(f"unknown option(s) {unknown} for teacher {name!r}; accepted options: {accepted}")
    try:
        return entry.builder(
            spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, image_size=sizes, **kwargs
        )
    except (ValueError, TypeError, AssertionError) as error:
        raise ValueError(f"cannot build teacher {name!r} with options {kwargs}: {error}") from error


# Option checks shared by the family modules: each names the option it rejects.


def check_fraction(value: Any, arg: str) -> float:
    """A dropout-like probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{arg} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_positive_int(value: Any, arg: str) -> int:
    return _positive_int(value, arg)


def check_int_sequence(value: Any, arg: str, *, min_length: int = 1) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (YAML lists arrive as lists, Python as tuples)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) < min_length:
        raise ValueError(f"{arg} must be a sequence of at least {min_length} positive integers, got {value!r}")
    for item in value:
        _positive_int(item, f"every entry of {arg}")
    return tuple(value)


def check_choice(value: Any, arg: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{arg} must be one of {list(choices)}, got {value!r}")
    return value
