"""ONNX Runtime wrapper, latency measurement, size and parameter accounting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from medkd.students.compression import (
    LatencyStats,
    OnnxModel,
    count_nonzero_parameters,
    count_parameters,
    export_onnx,
    measure_latency,
    model_size_bytes,
)

SHAPE = (1, 16, 16)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()  # fmt: skip


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = small_cnn()
    return model, export_onnx(model, torch.from_numpy(images(2)), tmp_path_factory.mktemp("rt") / "cnn.onnx")


def test_predict_matches_pytorch_in_any_batching(exported: tuple[nn.Module, Path]) -> None:
    model, path = exported
    session = OnnxModel(path)
    x = images(11)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.predict(x), expected, atol=1e-5)
    np.testing.assert_array_equal(session.predict(x, batch_size=3), session.predict(x, batch_size=256))
    assert session.predict(x.astype(np.float64)).dtype == np.float32  # inputs are cast


def test_session_properties(exported: tuple[nn.Module, Path]) -> None:
    _, path = exported
    session = OnnxModel(path, threads=2)
    assert session.input_shape == (None, *SHAPE)
    assert session.nbytes == path.stat().st_size
    assert session.providers == ["CPUExecutionProvider"]
    assert session.threads == 2
    assert str(path) in repr(session)


def test_session_from_bytes(exported: tuple[nn.Module, Path]) -> None:
    _, path = exported
    data = path.read_bytes()
    from_bytes = OnnxModel(data)
    assert from_bytes.nbytes == len(data)
    np.testing.assert_array_equal(from_bytes.predict(images(4)), OnnxModel(path).predict(images(4)))


def test_measure_latency(exported: tuple[nn.Module, Path]) -> None:
    _, path = exported
    stats = measure_latency(path, (1, *SHAPE), warmup=2, runs=7)
    assert isinstance(stats, LatencyStats)
    assert stats.runs == 7 and stats.threads == 1
    assert 0 < stats.median_ms <= stats.p90_ms
    assert stats.mean_ms > 0
    assert measure_latency(path, (4, *SHAPE), threads=2, warmup=0, runs=3).threads == 2


def test_model_size_counts_external_data(exported: tuple[nn.Module, Path], tmp_path: Path) -> None:
    _, path = exported
    assert model_size_bytes(path) == path.stat().st_size
    external = tmp_path / "external.onnx"
    onnx.save_model(
        onnx.load(str(path)),
        str(external),
        save_as_external_data=True,
        location="external.onnx.data",
        size_threshold=256,
    )
    data_file = tmp_path / "external.onnx.data"
    assert data_file.stat().st_size > 0
    assert model_size_bytes(external) == external.stat().st_size + data_file.stat().st_size
    np.testing.assert_allclose(OnnxModel(external).predict(images(2)), OnnxModel(path).predict(images(2)))
    data_file.unlink()
    with pytest.raises(FileNotFoundError, match="external.onnx.data"):
        model_size_bytes(external)


def test_parameter_counts() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2
    with torch.no_grad():
        model[0].weight[0].zero_()
    assert count_nonzero_parameters(model) == count_parameters(model) - 4
    shared = nn.Linear(2, 2)
    assert count_parameters(nn.Sequential(shared, shared)) == count_parameters(shared)


def test_bad_inputs(exported: tuple[nn.Module, Path], tmp_path: Path) -> None:
    _, path = exported
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        OnnxModel(tmp_path / "nope.onnx")
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        measure_latency(tmp_path / "nope.onnx", (1, *SHAPE))
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        model_size_bytes(tmp_path / "nope.onnx")
    with pytest.raises(ValueError, match="cannot load <bytes>"):
        OnnxModel(b"not an onnx model")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="garbage.onnx"):
        OnnxModel(garbage)
    with pytest.raises(ValueError, match="garbage.onnx is not an ONNX model"):
        model_size_bytes(garbage)
    with pytest.raises(ValueError, match="threads"):
        OnnxModel(path, threads=0)
    with pytest.raises(ValueError, match="not available"):
        OnnxModel(path, providers=["NoSuchExecutionProvider"])

    session = OnnxModel(path)
    with pytest.raises(ValueError, match=r"does not fit .*expects \('N', 1, 16, 16\)"):
        session.predict(np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        session.predict(np.zeros(SHAPE, np.float32))  # missing batch axis
    with pytest.raises(ValueError, match="non-empty batch"):
        session.predict(np.zeros((0, *SHAPE), np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        session.predict(images(2), batch_size=0)

    with pytest.raises(ValueError, match="input_shape"):
        measure_latency(path, (0, *SHAPE))
    with pytest.raises(ValueError, match="input_shape"):
        measure_latency(path, ())
    with pytest.raises(ValueError, match="does not fit"):
        measure_latency(path, (1, 3, 16, 16))
    with pytest.raises(ValueError, match="runs"):
        measure_latency(path, (1, *SHAPE), runs=0)
    with pytest.raises(ValueError, match="warmup"):
        measure_latency(path, (1, *SHAPE), warmup=-1)
