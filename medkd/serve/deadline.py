"""The prediction routes' deadline, kept by medkd instead of Serve's per-request task (direct ingress).

With direct ingress (HAProxy in front, :mod:`medkd.serve.ha_proxy`), Ray Serve 2.60's wrapper
around a replica's HTTP requests (``Replica._direct_ingress_asgi``) watches each request for a
client disconnect and for its timeout the expensive way: a receive-proxy task that reads the body
through a queue, the request itself in a second task, and ``asyncio.wait`` on both — 15-17 % of the
replica's event loop for a ``/predict/batch`` request of 64 images (py-spy,
``benchmarks/RESULTS.md``, serve_throughput (6)). It awaits the request directly only when the
request carries ``x-request-disconnect-disabled: ?1`` and a non-positive ``x-request-timeout-seconds``
header, which users' clients do not send (and which, sent by a client, would switch Serve's request
timeout off).

:class:`PredictionDeadline` is the outermost ASGI middleware of the replica's own HTTP server
(installed through Serve's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` hook, which
:func:`medkd.serve.ha_proxy.environment` sets to :func:`middlewares`). For ``POST /predict`` and ``POST /predict/batch``
it sets both headers itself (replacing any a client sent) and keeps the deadline instead, with
``asyncio.timeout`` on the request's own task (a timer, no task):

* **timeout**: the whole request, queueing for a slot of ``max_ongoing_requests`` included, is
  cancelled after ``request_timeout_s + HTTP_TIMEOUT_MARGIN_S`` (what ``medkd serve`` gives Serve's
  HTTP options) and answered 504 if nothing was sent yet. The handler's own ``request_timeout_s``
  (504, :meth:`medkd.serve.ingress.MedkdServer._handle`) fires first in every normal case.
* **disconnects**: a prediction whose client went away runs to its end (milliseconds; at most the
  deadline) and its answer is dropped; a client that leaves while its body is still being read ends
  the request at once (499, :meth:`~medkd.serve.ingress.MedkdServer._handle`).

Where medkd does not keep the deadline (Serve's Python proxy, which HAProxy falls back to as its
backup server while a replica fails its health check, and a replica before its servable is
published), Serve keeps its own timeout and disconnect handling, but a client never overrides them:
:class:`ClientOverridesDropped` removes both headers from prediction requests there (a client's
``x-request-timeout-seconds: 0.000001`` would be a 408 at once, ``0`` no timeout at all). Every other
route passes through untouched.

Examples:
    >>> [m.cls.__name__ for m in middlewares()]  # outside a replica (e.g. Serve's Python proxy)
    ['ClientOverridesDropped']
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medkd.serve import responses as answers
from medkd.serve.fast_lane import LANES, route_of

HTTP_TIMEOUT_MARGIN_S = 5.0
"""Serve's HTTP request timeout is ``request_timeout_s`` plus this, so the handler's own timeout
(with its JSON 504 answer) always fires first."""
DISCONNECT_HEADER = b"x-request-disconnect-disabled"
TIMEOUT_HEADER = b"x-request-timeout-seconds"
SERVE_OWNED = frozenset({DISCONNECT_HEADER, TIMEOUT_HEADER})


def _servable() -> Any | None:
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - not inside a Serve replica
        return None


def _is_prediction(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and route_of(scope) in LANES


def _without_client_overrides(scope: Scope) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in scope["headers"] if name not in SERVE_OWNED]


class ClientOverridesDropped:
    """ASGI middleware: Serve's two per-request headers, sent by a client, removed from prediction requests.

    Serve's Python proxy reads them as hints from a trusted load balancer in front of it (Serve 2.60's
    own HAProxy config sets neither); from a client they would set the server's timeout
    (``0.000001``: 408 at once; ``0``: none at all).

    Args:
        app: the application it wraps (Serve's proxy, or a replica's server before its servable exists).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _is_prediction(scope):
            scope["headers"] = _without_client_overrides(scope)
        await self.app(scope, receive, send)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return value.decode("latin-1")
    return "-"


class PredictionDeadline:
    """ASGI middleware: the prediction routes' deadline and disconnects in medkd's hands (see the module).

    The deadline is ``request_timeout_s`` of the replica's deployment plus :data:`HTTP_TIMEOUT_MARGIN_S`,
    read from the replica's servable at its first request (Serve starts a replica's HTTP server, and
    calls :func:`middlewares`, before it publishes the servable). A replica that is not a medkd
    deployment is passed through untouched.

    Args:
        app: Serve's direct-ingress application of the replica.
        limit_s: the deadline in seconds; ``None`` (Serve's case): read from the replica's servable.
    """

    def __init__(self, app: ASGIApp, limit_s: float | None = None) -> None:
        self.app = app
        self.limit_s = limit_s

    def _limit(self) -> float | None:
        if self.limit_s is None:
            timeout_s = getattr(_servable(), "request_timeout_s", None)
            if timeout_s is not None:
                self.limit_s = float(timeout_s) + HTTP_TIMEOUT_MARGIN_S
        return self.limit_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _is_prediction(scope):
            await self.app(scope, receive, send)
            return
        limit_s = self.limit_s or self._limit()
        if limit_s is None:  # the servable is not published yet: Serve's own deadline, not the client's
            scope["headers"] = _without_client_overrides(scope)
            await self.app(scope, receive, send)
            return
        scope["headers"] = _without_client_overrides(scope) + [(DISCONNECT_HEADER, b"?1"), (TIMEOUT_HEADER, b"0")]
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            async with asyncio.timeout(limit_s):
                await self.app(scope, receive, tracking_send)
        except TimeoutError:
            if not started:
                message = f"request took longer than {limit_s:g} s (request_timeout_s + {HTTP_TIMEOUT_MARGIN_S:g})"
                body = answers.error_body(message, 504, _request_id(scope))
                await send(
                    {
                        "type": "http.response.start",
                        "status": 504,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
                    }
                )
                await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Middleware]:
    """Serve's HTTP callback: :class:`PredictionDeadline` inside a Serve replica, :class:`ClientOverridesDropped`
    elsewhere (Serve's Python proxy keeps its own timeout and disconnect handling, not a client's).

    Examples:
        >>> [m.cls.__name__ for m in middlewares()]
        ['ClientOverridesDropped']
    """
    try:
        serve.get_replica_context()
    except Exception:  # noqa: BLE001 - not inside a Serve replica (the Python proxy, a driver)
        return [Middleware(ClientOverridesDropped)]
    return [Middleware(PredictionDeadline)]
