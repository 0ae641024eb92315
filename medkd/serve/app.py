"""The Ray Serve application that serves an exported ONNX student over HTTP.

One deployment, :class:`ModelServer`, is both the HTTP ingress and the model: a request is
decoded and preprocessed on the replica, then joins a dynamic batch (``@serve.batch``) that one
ONNX Runtime session runs in a worker thread, so the event loop keeps accepting (and batching)
requests while the model computes. Replicas autoscale on ongoing requests.

The model and its metadata are read on the driver and handed to the replicas as bytes, so the
application runs on multi-node clusters without a shared filesystem.

Routes (below the application's ``route_prefix``):

=====================  ========================================================================
``POST /predict``      one image (PNG, JPEG, NPY, DICOM or JSON) -> prediction JSON
``POST /predict/batch`` NPY ``(N, ...)`` or JSON ``{"instances": [...]}`` -> ``predictions``
``GET /healthz``       liveness and the model id
``GET /metadata``      the model's ``metadata.json`` plus serving details
``GET /stats``         this replica's request and batch-size counters
=====================  ========================================================================

Examples:
    >>> from medkd.serve.app import deploy, undeploy  # doctest: +SKIP
    >>> url = deploy("runs/quickstart/export", ServeConfig(port=8000))  # doctest: +SKIP
    >>> MedkdClient(url).predict("scan.png")["predicted_label"]  # doctest: +SKIP
    'benign'
    >>> undeploy()  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from medkd.serve.codecs import (
    PayloadTooLarge,
    RequestError,
    decode_batch,
    decode_image,
    encode_npy,
    preprocess,
)
from medkd.registry.metadata import ModelMetadata
from medkd.spec.serve import ServeConfig

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
NPY_MEDIA_TYPE = "application/x-npy"
DEPLOYMENT_NAME = "MedkdModel"

_ORT_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class ModelDirError(ValueError):
    """The model directory is missing ``model.onnx`` or has a bad ``metadata.json``."""


def load_model_dir(model_dir: Path | str) -> tuple[bytes, dict[str, Any]]:
    """Read ``model.onnx`` (bytes) and ``metadata.json`` (validated) from an export directory.

    Raises:
        ModelDirError: a file is missing or ``metadata.json`` is invalid; the message names
            the file and the field.
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


def create_session(model_bytes: bytes, *, threads: int = 1, use_gpu: bool = False):
    """An ONNX Runtime session with a fixed thread count (no spinning: cores are shared)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(model_bytes, sess_options=options, providers=providers)


# ------------------------------------------------------------------------------ postprocessing


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x.astype(np.float64) - x.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def classification_outputs(logits: np.ndarray, metadata: ModelMetadata) -> list[dict[str, Any]]:
    """Per-image probabilities and predicted class(es) from logits ``(N, K)``."""
    logits = logits.reshape(len(logits), -1)
    if metadata.multilabel:
        probabilities = _sigmoid(logits)
    elif logits.shape[1] == 1:  # binary model with a single logit
        positive = _sigmoid(logits[:, 0])
        probabilities = np.stack([1.0 - positive, positive], axis=1)
    else:
        probabilities = _softmax(logits)
    results = []
    for row in probabilities:
        predicted = int(row.argmax())
        result: dict[str, Any] = {
            "probabilities": row.tolist(),
            "predicted_class": predicted,
            "predicted_label": metadata.label(predicted),
        }
        if metadata.multilabel:
            result["predicted_labels"] = [metadata.label(i) for i in np.flatnonzero(row >= 0.5)]
        results.append(result)
    return results


def segmentation_masks(logits: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """Masks from logits ``(N, K, *spatial)``: class indices ``(N, *spatial)`` or, for
    multi-label models, one 0/1 channel per label ``(N, K, *spatial)``."""
    if metadata.multilabel:
        return (logits > 0).astype(np.uint8)
    if logits.shape[1] == 1:  # binary model with a single logit channel
        return (logits[:, 0] > 0).astype(np.uint8)
    dtype = np.uint8 if logits.shape[1] <= 256 else np.uint16
    return logits.argmax(axis=1).astype(dtype)


def segmentation_output(mask: np.ndarray, metadata: ModelMetadata, *, as_list: bool) -> dict[str, Any]:
    if metadata.multilabel:
        counts = mask.reshape(mask.shape[0], -1).sum(axis=1)
    else:
        counts = np.bincount(mask.ravel(), minlength=metadata.num_classes)
    result: dict[str, Any] = {"shape": list(mask.shape), "class_pixel_counts": [int(c) for c in counts]}
    if as_list:
        result["mask"] = mask.tolist()
    else:
        result["mask_npy_b64"] = base64.b64encode(encode_npy(mask)).decode("ascii")
    return result


# -------------------------------------------------------------------------------- deployment


def _images_in(batch: list[np.ndarray]) -> int:
    """Batch size in images: a /predict/batch chunk counts as all of its images."""
    return sum(len(item) for item in batch)


def _json_response(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(payload).encode(), status_code=status, media_type="application/json")


_ROUTES: dict[tuple[str, str], str] = {}


def _route(method: str, path: str):
    def decorator(handler):
        _ROUTES[(method, path)] = handler.__name__
        return handler

    return decorator


@serve.deployment(name=DEPLOYMENT_NAME)
class ModelServer:
    """HTTP ingress and ONNX model in one replica (no extra hop between them)."""

    def __init__(self, model_bytes: bytes, metadata: dict[str, Any], config: dict[str, Any]) -> None:
        self._config = ServeConfig.model_validate(config)
        self._metadata = ModelMetadata.model_validate(metadata)
        self._raw_metadata = metadata
        self._session = create_session(
            model_bytes, threads=self._config.ort_threads, use_gpu=self._config.gpus_per_replica > 0
        )
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        self._input_dtype = _ORT_INPUT_DTYPES.get(model_input.type)
        if self._input_dtype is None:
            raise TypeError(f"{MODEL_FILE}: input {model_input.name!r} has type {model_input.type}, expected float")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medkd-onnx")
        self._infer.set_max_batch_size(self._config.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self._config.batch_wait_timeout_s)
        try:
            self._replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # not running inside Serve (e.g. a direct unit test)
            self._replica = "local"
        self._requests = 0
        self._images = 0
        self._batch_sizes: Counter[int] = Counter()
        self._output_shape = self._check_model()

    def _check_model(self) -> list[int]:
        """Run one zero input so a model/metadata mismatch fails the replica at start-up."""
        meta = self._metadata
        probe = np.zeros((1, meta.input.in_channels, *meta.input.image_size), dtype=np.float32)
        try:
            output = self._run(probe)
        except Exception as error:
            raise ValueError(
                f"{MODEL_FILE} does not accept input of shape {list(probe.shape)} "
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
            raise ValueError(
                f"{METADATA_FILE}: num_classes is {meta.num_classes} but {MODEL_FILE} outputs {channels}"
            )
        return list(output.shape[1:])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        feed = {self._input_name: batch.astype(self._input_dtype, copy=False)}
        return np.asarray(self._session.run(None, feed)[0], dtype=np.float32)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=_images_in)
    async def _infer(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """One model call for every queued request; each chunk is ``(n_i, C, *spatial)``."""
        batch = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self._executor, self._run, batch)
        self._batch_sizes[len(batch)] += 1
        self._images += len(batch)
        splits = np.cumsum([len(chunk) for chunk in chunks])[:-1]
        return np.split(outputs, splits)

    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        path = "/" + path.strip("/")
        handler_name = _ROUTES.get((request.method, path))
        if handler_name is None:
            allowed = sorted(method for method, route in _ROUTES if route == path)
            if allowed:
                return _json_response(
                    {"error": f"{request.method} {path} is not allowed; use {', '.join(allowed)}", "status": 405}, 405
                )
            routes = ", ".join(f"{method} {route}" for method, route in sorted(_ROUTES, key=lambda r: r[1]))
            return _json_response({"error": f"no route {request.method} {path}; routes: {routes}", "status": 404}, 404)
        handler: Callable[[Request, float], Awaitable[Response]] = getattr(self, handler_name)
        try:
            return await handler(request, started)
        except RequestError as error:
            return _json_response(error.to_dict(), error.status)
        except Exception as error:
            logger.exception("medkd: %s %s failed", request.method, path)
            return _json_response({"error": f"internal error: {type(error).__name__}: {error}", "status": 500}, 500)

    # ---------------------------------------------------------------------------- routes

    @_route("GET", "/healthz")
    async def _healthz(self, request: Request, started: float) -> Response:
        return _json_response({"status": "ok", "model_id": self._metadata.model_id, "replica": self._replica})

    @_route("GET", "/metadata")
    async def _metadata_route(self, request: Request, started: float) -> Response:
        serving = {
            "replica": self._replica,
            "input_name": self._input_name,
            "input_shape": [None, self._metadata.input.in_channels, *self._metadata.input.image_size],
            "output_shape": [None, *self._output_shape],
            "providers": self._session.get_providers(),
            "max_batch_size": self._config.max_batch_size,
            "batch_wait_timeout_s": self._config.batch_wait_timeout_s,
            "max_body_bytes": self._config.max_body_bytes,
        }
        return _json_response({**self._raw_metadata, "serving": serving})

    @_route("GET", "/stats")
    async def _stats(self, request: Request, started: float) -> Response:
        return _json_response(
            {
                "replica": self._replica,
                "requests": self._requests,
                "images": self._images,
                "batches": sum(self._batch_sizes.values()),
                "batch_sizes": {str(size): count for size, count in sorted(self._batch_sizes.items())},
                "largest_batch": max(self._batch_sizes, default=0),
                "max_batch_size": self._config.max_batch_size,
            }
        )

    @_route("POST", "/predict")
    async def _predict(self, request: Request, started: float) -> Response:
        body = await self._read_body(request)
        image = decode_image(body, request.headers.get("content-type"), max_bytes=self._config.max_body_bytes)
        model_input = preprocess(image, self._metadata.input)[np.newaxis]
        self._requests += 1
        outputs = await self._infer(model_input)
        return self._respond(request, outputs, started, single=True)

    @_route("POST", "/predict/batch")
    async def _predict_batch(self, request: Request, started: float) -> Response:
        body = await self._read_body(request)
        images = decode_batch(body, request.headers.get("content-type"), max_bytes=self._config.max_body_bytes)
        model_inputs = np.stack([preprocess(image, self._metadata.input) for image in images])
        self._requests += 1
        size = self._config.max_batch_size
        chunks = [model_inputs[start : start + size] for start in range(0, len(model_inputs), size)]
        outputs = np.concatenate(await asyncio.gather(*(self._infer(chunk) for chunk in chunks)))
        return self._respond(request, outputs, started, single=False)

    # --------------------------------------------------------------------------- helpers

    async def _read_body(self, request: Request) -> bytes:
        limit = self._config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(f"Content-Length header {declared!r} is not a number")
            if int(declared) > limit:
                raise PayloadTooLarge(f"request body is {declared} bytes, larger than the limit of {limit}")
        parts, total = [], 0
        async for part in request.stream():
            total += len(part)
            if total > limit:
                raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
            parts.append(part)
        return b"".join(parts)

    def _respond(self, request: Request, outputs: np.ndarray, started: float, *, single: bool) -> Response:
        meta = self._metadata
        wants_npy = NPY_MEDIA_TYPE in request.headers.get("accept", "")
        if meta.task == "segmentation":
            masks = segmentation_masks(outputs, meta)
            if wants_npy:
                return Response(
                    encode_npy(masks[0] if single else masks),
                    media_type=NPY_MEDIA_TYPE,
                    headers={"X-Model-Id": meta.model_id, "X-Latency-Ms": f"{_elapsed_ms(started):.3f}"},
                )
            as_list = request.query_params.get("mask") == "list"
            predictions = [segmentation_output(mask, meta, as_list=as_list) for mask in masks]
        else:
            predictions = classification_outputs(outputs, meta)
        if single:
            payload = {"model_id": meta.model_id, **predictions[0]}
        else:
            payload = {"model_id": meta.model_id, "count": len(predictions), "predictions": predictions}
        payload["latency_ms"] = round(_elapsed_ms(started), 3)
        return _json_response(payload)


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


# ------------------------------------------------------------------------- build and deploy


def build_app(model_dir: Path | str, config: ServeConfig | None = None) -> serve.Application:
    """The Serve application for an export directory (``model.onnx`` + ``metadata.json``).

    The files are read here, on the driver, and passed to the replicas as bytes.

    Args:
        model_dir: directory written by the export stage.
        config: serving configuration (autoscaling, batching, resources).

    Raises:
        ModelDirError: missing files or invalid metadata.
    """
    config = config or ServeConfig()
    model_bytes, metadata = load_model_dir(model_dir)
    deployment = ModelServer.options(
        autoscaling_config=config.autoscaling_config(),
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options=config.ray_actor_options(),
    )
    return deployment.bind(model_bytes, metadata, config.model_dump(mode="json"))


def resolve_model_dir(path: Path | str) -> Path:
    """An export directory, or a run's ``output_dir`` whose ``models/SELECTED`` names one."""
    path = Path(path)
    if (path / "model.onnx").is_file():
        return path
    selected = path / "models" / "SELECTED"
    if selected.is_file():
        return path / "models" / selected.read_text().strip()
    raise ModelDirError(f"{path}: neither an export directory (model.onnx) nor a run directory (models/SELECTED)")


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve application builder for ``serve run`` / RayService configs.

    ``args``: ``model_dir`` (export directory or run output_dir) and optional ``serve``
    (ServeConfig fields, as in a job spec's ``serve:`` section).

    Examples:
        serve run medkd.serve.app:app_builder model_dir=runs/quickstart
    """
    if "model_dir" not in args:
        raise ModelDirError("app_builder: args.model_dir is required (an export directory or a run's output_dir)")
    unknown = set(args) - {"model_dir", "serve"}
    if unknown:
        raise ModelDirError(f"app_builder: unknown args {sorted(unknown)} (expected model_dir, serve)")
    config = ServeConfig.model_validate(args.get("serve") or {})
    return build_app(resolve_model_dir(args["model_dir"]), config)


def _serve_http_address(config: ServeConfig) -> tuple[str, int]:
    """Host and port of the running Serve HTTP proxy (which may predate this config)."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host or config.host, int(http.port)
    except Exception:  # private API moved: assume our own options were applied
        return config.host, config.port
    if (host, port) != (config.host, config.port):
        logger.warning(
            "medkd: Serve was already running on %s:%s; serving there instead of %s:%s",
            host, port, config.host, config.port,
        )
    return host, port


def wait_until_healthy(base_url: str, *, timeout_s: float = 60.0) -> None:
    """Poll ``GET /healthz`` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | str = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as error:
            last_error = error
        time.sleep(0.2)
    raise TimeoutError(f"{base_url}/healthz did not answer 200 within {timeout_s:.0f} s: {last_error}")


def deploy(
    model_dir: Path | str,
    config: ServeConfig | None = None,
    *,
    app_name: str = "medkd",
    blocking: bool = False,
) -> str:
    """Deploy the model on Ray Serve (starting Serve if needed) and return its base URL.

    Args:
        model_dir: directory with ``model.onnx`` and ``metadata.json``.
        config: serving configuration; ``host``/``port`` apply when this call starts Serve.
        app_name: Serve application name (deploying the same name again updates it).
        blocking: serve until interrupted (Ctrl-C), then undeploy.

    Returns:
        The base URL, e.g. ``http://127.0.0.1:8000`` (plus the route prefix).
    """
    config = config or ServeConfig()
    application = build_app(model_dir, config)
    serve.start(http_options={"host": config.host, "port": config.port})
    host, port = _serve_http_address(config)
    base_url = config.model_copy(update={"host": host, "port": port}).local_url()
    serve.run(application, name=app_name, route_prefix=config.route_prefix, blocking=False)
    wait_until_healthy(base_url)
    logger.info("medkd: serving %s at %s", model_dir, base_url)
    if blocking:
        print(f"medkd: serving at {base_url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            undeploy(app_name)
    return base_url


def undeploy(app_name: str = "medkd") -> None:
    """Delete the application; shut Serve down when no application is left. Never stops Ray."""
    import ray

    if not ray.is_initialized():
        return
    applications = serve.status().applications
    if app_name in applications:
        serve.delete(app_name)
        applications = serve.status().applications
    if not applications:
        serve.shutdown()
