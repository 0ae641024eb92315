"""Models to serve: reading registry entries on the driver, ONNX Runtime sessions on replicas.

A run's registry is ``<output_dir>/models/<model_id>/{model.onnx,metadata.json}`` plus a
``SELECTED`` file (see :mod:`medkd.registry.export`). :func:`collect_models` turns an export
directory or a run directory into every Pareto student of that run (the entries that share the
selected model's search), with the selected one as the default. Files are read on the driver and
shipped to the replicas as bytes, so multi-node clusters need no shared filesystem.

Examples:
    >>> bundle = collect_models("runs/quickstart")  # doctest: +SKIP
    >>> bundle.default_id in bundle.models  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from medkd.core.errors import GpuUnavailableError
from medkd.core.onnx_session import cpu_int8_products_saturate, cpu_session_options, int8_weight_bits
from medkd.core.ray_node import ray_node_description
from medkd.registry import layout
from medkd.registry.layout import METADATA_FILE, MODEL_FILE, SELECTED_FILE
from medkd.registry.metadata import ModelMetadata

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"

_ORT_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class ModelDirError(ValueError):
    """The model directory is missing ``model.onnx`` or has a bad ``metadata.json``."""


class ModelFiles(BaseModel):
    """One registry entry as shipped to the replicas."""

    model_id: str
    model_bytes: bytes
    metadata: dict[str, Any]


class ModelBundle(BaseModel):
    """Every model one application serves, and the one served when a request names none."""

    models: dict[str, ModelFiles]
    default_id: str


def load_model_dir(model_dir: Path | str) -> tuple[bytes, dict[str, Any]]:
    """Read ``model.onnx`` (bytes) and ``metadata.json`` (validated) from an export directory.

    Args:
        model_dir: a registry entry (``model.onnx`` + ``metadata.json``).

    Raises:
        ModelDirError: a file is missing or ``metadata.json`` is invalid; the message names
            the file and the field.

    Examples:
        >>> model_bytes, metadata = load_model_dir("runs/quickstart/models/m1")  # doctest: +SKIP
    """
    directory = Path(model_dir)
    if not directory.is_dir():
        raise ModelDirError(f"model_dir: {directory} is not a directory")
    model_path, metadata_path = directory / MODEL_FILE, directory / METADATA_FILE
    for path in (model_path, metadata_path):
        if not path.is_file():
            raise ModelDirError(f"model_dir: {path} does not exist (the export stage writes it)")
    try:
        metadata = json.loads(metadata_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelDirError(f"{metadata_path}: not valid JSON: {error}") from None
    try:
        ModelMetadata.model_validate(metadata)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or '<root>'}: {item['msg']}" for item in error.errors()
        )
        raise ModelDirError(f"{metadata_path}: {problems}") from None
    model_bytes = model_path.read_bytes()
    if not model_bytes:
        raise ModelDirError(f"{model_path}: file is empty")
    return model_bytes, metadata


def resolve_model_dir(path: Path | str) -> Path:
    """An export directory, or a run's ``output_dir`` whose ``models/SELECTED`` names one.

    Examples:
        >>> resolve_model_dir("runs/quickstart")  # doctest: +SKIP
        PosixPath('runs/quickstart/models/quickstart-1a2b3c')
    """
    try:
        return layout.resolve_model_dir(path)
    except layout.RegistryLayoutError as error:
        raise ModelDirError(str(error)) from None


def _search_fingerprint(metadata: dict[str, Any]) -> str | None:
    search = metadata.get("search")
    return search.get("fingerprint") if isinstance(search, dict) else None


def collect_models(path: Path | str) -> ModelBundle:
    """Every Pareto student of the run that ``path`` belongs to, the selected one as default.

    ``path`` is a run's ``output_dir``, its ``models/`` registry entry, or a lone export
    directory. Entries of the same registry that come from the same search as the default
    model (same ``search.fingerprint``) are served beside it; a lone directory is served alone.

    Args:
        path: run directory or export directory.

    Raises:
        ModelDirError: no model found, or a file of an entry is missing or invalid.

    Examples:
        >>> sorted(collect_models("runs/quickstart").models)  # doctest: +SKIP
        ['quickstart-04b2', 'quickstart-8658']
    """
    default_dir = resolve_model_dir(path)
    model_bytes, metadata = load_model_dir(default_dir)
    default_id = metadata["model_id"]
    models = {default_id: ModelFiles(model_id=default_id, model_bytes=model_bytes, metadata=metadata)}
    registry = default_dir.parent
    if (registry / SELECTED_FILE).is_file():
        search = _search_fingerprint(metadata)
        for entry in sorted(registry.iterdir()):
            if entry == default_dir or not (entry / METADATA_FILE).is_file() or not (entry / MODEL_FILE).is_file():
                continue
            sibling_bytes, sibling = load_model_dir(entry)
            if search is not None and _search_fingerprint(sibling) != search:
                continue  # an entry of an earlier search of this output_dir
            if sibling["model_id"] in models:
                raise ModelDirError(f"{entry / METADATA_FILE}: model_id {sibling['model_id']!r} appears twice")
            models[sibling["model_id"]] = ModelFiles(
                model_id=sibling["model_id"], model_bytes=sibling_bytes, metadata=sibling
            )
    return ModelBundle(models=models, default_id=default_id)


def create_session(model_bytes: bytes, *, threads: int = 1, use_gpu: bool = False):
    """An ONNX Runtime session with a fixed thread count (no spinning: cores are shared).

    Args:
        model_bytes: the ONNX model.
        threads: intra-op threads.
        use_gpu: run on CUDA; never falls back to the CPU silently.

    Raises:
        GpuUnavailableError: ``use_gpu`` but this ONNX Runtime has no working CUDA provider;
            the message names the node the replica was placed on and ``serve.gpus_per_replica``.

    Examples:
        >>> session = create_session(open("model.onnx", "rb").read())  # doctest: +SKIP
    """
    import onnxruntime as ort

    bits = int8_weight_bits(model_bytes)
    options = cpu_session_options(threads, allow_spinning=False, exact_int8=bits != 7)
    if not use_gpu:
        if bits == 8 and cpu_int8_products_saturate():
            logger.warning(
                "medkd: this CPU has no VNNI, so the model's 8-bit INT8 weights run exact products at about FP32 "
                "speed here; a student searched with search.space.quantize: [int8_static_7bit] runs the fast "
                "INT8 kernels exactly on such CPUs"
            )
        return ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    where = f"serve.gpus_per_replica > 0 asked for a GPU and Ray placed the replica on node {ray_node_description()}"
    if CUDA_PROVIDER not in ort.get_available_providers():
        raise GpuUnavailableError(
            f"{where}, but onnxruntime {ort.__version__} there has no {CUDA_PROVIDER} "
            f"(available: {', '.join(ort.get_available_providers())}); stopped instead of serving on the CPU. "
            "Install the GPU build with `pip install 'medkd[gpu]'` (onnxruntime-gpu) or set serve.gpus_per_replica: 0"
        )
    session = ort.InferenceSession(model_bytes, sess_options=options, providers=[CUDA_PROVIDER, "CPUExecutionProvider"])
    if session.get_providers()[0] != CUDA_PROVIDER:  # no device, or CUDA libraries that failed to load
        raise GpuUnavailableError(
            f"{where}, but ONNX Runtime could not start {CUDA_PROVIDER} there (session providers: "
            f"{session.get_providers()}); stopped instead of serving on the CPU. Check the node's GPU and "
            "CUDA/cuDNN libraries, or set serve.gpus_per_replica: 0"
        )
    return session


@dataclass
class LoadedModel:
    """One ONNX session and its typed metadata, checked against each other at load time."""

    metadata: ModelMetadata
    raw_metadata: dict[str, Any]
    session: Any
    input_name: str
    input_dtype: Any
    output_shape: list[int]
    size_bytes: int

    @classmethod
    def load(cls, files: ModelFiles, *, threads: int = 1, use_gpu: bool = False) -> LoadedModel:
        """Open a session and run one zero input through it (the warm-up inference), so that a
        model that disagrees with its metadata fails the replica at start-up.

        Raises:
            ValueError: the model rejects the metadata's input shape or its output does not
                match ``task`` / ``num_classes``.
            GpuUnavailableError: see :func:`create_session`.
        """
        metadata = ModelMetadata.model_validate(files.metadata)
        session = create_session(files.model_bytes, threads=threads, use_gpu=use_gpu)
        model_input = session.get_inputs()[0]
        dtype = _ORT_INPUT_DTYPES.get(model_input.type)
        if dtype is None:
            raise TypeError(f"{MODEL_FILE}: input {model_input.name!r} has type {model_input.type}, expected float")
        loaded = cls(metadata, files.metadata, session, model_input.name, dtype, [], len(files.model_bytes))
        loaded.output_shape = loaded._check()
        return loaded

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a preprocessed batch ``(N, C, *spatial)``."""
        feed = {self.input_name: batch.astype(self.input_dtype, copy=False)}
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)

    def probe(self) -> float:
        """Run one zero input; returns the seconds it took."""
        meta = self.metadata.input
        started = time.perf_counter()
        self.run(np.zeros((1, meta.in_channels, *meta.image_size), dtype=np.float32))
        return time.perf_counter() - started

    def _check(self) -> list[int]:
        meta = self.metadata
        probe = np.zeros((1, meta.input.in_channels, *meta.input.image_size), dtype=np.float32)
        try:
            output = self.run(probe)
        except Exception as error:
            raise ValueError(
                f"{MODEL_FILE} of {meta.model_id} does not accept input of shape {list(probe.shape)} "
                f"({METADATA_FILE} input): {error}"
            ) from error
        channels = output.shape[1] if output.ndim > 1 else 1
        if meta.task == "classification" and output.ndim != 2:
            raise ValueError(f"{MODEL_FILE}: classification output has shape {list(output.shape)}, expected (N, K)")
        if meta.task == "segmentation" and output.ndim != probe.ndim:
            raise ValueError(
                f"{MODEL_FILE}: segmentation output has shape {list(output.shape)}, expected (N, K, *spatial)"
            )
        binary_single_logit = channels == 1 and meta.num_classes == 2 and not meta.multilabel
        if channels != meta.num_classes and not binary_single_logit:
            raise ValueError(f"{METADATA_FILE}: num_classes is {meta.num_classes} but {MODEL_FILE} outputs {channels}")
        return list(output.shape[1:])

    def describe(self, *, default: bool) -> dict[str, Any]:
        """The ``GET /models`` entry: id, task, classes, size, metrics and latency from the registry."""
        raw, meta = self.raw_metadata, self.metadata
        metrics = raw.get("metrics") if isinstance(raw.get("metrics"), dict) else {}
        search = raw.get("search") if isinstance(raw.get("search"), dict) else {}
        return {
            "model_id": meta.model_id,
            "default": default,
            "task": meta.task,
            "class_names": [meta.label(i) for i in range(meta.num_classes)],
            "pareto_rank": search.get("pareto_rank"),
            "size_bytes": self.size_bytes,
            "params": metrics.get("params"),
            "latency_ms": metrics.get("latency_ms"),
            "metrics": {key: metrics[key] for key in ("val", "test") if key in metrics},
        }
