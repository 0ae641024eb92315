"""Request metrics of the endpoint through Ray's metrics API (exported on Ray's Prometheus port).

=================================  =========  ==================================================
``medkd_serve_requests_total``     counter    requests by ``route``, ``status``, ``model``
``medkd_serve_latency_ms``         histogram  time in the replica by ``route``, ``model``
``medkd_serve_batch_images``       histogram  images per model call by ``model``
``medkd_serve_queue_length``       gauge      requests in this replica not answered yet
=================================  =========  ==================================================

The same counts are kept in process for ``GET /metadata`` (``serving.stats``) so a test or a
user can read them without Prometheus.

Examples:
    >>> metrics = ServeMetrics()  # doctest: +SKIP
    >>> metrics.request("/predict", 200, "m1", 3.2)  # doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter

from ray.util import metrics as ray_metrics

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ServeMetrics:
    """The replica's metrics; one instance per replica."""

    def __init__(self) -> None:
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
        self.in_flight = 0
        self.requests: Counter[tuple[str, int]] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.images = 0

    def started(self) -> None:
        self.in_flight += 1
        self._queue.set(self.in_flight)

    def request(self, route: str, status: int, model: str, latency_ms: float) -> None:
        """Record one answered request."""
        self.in_flight = max(self.in_flight - 1, 0)
        self._queue.set(self.in_flight)
        self.requests[(route, status)] += 1
        self._requests.inc(1, tags={"route": route, "status": str(status), "model": model or "-"})
        self._latency.observe(latency_ms, tags={"route": route, "model": model or "-"})

    def batch(self, model: str, images: int) -> None:
        """Record one model call of ``images`` images."""
        self.batch_sizes[images] += 1
        self.images += images
        self._batch.observe(images, tags={"model": model})

    def snapshot(self) -> dict:
        """In-process counts, for ``GET /metadata``."""
        return {
            "requests": {f"{route} {status}": count for (route, status), count in sorted(self.requests.items())},
            "in_flight": self.in_flight,
            "images": self.images,
            "batches": sum(self.batch_sizes.values()),
            "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
            "largest_batch": max(self.batch_sizes, default=0),
        }
