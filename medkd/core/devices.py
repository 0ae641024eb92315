"""The torch device for work that Ray placed: CUDA when Ray reserved GPUs for it, else the CPU.

A Ray node declares its GPUs (``ray start --num-gpus N``, KubeRay from ``nvidia.com/gpu``
limits) and Ray schedules GPU work by that declaration alone. When a node declares a GPU that
PyTorch cannot use (no device, no driver, a CPU-only build), the work would quietly run on the
CPU at a fraction of the speed while holding the node's GPU slot. Instead, a task, actor or
Train worker that holds GPUs calls :func:`require_reserved_gpus` (or :func:`reserved_gpu_device`)
first, and stops with :class:`GpuUnavailableError`, naming the node and the spec field that asked.

Examples:
    >>> reserved_gpu_device("search.gpus_per_trial")  # doctest: +SKIP
    device(type='cuda')
"""

from __future__ import annotations

import math
import os

import ray
import torch

from medkd.core.errors import GpuUnavailableError
from medkd.core.ray_node import ray_node_description

__all__ = [
    "GpuUnavailableError",
    "cpu_threads",
    "limit_cpu_threads",
    "probe_reserved_gpus",
    "require_reserved_gpus",
    "reserved_gpu_device",
]


def require_reserved_gpus(spec_field: str) -> list[str]:
    """Check that GPUs Ray reserved for the calling task/actor/worker are usable by PyTorch.

    Args:
        spec_field: the job spec field that asked for the GPU (named in the error), e.g.
            ``"teachers[resnet].use_gpu"`` or ``"search.gpus_per_trial"``.

    Returns:
        The GPU ids Ray assigned (empty when the work holds no GPU: nothing to check).

    Raises:
        GpuUnavailableError: GPUs were reserved and ``torch.cuda.is_available()`` is false.

    Examples:
        >>> require_reserved_gpus("search.gpus_per_trial")  # in a task without GPUs  # doctest: +SKIP
        []
    """
    gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
    if gpu_ids and not torch.cuda.is_available():
        raise GpuUnavailableError(
            f"{spec_field} asked for a GPU and Ray placed the work on node {ray_node_description()}, which declares "
            f"GPU(s) {gpu_ids}, but PyTorch {torch.__version__} finds no CUDA device there "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!s}, torch built for CUDA "
            f"{torch.version.cuda or 'none'}); stopped instead of running on the CPU. Fix the node's GPU "
            f"(driver, device plugin, `ray start --num-gpus`), or set {spec_field} so that no GPU is requested."
        )
    return gpu_ids


def reserved_gpu_device(spec_field: str) -> torch.device:
    """The device for a Ray task or actor: ``cuda`` when Ray reserved a GPU for it, else ``cpu``.

    Args:
        spec_field: the job spec field that decides the GPU request (named in the error).

    Raises:
        GpuUnavailableError: a GPU was reserved but PyTorch cannot use one (see
            :func:`require_reserved_gpus`).

    Examples:
        >>> reserved_gpu_device("serve.gpus_per_replica")  # outside Ray, or without GPUs  # doctest: +SKIP
        device(type='cpu')
    """
    return torch.device("cuda") if require_reserved_gpus(spec_field) else torch.device("cpu")


def cpu_threads(cpus: float) -> int:
    """How many threads work that holds ``cpus`` Ray CPUs may run: ``ceil(cpus)``, at least 1.

    Examples:
        >>> cpu_threads(1), cpu_threads(0.5), cpu_threads(1.5)
        (1, 1, 2)
    """
    if not cpus > 0:
        raise ValueError(f"cpus must be > 0, got {cpus!r}")
    return max(1, math.ceil(cpus))


def limit_cpu_threads(cpus: float) -> int:
    """Keep the calling process's PyTorch compute within its Ray CPU allotment.

    Ray schedules by declared CPUs only; a process that holds 1 CPU but runs PyTorch's default
    thread pool (one thread per core of the machine) takes CPU time from the work beside it on
    that node. Sets ``torch.set_num_threads(cpu_threads(cpus))``; ONNX Runtime sessions take
    their thread counts explicitly (``intra_op_num_threads``).

    Args:
        cpus: the CPUs Ray reserved for this task, actor or trial.

    Returns:
        The thread count set.

    Examples:
        >>> limit_cpu_threads(1.0)  # doctest: +SKIP
        1
    """
    threads = cpu_threads(cpus)
    torch.set_num_threads(threads)
    return threads


@ray.remote(max_retries=0)
def _gpu_probe(spec_field: str) -> list[str]:
    return require_reserved_gpus(spec_field)


def probe_reserved_gpus(spec_field: str, *, workers: int, cpus_per_worker: float, timeout_s: float = 60.0) -> None:
    """Before GPU work whose own start would fail opaquely (Ray Train sets up NCCL before any
    medkd code runs in its workers), check the GPUs where that work would be placed: ``workers``
    short tasks with the same resources (``cpus_per_worker`` CPUs and one GPU each).

    Args:
        spec_field: the spec field that asked for the GPUs (named in the error).
        workers: how many GPU workers the work starts.
        cpus_per_worker: CPUs each of them reserves beside its GPU.
        timeout_s: how long the probes may wait to be placed; a cluster that has no free GPU yet
            (an autoscaler adding nodes) is left to the work's own waiting.

    Raises:
        GpuUnavailableError: a probe was placed on a node whose declared GPU PyTorch cannot use.

    Examples:
        >>> probe_reserved_gpus("teachers[resnet].use_gpu", workers=2, cpus_per_worker=1)  # doctest: +SKIP
    """
    probes = [_gpu_probe.options(num_cpus=cpus_per_worker, num_gpus=1).remote(spec_field) for _ in range(workers)]
    try:
        ray.get(probes, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        for probe in probes:
            ray.cancel(probe, force=True)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, GpuUnavailableError):
            raise GpuUnavailableError(str(error.cause)) from None
        raise
