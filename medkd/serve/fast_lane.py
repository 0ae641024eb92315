"""A pure-ASGI fast lane for the two prediction routes, in front of FastAPI's routing.

``POST /predict`` and ``POST /predict/batch`` carry nearly all of an endpoint's traffic, and for a
small student FastAPI's per-request machinery costs more than the model: routing, the exception
and exit-stack middlewares, the request-response wrapper and dependency solving (the replica's
``self``, the ``Request`` and two query parameters) were ~22 % of the replica's CPU at
concurrency 8 (py-spy, ``benchmarks/RESULTS.md``, serve_throughput (4)). This middleware hands a
prediction request whose query string is empty or plainly valid straight to the replica's
:meth:`~medkd.serve.ingress.MedkdServer.predict_route` — the same method FastAPI's routes call,
so auth, limits, timeout, metrics and error answers are the same. Everything else (other routes,
other methods, a trailing slash, any query string FastAPI would have to validate or reject) goes
on to FastAPI untouched, which stays the one source of routes, validation and the OpenAPI
schema.

Examples:
    >>> simple_query(b"")
    {'model': None, 'mask': None}
    >>> simple_query(b"model=m1&mask=list")
    {'model': 'm1', 'mask': 'list'}
    >>> simple_query(b"mask=png") is None  # FastAPI answers 422
    True
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from ray import serve
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

LANES = {"/predict": False, "/predict/batch": True}
"""Route -> whether it is the batch route."""
MAX_MODEL_ID_CHARS = 256
"""The ``model`` query parameter's ``max_length`` on the FastAPI routes."""
MASK_FORMATS = frozenset({"list", "npy_b64"})
"""The values the ``mask`` query parameter's ``pattern`` on the FastAPI routes accepts."""


def simple_query(query_string: bytes) -> dict[str, str | None] | None:
    """``model`` and ``mask`` of a query string FastAPI would accept as they are, else ``None``.

    ``None`` (let FastAPI decide) for anything but at most one ``model`` of at most
    :data:`MAX_MODEL_ID_CHARS` characters and at most one ``mask`` in :data:`MASK_FORMATS`:
    unknown or repeated parameters, an invalid value. Decoded as Starlette decodes it.
    """
    query: dict[str, str | None] = {"model": None, "mask": None}
    if not query_string:
        return query
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key not in query or query[key] is not None:
            return None
        query[key] = value
    model, mask = query["model"], query["mask"]
    if (model is not None and len(model) > MAX_MODEL_ID_CHARS) or (mask is not None and mask not in MASK_FORMATS):
        return None
    return query


def route_of(scope: Scope) -> str:
    """The path below the application's route prefix (Serve puts the prefix in ``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _servable() -> Any | None:
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - not inside a Serve replica: FastAPI's routes serve it
        return None


class PredictionLane:
    """ASGI middleware: prediction requests straight to the replica's handler (see the module).

    Args:
        app: the rest of the FastAPI application.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = route_of(scope)
            batch = LANES.get(route)
            query = simple_query(scope.get("query_string", b"")) if batch is not None else None
            handler = getattr(_servable(), "predict_route", None) if query is not None else None
            if handler is not None:
                response = await handler(Request(scope, receive), route, batch=batch, **query)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
