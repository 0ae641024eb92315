"""ONNX export (torch.export-based, dynamic batch) and the parity check against PyTorch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from medkd.students.compression import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxModel,
    ParityError,
    ParityReport,
    check_parity,
    export_onnx,
)


def small_cnn(classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )  # fmt: skip


def images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, size, size)).astype(np.float32)


class DataDependentBranch(nn.Module):
    """Python control flow on tensor values: torch.export cannot capture it, TorchScript tracing can."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


@pytest.fixture(scope="module")
def exported_cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = small_cnn()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is tested
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = export_onnx(model, torch.from_numpy(images(2)), tmp_path_factory.mktemp("export") / "cnn.onnx")
    return model, path


def test_cnn_export_is_self_contained_and_matches_pytorch(exported_cnn: tuple[nn.Module, Path]) -> None:
    model, path = exported_cnn
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["cnn.onnx"]  # no side *.onnx.data file
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert proto.graph.output[0].name == OUTPUT_NAME

    report = check_parity(model, path, images(32, seed=1), atol=1e-4)
    assert isinstance(report, ParityReport)
    assert report.passed and report.n == 32
    assert report.max_abs_diff < 1e-4
    assert report.mean_abs_diff <= report.max_abs_diff
    assert report.argmax_agreement == 1.0


def test_dynamic_batch_runs_at_other_batch_sizes(exported_cnn: tuple[nn.Module, Path]) -> None:
    model, path = exported_cnn
    session = OnnxModel(path)
    assert session.input_shape == (None, 1, 16, 16)
    for batch in (1, 5):
        x = images(batch, seed=batch)
        with torch.no_grad():
            expected = model.eval()(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(session.predict(x), expected, atol=1e-4)


def test_monai_unet_export_matches_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    path = export_onnx(model, torch.from_numpy(images(2)), tmp_path / "unet.onnx")
    report = check_parity(model, path, images(3, seed=2), atol=1e-4)
    assert report.max_abs_diff < 1e-4
    assert report.argmax_agreement == 1.0  # per pixel
    assert OnnxModel(path).predict(images(1)).shape == (1, 2, 16, 16)


def test_static_batch_export(tmp_path: Path) -> None:
    model = small_cnn()
    path = export_onnx(model, torch.from_numpy(images(2)), tmp_path / "static.onnx", dynamic_batch=False)
    session = OnnxModel(path)
    assert session.input_shape == (2, 1, 16, 16)
    assert check_parity(model, path, images(5), atol=1e-4).passed  # 5 = 2 + 2 + padded 1


def test_export_leaves_callers_model_alone(tmp_path: Path) -> None:
    model = small_cnn().train()
    export_onnx(model, torch.from_numpy(images(2)), tmp_path / "sub" / "dir" / "m.onnx")
    assert model.training
    assert (tmp_path / "sub" / "dir" / "m.onnx").is_file()


def test_export_falls_back_to_torchscript_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = DataDependentBranch()
    with caplog.at_level(logging.WARNING, logger="medkd.students.compression.export"):
        path = export_onnx(model, torch.ones(2, 4), tmp_path / "branch.onnx")
    assert "falling back to the TorchScript exporter" in caplog.text
    assert "data-dependent" in caplog.text.lower() or "guard" in caplog.text.lower()
    positive = np.abs(np.random.default_rng(0).standard_normal((3, 4))).astype(np.float32)
    assert check_parity(model, path, positive, atol=1e-5).passed  # the traced branch, any batch size


def test_check_parity_raises_with_numbers_when_atol_exceeded(exported_cnn: tuple[nn.Module, Path]) -> None:
    _, path = exported_cnn
    other = small_cnn(seed=1)  # different weights than the exported model
    report = check_parity(other, path, images(8))  # no limit given: report only
    assert not report.passed and report.max_abs_diff > 1e-4
    with pytest.raises(ParityError, match=r"max_abs_diff=.*argmax_agreement=.*atol=1e-06") as info:
        check_parity(other, path, images(8), atol=1e-6)
    assert info.value.report.max_abs_diff == pytest.approx(report.max_abs_diff)


def test_check_parity_argmax_limit(exported_cnn: tuple[nn.Module, Path]) -> None:
    model, path = exported_cnn
    assert check_parity(model, path, images(8), min_argmax_agreement=1.0).passed
    other = small_cnn(classes=3, seed=7)
    report = check_parity(other, path, images(64))
    assert report.argmax_agreement < 1.0
    with pytest.raises(ParityError, match="min_argmax_agreement=1"):
        check_parity(other, path, images(64), min_argmax_agreement=1.0)


def test_check_parity_bad_inputs(exported_cnn: tuple[nn.Module, Path], tmp_path: Path) -> None:
    model, path = exported_cnn
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        check_parity(model, tmp_path / "missing.onnx", images(2))
    with pytest.raises(ValueError, match=r"does not fit .*expects \('N', 1, 16, 16\)"):
        check_parity(model, path, images(2, size=8))
    with pytest.raises(ValueError, match="non-empty batch"):
        check_parity(model, path, np.zeros((0, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="atol"):
        check_parity(model, path, images(2), atol=-1.0)
    with pytest.raises(ValueError, match="min_argmax_agreement"):
        check_parity(model, path, images(2), min_argmax_agreement=1.5)


def test_export_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="example_input"):
        export_onnx(small_cnn(), images(2), tmp_path / "m.onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        export_onnx(nn.Linear(4, 2), torch.ones(4), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="nn.Module"):
        export_onnx(lambda x: x, torch.ones(2, 4), tmp_path / "m.onnx")  # type: ignore[arg-type]


def test_decision_agreement_of_multilabel_logits_compares_each_labels_sign() -> None:
    from medkd.students.compression import decision_agreement

    a = np.array([[2.0, -1.0, 0.5], [-3.0, 1.0, -0.2]])
    b = np.array([[1.0, -2.0, -0.5], [-1.0, 2.0, -0.1]])  # same argmax per row, one label flips
    assert decision_agreement(a, b) == 1.0
    assert decision_agreement(a, b, multilabel=True) == pytest.approx(5 / 6)
    assert decision_agreement(a[:, :1], b[:, :1]) == 1.0  # one logit: its sign


def test_check_parity_multilabel_counts_label_decisions(tmp_path: Path) -> None:
    model = small_cnn(classes=4).eval()
    path = export_onnx(model, torch.from_numpy(images(2)), tmp_path / "multilabel.onnx")
    other = small_cnn(classes=4, seed=3).eval()
    inputs = images(32, seed=4)
    with torch.no_grad():
        ours, theirs = model(torch.from_numpy(inputs)).numpy(), other(torch.from_numpy(inputs)).numpy()
    report = check_parity(other, path, inputs, multilabel=True)
    assert report.argmax_agreement == pytest.approx(np.mean((ours > 0) == (theirs > 0)), abs=1e-6)
    assert check_parity(model, path, inputs, multilabel=True).argmax_agreement == 1.0
