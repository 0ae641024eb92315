"""The Serve application builder used by `serve run` and RayService configs."""

from __future__ import annotations

import json

import pytest

from medkd.serve.app import ModelDirError, app_builder, resolve_model_dir


def test_resolve_model_dir_accepts_export_and_run_dirs(tmp_path):
    export = tmp_path / "run" / "models" / "m1"
    export.mkdir(parents=True)
    (export / "model.onnx").write_bytes(b"x")
    assert resolve_model_dir(export) == export
    (tmp_path / "run" / "models" / "SELECTED").write_text("m1\n")
    assert resolve_model_dir(tmp_path / "run") == export
    with pytest.raises(ModelDirError, match="neither an export directory"):
        resolve_model_dir(tmp_path)


def test_app_builder_validates_args(tmp_path):
    with pytest.raises(ModelDirError, match="model_dir is required"):
        app_builder({})
    with pytest.raises(ModelDirError, match="unknown args"):
        app_builder({"model_dir": str(tmp_path), "replicas": 3})
    with pytest.raises(ValueError, match="max_replicas"):
        app_builder({"model_dir": str(tmp_path), "serve": {"min_replicas": 3, "max_replicas": 1}})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not onnx")
    (broken / "metadata.json").write_text(json.dumps({"task": "classification"}))
    with pytest.raises(ModelDirError):
        app_builder({"model_dir": str(broken)})
