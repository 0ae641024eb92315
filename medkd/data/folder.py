"""Image-folder adapter: one sub-folder per class of PNG/JPEG (or DICOM) images.

``path/<class>/*.png`` is split into train/val/test (stratified, seeded); ``path/train|val|test/<class>/``
uses the given splits. Images are converted to grayscale or RGB and resized to a square
``image_size`` (bilinear, anti-aliased). 16-bit images and DICOM are min-max scaled to 8 bits per
image. Hidden files and files of other types are ignored; an unreadable image is an error naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medkd.data.dataset import SPLITS, RawData, Split
from medkd.core.errors import DataValidationError
from medkd.data.registry import register_adapter
from medkd.spec.data import FolderDataSpec
from medkd.data.splitting import stratified_partition

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


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Min-max scale any numeric image to uint8 (constant images become 0)."""
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.rint((array - low) * (255.0 / (high - low))).astype(np.uint8)


def _read_dicom(path: Path) -> Image.Image:
    import pydicom

    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array.astype(np.float64)
    pixels = pixels * float(getattr(dataset, "RescaleSlope", 1) or 1) + float(getattr(dataset, "RescaleIntercept", 0) or 0)
    samples = int(getattr(dataset, "SamplesPerPixel", 1))
    if pixels.ndim != (3 if samples > 1 else 2):
        raise ValueError(f"expected one 2D frame, got pixel data of shape {pixels.shape}")
    if str(getattr(dataset, "PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return Image.fromarray(_to_uint8(pixels))


def read_image(path: Path, image_size: int, in_channels: int) -> np.ndarray:
    """One image as uint8 ``(C, image_size, image_size)``; errors name the file."""
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            image = _read_dicom(path)
        else:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                image = Image.fromarray(_to_uint8(np.asarray(image)))
        image = image.convert("L" if in_channels == 1 else "RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, AttributeError, ImportError) as error:
        raise DataValidationError(f"{path}: unreadable image: {error}") from None
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)


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
    images = np.empty((len(files), spec.in_channels, spec.image_size, spec.image_size), dtype=np.uint8)
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
        parts = stratified_partition(labels, len(labels), [train_fraction, spec.val_fraction, spec.test_fraction], spec.seed)
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
