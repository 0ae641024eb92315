"""results.json: versioned, typed, written atomically, read back with a clear refusal of other versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from medkd.pipeline.results import RESULTS_FILE, Results, ResultsError, StageRecord


def test_written_results_read_back_with_plain_json_types(tmp_path: Path) -> None:
    results = Results(job="j", job_fingerprint="fp")
    results.stages["teachers"] = StageRecord(status="trained 2", seconds=1.5)
    results.teachers = [{"name": "t1", "val": {"auc": np.float32(0.75)}, "history": np.arange(3)}]
    results.ensemble = {"val_metrics": {"auc": float("nan")}}
    path = results.write(tmp_path)
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1 and raw["teachers"][0]["val"]["auc"] == 0.75
    assert raw["teachers"][0]["history"] == [0, 1, 2] and raw["ensemble"]["val_metrics"]["auc"] is None
    assert "search" not in raw  # a stage not reached leaves its section out
    loaded = Results.load(tmp_path)
    assert loaded.stages["teachers"].status == "trained 2" and loaded.teachers[0]["name"] == "t1"


def test_bad_results_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="no results file"):
        Results.load(tmp_path)
    (tmp_path / RESULTS_FILE).write_text("{not json")
    with pytest.raises(ResultsError, match="not JSON"):
        Results.load(tmp_path)
    (tmp_path / RESULTS_FILE).write_text(json.dumps({"schema_version": 99, "job": "j", "job_fingerprint": "f"}))
    with pytest.raises(ResultsError, match="schema_version 99, this medkd reads version 1"):
        Results.load(tmp_path / RESULTS_FILE)


def test_an_undeclared_section_is_an_error() -> None:
    with pytest.raises(ValidationError, match="surprise"):
        Results(job="j", job_fingerprint="f", surprise={})
