from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from medkd.core import onnx_session
from medkd.core.onnx_session import (
    INT8_WEIGHT_BITS_KEY,
    X64_QUANT_PRECISION,
    cpu_int8_products_saturate,
    cpu_session_options,
    int8_weight_bits,
    needs_exact_int8,
)

FEATURES, OUTPUTS = 64, 4


def saturating_matmul(tmp_path: Path, *, reduce_range: bool = False) -> tuple[Path, np.ndarray, np.ndarray]:
    """A MatMul whose dynamically quantized form multiplies uint8 255s by int8 127s: every adjacent
    pair of products (2 x 32,385) overflows int16, which is where u8s8 kernels without VNNI saturate.
    With ``reduce_range`` (7-bit weights) the products are 255 x 64 and their pairs fit in int16."""
    weights = np.ones((FEATURES, OUTPUTS), np.float32)
    weights[:, 1] = -1.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "saturating",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUTPUTS])],
        [numpy_helper.from_array(weights, "w")],
    )
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    int8 = tmp_path / "int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, reduce_range=reduce_range)
    x = np.ones((3, FEATURES), np.float32)
    x[1] = 0.5
    return int8, x, x @ weights


def test_int8_products_do_not_saturate_on_any_x86_cpu(tmp_path):
    int8, x, expected = saturating_matmul(tmp_path)
    session = ort.InferenceSession(str(int8), cpu_session_options(1), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x})
    # Saturation would halve the extreme rows (|y| = 64 -> ~32); rounding alone moves them by < 1.
    np.testing.assert_allclose(got, expected, atol=1.0)


def test_options_carry_threads_spinning_and_the_precision_entry():
    options = cpu_session_options(2, allow_spinning=False)
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry(X64_QUANT_PRECISION) == "1"
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="allow_spinning"):  # not set: ONNX Runtime's default (spinning)
        cpu_session_options(1).get_session_config_entry("session.intra_op.allow_spinning")


def test_seven_bit_weights_are_exact_without_the_precision_entry(tmp_path):
    int8, x, expected = saturating_matmul(tmp_path, reduce_range=True)
    options = cpu_session_options(1, exact_int8=False)
    with pytest.raises(RuntimeError, match="x64quantprecision"):  # the entry is not set
        options.get_session_config_entry(X64_QUANT_PRECISION)
    (got,) = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got, expected, atol=1.0)


def test_only_a_model_marked_seven_bit_skips_the_exact_products(tmp_path):
    int8, _, _ = saturating_matmul(tmp_path)
    assert int8_weight_bits(int8) == 8 and int8_weight_bits(tmp_path / "fp32.onnx") is None
    assert needs_exact_int8(int8) and needs_exact_int8(int8.read_bytes())
    model = onnx.load(str(int8))
    onnx.helper.set_model_props(model, {INT8_WEIGHT_BITS_KEY: "7"})
    marked = tmp_path / "marked.onnx"
    onnx.save(model, marked)
    assert not needs_exact_int8(marked) and not needs_exact_int8(marked.read_bytes())
    assert int8_weight_bits(marked) == 7
    onnx.helper.set_model_props(model, {INT8_WEIGHT_BITS_KEY: "8"})
    assert needs_exact_int8(model.SerializeToString())
    # Not a model: the exact products, and ONNX Runtime's own load error later.
    assert needs_exact_int8(b"not an onnx model") and needs_exact_int8(tmp_path / "missing.onnx")


@pytest.mark.parametrize(
    ("machine", "flags", "saturates"),
    [
        ("x86_64", "fpu sse2 avx avx2 fma", True),  # AVX2 only: VPMADDUBSW's int16 pair sums
        ("x86_64", "fpu avx2 avx512f avx512bw", True),  # AVX-512 without VNNI saturates too
        ("x86_64", "fpu avx2 avx512f avx512_vnni", False),
        ("x86_64", "fpu avx2 avx_vnni", False),
        ("aarch64", "fp asimd asimddp", False),  # not x86: other kernels
    ],
)
def test_which_cpus_saturate_int8_products(tmp_path, monkeypatch, machine, flags, saturates):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(onnx_session.platform, "machine", lambda: machine)
    assert cpu_int8_products_saturate(cpuinfo) is saturates


def test_an_unreadable_cpuinfo_is_no_verdict(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_session.platform, "machine", lambda: "x86_64")
    assert cpu_int8_products_saturate(tmp_path / "missing") is False
    (tmp_path / "noflags").write_text("processor\t: 0\n")
    assert cpu_int8_products_saturate(tmp_path / "noflags") is False
