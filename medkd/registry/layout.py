"""The on-disk layout of the model registry, in one place for the writer (export), the server and
the CLI::

    <output_dir>/models/<model_id>/model.onnx       the served (compressed) student
    <output_dir>/models/<model_id>/metadata.json    ModelMetadata: input contract, metrics, lineage
    <output_dir>/models/SELECTED                    the model_id served by default

Examples:
    >>> registry_dir("runs/quickstart")
    PosixPath('runs/quickstart/models')
"""

from __future__ import annotations

from pathlib import Path

REGISTRY_DIR = "models"
SELECTED_FILE = "SELECTED"
METADATA_FILE = "metadata.json"
MODEL_FILE = "model.onnx"


class RegistryLayoutError(FileNotFoundError):
    """A path that is neither a registry entry nor a run whose registry selects one."""


def registry_dir(output_dir: Path | str) -> Path:
    """``<output_dir>/models``: where a run's exported students live."""
    return Path(output_dir) / REGISTRY_DIR


def selected_model_id(output_dir: Path | str) -> str | None:
    """The model_id ``models/SELECTED`` names, or None before anything was exported."""
    marker = registry_dir(output_dir) / SELECTED_FILE
    return marker.read_text().strip() if marker.is_file() else None


def select_model(output_dir: Path | str, model_id: str) -> Path:
    """Make ``model_id`` the run's default model; its entry directory is returned.

    Raises:
        RegistryLayoutError: there is no entry ``model_id`` in the run's registry.
    """
    entry = registry_dir(output_dir) / model_id
    if not (entry / METADATA_FILE).is_file():
        known = sorted(p.name for p in registry_dir(output_dir).glob(f"*/{METADATA_FILE}") for p in [p.parent])
        raise RegistryLayoutError(f"{entry}: no exported model {model_id!r}; exported: {', '.join(known) or 'none'}")
    (registry_dir(output_dir) / SELECTED_FILE).write_text(model_id + "\n")
    return entry


def resolve_model_dir(path: Path | str) -> Path:
    """An export directory (holding ``model.onnx``), or a run's ``output_dir`` whose ``models/SELECTED`` names one.

    Raises:
        RegistryLayoutError: ``path`` is neither.

    Examples:
        >>> resolve_model_dir("runs/quickstart")  # doctest: +SKIP
        PosixPath('runs/quickstart/models/quickstart-1a2b3c')
    """
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    selected = selected_model_id(path)
    if selected is not None:
        return registry_dir(path) / selected
    raise RegistryLayoutError(
        f"{path}: neither an export directory ({MODEL_FILE}) nor a run directory ({REGISTRY_DIR}/{SELECTED_FILE})"
    )
