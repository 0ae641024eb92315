"""Data layer: typed data specs, adapters (synthetic, MedMNIST, image folder, Decathlon),
in-memory normalised datasets with content fingerprints, and augmentation.

Examples:
    >>> from medkd.data import SyntheticDataSpec, load_dataset
    >>> dataset = load_dataset(SyntheticDataSpec(num_train=64, num_val=16, num_test=16))
    >>> dataset.summary()["splits"]["train"]["size"]
    64
"""

from medkd.data.augment import (
    Augmentation,
    apply_view,
    apply_view_to_masks,
    build_augmentation,
    identity_view,
    sample_view_params,
)
from medkd.data.dataset import SPLITS, Dataset, RawData, Split, apply_preprocessing, build_dataset
from medkd.core.errors import DataFileNotFoundError, DataValidationError
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

__all__ = [
    "SPLITS",
    "AffineAugmentSpec",
    "Augmentation",
    "AugmentSpec",
    "DataFileNotFoundError",
    "DataSpec",
    "DataValidationError",
    "Dataset",
    "DecathlonDataSpec",
    "FolderDataSpec",
    "IntensityAugmentSpec",
    "MedMNISTDataSpec",
    "RawData",
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
