"""Medical Segmentation Decathlon style datalist adapter (NIfTI image/label pairs via nibabel).

Volumes are reoriented to the closest canonical (RAS) orientation, resized to ``image_size``
(images by :func:`medkd.data.preprocess.resize`, linear and antialiased as in serving; labels by
nearest neighbour) and, for ``spatial_dims: 2``, cut into axial slices
(last axis). Splits are made per case, so slices of one patient never straddle splits.
Intensities are clipped to train-split percentiles and scaled to [0, 1] (recorded in the
dataset's preprocessing).
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medkd.core.errors import DataFileNotFoundError, DataValidationError
from medkd.data.checks import check_mask, check_numeric
from medkd.data.dataset import RawData, Split
from medkd.data.preprocess import resize
from medkd.data.registry import register_adapter
from medkd.data.splitting import stratified_partition
from medkd.spec.data import DecathlonDataSpec

_LIST_KEYS = {"train": "training", "val": "validation", "test": "test"}


def read_datalist(path: Path) -> dict[str, Any]:
    try:
        datalist = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataFileNotFoundError(f"{path}: datalist file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataValidationError(f"{path}: not a valid JSON datalist: {error}") from None
    if not isinstance(datalist, dict) or not isinstance(datalist.get("training"), list) or not datalist["training"]:
        raise DataValidationError(
            f"{path}: expected a JSON object with a non-empty 'training' list of "
            '{"image": ..., "label": ...} entries (Medical Segmentation Decathlon datalist)'
        )
    return datalist


def _labelled_entries(datalist: dict[str, Any], key: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``[(where, entry)]`` of entries with an image and a label; ``where`` is e.g. ``training[3]``."""
    entries = datalist.get(key) or []
    if not isinstance(entries, list):
        raise DataValidationError(f"{path}: '{key}' must be a list of entries")
    out = []
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]"
        if key == "test" and not (isinstance(entry, dict) and "label" in entry):
            continue  # MSD test entries have no labels; they cannot be evaluated
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataValidationError(f"{path} {where}: expected an object with 'image' and 'label', got {entry!r}")
        out.append((where, entry))
    return out


def _load_nifti(path: Path, json_path: Path, where: str, field: str) -> np.ndarray:
    import nibabel as nib

    if not path.is_file():
        raise DataFileNotFoundError(f"{path}: file not found (referenced by {json_path} {where}.{field})")
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        return np.asarray(image.dataobj)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as error:
        raise DataValidationError(
            f"{path}: unreadable NIfTI file (referenced by {json_path} {where}.{field}): {error}"
        ) from None


def _image_paths(entry: dict[str, Any], root: Path) -> list[Path]:
    images = entry["image"]
    return [root / p for p in (images if isinstance(images, list) else [images])]


def _load_case(entry: dict[str, Any], where: str, spec: DecathlonDataSpec) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(C, X, Y, Z)`` float32 and label ``(X, Y, Z)`` int64 of one case, checked."""
    root, json_path = spec.root, spec.path
    channels = []
    image_paths = _image_paths(entry, root)
    for path in image_paths:
        array = _load_nifti(path, json_path, where, "image")
        check_numeric(array, source=str(path))
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim == 3:
            array = array[None]
        elif array.ndim == 4:
            array = np.moveaxis(array, -1, 0)
        else:
            raise DataValidationError(f"{path}: image has shape {array.shape}; expected 2D, 3D or 4D (X, Y, Z, C)")
        channels.append(array.astype(np.float32))
    label_path = root / entry["label"]
    label = _load_nifti(label_path, json_path, where, "label")
    label = label[..., None] if label.ndim == 2 else label
    if label.ndim == 4 and label.shape[-1] == 1:
        label = label[..., 0]
    for path, image in zip(image_paths, channels):
        if image.shape[1:] != label.shape:
            raise DataValidationError(
                f"{path} and {label_path}: image/label shape mismatch: image spatial shape {image.shape[1:]}, "
                f"label shape {label.shape} (entry {json_path} {where})"
            )
    label = check_mask(label, spec.num_classes, source=str(label_path))
    return np.concatenate(channels, axis=0), label


def _resize(image: np.ndarray, label: np.ndarray, size: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize a batch: image ``(B, C, *sp)`` by :func:`medkd.data.preprocess.resize` (linear,
    antialiased: what serving does to a posted volume), label ``(B, *sp)`` by nearest neighbour."""
    import torch
    import torch.nn.functional as F

    if list(image.shape[2:]) == list(size):
        return image, label
    resized = np.stack([resize(sample, size) for sample in image])
    with torch.no_grad():
        labels = F.interpolate(torch.from_numpy(label[:, None].astype(np.float32)), size=size, mode="nearest-exact")
    return resized, labels[:, 0].round().numpy().astype(np.int64)


def _samples(image: np.ndarray, label: np.ndarray, spec: DecathlonDataSpec) -> tuple[np.ndarray, np.ndarray]:
    """One case -> resized samples: one volume (3D) or its axial slices (2D)."""
    if spec.spatial_dims == 3:
        return _resize(image[None], label[None], spec.image_size)
    slices_image = np.moveaxis(image, -1, 0)  # (Z, C, X, Y)
    slices_label = np.moveaxis(label, -1, 0)  # (Z, X, Y)
    if spec.slices == "foreground":
        keep = slices_label.reshape(len(slices_label), -1).any(axis=1)
        slices_image, slices_label = slices_image[keep], slices_label[keep]
    if len(slices_image) == 0:
        empty = (0, image.shape[0], *spec.image_size)
        return np.zeros(empty, np.float32), np.zeros((0, *spec.image_size), np.int64)
    return _resize(np.ascontiguousarray(slices_image), np.ascontiguousarray(slices_label), spec.image_size)


def _assign_cases(datalist: dict[str, Any], spec: DecathlonDataSpec) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    cases = {split: _labelled_entries(datalist, key, spec.path) for split, key in _LIST_KEYS.items()}
    missing = [split for split in ("val", "test") if not cases[split]]
    if missing:
        fractions = {"val": spec.val_fraction, "test": spec.test_fraction}
        training = cases["train"]
        shares = [1.0 - sum(fractions[m] for m in missing)] + [fractions[m] for m in missing]
        parts = stratified_partition(None, len(training), shares, spec.seed)
        cases["train"] = [training[i] for i in parts[0]]
        for split, part in zip(missing, parts[1:]):
            cases[split] = [training[i] for i in part]
    return cases


@register_adapter("decathlon")
def load_decathlon(spec: DecathlonDataSpec) -> RawData:
    datalist = read_datalist(spec.path)
    splits: dict[str, Split] = {}
    in_channels = spec.in_channels
    for split, cases in _assign_cases(datalist, spec).items():
        images, labels = [], []
        for where, entry in cases:
            image, label = _load_case(entry, where, spec)
            if in_channels is None:
                in_channels = image.shape[0]
            if image.shape[0] != in_channels:
                raise DataValidationError(
                    f"{_image_paths(entry, spec.root)[0]}: image has {image.shape[0]} channel(s), expected {in_channels} "
                    f"(entry {spec.path} {where})"
                )
            case_images, case_labels = _samples(image, label, spec)
            images.append(case_images)
            labels.append(case_labels)
        if not images or sum(len(i) for i in images) == 0:
            raise DataValidationError(
                f"{spec.path}: the {split} split is empty ({len(cases)} case(s) with usable samples)"
            )
        splits[split] = Split(np.concatenate(images), np.concatenate(labels))

    train = splits["train"].images
    low, high = (float(v) for v in np.percentile(train, spec.intensity_percentiles))
    scale = 1.0 / (high - low) if high > low else 1.0
    names = spec.class_names or _datalist_class_names(datalist, spec.num_classes)
    return RawData(
        name=spec.name or str(datalist.get("name") or spec.path.stem),
        task="segmentation",
        spatial_dims=spec.spatial_dims,
        num_classes=spec.num_classes,
        splits=splits,
        source=str(spec.path),
        class_names=names,
        scale=scale,
        offset=low,
        clip=(low, high),
    )


def _datalist_class_names(datalist: dict[str, Any], num_classes: int) -> list[str]:
    """MSD ``dataset.json`` files carry ``"labels": {"0": "background", ...}``; use them if they fit."""
    labels = datalist.get("labels")
    if isinstance(labels, dict) and len(labels) == num_classes:
        try:
            return [str(labels[str(i)]) for i in range(num_classes)]
        except KeyError:
            pass
    return ["background"] + [f"class_{i}" for i in range(1, num_classes)]
