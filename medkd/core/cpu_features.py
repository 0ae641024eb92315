"""What this CPU can run fast: bfloat16 autocast pays only where oneDNN has native bf16 kernels."""

from __future__ import annotations

import functools

import torch

__all__ = ["cpu_has_native_bf16"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions and matmuls natively on this CPU (AVX-512 with bf16,
    or AMX), so that ``torch.autocast("cpu", dtype=torch.bfloat16)`` is faster than float32.

    Without them oneDNN falls back to reference kernels: on an AVX2-only AMD EPYC a ResNet-18
    training step at 28 px took 16-26 s under bf16 autocast against 1.0-1.4 s in float32
    (benchmarks/RESULTS.md, stop 28), where an AVX-512 machine had made it 2.3-2.5x faster.

    Examples:
        >>> isinstance(cpu_has_native_bf16(), bool)
        True
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False
