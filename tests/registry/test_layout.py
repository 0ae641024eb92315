"""The registry's on-disk layout: one place for the export, the server and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from medkd.registry.layout import (
    METADATA_FILE,
    MODEL_FILE,
    RegistryLayoutError,
    registry_dir,
    resolve_model_dir,
    select_model,
    selected_model_id,
)


def _entry(run: Path, model_id: str) -> Path:
    entry = registry_dir(run) / model_id
    entry.mkdir(parents=True)
    (entry / MODEL_FILE).write_bytes(b"onnx")
    (entry / METADATA_FILE).write_text("{}")
    return entry


def test_selecting_and_resolving(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first, second = _entry(run, "m-1"), _entry(run, "m-2")
    assert selected_model_id(run) is None
    with pytest.raises(RegistryLayoutError, match="neither an export directory"):
        resolve_model_dir(run)
    assert select_model(run, "m-2") == second
    assert selected_model_id(run) == "m-2" and resolve_model_dir(run) == second
    assert resolve_model_dir(first) == first  # an entry resolves to itself
    with pytest.raises(RegistryLayoutError, match="no exported model 'm-3'; exported: m-1, m-2"):
        select_model(run, "m-3")
    assert selected_model_id(run) == "m-2"  # a refused selection changes nothing
