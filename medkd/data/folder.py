"""Image-folder adapter: one sub-folder per class of PNG/JPEG (or DICOM) images.

``path/<class>/*.png`` is split into train/val/test (stratified, seeded); ``path/train|val|test/<class>/``
uses the given splits. Every file goes through :mod:`medkd.data.preprocess`, the functions the
serving codecs call: decoded (8-bit pixels / 255, 16-bit / 65535, DICOM through its modality and
VOI LUTs), converted to gray or RGB, resized to a square ``image_size`` (linear, antialiased) and
stored as float32 in [0, 1]; the dataset records ``scale`` 1/255 (an 8-bit pixel's step), so a
served model multiplies 8-bit pixels exactly as here. Hidden files and files of other types are
ignored; an unreadable image is an error naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medkd.core.errors import DataValidationError
from medkd.data.dataset import SPLITS, RawData, Split
from medkd.data.preprocess import EIGHT_BIT_SCALE, ImageError, decode_dicom, decode_pil, scaled_image
from medkd.data.registry import register_adapter
from medkd.data.splitting import stratified_partition
from medkd.spec.data import FolderDataSpec

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})


def _visible(entries: list[Path]) -> list[Path]:
    return sorted(e for e in entries if not e.name.startswith("."))


def _class_dirs(root: Path) -> list[Path]:
    return [d for d in _visible(list(root.iterdir())) if d.is_dir()]


def _image_files(class_dir: Path) -> list[Path]:
    suffixes = IMAGE_SUFFIXES | DICOM_SUFFIXES
    return sorted(
        f
        for f in class_dir.rglob("*")
        if f.is_file()
        and f.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in f.relative_to(class_dir).parts)
    )


def decode_file(path: Path) -> np.ndarray:
    """One image file decoded by :mod:`medkd.data.preprocess` (DICOM by its suffix, else Pillow).

    Returns:
        ``uint8`` pixels (8-bit images) or ``float32`` in [0, 1], ``(H, W)`` or ``(3, H, W)``.

    Raises:
        DataValidationError: the file cannot be read or decoded; the message names it.
    """
    try:
        data = path.read_bytes()
        if path.suffix.lower() in DICOM_SUFFIXES:
            return decode_dicom(data, source="file", allow_volumes=False)
        return decode_pil(data, source="file")
    except (ImageError, OSError) as error:
        raise DataValidationError(f"{path}: unreadable image: {error}") from None


def read_image(path: Path, image_size: int, in_channels: int) -> np.ndarray:
    """One image as float32 ``(C, image_size, image_size)`` in [0, 1], as serving would see it.

    Decoded, channel-adapted, resized and rescaled by :func:`medkd.data.preprocess.scaled_image`
    with the 8-bit ``scale`` this adapter records; errors name the file.

    Examples:
        >>> read_image(Path("xray/normal/001.png"), 28, 1).shape  # doctest: +SKIP
        (1, 28, 28)
    """
    image = decode_file(path)
    try:
        return scaled_image(
            image, in_channels=in_channels, spatial_dims=2, image_size=(image_size, image_size), scale=EIGHT_BIT_SCALE
        )
    except ImageError as error:
        raise DataValidationError(f"{path}: unusable image: {error}") from None


def _scan(root: Path, class_names: list[str] | None) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files and labels under ``root/<class>/``; ``class_names`` fixes the classes (given splits)."""
    found = {d.name: d for d in _class_dirs(root)}
    names = class_names if class_names is not None else sorted(found)
    if class_names is None and len(names) < 2:
        raise DataValidationError(
            f"{root}: found {len(names)} class sub-folder(s) {names}; an image folder needs one sub-folder "
            "per class (at least 2)"
        )
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataValidationError(f"{root}: class folder(s) {unknown} are not in the train split's classes {names}")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(names):
        if name not in found:
            continue
        images = _image_files(found[name])
        if not images and class_names is None:
            present = sorted(p.name for p in found[name].iterdir())[:5]
            raise DataValidationError(
                f"{found[name]}: no images (.png, .jpg, .jpeg, .bmp, .tif, .dcm) in this class folder; found {present}"
            )
        files.extend(images)
        labels.extend([index] * len(images))
    return files, np.asarray(labels, dtype=np.int64), names


def _load(files: list[Path], spec: FolderDataSpec) -> np.ndarray:
    images = np.empty((len(files), spec.in_channels, spec.image_size, spec.image_size), dtype=np.float32)
    for index, file in enumerate(files):
        images[index] = read_image(file, spec.image_size, spec.in_channels)
    return images


@register_adapter("folder")
def load_folder(spec: FolderDataSpec) -> RawData:
    root = spec.path
    children = {d.name for d in _class_dirs(root)}
    splits: dict[str, Split] = {}
    if set(SPLITS) <= children:
        files, labels, class_names = _scan(root / "train", None)
        splits["train"] = Split(_load(files, spec), labels)
        for split in ("val", "test"):
            files, labels, _ = _scan(root / split, class_names)
            splits[split] = Split(_load(files, spec), labels)
    else:
        files, labels, class_names = _scan(root, None)
        images = _load(files, spec)
        train_fraction = 1.0 - spec.val_fraction - spec.test_fraction
        parts = stratified_partition(
            labels, len(labels), [train_fraction, spec.val_fraction, spec.test_fraction], spec.seed
        )
        splits = {split: Split(images[idx], labels[idx]) for split, idx in zip(SPLITS, parts)}
    return RawData(
        name=spec.name or root.resolve().name,
        task="classification",
        spatial_dims=2,
        num_classes=len(class_names),
        splits=splits,
        source=str(root),
        class_names=class_names,
    )
