"""Candidate export helpers (medkd.students.candidate)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from medkd.students.candidate import strip_debug_metadata
from medkd.students.compression import OnnxModel, export_onnx


def test_strip_debug_metadata_keeps_outputs_and_drops_exporter_annotations(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    path = export_onnx(net, torch.randn(2, 1, 8, 8), tmp_path / "net.onnx")
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    before, size_before = OnnxModel(path).predict(x), path.stat().st_size
    assert strip_debug_metadata(path) == path
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert all(len(node.metadata_props) == 0 and not node.doc_string for node in model.graph.node)
    assert path.stat().st_size <= size_before
    np.testing.assert_array_equal(OnnxModel(path).predict(x), before)
