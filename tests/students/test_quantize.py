"""Post-training quantization of exported models: static INT8, dynamic INT8, FP16, the dispatcher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from medkd.core.onnx_session import INT8_WEIGHT_BITS_KEY, X64_QUANT_PRECISION, cpu_session_options, needs_exact_int8
from medkd.students.compression import (
    OnnxModel,
    convert_fp16,
    count_parameters,
    export_onnx,
    list_quantization_modes,
    model_size_bytes,
    quantize,
    quantize_dynamic_int8,
    quantize_static_int8,
)

CLASSES = 4
SIZE = 16


def quadrant_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise plus a bright square in the quadrant named by the label: learnable in a few steps,
    so the trained net has clear logit margins (argmax agreement then measures quantization
    error rather than ties between nearly equal logits of an untrained net)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    x = rng.normal(0.0, 0.3, (n, 1, SIZE, SIZE)).astype(np.float32)
    half = SIZE // 2
    for i, label in enumerate(labels):
        top, left = divmod(int(label), 2)
        r, c = top * half + rng.integers(1, half - 4), left * half + rng.integers(1, half - 4)
        x[i, 0, r : r + 4, c : c + 4] += 1.5
    return x, labels


def conv_net() -> nn.Module:
    """~240k parameters, mostly in 3x3 convs (what static INT8 compresses)."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32, 1), *block(32, 64, 2), *block(64, 128, 2), *block(128, 128, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, CLASSES),
    )  # fmt: skip


def linear_net() -> nn.Module:
    """Linear-heavy: a tiny transformer over 4x4 patches (what dynamic INT8 is for)."""

    class TinyTransformer(nn.Module):
        def __init__(self, dim: int = 64) -> None:
            super().__init__()
            self.embed = nn.Linear(16, dim)
            layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(dim, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(x.shape[0], -1, 16)
            return self.head(self.encoder(self.embed(patches)).mean(dim=1))

    return TinyTransformer()


@pytest.fixture(scope="module")
def trained_fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """(fp32 path, calibration samples, held-out samples from the same distribution)."""
    torch.manual_seed(0)
    model = conv_net()
    assert count_parameters(model) > 200_000
    x, y = quadrant_images(256, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(2):
        for start in range(0, len(x), 32):
            batch, labels = torch.from_numpy(x[start : start + 32]), torch.from_numpy(y[start : start + 32])
            loss = nn.functional.cross_entropy(model(batch), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    # A couple of epochs leave BatchNorm's running averages behind the weights: re-estimate them.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the passes below
        model(torch.from_numpy(x))
    model.eval()
    held_out, held_labels = quadrant_images(128, seed=1)
    path = export_onnx(model, torch.from_numpy(x[:2]), tmp_path_factory.mktemp("quant") / "fp32.onnx")
    accuracy = float(np.mean(OnnxModel(path).predict(held_out).argmax(1) == held_labels))
    assert accuracy > 0.6, f"the fixture net did not learn (accuracy {accuracy:.2f})"
    print(f"fixture accuracy {accuracy:.3f}")
    return path, x[:128], held_out


@pytest.fixture(scope="module")
def linear_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    x, _ = quadrant_images(2, seed=0)
    return export_onnx(linear_net().eval(), torch.from_numpy(x), tmp_path_factory.mktemp("linear") / "fp32.onnx")


def argmax_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def test_static_int8_is_small_and_agrees_with_fp32(
    trained_fp32: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    fp32, calibration, held_out = trained_fp32
    int8 = quantize_static_int8(fp32, tmp_path / "int8.onnx", calibration)
    assert model_size_bytes(int8) <= model_size_bytes(fp32) / 3

    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format

    fp32_logits = OnnxModel(fp32).predict(held_out)
    int8_logits = OnnxModel(int8).predict(held_out)
    assert int8_logits.shape == fp32_logits.shape
    agreement = argmax_agreement(fp32_logits, int8_logits)
    print(f"int8 size ratio {model_size_bytes(int8) / model_size_bytes(fp32):.3f}, argmax agreement {agreement:.3f}")
    assert agreement >= 0.9


def test_static_int8_7bit_runs_the_fast_kernels_exactly(
    trained_fp32: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    fp32, calibration, held_out = trained_fp32
    eight = quantize(fp32, tmp_path / "int8.onnx", mode="int8_static", calibration=calibration)
    seven = quantize(fp32, tmp_path / "int8_7bit.onnx", mode="int8_static_7bit", calibration=calibration)
    model = onnx.load(str(seven))
    assert {p.key: p.value for p in model.metadata_props}[INT8_WEIGHT_BITS_KEY] == "7"
    assert needs_exact_int8(eight) and not needs_exact_int8(seven)
    weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(np.abs(w).max()) for w in weights) <= 64  # 7 bits: pairs of u8 x s8 fit in int16
    assert max(int(np.abs(w).max()) for w in weights) > 32  # and the range is used

    def logits(options) -> np.ndarray:
        session = ort.InferenceSession(str(seven), options, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: held_out})[0]

    fast, exact = cpu_session_options(1, exact_int8=False), cpu_session_options(1)
    assert exact.get_session_config_entry(X64_QUANT_PRECISION) == "1"
    np.testing.assert_allclose(logits(fast), logits(exact), atol=1e-5)  # on CPUs without VNNI too
    np.testing.assert_allclose(OnnxModel(seven).predict(held_out), logits(fast), atol=1e-5)  # medkd's session
    assert argmax_agreement(OnnxModel(fp32).predict(held_out), logits(fast)) >= 0.9


def test_static_int8_per_channel_scales(trained_fp32: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    fp32, calibration, _ = trained_fp32

    def weight_scale_sizes(path: Path) -> set[int]:
        graph = onnx.load(str(path)).graph
        initializers = {t.name: t for t in graph.initializer}
        sizes = set()
        for node in graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
                if (
                    initializers[node.input[0]].data_type == onnx.TensorProto.INT8
                    and len(initializers[node.input[0]].dims) == 4
                ):
                    sizes.add(int(np.prod(initializers[node.input[1]].dims)))
        return sizes

    per_channel = quantize_static_int8(fp32, tmp_path / "pc.onnx", calibration, per_channel=True)
    per_tensor = quantize_static_int8(fp32, tmp_path / "pt.onnx", calibration, per_channel=False)
    assert weight_scale_sizes(per_tensor) == {1}
    assert weight_scale_sizes(per_channel) >= {32, 64, 128}


def test_static_int8_with_fixed_batch_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, _ = quadrant_images(7, seed=3)
    fp32 = export_onnx(conv_net().eval(), torch.from_numpy(x[:4]), tmp_path / "fixed.onnx", dynamic_batch=False)
    int8 = quantize_static_int8(fp32, tmp_path / "fixed_int8.onnx", x)  # 7 samples, batches of 4
    assert OnnxModel(int8).predict(x).shape == (7, CLASSES)


def test_dynamic_int8_shrinks_linear_heavy_net(linear_fp32: Path, tmp_path: Path) -> None:
    int8 = quantize_dynamic_int8(linear_fp32, tmp_path / "dyn.onnx")
    assert model_size_bytes(int8) < 0.6 * model_size_bytes(linear_fp32)
    x, _ = quadrant_images(32, seed=2)
    fp32_logits, int8_logits = OnnxModel(linear_fp32).predict(x), OnnxModel(int8).predict(x)
    # Weight-only rounding error: small relative to the spread of the logits.
    assert np.abs(fp32_logits - int8_logits).max() < 0.2 * fp32_logits.std()
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}


def test_fp16_conversion_runs_with_float32_io(
    trained_fp32: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    fp32, _, held_out = trained_fp32
    fp16 = convert_fp16(fp32, tmp_path / "fp16.onnx")
    assert model_size_bytes(fp16) < 0.6 * model_size_bytes(fp32)
    model = OnnxModel(fp16)
    logits = model.predict(held_out)
    assert logits.dtype == np.float32
    fp32_logits = OnnxModel(fp32).predict(held_out)
    np.testing.assert_allclose(logits, fp32_logits, atol=2e-2 * float(np.abs(fp32_logits).max()))


def test_dispatcher_modes(trained_fp32: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    fp32, calibration, _ = trained_fp32
    assert list_quantization_modes() == ["fp16", "int8_dynamic", "int8_static", "int8_static_7bit", "none"]
    copied = quantize(fp32, tmp_path / "none.onnx", mode="none")
    assert copied.read_bytes() == fp32.read_bytes()
    for mode in ("int8_static", "int8_static_7bit", "int8_dynamic", "fp16"):
        out = quantize(fp32, tmp_path / f"{mode}.onnx", mode=mode, calibration=calibration[:16])
        assert out == tmp_path / f"{mode}.onnx"
        assert OnnxModel(out).predict(calibration[:2]).shape == (2, CLASSES)


def test_bad_inputs(trained_fp32: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    fp32, calibration, _ = trained_fp32
    with pytest.raises(
        ValueError,
        match="unknown quantization mode 'int4'; known quantization modes: fp16, int8_dynamic, int8_static, "
        "int8_static_7bit, none",
    ):
        quantize(fp32, tmp_path / "x.onnx", mode="int4")
    for mode in ("int8_static", "int8_static_7bit"):
        with pytest.raises(ValueError, match=f"mode '{mode}' needs calibration"):
            quantize(fp32, tmp_path / "x.onnx", mode=mode)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        quantize_static_int8(tmp_path / "missing.onnx", tmp_path / "x.onnx", calibration)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        quantize(tmp_path / "missing.onnx", tmp_path / "x.onnx", mode="fp16")
    with pytest.raises(ValueError, match=r"calibration of shape \(4, 3, 16, 16\) does not fit"):
        quantize_static_int8(fp32, tmp_path / "x.onnx", np.zeros((4, 3, SIZE, SIZE), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        quantize_static_int8(fp32, tmp_path / "x.onnx", calibration[0])  # a single image, no batch axis
    with pytest.raises(ValueError, match="at least one sample"):
        quantize_static_int8(fp32, tmp_path / "x.onnx", calibration[:0])
    nan = calibration[:4].copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize_static_int8(fp32, tmp_path / "x.onnx", nan)
    with pytest.raises(ValueError, match="out_path must differ"):
        quantize_dynamic_int8(fp32, fp32)
    assert not (tmp_path / "x.onnx").exists()
