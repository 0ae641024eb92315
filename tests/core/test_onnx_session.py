from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from medkd.core.onnx_session import X64_QUANT_PRECISION, cpu_session_options

FEATURES, OUTPUTS = 64, 4


def saturating_matmul(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A MatMul whose dynamically quantized form multiplies uint8 255s by int8 127s: every adjacent
    pair of products (2 x 32,385) overflows int16, which is where u8s8 kernels without VNNI saturate."""
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
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
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
