"""medkd.pipeline.tracking without a pipeline run: a store MLflow cannot use, or no MLflow, fails
before anything is trained with an error naming the tracking field (the runs themselves are read
back in tests/pipeline/test_runner.py's end-to-end test)."""

from __future__ import annotations

import sys

import pytest

from medkd.pipeline.tracking import Tracker, TrackingError, flatten, numeric
from medkd.spec.job import parse_spec
from tests.spec.test_job import minimal


def test_off_means_no_tracker(tmp_path):
    assert Tracker.open(parse_spec(minimal()), tmp_path) is None
    assert not (tmp_path / "mlruns").exists()


def test_a_store_mlflow_refuses_is_named(tmp_path, monkeypatch):
    # MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set (why the default is SQLite).
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "filestore").as_uri()
    spec = parse_spec(minimal(tracking={"enabled": True, "uri": uri}))
    with pytest.raises(TrackingError, match=rf"tracking\.uri: MLflow cannot use '{uri}': .*maintenance mode"):
        Tracker.open(spec, tmp_path)


def test_default_store_in_a_folder_that_cannot_be_made_is_named(tmp_path):
    blocker = tmp_path / "output"
    blocker.write_text("a file where output_dir/mlruns should be a folder")
    spec = parse_spec(minimal(tracking={"enabled": True}))
    with pytest.raises(TrackingError, match=r"tracking \(default store sqlite:///.*/output/mlruns/mlflow.db\)"):
        Tracker.open(spec, blocker)


def test_missing_mlflow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without the extra imports
    spec = parse_spec(minimal(tracking={"enabled": True}))
    with pytest.raises(TrackingError, match=r"tracking\.enabled: MLflow is not installed .*medkd\[tracking\]"):
        Tracker.open(spec, tmp_path)


def test_flatten_and_numeric_keep_what_mlflow_takes():
    assert flatten({"a": {"b": {"c": 1}}, "d": [1, 2]}) == {"a/b/c": 1, "d": [1, 2]}
    assert numeric({"auc": 0.5, "nan": float("nan"), "name": "x", "ok": False, "n": 3}, "val/") == {
        "val/auc": 0.5,
        "val/ok": 0.0,
        "val/n": 3.0,
    }
