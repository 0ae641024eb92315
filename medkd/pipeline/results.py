"""``results.json``: the versioned record of a run, written after every stage.

Every section is written by the stage that owns it; a section a stage has not reached yet is
absent (null). Readers load it through :meth:`Results.load`, which refuses a file of another
schema version with a message instead of a ``KeyError`` deep inside a report.

Examples:
    >>> results = Results(job="quickstart", job_fingerprint="21bf00ca03620a06")
    >>> results.stages["teachers"] = StageRecord(status="trained 2", seconds=12.5)
    >>> Results.model_validate_json(results.model_dump_json()).stages["teachers"].status
    'trained 2'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

RESULTS_FILE = "results.json"
RESULTS_SCHEMA_VERSION = 1


class ResultsError(ValueError):
    """A ``results.json`` that cannot be read (missing, not JSON, another schema version)."""


class StageRecord(BaseModel):
    """How one stage ended: a short status ("trained 2", "skipped (found)", "failed"), its time, its error."""

    model_config = ConfigDict(extra="forbid")

    status: str
    seconds: float
    error: str | None = None


class Results(BaseModel):
    """A run's results, section by section (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = RESULTS_SCHEMA_VERSION
    job: str
    job_fingerprint: str
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    dataset: dict[str, Any] | None = None
    teachers: list[dict[str, Any]] | None = None
    ensemble: dict[str, Any] | None = None
    soft_labels: dict[str, Any] | None = None
    search: dict[str, Any] | None = None
    trials: list[dict[str, Any]] | None = None
    final: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    pareto_models: list[dict[str, Any]] | None = None
    serve: dict[str, Any] | None = None
    report: str | None = None
    tracking: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types only (numpy scalars and arrays converted), sections not reached left out."""
        return _json_safe(self.model_dump(exclude_none=True))

    def write(self, output_dir: Path) -> Path:
        """Write ``output_dir/results.json`` atomically (a reader never sees half a file)."""
        path = Path(output_dir) / RESULTS_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, output_dir_or_file: Path | str) -> Results:
        """Read a run's ``results.json`` (give the run's ``output_dir`` or the file).

        Raises:
            ResultsError: missing file, not JSON, or written by another schema version.
        """
        path = Path(output_dir_or_file)
        if path.is_dir():
            path = path / RESULTS_FILE
        if not path.is_file():
            raise ResultsError(f"{path}: no results file (has the job run?)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ResultsError(f"{path}: not JSON ({error})") from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != RESULTS_SCHEMA_VERSION:
            raise ResultsError(f"{path}: schema_version {version!r}, this medkd reads version {RESULTS_SCHEMA_VERSION}")
        return cls.model_validate(raw)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
