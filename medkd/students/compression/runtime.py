"""ONNX Runtime inference, latency measurement and model size accounting.

Latency is measured the same way for every candidate so numbers are comparable across a search:
one ONNX Runtime session with fixed intra-op threads, one inter-op thread, sequential execution,
all graph optimisations, a warm-up, then the median of N timed batch runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict
from torch import nn

from medkd.core.onnx_session import cpu_session_options, needs_exact_int8

__all__ = [
    "LatencyStats",
    "OnnxModel",
    "count_nonzero_parameters",
    "count_parameters",
    "measure_latency",
    "model_size_bytes",
]

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

_ORT_TO_NUMPY: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def _check_positive_int(name: str, value: int, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _resolve_providers(providers: Sequence[str] | None) -> list[str]:
    if providers is None:
        return [CPU_PROVIDER]
    if isinstance(providers, str):
        providers = [providers]
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"providers {missing} are not available in this onnxruntime build (available: {available})")
    resolved = list(providers)
    if CPU_PROVIDER not in resolved:
        resolved.append(CPU_PROVIDER)  # fallback for operators the accelerator lacks
    return resolved


class OnnxModel:
    """An ONNX Runtime session that maps a batch of inputs to the model's first output.

    Args:
        path_or_bytes: an ``.onnx`` file or its serialized bytes.
        threads: intra-op threads (inter-op is 1 and execution sequential).
        providers: ONNX Runtime execution providers in priority order, e.g.
            ``["CUDAExecutionProvider"]``; ``None`` is the CPU provider. The CPU provider is
            always appended as the fallback.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: ``threads < 1``, a provider that is not available, or not a valid ONNX model.

    Examples:
        >>> model = OnnxModel("model.onnx")  # doctest: +SKIP
        >>> model.predict(np.zeros((3, 1, 28, 28), np.float32)).shape  # doctest: +SKIP
        (3, 2)
    """

    def __init__(
        self,
        path_or_bytes: str | Path | bytes,
        *,
        threads: int = 1,
        providers: Sequence[str] | None = None,
    ) -> None:
        threads = _check_positive_int("threads", threads)
        if isinstance(path_or_bytes, (bytes, bytearray)):
            self.source = "<bytes>"
            model_bytes = bytes(path_or_bytes)
            self._nbytes = len(model_bytes)
            session_input: str | bytes = model_bytes
        else:
            path = Path(path_or_bytes)
            if not path.is_file():
                raise FileNotFoundError(f"ONNX model file not found: {path}")
            self.source = str(path)
            session_input = str(path)
        try:
            self.session = ort.InferenceSession(
                session_input,
                sess_options=cpu_session_options(threads, exact_int8=needs_exact_int8(session_input)),
                providers=_resolve_providers(providers),
            )
        except Exception as exc:  # onnxruntime raises its own exception types for any load failure
            raise ValueError(f"ONNX Runtime cannot load {self.source}: {exc}") from exc
        if not isinstance(session_input, bytes):
            self._nbytes = model_size_bytes(session_input)
        self.threads = threads
        model_input = self.session.get_inputs()[0]
        self.input_name: str = model_input.name
        self.input_dtype = _ORT_TO_NUMPY.get(model_input.type)
        if self.input_dtype is None:
            raise ValueError(f"{self.source}: unsupported input type {model_input.type} (expected a float tensor)")
        self.output_name: str = self.session.get_outputs()[0].name

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """The model input's shape; ``None`` for dynamic dimensions (such as the batch)."""
        return tuple(d if isinstance(d, int) else None for d in self.session.get_inputs()[0].shape)

    @property
    def nbytes(self) -> int:
        """Size of the serialized model (with any external weight files)."""
        return self._nbytes

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def check_input(self, x: np.ndarray, *, include_batch: bool = False) -> None:
        """Raise ``ValueError`` if ``x``'s shape does not fit the model input.

        The batch dimension is only checked with ``include_batch`` (``predict`` splits and pads
        batches for models exported with a fixed batch size).
        """
        expected = self.input_shape
        dims = zip(expected, x.shape) if include_batch else zip(expected[1:], x.shape[1:])
        if x.ndim != len(expected) or any(e is not None and e != s for e, s in dims):
            shown = tuple("N" if e is None else e for e in expected)
            raise ValueError(f"input of shape {tuple(x.shape)} does not fit {self.source}, which expects {shown}")

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The first model output for ``x`` (``(n, ...)``), computed in batches of ``batch_size``.

        Raises:
            ValueError: ``x`` is empty or does not fit the model input, or ``batch_size < 1``.
        """
        batch_size = _check_positive_int("batch_size", batch_size)
        x = np.asarray(x)
        if x.ndim == 0 or len(x) == 0:
            raise ValueError(f"predict needs a non-empty batch, got shape {x.shape}")
        self.check_input(x)
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        fixed_batch = self.input_shape[0]
        if fixed_batch is not None:
            batch_size = fixed_batch
        outputs = []
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            n = len(batch)
            if fixed_batch is not None and n < fixed_batch:  # a static-batch model: pad, then trim
                batch = np.concatenate([batch, np.repeat(batch[-1:], fixed_batch - n, axis=0)])
            outputs.append(self.session.run([self.output_name], {self.input_name: batch})[0][:n])
        return np.concatenate(outputs, axis=0)

    def __repr__(self) -> str:
        return f"OnnxModel({self.source!r}, threads={self.threads}, providers={self.providers})"


class LatencyStats(BaseModel):
    """Wall-clock latency of single ``session.run`` calls, in milliseconds."""

    model_config = ConfigDict(frozen=True)

    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    threads: int


def measure_latency(
    model_path: str | Path | bytes,
    input_shape: Sequence[int],
    *,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
) -> LatencyStats:
    """Latency of the ONNX model on a fixed random input of ``input_shape`` (batch included).

    Every candidate is measured identically: CPU provider, ``threads`` intra-op threads, one
    inter-op thread, sequential execution, ``warmup`` untimed runs, then ``runs`` timed runs.

    Args:
        model_path: the ``.onnx`` file (or its bytes).
        input_shape: the full input shape, e.g. ``(1, 1, 28, 28)`` for batch-1 latency.
        threads: intra-op threads.
        warmup: untimed runs first.
        runs: timed runs.

    Raises:
        FileNotFoundError: the model file does not exist.
        ValueError: bad ``input_shape``, ``threads``, ``warmup`` or ``runs``.
    """
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
        raise ValueError(f"input_shape must be a non-empty sequence of positive ints, got {input_shape!r}")
    warmup = _check_positive_int("warmup", warmup, minimum=0)
    runs = _check_positive_int("runs", runs)
    model = OnnxModel(model_path, threads=threads)
    x = np.random.default_rng(0).standard_normal(shape).astype(model.input_dtype)
    model.check_input(x, include_batch=True)
    feed = {model.input_name: x}
    run = model.session.run
    names = [model.output_name]
    for _ in range(warmup):
        run(names, feed)
    timings = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        start = time.perf_counter()
        run(names, feed)
        timings[i] = time.perf_counter() - start
    timings *= 1e3
    return LatencyStats(
        median_ms=float(np.median(timings)),
        p90_ms=float(np.percentile(timings, 90)),
        mean_ms=float(timings.mean()),
        runs=runs,
        threads=model.threads,
    )


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


def model_size_bytes(path: str | Path) -> int:
    """Bytes on disk of an ONNX model, including external weight files it references.

    Raises:
        FileNotFoundError: the model or one of its external data files is missing.
        ValueError: the file is not an ONNX model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model file not found: {path}")
    total = path.stat().st_size
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ValueError(f"{path} is not an ONNX model: {exc}") from exc
    locations = {
        entry.value
        for tensor in _graph_tensors(proto.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    for location in locations:
        external = path.parent / location
        if not external.is_file():
            raise FileNotFoundError(f"external data file {external} of ONNX model {path} not found")
        total += external.stat().st_size
    return total


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero_parameters(model: nn.Module) -> int:
    """Number of nonzero parameter elements (what unstructured pruning reduces)."""
    return sum(int(p.count_nonzero()) for p in model.parameters())
