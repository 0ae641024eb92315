"""ONNX Runtime session options shared by every medkd session on the CPU (scoring, latency, serving)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "INT8_WEIGHT_BITS_KEY",
    "X64_QUANT_PRECISION",
    "cpu_int8_products_saturate",
    "cpu_session_options",
    "int8_weight_bits",
    "needs_exact_int8",
]

# On x86 CPUs without VNNI (AVX2-only, e.g. AMD EPYC before Zen 4), ONNX Runtime multiplies
# uint8 activations by int8 weights with VPMADDUBSW, whose int16 pair sums saturate. Measured on
# such a machine: a dynamically quantized transformer's logits moved 7x further from FP32 (max
# error 0.089 against 0.012), and a static-INT8 BreastMNIST student changed 2 of 156 test decisions
# that FP32 and exact INT8 agree on. This entry makes ONNX Runtime switch those products to
# uint8 x uint8 there, so a model scores the same on every CPU; it changes nothing on CPUs with
# VNNI. The cost, on CPUs without VNNI only: static-INT8 convolutions run at about FP32 speed
# (benchmarks/RESULTS.md, stop 28).
X64_QUANT_PRECISION = "session.x64quantprecision"

# ONNX metadata entry the quantization mode ``int8_static_7bit`` writes: with weights in [-64, 64],
# a pair of uint8 x int8 products sums to at most 2 x 255 x 64 = 32,640 < 32,767, so the fast
# kernels cannot saturate and the exact (slower) products are not needed.
INT8_WEIGHT_BITS_KEY = "medkd.int8_weight_bits"


X86_MACHINES = {"x86_64", "amd64", "i386", "i686"}
VNNI_FLAGS = {"avx512_vnni", "avx_vnni"}


@functools.cache
def cpu_int8_products_saturate(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether ONNX Runtime's fast uint8 x int8 kernels saturate on this CPU: an x86 CPU without VNNI
    (``avx512_vnni`` or ``avx_vnni`` in ``cpuinfo``'s flags), where they sum pairs of products in int16.

    There a session with :data:`X64_QUANT_PRECISION` runs exact products, at about FP32 speed, and
    only 7-bit weights run the fast kernels exactly. ``False`` where it cannot tell (no
    ``cpuinfo``) and on other architectures.

    Examples:
        >>> isinstance(cpu_int8_products_saturate(), bool)
        True
    """
    if platform.machine().lower() not in X86_MACHINES:
        return False
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return flags is not None and not VNNI_FLAGS & set(flags)


def int8_weight_bits(model: str | Path | bytes) -> int | None:
    """The bits of ``model``'s INT8 weights: 7 when its metadata says so (:data:`INT8_WEIGHT_BITS_KEY`),
    8 for other models with INT8 initializers, ``None`` for a model without them (or not readable).

    Args:
        model: an ONNX file or its bytes.

    Examples:
        >>> int8_weight_bits("model.onnx")  # doctest: +SKIP
        8
    """
    import onnx

    try:
        if isinstance(model, (bytes, bytearray)):
            proto = onnx.load_model_from_string(bytes(model))
        else:
            proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # not a readable model: ONNX Runtime's load names the problem
        return None
    if {entry.key: entry.value for entry in proto.metadata_props}.get(INT8_WEIGHT_BITS_KEY) == "7":
        return 7
    int8 = onnx.TensorProto.INT8
    return 8 if any(tensor.data_type == int8 for tensor in proto.graph.initializer) else None


def needs_exact_int8(model: str | Path | bytes) -> bool:
    """Whether a session for ``model`` needs :data:`X64_QUANT_PRECISION`: every model but one whose
    metadata says its INT8 weights have 7 bits (a model without INT8 weights is not slowed by it).

    Args:
        model: an ONNX file or its bytes.

    Examples:
        >>> needs_exact_int8("model.onnx")  # doctest: +SKIP
        True
    """
    return int8_weight_bits(model) != 7


def cpu_session_options(threads: int, *, allow_spinning: bool = True, exact_int8: bool = True) -> ort.SessionOptions:
    """Session options for one model on the CPU: ``threads`` intra-op threads, one inter-op thread,
    sequential execution, every graph optimisation, errors-only logging, saturation-free INT8.

    Args:
        threads: intra-op threads (>= 1).
        allow_spinning: let idle intra-op threads spin (lowest latency for a lone session; off for
            serving replicas that share cores with other processes).
        exact_int8: set :data:`X64_QUANT_PRECISION`; ``False`` only for a model that cannot
            saturate (:func:`needs_exact_int8`), which then runs the fast INT8 kernels.

    Examples:
        >>> cpu_session_options(1).intra_op_num_threads
        1
    """
    import onnxruntime as ort  # on first use: medkd.serve.app imports this where no model runs

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if exact_int8:
        options.add_session_config_entry(X64_QUANT_PRECISION, "1")
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
