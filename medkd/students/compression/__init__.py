"""Compression and export of students: pruning, ONNX export with parity check, quantization,
ONNX Runtime inference and latency measurement.

Typical use, for a trained student ``model`` and training images ``train_x``::

    model = prune_channels(model, 0.3, torch.from_numpy(train_x[:2]))   # then fine-tune
    fp32 = export_onnx(model, torch.from_numpy(train_x[:2]), out / "model_fp32.onnx")
    check_parity(model, fp32, val_x[:64], atol=1e-4)
    served = quantize(fp32, out / "model.onnx", mode="int8_static", calibration=train_x[:256])
    measure_latency(served, (1, *train_x.shape[1:])).median_ms
"""

from medkd.students.compression.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    ParityError,
    ParityReport,
    check_parity,
    decision_agreement,
    export_onnx,
)
from medkd.students.compression.prune import (
    UnsupportedModelError,
    prune_channels,
    prune_unstructured,
    sparsity,
)
from medkd.students.compression.quantize import (
    QuantizationMode,
    bytes_per_weight,
    convert_fp16,
    list_quantization_modes,
    quantize,
    quantize_dynamic_int8,
    quantize_static_int8,
    register_quantization_mode,
)
from medkd.students.compression.runtime import (
    LatencyStats,
    OnnxModel,
    count_nonzero_parameters,
    count_parameters,
    measure_latency,
    model_size_bytes,
)

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "LatencyStats",
    "OnnxModel",
    "ParityError",
    "ParityReport",
    "QuantizationMode",
    "UnsupportedModelError",
    "bytes_per_weight",
    "check_parity",
    "convert_fp16",
    "count_nonzero_parameters",
    "count_parameters",
    "decision_agreement",
    "export_onnx",
    "list_quantization_modes",
    "measure_latency",
    "model_size_bytes",
    "prune_channels",
    "prune_unstructured",
    "quantize",
    "quantize_dynamic_int8",
    "quantize_static_int8",
    "register_quantization_mode",
    "sparsity",
]
