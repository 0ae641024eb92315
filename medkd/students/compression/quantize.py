"""Post-training quantization of exported ONNX models (ONNX Runtime quantization, onnxconverter-common).

Modes (a registry, see ``list_quantization_modes``):

- ``none``: the FP32 model, copied.
- ``int8_static``: INT8 weights and activations (QDQ format), activation ranges calibrated
  on training samples. The right choice for CNNs on CPU.
- ``int8_static_7bit``: ``int8_static`` with 7-bit weights, for serving on x86 CPUs without
  VNNI (AVX2 only): there medkd's sessions can use ONNX Runtime's fast INT8 kernels, which
  saturate on 8-bit weights, at a small cost in fidelity to FP32 (benchmarks/RESULTS.md, stop 28).
- ``int8_dynamic``: INT8 weights of MatMul/Gemm, activations quantized on the fly. For
  Linear-heavy models (ViT, MLP) where activation ranges vary per input.
- ``fp16``: half-precision weights and compute with float32 inputs/outputs, for GPU serving.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnxconverter_common import float16
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from medkd.core.onnx_session import INT8_WEIGHT_BITS_KEY
from medkd.core.registry import Registry

__all__ = [
    "QuantizationMode",
    "SampleReader",
    "bytes_per_weight",
    "convert_fp16",
    "list_quantization_modes",
    "quantize",
    "quantize_dynamic_int8",
    "quantize_static_int8",
    "register_quantization_mode",
]

logger = logging.getLogger(__name__)

QuantizationMode = Literal["none", "int8_static", "int8_static_7bit", "int8_dynamic", "fp16"]
Quantizer = Callable[[Path, Path, "np.ndarray | None"], Path]

QUANTIZATION_MODES: Registry[Quantizer] = Registry("quantization mode")

# Linear layers export as Gemm (2D inputs) or MatMul (+Add, token inputs).
DYNAMIC_OP_TYPES = ["MatMul", "Gemm"]


def register_quantization_mode(name: str) -> Callable[[Quantizer], Quantizer]:
    """Register ``fn(fp32_path, out_path, calibration) -> out_path`` as quantization mode ``name``."""

    return QUANTIZATION_MODES.register(name)


def list_quantization_modes() -> list[str]:
    return QUANTIZATION_MODES.names()


def bytes_per_weight(mode: str) -> int:
    """Bytes each weight takes in a model of quantization ``mode`` (a size estimate before export).

    Examples:
        >>> bytes_per_weight("int8_static_7bit"), bytes_per_weight("fp16"), bytes_per_weight("none")
        (1, 2, 4)
    """
    return 1 if mode.startswith("int8") else 2 if mode == "fp16" else 4


def _model_input(path: Path) -> tuple[str, tuple[int | None, ...]]:
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in initializers)
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in graph_input.type.tensor_type.shape.dim)
    return graph_input.name, dims


def _check_paths(fp32_path: Path, out_path: Path) -> tuple[Path, Path]:
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"FP32 ONNX model not found: {fp32_path}")
    if out_path.resolve() == fp32_path.resolve():
        raise ValueError(f"out_path must differ from fp32_path ({fp32_path}); quantization does not work in place")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return fp32_path, out_path


def _check_calibration(calibration: np.ndarray | None, expected: tuple[int | None, ...], path: Path) -> np.ndarray:
    if calibration is None:
        raise ValueError("calibration samples are required for int8_static quantization")
    calibration = np.asarray(calibration)
    if not np.issubdtype(calibration.dtype, np.number):
        raise ValueError(f"calibration must be a numeric array, got dtype {calibration.dtype}")
    if calibration.ndim != len(expected) or any(
        e is not None and e != s for e, s in zip(expected[1:], calibration.shape[1:])
    ):
        shown = tuple("N" if e is None else e for e in expected)
        raise ValueError(f"calibration of shape {calibration.shape} does not fit the input {shown} of {path}")
    if len(calibration) == 0:
        raise ValueError("calibration must contain at least one sample")
    if not np.all(np.isfinite(calibration)):
        raise ValueError("calibration contains NaN or infinite values")
    return np.ascontiguousarray(calibration, dtype=np.float32)


class SampleReader(CalibrationDataReader):
    """Feeds calibration samples to ONNX Runtime's calibrator in batches.

    A model exported with a fixed batch size is fed batches of exactly that size (the last,
    incomplete batch is dropped unless it is the only one, in which case samples repeat).
    """

    def __init__(self, samples: np.ndarray, input_name: str, batch_size: int = 32, fixed_batch: int | None = None):
        self.samples = samples
        self.input_name = input_name
        self.batch_size = fixed_batch or batch_size
        self.fixed_batch = fixed_batch
        self._batches: Iterator[np.ndarray] | None = None

    def _iter_batches(self) -> Iterator[np.ndarray]:
        samples = self.samples
        if self.fixed_batch and len(samples) < self.fixed_batch:
            samples = np.resize(samples, (self.fixed_batch, *samples.shape[1:]))
        for start in range(0, len(samples), self.batch_size):
            batch = samples[start : start + self.batch_size]
            if self.fixed_batch and len(batch) != self.fixed_batch:
                return
            yield batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._batches is None:
            self._batches = self._iter_batches()
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._batches = None

    def __len__(self) -> int:
        return sum(1 for _ in self._iter_batches())


def _preprocess(fp32_path: Path, directory: Path) -> Path:
    """Shape inference and graph optimisation before quantization (ORT's recommended first step)."""
    target = directory / "preprocessed.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32_path), str(target))
        return target
    except Exception as exc:  # pre-processing is an optimisation; quantization works without it
        logger.warning("quantization pre-processing of %s failed (%s); quantizing it as is", fp32_path, exc)
        return fp32_path


def quantize_static_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    calibration_batch_size: int = 32,
) -> Path:
    """INT8 post-training static quantization (QDQ), activations calibrated on ``calibration``.

    Weights are signed INT8 (per output channel by default), activations unsigned INT8 with
    MinMax ranges observed on the calibration samples, which should be representative training
    inputs, preprocessed exactly like serving inputs (a few hundred are plenty).

    Args:
        fp32_path: the FP32 ONNX model.
        out_path: where to write the INT8 model (must differ from ``fp32_path``).
        calibration: samples ``(n, *input_shape)``.
        per_channel: per-output-channel weight scales (more accurate for conv nets).
        reduce_range: 7-bit weights, for x86 CPUs without VNNI (avoids int16 saturation).
        calibration_batch_size: samples per calibration batch.

    Returns:
        ``out_path``.

    Raises:
        FileNotFoundError: ``fp32_path`` does not exist.
        ValueError: ``calibration`` is missing, empty, non-finite or does not fit the model input;
            ``out_path`` equals ``fp32_path``.
    """
    fp32_path, out_path = _check_paths(fp32_path, out_path)
    input_name, input_shape = _model_input(fp32_path)
    samples = _check_calibration(calibration, input_shape, fp32_path)
    if calibration_batch_size < 1:
        raise ValueError(f"calibration_batch_size must be >= 1, got {calibration_batch_size}")
    reader = SampleReader(samples, input_name, calibration_batch_size, fixed_batch=input_shape[0])
    with tempfile.TemporaryDirectory(prefix="medkd-quant-") as directory:
        source = _preprocess(fp32_path, Path(directory))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                str(source),
                str(out_path),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    return out_path


def quantize_dynamic_int8(fp32_path: Path, out_path: Path, *, per_channel: bool = False) -> Path:
    """INT8 dynamic quantization of the MatMul/Gemm weights (Linear layers); no calibration.

    Activations are quantized per batch at run time, so this suits Linear-heavy models (ViT,
    MLP heads); convolutions stay FP32.

    Raises:
        FileNotFoundError: ``fp32_path`` does not exist.
        ValueError: ``out_path`` equals ``fp32_path``.
    """
    fp32_path, out_path = _check_paths(fp32_path, out_path)
    with tempfile.TemporaryDirectory(prefix="medkd-quant-") as directory:
        source = _preprocess(fp32_path, Path(directory))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(source),
                str(out_path),
                op_types_to_quantize=DYNAMIC_OP_TYPES,
                per_channel=per_channel,
                weight_type=QuantType.QInt8,
            )
    return out_path


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    """Convert weights and compute to float16, keeping float32 inputs and outputs (GPU serving).

    Uses ``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)``, which
    keeps numerically sensitive ops in float32 and inserts the casts. On CPU, ONNX Runtime runs
    such a model but mostly through casts; its purpose is the CUDA provider.

    Raises:
        FileNotFoundError: ``fp32_path`` does not exist.
        ValueError: ``out_path`` equals ``fp32_path``.
    """
    fp32_path, out_path = _check_paths(fp32_path, out_path)
    model = onnx.load(str(fp32_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the value is out of fp16 range, clamped" per tensor
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(out_path))
    return out_path


@register_quantization_mode("none")
def _copy(fp32_path: Path, out_path: Path, calibration: np.ndarray | None) -> Path:
    fp32_path, out_path = _check_paths(fp32_path, out_path)
    shutil.copyfile(fp32_path, out_path)
    return out_path


@register_quantization_mode("int8_static")
def _int8_static(fp32_path: Path, out_path: Path, calibration: np.ndarray | None) -> Path:
    if calibration is None:
        raise ValueError("mode 'int8_static' needs calibration samples (calibration=...)")
    return quantize_static_int8(fp32_path, out_path, calibration)


@register_quantization_mode("int8_static_7bit")
def _int8_static_7bit(fp32_path: Path, out_path: Path, calibration: np.ndarray | None) -> Path:
    """INT8 static with 7-bit weights, for serving on x86 CPUs without VNNI: their fast INT8 kernels
    cannot saturate on such weights, so sessions skip the exact (slower) products
    (:func:`medkd.core.onnx_session.needs_exact_int8` reads the mark this writes)."""
    if calibration is None:
        raise ValueError("mode 'int8_static_7bit' needs calibration samples (calibration=...)")
    quantize_static_int8(fp32_path, out_path, calibration, reduce_range=True)
    model = onnx.load(str(out_path))
    entry = model.metadata_props.add()
    entry.key, entry.value = INT8_WEIGHT_BITS_KEY, "7"
    onnx.save(model, str(out_path))
    return out_path


@register_quantization_mode("int8_dynamic")
def _int8_dynamic(fp32_path: Path, out_path: Path, calibration: np.ndarray | None) -> Path:
    return quantize_dynamic_int8(fp32_path, out_path)


@register_quantization_mode("fp16")
def _fp16(fp32_path: Path, out_path: Path, calibration: np.ndarray | None) -> Path:
    return convert_fp16(fp32_path, out_path)


def quantize(
    fp32_path: Path,
    out_path: Path,
    *,
    mode: QuantizationMode | str,
    calibration: np.ndarray | None = None,
) -> Path:
    """Write the ``mode`` version of the FP32 ONNX model at ``fp32_path`` to ``out_path``.

    Args:
        fp32_path: the FP32 ONNX model.
        out_path: the output model (``mode="none"`` copies the FP32 model there).
        mode: one of ``list_quantization_modes()``.
        calibration: training samples ``(n, *input_shape)``; required by the ``int8_static`` modes.

    Raises:
        ValueError: unknown ``mode``, or missing/bad ``calibration`` for an ``int8_static`` mode.
        FileNotFoundError: ``fp32_path`` does not exist.

    Examples:
        >>> quantize(Path("fp32.onnx"), Path("int8.onnx"), mode="int8_static",
        ...          calibration=train_images[:256])  # doctest: +SKIP
    """
    quantizer = QUANTIZATION_MODES.get(mode).obj
    return quantizer(Path(fp32_path), Path(out_path), calibration)
