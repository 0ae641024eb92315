"""medkd.serve.deadline: the prediction routes' deadline and Serve's two per-request headers
(a real ASGI application under the middleware; tests/serve/test_lifecycle.py runs it in a replica
behind HAProxy)."""

from __future__ import annotations

import asyncio
import json

import pytest

from medkd.serve.deadline import (
    DISCONNECT_HEADER,
    TIMEOUT_HEADER,
    ClientOverridesDropped,
    PredictionDeadline,
    middlewares,
)


class RecordingApp:
    """An ASGI application that answers 200 after ``delay_s`` and keeps the headers it was given."""

    def __init__(self, delay_s: float = 0.0, *, start_first: bool = False) -> None:
        self.delay_s = delay_s
        self.start_first = start_first
        self.headers: list[tuple[bytes, bytes]] = []
        self.cancelled = False

    async def __call__(self, scope, receive, send) -> None:
        self.headers = list(scope["headers"])
        start = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        if self.start_first:
            await send(start)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if not self.start_first:
            await send(start)
        await send({"type": "http.response.body", "body": b"ok"})


def request(app, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> list[dict]:
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": headers}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_prediction_routes_get_both_headers_and_a_client_cannot_set_them():
    inner = RecordingApp()
    client_headers = [(b"x-request-id", b"r1"), (TIMEOUT_HEADER, b"0.000001"), (DISCONNECT_HEADER, b"?0")]
    sent = request(PredictionDeadline(inner, limit_s=5.0), "POST", "/predict/batch", client_headers)
    assert [m.get("status") for m in sent] == [200, None]
    assert (TIMEOUT_HEADER, b"0") in inner.headers and (DISCONNECT_HEADER, b"?1") in inner.headers
    assert (TIMEOUT_HEADER, b"0.000001") not in inner.headers and (DISCONNECT_HEADER, b"?0") not in inner.headers
    assert (b"x-request-id", b"r1") in inner.headers


@pytest.mark.parametrize(("method", "path"), [("GET", "/healthz"), ("POST", "/models"), ("GET", "/predict")])
def test_other_routes_keep_serves_own_handling(method, path):
    inner = RecordingApp()
    headers = [(TIMEOUT_HEADER, b"3")]
    request(PredictionDeadline(inner, limit_s=5.0), method, path, headers)
    assert inner.headers == headers


def test_a_request_past_the_deadline_is_cancelled_and_answered_504_with_its_id():
    inner = RecordingApp(delay_s=5.0)
    sent = request(PredictionDeadline(inner, limit_s=0.05), "POST", "/predict", [(b"x-request-id", b"r2")])
    assert inner.cancelled
    assert sent[0]["status"] == 504 and (b"content-type", b"application/json") in sent[0]["headers"]
    answer = json.loads(sent[1]["body"])
    assert answer["status"] == 504 and answer["request_id"] == "r2" and "longer than 0.05 s" in answer["error"]


def test_a_started_answer_is_not_followed_by_a_second_one():
    inner = RecordingApp(delay_s=5.0, start_first=True)
    sent = request(PredictionDeadline(inner, limit_s=0.05), "POST", "/predict", [])
    assert inner.cancelled and [m["type"] for m in sent] == ["http.response.start"]


CLIENT_OVERRIDES = [(b"x-request-id", b"r3"), (TIMEOUT_HEADER, b"0.000001"), (DISCONNECT_HEADER, b"?1")]


def test_outside_a_replica_a_client_cannot_set_serves_timeout_and_nothing_is_added():
    """Serve's Python proxy (HAProxy's backup server) keeps its own timeout: a client's header would
    have it answer 408 at once (0.000001) or never time out (0)."""
    assert [m.cls for m in middlewares()] == [ClientOverridesDropped]
    inner = RecordingApp()
    sent = request(ClientOverridesDropped(inner), "POST", "/predict/batch", list(CLIENT_OVERRIDES))
    assert [m.get("status") for m in sent] == [200, None]
    assert inner.headers == [(b"x-request-id", b"r3")]
    request(ClientOverridesDropped(inner), "GET", "/healthz", [(TIMEOUT_HEADER, b"3")])
    assert inner.headers == [(TIMEOUT_HEADER, b"3")]  # other routes: untouched


def test_before_the_servable_is_published_serves_own_deadline_applies_not_the_clients():
    inner = RecordingApp()
    request(PredictionDeadline(inner), "POST", "/predict", list(CLIENT_OVERRIDES))  # no servable yet
    assert inner.headers == [(b"x-request-id", b"r3")]
