"""The Serve deployment: a FastAPI ingress over multiplexed ONNX students with dynamic batching.

A request is checked (auth, body size, decoded size from headers), decoded and preprocessed, then
run through the model. Small NPY bodies (at most ``INLINE_DECODE_BYTES``, no compression, so
decoding costs microseconds) are decoded on the event loop; every other body in a thread pool,
off the event loop. A request goes straight to the model when no model call runs or waits (or
when it is a full batch by itself); one that arrives while a call runs joins a dynamic batch
(``@serve.batch``) that runs in the next call, so batches form under load and a lone request waits
for nothing (``batch_wait_timeout_s`` > 0 always waits for company). Model calls run in one ONNX
Runtime thread, queued back to back (:class:`medkd.serve.runner.ModelRunner`), or on the event
loop when the model is so quick (``INLINE_INFER_S``) that the thread hop would cost more.
Prediction requests reach :meth:`MedkdServer.predict_route` through a pure-ASGI fast lane in front
of FastAPI's routing (:mod:`medkd.serve.fast_lane`) when their query string needs no validation;
behind HAProxy (direct ingress) their deadline is kept by :mod:`medkd.serve.deadline`, in front of
Serve's request wrapper, instead of a task per request there.
Every Pareto student of a run is served by the one application through Serve model multiplexing:
the ``serve_multiplexed_model_id`` header (which Serve's Python proxy also routes on; HAProxy does
not, and need not, as every replica holds every model) or the ``model`` query parameter picks one;
none picks the default.

Routes: ``POST /predict``, ``POST /predict/batch``, ``GET /healthz``, ``GET /readyz``,
``GET /models``, ``GET /metadata``, ``GET /stats``; the OpenAPI schema at ``/openapi.json`` and
``/docs``. Errors are JSON ``{"error", "status", "request_id"}`` and never hold exception text.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import Depends, Query, Request
from pydantic import SecretStr
from ray import serve
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from medkd.serve import responses as answers
from medkd.serve.api import BEARER_SECURITY, ERRORS, IMAGE_BODY, api, bearer, json_response, request_id
from medkd.serve.codecs import (
    PayloadTooLarge,
    RequestError,
    decode_batch,
    decode_image,
    encode_npy,
    preprocess,
    preprocess_batch,
    sniff_format,
)
from medkd.serve.guards import Limits, Unauthorized, UnknownModel, authorized, check_before_decoding, check_image_count
from medkd.serve.metrics import ServeMetrics
from medkd.serve.model_store import LoadedModel, ModelBundle
from medkd.serve.runner import ModelRunner
from medkd.spec.serve import ServeConfig

logger = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "MedkdModel"
PROBE_TIMEOUT_S = 10.0
"""Shortest time an ONNX call may run before check_health calls the session wedged."""
INLINE_DECODE_BYTES = 64 * 1024
"""NPY bodies up to this size are decoded and preprocessed on the event loop: a thread-pool hop
(and the GIL changing hands twice) costs more than decoding them, an uncompressed body cannot
expand beyond its own size, and a stack of images is preprocessed in a few array operations
(64 images of 28x28 in ~0.1 ms)."""
CLIENT_CLOSED_REQUEST = 499
"""Status recorded (in the metrics; no client reads it) for a request whose client left."""
INLINE_INFER_S = 0.0002
"""Model calls expected to take less than this run on the event loop: handing them to the ONNX
Runtime thread and back costs about as much (a tiny student's single image takes ~0.03 ms). A
call that hangs there blocks the loop, so Serve's health check times out and the replica is
replaced, as when check_health reports a wedged session."""


def _images_in(items: list[tuple[str, np.ndarray]]) -> int:
    return sum(len(chunk) for _, chunk in items)


def inline_images(loaded: LoadedModel, *, probes: int = 5) -> int:
    """How many images one call of ``loaded`` may take on the event loop: as many as fit in
    ``INLINE_INFER_S`` at the fastest of ``probes`` single-image calls (0: always the ONNX
    Runtime thread). GPU sessions never run inline."""
    if loaded.session.get_providers()[0] != "CPUExecutionProvider":
        return 0
    fastest = min(loaded.probe() for _ in range(probes))
    return int(INLINE_INFER_S / max(fastest, 1e-6))


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class MedkdServer:
    """FastAPI ingress and ONNX models in one replica (no extra hop between them)."""

    def __init__(self, bundle: dict[str, Any], config: dict[str, Any], auth_token: SecretStr | None = None) -> None:
        self._bundle = ModelBundle.model_validate(bundle)
        self._config = ServeConfig.model_validate(config)
        self._token = auth_token
        self._limits = Limits(self._config.max_images_per_request, self._config.max_decoded_bytes)
        self._use_gpu = self._config.gpus_per_replica > 0
        self._runner = ModelRunner("medkd-onnx")
        self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="medkd-decode")
        self._metrics = ServeMetrics()
        self._busy_since: float | None = None
        self._infer.set_max_batch_size(self._config.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self._config.batch_wait_timeout_s)
        try:
            self._replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - not running inside Serve (a direct unit test)
            self._replica = "local"
        # Every model is loaded and run once here, so a bad one fails the replica at start-up
        # and /readyz holds: the default model is loaded and one warm inference is done.
        self._loaded = {
            model_id: LoadedModel.load(files, threads=self._config.ort_threads, use_gpu=self._use_gpu)
            for model_id, files in self._bundle.models.items()
        }
        self._warm_ms = self._loaded[self._bundle.default_id].probe() * 1000.0
        self._class_names = {
            model_id: [loaded.metadata.label(i) for i in range(loaded.metadata.num_classes)]
            for model_id, loaded in self._loaded.items()
        }
        self._inline_images = {model_id: inline_images(loaded) for model_id, loaded in self._loaded.items()}
        self._calls = 0  # model calls running in the ONNX Runtime thread
        self._batched = 0  # requests waiting in, or running through, the dynamic batch

    @property
    def request_timeout_s(self) -> float:
        """The deployment's ``request_timeout_s`` (what :mod:`medkd.serve.deadline` reads)."""
        return self._config.request_timeout_s

    @serve.multiplexed(max_num_models_per_replica=64)
    async def get_model(self, model_id: str) -> LoadedModel:
        """The session of ``model_id`` (already loaded at start-up; Serve tracks which ids a
        replica holds and routes requests naming them there)."""
        return self._loaded[model_id]

    # ------------------------------------------------------------------------------- routes

    @api.get("/healthz", response_model=answers.Health, summary="Liveness (no authentication)")
    async def healthz(self) -> Response:
        return json_response({"status": "ok", "replica": self._replica})

    @api.get(
        "/readyz",
        response_model=answers.Readiness,
        responses=ERRORS,
        dependencies=[Depends(bearer)],
        summary="Readiness: the default model is loaded and one warm inference is done",
    )
    async def readyz(self, request: Request) -> Response:
        return await self._handle(request, "/readyz", self._readiness)

    @api.get(
        "/models",
        response_model=answers.ModelList,
        responses=ERRORS,
        dependencies=[Depends(bearer)],
        summary="Every served model with its metrics, size and latency from the registry",
    )
    async def models(self, request: Request) -> Response:
        async def work(rid: str, used: list[str]) -> Response:
            default = self._bundle.default_id
            listed = [model.describe(default=mid == default) for mid, model in self._loaded.items()]
            return json_response({"default": default, "models": listed}, request_id=rid)

        return await self._handle(request, "/models", work)

    @api.get(
        "/metadata",
        responses=ERRORS,
        dependencies=[Depends(bearer)],
        summary="A model's metadata.json plus serving details",
    )
    async def metadata(self, request: Request, model: str | None = Query(None, max_length=256)) -> Response:
        async def work(rid: str, used: list[str]) -> Response:
            loaded = self._loaded[self._model_id(model, used)]
            serving = {
                "replica": self._replica,
                "input_name": loaded.input_name,
                "input_shape": [None, loaded.metadata.input.in_channels, *loaded.metadata.input.image_size],
                "output_shape": [None, *loaded.output_shape],
                "providers": loaded.session.get_providers(),
                **self._config.model_dump(
                    include={
                        "max_batch_size",
                        "batch_wait_timeout_s",
                        "max_body_bytes",
                        "max_images_per_request",
                        "max_decoded_bytes",
                        "request_timeout_s",
                    }
                ),
            }
            return json_response({**loaded.raw_metadata, "serving": serving}, request_id=rid)

        return await self._handle(request, "/metadata", work)

    @api.get("/stats", responses=ERRORS, dependencies=[Depends(bearer)], summary="This replica's counters")
    async def stats(self, request: Request) -> Response:
        async def work(rid: str, used: list[str]) -> Response:
            return json_response(
                {"replica": self._replica, "max_batch_size": self._config.max_batch_size, **self._metrics.snapshot()},
                request_id=rid,
            )

        return await self._handle(request, "/stats", work)

    @api.post(
        "/predict",
        response_model=answers.Prediction,
        responses=ERRORS,
        openapi_extra={**IMAGE_BODY, **BEARER_SECURITY},
        summary="Predict one image",
    )
    async def predict(
        self,
        request: Request,
        model: str | None = Query(None, max_length=256),
        mask: str | None = Query(None, pattern="^(list|npy_b64)$"),
    ) -> Response:
        return await self.predict_route(request, "/predict", batch=False, model=model, mask=mask)

    @api.post(
        "/predict/batch",
        response_model=answers.BatchPrediction,
        responses=ERRORS,
        openapi_extra={**IMAGE_BODY, **BEARER_SECURITY},
        summary="Predict a stack of images",
    )
    async def predict_batch(
        self,
        request: Request,
        model: str | None = Query(None, max_length=256),
        mask: str | None = Query(None, pattern="^(list|npy_b64)$"),
    ) -> Response:
        return await self.predict_route(request, "/predict/batch", batch=True, model=model, mask=mask)

    async def predict_route(
        self, request: Request, route: str, *, batch: bool, model: str | None, mask: str | None
    ) -> Response:
        """``/predict`` or ``/predict/batch`` with its query parameters already validated: what
        FastAPI's two routes call, and what :class:`medkd.serve.fast_lane.PredictionLane` calls
        directly for a request FastAPI would accept as it is."""

        async def work(rid: str, used: list[str]) -> Response:
            return await self._predict(request, rid, self._model_id(model, used), batch=batch, mask=mask)

        return await self._handle(request, route, work)

    # ------------------------------------------------------------------------------ plumbing

    async def _handle(self, request: Request, route: str, work) -> Response:
        """Auth, request id, timeout, metrics and error answers shared by every route."""
        started = time.perf_counter()
        rid = request_id(request)
        used: list[str] = []
        self._metrics.started()
        try:
            if self._token is not None and not authorized(request.headers.get("authorization"), self._token):
                raise Unauthorized("missing or wrong bearer token (send Authorization: Bearer <token>)")
            async with asyncio.timeout(self._config.request_timeout_s):  # no extra task, unlike wait_for
                response = await work(rid, used)
        except RequestError as error:
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
            response = Response(
                answers.error_body(error.message, error.status, rid),
                status_code=error.status,
                media_type="application/json",
                headers=headers,
            )
        except ClientDisconnect:  # the client left while its body was read: nobody reads an answer
            response = Response(status_code=CLIENT_CLOSED_REQUEST)
        except TimeoutError:
            message = f"request took longer than request_timeout_s={self._config.request_timeout_s:g}"
            response = Response(answers.error_body(message, 504, rid), status_code=504, media_type="application/json")
        except Exception:  # noqa: BLE001 - logged with the request id; the client gets no exception text
            logger.exception("medkd: request %s to %s failed", rid, route)
            response = Response(
                answers.error_body(f"internal error; see the server log for request {rid}", 500, rid),
                status_code=500,
                media_type="application/json",
            )
        self._metrics.request(
            route, response.status_code, used[0] if used else "", (time.perf_counter() - started) * 1e3
        )
        return response

    def _model_id(self, query_model: str | None, used: list[str]) -> str:
        header = serve.get_multiplexed_model_id() if self._replica != "local" else ""
        if query_model and header and query_model != header:
            raise RequestError(f"model {query_model!r} (query) and serve_multiplexed_model_id {header!r} disagree")
        chosen = query_model or header or self._bundle.default_id
        if chosen not in self._loaded:
            raise UnknownModel(f"unknown model {chosen!r}; known models: {', '.join(sorted(self._loaded))}")
        used.append(chosen)
        return chosen

    async def _readiness(self, rid: str, used: list[str]) -> Response:
        ready = self._bundle.default_id in self._loaded and self._warm_ms is not None
        payload = {
            "ready": ready,
            "default_model": self._bundle.default_id,
            "warm_inference_ms": self._warm_ms,
            "models": sorted(self._loaded),
        }
        return json_response(payload, 200 if ready else 503, rid)

    async def _predict(self, request: Request, rid: str, model_id: str, *, batch: bool, mask: str | None) -> Response:
        started = time.perf_counter()
        loaded = self._loaded[model_id]
        body = await self._read_body(request)
        content_type = request.headers.get("content-type")
        if len(body) <= INLINE_DECODE_BYTES and sniff_format(body) == "npy":
            inputs = self._decode(body, content_type, loaded, batch, rid)
        else:
            loop = asyncio.get_running_loop()
            inputs = await loop.run_in_executor(self._decoder, self._decode, body, content_type, loaded, batch, rid)
        size = self._config.max_batch_size
        if len(inputs) <= size:
            logits = await self._logits(model_id, inputs)
        else:
            chunks = [inputs[start : start + size] for start in range(0, len(inputs), size)]
            logits = np.concatenate(await asyncio.gather(*(self._logits(model_id, chunk) for chunk in chunks)))
        meta = loaded.metadata
        if meta.task == "segmentation" and answers.NPY_MEDIA_TYPE in request.headers.get("accept", ""):
            masks = answers.segmentation_masks(logits, meta)
            return Response(
                encode_npy(masks if batch else masks[0]),
                media_type=answers.NPY_MEDIA_TYPE,
                headers={"X-Model-Id": model_id},
            )
        results = answers.predictions(logits, meta, masks_as_list=mask == "list")
        payload: dict[str, Any] = {
            "model_id": model_id,
            "class_names": self._class_names[model_id],
            "request_id": rid,
        }
        payload.update({"count": len(results), "predictions": results} if batch else results[0])
        payload["latency_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
        return json_response(payload, request_id=rid)

    def _decode(self, body: bytes, content_type: str | None, loaded: LoadedModel, batch: bool, rid: str) -> np.ndarray:
        """Body to a preprocessed batch ``(N, C, *spatial)`` (runs in the decoder pool)."""
        meta = loaded.metadata.input
        try:
            check_before_decoding(body, content_type, batch=batch, input_meta=meta, limits=self._limits)
            max_bytes = self._config.max_body_bytes
            images = (
                decode_batch(body, content_type, max_bytes=max_bytes)
                if batch
                else [decode_image(body, content_type, max_bytes=max_bytes)]
            )
            check_image_count(len(images), meta, self._limits)
            return preprocess_batch(images, meta) if batch else preprocess(images[0], meta)[np.newaxis]
        except RequestError:
            raise
        except Exception:  # noqa: BLE001 - any other failure on a client's bytes is still the client's 4xx
            logger.warning("medkd: request %s: body could not be decoded", rid, exc_info=True)
            raise RequestError(f"body could not be decoded as an image (request {rid})") from None

    async def _read_body(self, request: Request) -> bytes:
        limit = self._config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes, larger than max_body_bytes={limit}")
        parts, total = [], 0
        async for part in request.stream():
            total += len(part)
            if total > limit:
                raise PayloadTooLarge(f"request body is larger than max_body_bytes={limit}")
            parts.append(part)
        return b"".join(parts)

    async def _logits(self, model_id: str, inputs: np.ndarray) -> np.ndarray:
        """One model call's logits for ``inputs`` (at most ``max_batch_size`` images).

        The dynamic batch (:meth:`_infer`) only pays when there is company to wait for: a full
        batch, or a request that arrives while no model call runs or waits (with
        ``batch_wait_timeout_s`` 0), goes straight to the model. Requests that arrive while a
        call runs queue in the dynamic batch and run together in the next call.
        """
        direct = len(inputs) >= self._config.max_batch_size or (
            self._config.batch_wait_timeout_s == 0 and self._calls == 0 and self._batched == 0
        )
        if direct:
            return await self._call_model(model_id, inputs)
        self._batched += 1
        try:
            return await self._infer((model_id, inputs))
        finally:
            self._batched -= 1

    async def _call_model(self, model_id: str, batch: np.ndarray) -> np.ndarray:
        """Run one model call: on the event loop when the model is quick enough for this batch
        (a thread-pool hop costs more than the call), else in the ONNX Runtime thread."""
        loaded = self._loaded[model_id]
        self._metrics.batch(model_id, len(batch))
        if self._inline_images[model_id] >= len(batch):
            return self._run(loaded, batch)
        self._calls += 1
        try:
            return await self._runner.run(self._run, loaded, batch)
        finally:
            self._calls -= 1

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=_images_in)
    async def _infer(self, items: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        """One model call per model for every queued request; each chunk is ``(n_i, C, *spatial)``."""
        by_model: dict[str, list[int]] = defaultdict(list)
        for index, (model_id, _) in enumerate(items):
            by_model[model_id].append(index)
        results: list[np.ndarray | None] = [None] * len(items)
        for model_id, indices in by_model.items():
            await self.get_model(model_id)  # Serve's multiplexing records which models this replica serves
            chunks = [items[i][1] for i in indices]
            batch = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
            outputs = await self._call_model(model_id, batch)
            for i, part in zip(indices, np.split(outputs, np.cumsum([len(c) for c in chunks])[:-1]), strict=True):
                results[i] = part
        return results  # type: ignore[return-value]

    def _run(self, loaded: LoadedModel, batch: np.ndarray) -> np.ndarray:
        self._busy_since = time.monotonic()
        try:
            return loaded.run(batch)
        finally:
            self._busy_since = None

    async def check_health(self) -> None:
        """Serve's health check: fails when an ONNX call hangs, so Serve replaces the replica.

        It also hands the request counts recorded since the last request to Ray's metrics, so an
        idle replica's last requests reach Prometheus too."""
        self._metrics.flush()
        busy = self._busy_since
        limit = max(self._config.request_timeout_s, PROBE_TIMEOUT_S)
        if busy is not None and time.monotonic() - busy > limit:
            raise RuntimeError(f"ONNX Runtime call running for {time.monotonic() - busy:.0f} s > {limit:g} s: wedged")
        if busy is None:
            default = self._loaded[self._bundle.default_id]
            await asyncio.wait_for(self._runner.run(default.probe), timeout=limit)
