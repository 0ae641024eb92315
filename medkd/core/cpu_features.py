"""What this CPU can run fast: bfloat16 autocast pays only where oneDNN has native bf16 kernels."""

from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["cpu_has_native_bf16", "warn_if_cpu_bf16_is_slow"]


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


def warn_if_cpu_bf16_is_slow(what: str) -> bool:
    """Warns (``RuntimeWarning``) that ``what`` was asked to run under CPU bfloat16 autocast on a CPU
    without native bf16 kernels, where it runs many times slower than float32; returns whether it warned.

    An explicit ``cpu_precision: bf16`` in a spec is honoured (it is part of the fingerprint), so the
    warning names the setting that would make the run fast on this CPU.

    Args:
        what: the job part that trains under bf16, e.g. ``"teacher 'cnn'"`` or ``"student 'resnet_tiny'"``.

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     warned = warn_if_cpu_bf16_is_slow("teacher 'cnn'")
        >>> warned == (not cpu_has_native_bf16())
        True
    """
    if cpu_has_native_bf16():
        return False
    warnings.warn(
        f"{what}: cpu_precision is bf16, but this CPU has no native bf16 kernels (AVX-512 bf16 or AMX); "
        "bf16 autocast runs over 10x slower than fp32 here. Set cpu_precision: fp32 (or leave it unset) "
        "for this CPU.",
        RuntimeWarning,
        stacklevel=2,
    )
    return True
