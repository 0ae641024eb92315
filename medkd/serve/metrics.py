"""Request metrics of the endpoint through Ray's metrics API (exported on Ray's Prometheus port).

=================================  =========  ==================================================
``medkd_serve_requests_total``     counter    requests by ``route``, ``status``, ``model``
``medkd_serve_latency_ms``         histogram  time in the replica by ``route``, ``model``
``medkd_serve_batch_images``       histogram  images per model call by ``model``
``medkd_serve_queue_length``       gauge      requests in this replica not answered yet
=================================  =========  ==================================================

Requests are counted in process and handed to Ray's metrics at most every ``flush_interval_s``
(and whenever Serve's health check runs), not once per request: each Ray metric call validates
its tags and crosses into Ray's C++ core, which cost as much as the rest of a small request's
bookkeeping. Prometheus scrapes far less often than that, so nothing it sees changes. The same
counts serve ``GET /stats`` so a test or a user can read them without Prometheus.

Examples:
    >>> metrics = ServeMetrics()  # doctest: +SKIP
    >>> metrics.request("/predict", 200, "m1", 3.2)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections import Counter

from ray.util import metrics as ray_metrics

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
FLUSH_INTERVAL_S = 1.0


class ServeMetrics:
    """The replica's metrics; one instance per replica.

    Args:
        flush_interval_s: longest time recorded values wait before they reach Ray's metrics.
    """

    def __init__(self, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self._requests = ray_metrics.Counter(
            "medkd_serve_requests_total",
            "Requests answered, by route, HTTP status and model.",
            tag_keys=("route", "status", "model"),
        )
        self._latency = ray_metrics.Histogram(
            "medkd_serve_latency_ms",
            "Time a request spent in the replica (ms).",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("route", "model"),
        )
        self._batch = ray_metrics.Histogram(
            "medkd_serve_batch_images",
            "Images per ONNX Runtime call.",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("model",),
        )
        self._queue = ray_metrics.Gauge("medkd_serve_queue_length", "Requests in the replica not answered yet.")
        self._flush_interval_s = flush_interval_s
        self._next_flush = time.monotonic() + flush_interval_s
        self._pending_requests: Counter[tuple[str, str, str]] = Counter()
        self._pending_latency: list[tuple[str, str, float]] = []
        self._pending_batches: list[tuple[str, int]] = []
        self.in_flight = 0
        self.requests: Counter[tuple[str, int]] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.images = 0

    def started(self) -> None:
        self.in_flight += 1

    def request(self, route: str, status: int, model: str, latency_ms: float) -> None:
        """Record one answered request."""
        self.in_flight = max(self.in_flight - 1, 0)
        self.requests[(route, status)] += 1
        model = model or "-"
        self._pending_requests[(route, str(status), model)] += 1
        self._pending_latency.append((route, model, latency_ms))
        if time.monotonic() >= self._next_flush:
            self.flush()

    def batch(self, model: str, images: int) -> None:
        """Record one model call of ``images`` images."""
        self.batch_sizes[images] += 1
        self.images += images
        self._pending_batches.append((model, images))

    def flush(self) -> None:
        """Hand everything recorded since the last flush to Ray's metrics."""
        self._next_flush = time.monotonic() + self._flush_interval_s
        requests, self._pending_requests = self._pending_requests, Counter()
        latency, self._pending_latency = self._pending_latency, []
        batches, self._pending_batches = self._pending_batches, []
        for (route, status, model), count in requests.items():
            self._requests.inc(count, tags={"route": route, "status": status, "model": model})
        for route, model, value in latency:
            self._latency.observe(value, tags={"route": route, "model": model})
        for model, images in batches:
            self._batch.observe(images, tags={"model": model})
        self._queue.set(self.in_flight)

    def snapshot(self) -> dict:
        """In-process counts, for ``GET /stats``."""
        return {
            "requests": {f"{route} {status}": count for (route, status), count in sorted(self.requests.items())},
            "in_flight": self.in_flight,
            "images": self.images,
            "batches": sum(self.batch_sizes.values()),
            "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
            "largest_batch": max(self.batch_sizes, default=0),
        }
