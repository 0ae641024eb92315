"""``load_dataset``: any data spec -> a checked, normalised, fingerprinted :class:`Dataset`."""

from __future__ import annotations

from pydantic import TypeAdapter

# Importing the adapter modules registers them.
from medkd.data import decathlon, folder, medmnist, synthetic  # noqa: F401
from medkd.data.dataset import Dataset, build_dataset
from medkd.data.registry import get_adapter
from medkd.spec.data import DataSpec

_DATA_SPEC = TypeAdapter(DataSpec)


def load_dataset(spec: DataSpec) -> Dataset:
    """Load, check, normalise and fingerprint the data a spec describes.

    Args:
        spec: a data spec model (``SyntheticDataSpec``, ``MedMNISTDataSpec``, ...) or a dict
            with a ``kind`` key.

    Raises:
        DataFileNotFoundError: a file or folder named by the spec does not exist.
        DataValidationError: the data is unusable; the message names the file and the problem.

    Examples:
        >>> dataset = load_dataset({"kind": "synthetic", "num_train": 64, "num_val": 16, "num_test": 16})
        >>> dataset.splits["train"].images.shape
        (64, 1, 28, 28)
    """
    if isinstance(spec, dict):
        spec = _DATA_SPEC.validate_python(spec)
    spec.check_paths()
    raw = get_adapter(spec.kind)(spec)
    return build_dataset(raw, spec.kind, spec.content_fields())
