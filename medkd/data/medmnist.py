"""MedMNIST v2 ``.npz`` adapter (2D and 3D, any resolution, single- and multi-label).

The file is read with ``allow_pickle=False``; every problem (not an archive, truncated, missing
key, object arrays, mismatched counts, NaNs, out-of-range labels) is reported with the path.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from medkd.core.errors import DataFileNotFoundError, DataValidationError
from medkd.data.checks import check_class_labels, check_multilabel, check_pixels
from medkd.data.dataset import SPLITS, RawData, Split
from medkd.data.registry import register_adapter
from medkd.data.splitting import stratified_sample
from medkd.spec.data import MEDMNIST_DOWNLOAD_HINT, MedMNISTDataSpec

REQUIRED_KEYS: tuple[str, ...] = tuple(f"{split}_{part}" for split in SPLITS for part in ("images", "labels"))

_ORGAN = [
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
]
#: Class names of the official MedMNIST v2 files (medmnist ``INFO[flag]["label"]``), by file stem.
KNOWN_CLASS_NAMES: dict[str, list[str]] = {
    "pathmnist": [
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ],
    "chestmnist": [
        "atelectasis",
        "cardiomegaly",
        "effusion",
        "infiltration",
        "mass",
        "nodule",
        "pneumonia",
        "pneumothorax",
        "consolidation",
        "edema",
        "emphysema",
        "fibrosis",
        "pleural",
        "hernia",
    ],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
    "tissuemnist": [
        "Collecting Duct, Connecting Tubule",
        "Distal Convoluted Tubule",
        "Glomerular endothelial cells",
        "Interstitial endothelial cells",
        "Leukocytes",
        "Podocytes",
        "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ],
    "organamnist": _ORGAN,
    "organcmnist": _ORGAN,
    "organsmnist": _ORGAN,
    "organmnist3d": [
        "liver",
        "kidney-right",
        "kidney-left",
        "femur-right",
        "femur-left",
        "bladder",
        "heart",
        "lung-right",
        "lung-left",
        "spleen",
        "pancreas",
    ],
    "nodulemnist3d": ["benign", "malignant"],
    "adrenalmnist3d": ["normal", "hyperplasia"],
    "fracturemnist3d": ["buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"],
    "vesselmnist3d": ["vessel", "aneurysm"],
    "synapsemnist3d": ["inhibitory synapse", "excitatory synapse"],
}
_CHANNELS_LAST = (1, 3)


def medmnist_flag(path: Path) -> str:
    """``.../breastmnist_224.npz`` -> ``breastmnist``."""
    return re.sub(r"_\d+$", "", path.stem.lower())


def read_npz(path: Path, keys: tuple[str, ...] = REQUIRED_KEYS) -> dict[str, np.ndarray]:
    """Read ``keys`` from an ``.npz`` without unpickling; errors name the file and key."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataFileNotFoundError(f"{path}: file not found. {MEDMNIST_DOWNLOAD_HINT}") from None
    except IsADirectoryError:
        raise DataValidationError(f"{path}: is a folder, expected a MedMNIST .npz file") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise DataValidationError(f"{path}: not a readable .npz archive (corrupt or truncated?): {error}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataValidationError(
            f"{path}: holds a single array of shape {archive.shape}, expected an .npz archive with keys {list(keys)}"
        )
    with archive:
        missing = [key for key in keys if key not in archive.files]
        if missing:
            raise DataValidationError(
                f"{path}: missing key(s) {missing}; the file has {sorted(archive.files)}; "
                f"a MedMNIST .npz needs {list(keys)}"
            )
        arrays: dict[str, np.ndarray] = {}
        for key in keys:
            try:
                arrays[key] = archive[key]
            except ValueError as error:
                if "allow_pickle" in str(error):
                    raise DataValidationError(
                        f"{path} [{key}]: is an object (pickled) array; medkd never unpickles data files, "
                        "store numeric arrays (uint8 images, integer labels)"
                    ) from None
                raise DataValidationError(
                    f"{path} [{key}]: unreadable array (corrupt or truncated?): {error}"
                ) from None
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
                raise DataValidationError(
                    f"{path} [{key}]: unreadable array (corrupt or truncated?): {error}"
                ) from None
    return arrays


def _layout(shape: tuple[int, ...], spatial_dims: int | None, path: Path) -> tuple[int, bool]:
    """``(spatial_dims, channels_last)`` from a train image array's shape."""
    if len(shape) == 3:
        if spatial_dims == 3:
            raise DataValidationError(f"{path} [train_images]: shape {shape} is 2D (N, H, W) but spatial_dims is 3")
        return 2, False
    if len(shape) == 4:
        if spatial_dims is None:
            looks_2d_rgb = shape[-1] in _CHANNELS_LAST and shape[-1] != shape[-2] and shape[1] == shape[2]
            spatial_dims = 2 if looks_2d_rgb else 3
        return (2, True) if spatial_dims == 2 else (3, False)
    if len(shape) == 5:
        if spatial_dims == 2:
            raise DataValidationError(
                f"{path} [train_images]: shape {shape} is 3D (N, D, H, W, C) but spatial_dims is 2"
            )
        return 3, True
    raise DataValidationError(
        f"{path} [train_images]: shape {shape} is not a MedMNIST layout; expected (N, H, W), (N, H, W, 3) or (N, D, H, W)"
    )


def _channel_first(images: np.ndarray, channels_last: bool) -> np.ndarray:
    return np.moveaxis(images, -1, 1) if channels_last else images[:, None]


@register_adapter("medmnist")
def load_medmnist(spec: MedMNISTDataSpec) -> RawData:
    path = spec.path
    arrays = read_npz(path)
    spatial_dims, channels_last = _layout(arrays["train_images"].shape, spec.spatial_dims, path)
    sample_shape = arrays["train_images"].shape[1:]
    label_width = {}
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != sample_shape:
            raise DataValidationError(
                f"{path} [{split}_images]: samples have shape {images.shape[1:]} but train_images samples have {sample_shape}"
            )
        if len(images) == 0:
            raise DataValidationError(f"{path}: the {split} split is empty ({split}_images has shape {images.shape})")
        if labels.ndim == 0 or len(images) != len(labels):
            raise DataValidationError(
                f"{path}: {split}_images has {len(images)} images but {split}_labels has "
                f"{len(labels) if labels.ndim else 0} labels (shape {labels.shape})"
            )
        check_pixels(images, source=str(path), key=f"{split}_images")
        label_width[split] = 1 if labels.ndim == 1 else int(np.prod(labels.shape[1:]))

    multilabel = label_width["train"] > 1
    if len(set(label_width.values())) != 1:
        raise DataValidationError(f"{path}: label widths differ between splits: {label_width}")
    if spec.task == "multilabel" and not multilabel:
        raise DataValidationError(
            f"{path}: data.task is 'multilabel' but train_labels has shape {arrays['train_labels'].shape}; "
            "multi-label files have labels of shape (N, L) with L > 1"
        )

    flag_names = KNOWN_CLASS_NAMES.get(medmnist_flag(path))
    labels: dict[str, np.ndarray] = {}
    if multilabel:
        for split in SPLITS:
            raw_labels = arrays[f"{split}_labels"]
            labels[split] = check_multilabel(
                raw_labels.reshape(len(raw_labels), label_width[split]), source=str(path), key=f"{split}_labels"
            )
        num_classes = label_width["train"]
    else:
        declared = len(spec.class_names) if spec.class_names else None
        for split in SPLITS:
            labels[split] = check_class_labels(
                arrays[f"{split}_labels"], declared, source=str(path), key=f"{split}_labels"
            )
        observed = max(int(v.max()) for v in labels.values() if v.size) + 1
        num_classes = declared or max(observed, len(flag_names or []), 2)
    class_names = spec.class_names or (flag_names if flag_names and len(flag_names) == num_classes else None)
    if spec.class_names and len(spec.class_names) != num_classes:
        raise DataValidationError(
            f"data.class_names has {len(spec.class_names)} names but {path} has {num_classes} labels per sample"
        )

    splits = {split: Split(_channel_first(arrays[f"{split}_images"], channels_last), labels[split]) for split in SPLITS}
    if spec.subsample_train is not None:
        train = splits["train"]
        strata = None if multilabel else train.labels
        splits["train"] = train.take(stratified_sample(strata, len(train), spec.subsample_train, spec.seed))
    return RawData(
        name=spec.name or path.stem,
        task="classification",
        spatial_dims=spatial_dims,
        num_classes=num_classes,
        multilabel=multilabel,
        splits=splits,
        source=str(path),
        class_names=class_names,
    )
