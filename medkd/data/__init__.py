"""Data layer: typed data specs, adapters (synthetic, MedMNIST, image folder, Decathlon),
in-memory normalised datasets with content fingerprints, augmentation, and the preprocessing
contract (``medkd.data.preprocess``) that training and serving share.

The names below are imported on first use: the serving replicas import
``medkd.data.preprocess`` alone, and importing this package must not load torch (augmentation)
into them (~0.6 GB per replica, measured). The first use of any of these names loads them all,
which also registers every adapter, as an eager import did.

Examples:
    >>> from medkd.data import SyntheticDataSpec, load_dataset
    >>> dataset = load_dataset(SyntheticDataSpec(num_train=64, num_val=16, num_test=16))
    >>> dataset.summary()["splits"]["train"]["size"]
    64
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        [
            "Augmentation",
            "apply_view",
            "apply_view_to_masks",
            "build_augmentation",
            "identity_view",
            "sample_view_params",
        ],
        "medkd.data.augment",
    ),
    **dict.fromkeys(
        ["SPLITS", "Dataset", "RawData", "Split", "apply_preprocessing", "build_dataset"], "medkd.data.dataset"
    ),
    **dict.fromkeys(["DataFileNotFoundError", "DataValidationError"], "medkd.core.errors"),
    "load_dataset": "medkd.data.loader",
    **dict.fromkeys(["available_adapters", "get_adapter", "register_adapter"], "medkd.data.registry"),
    **dict.fromkeys(
        [
            "AffineAugmentSpec",
            "AugmentSpec",
            "DataSpec",
            "DecathlonDataSpec",
            "FolderDataSpec",
            "IntensityAugmentSpec",
            "MedMNISTDataSpec",
            "SyntheticDataSpec",
        ],
        "medkd.spec.data",
    ),
}

__all__ = [
    "AffineAugmentSpec",
    "AugmentSpec",
    "Augmentation",
    "DataFileNotFoundError",
    "DataSpec",
    "DataValidationError",
    "Dataset",
    "DecathlonDataSpec",
    "FolderDataSpec",
    "IntensityAugmentSpec",
    "MedMNISTDataSpec",
    "RawData",
    "SPLITS",
    "Split",
    "SyntheticDataSpec",
    "apply_preprocessing",
    "apply_view",
    "apply_view_to_masks",
    "available_adapters",
    "build_augmentation",
    "build_dataset",
    "get_adapter",
    "identity_view",
    "load_dataset",
    "register_adapter",
    "sample_view_params",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for module in sorted(set(_EXPORTS.values())):
        loaded = importlib.import_module(module)
        for exported, home in _EXPORTS.items():
            if home == module:
                globals()[exported] = getattr(loaded, exported)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from medkd.core.errors import DataFileNotFoundError, DataValidationError
    from medkd.data.augment import (
        Augmentation,
        apply_view,
        apply_view_to_masks,
        build_augmentation,
        identity_view,
        sample_view_params,
    )
    from medkd.data.dataset import SPLITS, Dataset, RawData, Split, apply_preprocessing, build_dataset
    from medkd.data.loader import load_dataset
    from medkd.data.registry import available_adapters, get_adapter, register_adapter
    from medkd.spec.data import (
        AffineAugmentSpec,
        AugmentSpec,
        DataSpec,
        DecathlonDataSpec,
        FolderDataSpec,
        IntensityAugmentSpec,
        MedMNISTDataSpec,
        SyntheticDataSpec,
    )
