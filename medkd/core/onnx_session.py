"""ONNX Runtime session options shared by every medkd session on the CPU (scoring, latency, serving)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["X64_QUANT_PRECISION", "cpu_session_options"]

# On x86 CPUs without VNNI (AVX2-only, e.g. AMD EPYC before Zen 4), ONNX Runtime multiplies
# uint8 activations by int8 weights with VPMADDUBSW, whose int16 pair sums saturate. Measured on
# such a machine: a dynamically quantized transformer's logits moved 7x further from FP32 (max
# error 0.089 against 0.012), and a static-INT8 BreastMNIST student changed 2 of 156 test decisions
# that FP32 and exact INT8 agree on. This entry makes ONNX Runtime switch those products to
# uint8 x uint8 there, so a model scores the same on every CPU; it changes nothing on CPUs with
# VNNI. The cost, on CPUs without VNNI only: static-INT8 convolutions run at about FP32 speed
# (benchmarks/RESULTS.md, stop 28).
X64_QUANT_PRECISION = "session.x64quantprecision"


def cpu_session_options(threads: int, *, allow_spinning: bool = True) -> ort.SessionOptions:
    """Session options for one model on the CPU: ``threads`` intra-op threads, one inter-op thread,
    sequential execution, every graph optimisation, errors-only logging, saturation-free INT8.

    Args:
        threads: intra-op threads (>= 1).
        allow_spinning: let idle intra-op threads spin (lowest latency for a lone session; off for
            serving replicas that share cores with other processes).

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
    options.add_session_config_entry(X64_QUANT_PRECISION, "1")
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
