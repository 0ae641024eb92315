"""Checks on raw input arrays; every failure names the source file (and key) and the problem."""

from __future__ import annotations

import numpy as np

from medkd.core.errors import DataValidationError

PIXEL_MAX = 255.0


def _where(source: str, key: str | None) -> str:
    return f"{source} [{key}]" if key else source


def check_numeric(array: np.ndarray, *, source: str, key: str | None = None, what: str = "images") -> None:
    """Reject object, string, complex and boolean arrays, and NaN/Inf values."""
    where = _where(source, key)
    if array.dtype.kind == "O":
        raise DataValidationError(f"{where}: {what} are an object array; expected a numeric (uint8) array")
    if array.dtype.kind not in "uif":
        raise DataValidationError(f"{where}: {what} have dtype {array.dtype}; expected a numeric (uint8) array")
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            bad = np.argwhere(~finite)
            nan_count = int(np.isnan(array).sum())
            inf_count = int((~finite).sum()) - nan_count
            raise DataValidationError(
                f"{where}: {what} contain {nan_count} NaN and {inf_count} Inf value(s) "
                f"(first at index {tuple(int(i) for i in bad[0])})"
            )


def check_pixels(images: np.ndarray, *, source: str, key: str | None = None) -> None:
    """8-bit pixel images: numeric, finite and within [0, 255] (uint8 or integral floats alike)."""
    check_numeric(images, source=source, key=key)
    if images.dtype == np.uint8 or images.size == 0:
        return
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > PIXEL_MAX:
        raise DataValidationError(
            f"{_where(source, key)}: images of dtype {images.dtype} have values in [{low:g}, {high:g}]; "
            "expected 8-bit pixel values in [0, 255] (uint8)"
        )


def check_class_labels(
    labels: np.ndarray, num_classes: int | None, *, source: str, key: str | None = None
) -> np.ndarray:
    """Single-label class indices -> int64 ``(N,)``; integral, non-negative, ``< num_classes``."""
    where = _where(source, key)
    check_numeric(labels, source=source, key=key, what="labels")
    flat = labels.reshape(labels.shape[0], int(np.prod(labels.shape[1:]))) if labels.ndim > 1 else labels[:, None]
    if flat.shape[1] != 1:
        raise DataValidationError(f"{where}: labels have shape {labels.shape}; expected (N,) or (N, 1) class indices")
    flat = flat[:, 0]
    if flat.dtype.kind == "f" and not np.all(flat == np.round(flat)):
        raise DataValidationError(f"{where}: labels are not integers (dtype {labels.dtype})")
    as_int = flat.astype(np.int64)
    if as_int.size and as_int.min() < 0:
        raise DataValidationError(f"{where}: labels out of range: found {int(as_int.min())}, expected >= 0")
    if num_classes is not None and as_int.size and as_int.max() >= num_classes:
        raise DataValidationError(
            f"{where}: labels out of range: found {int(as_int.max())}, expected < num_classes={num_classes}"
        )
    return as_int


def check_multilabel(labels: np.ndarray, *, source: str, key: str | None = None) -> np.ndarray:
    """Multi-label targets -> float32 ``(N, L)`` of 0/1 values."""
    where = _where(source, key)
    check_numeric(labels, source=source, key=key, what="labels")
    if labels.ndim != 2:
        raise DataValidationError(f"{where}: multi-label labels have shape {labels.shape}; expected (N, L)")
    values = np.unique(labels)
    if not np.all(np.isin(values, (0, 1))):
        shown = values[~np.isin(values, (0, 1))][:5].tolist()
        raise DataValidationError(f"{where}: multi-label labels must be 0 or 1, found {shown}")
    return labels.astype(np.float32)


def check_mask(mask: np.ndarray, num_classes: int, *, source: str, key: str | None = None) -> np.ndarray:
    """Segmentation mask -> int64; integral values in ``[0, num_classes)``."""
    where = _where(source, key)
    check_numeric(mask, source=source, key=key, what="labels")
    if mask.dtype.kind == "f" and not np.all(mask == np.round(mask)):
        raise DataValidationError(f"{where}: segmentation labels are not integers (dtype {mask.dtype})")
    as_int = mask.astype(np.int64)
    if as_int.size:
        low, high = int(as_int.min()), int(as_int.max())
        if low < 0 or high >= num_classes:
            found = np.unique(as_int)
            bad = found[(found < 0) | (found >= num_classes)][:5].tolist()
            raise DataValidationError(
                f"{where}: segmentation labels out of range: found {bad}, expected 0..{num_classes - 1} "
                f"(num_classes={num_classes})"
            )
    return as_int
