"""The ``serve:`` section of the job spec: where the HTTP endpoint listens, how Ray Serve
autoscales replicas and how requests are batched.

Examples:
    >>> cfg = ServeConfig(max_replicas=4, max_batch_size=8)
    >>> cfg.autoscaling_config()["max_replicas"]
    4
    >>> ServeConfig(min_replicas=3, max_replicas=2)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    pydantic_core._pydantic_core.ValidationError: max_replicas: must be >= min_replicas (3), got 2
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from medkd.core.errors import field_error as _field_error

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_DECODED_BYTES = 64 * 1024 * 1024


class ServeConfig(BaseModel):
    """How the exported student is served: HTTP address, autoscaling, batching, resources.

    Args:
        enabled: serve the model at the end of the pipeline.
        host: address the Serve HTTP proxy binds to (``0.0.0.0`` to expose it).
        port: TCP port of the Serve HTTP proxy.
        route_prefix: URL prefix of the application (``/`` or e.g. ``/medkd``).
        min_replicas: lower bound of the autoscaler (0 allows scale to zero).
        max_replicas: upper bound of the autoscaler.
        target_ongoing_requests: ongoing requests per replica the autoscaler aims for.
        max_ongoing_requests: requests a replica accepts at once; must be >= max_batch_size or
            batches never fill.
        max_batch_size: largest number of images run through the model in one call.
        batch_wait_timeout_s: how long the first request of a batch waits for others. 0 (the
            default) waits for none: requests that arrive while the model runs form the next
            batch by themselves, so batches still fill under load and a lone request is not held.
        cpus_per_replica: CPUs Ray reserves for each replica (fractions allowed).
        gpus_per_replica: GPUs Ray reserves for each replica (0: CPU inference).
        upscale_delay_s: sustained load needed before the autoscaler adds replicas.
        downscale_delay_s: sustained idleness needed before the autoscaler removes replicas.
        ort_threads: ONNX Runtime intra-op threads per replica.
        max_body_bytes: largest accepted request body; larger ones get HTTP 413.
        max_images_per_request: most images one ``/predict/batch`` request may hold (413 above).
        max_decoded_bytes: most bytes the decoded and preprocessed images of one request may
            take, checked from headers before anything is allocated (413 above).
        max_queued_requests: requests waiting for a replica beyond which new ones get HTTP 503
            with ``Retry-After`` (backpressure).
        retry_after_s: the ``Retry-After`` of a backpressure 503.
        request_timeout_s: longest a request may take in a replica (504 after it) and the
            ONNX call time after which ``check_health`` declares the session wedged.
        auth_token_env: name of an environment variable holding a bearer token; when set,
            every route but ``/healthz`` needs ``Authorization: Bearer <token>``.
        look_back_period_s: window over which the autoscaler averages ongoing requests.
        metrics_interval_s: how often replicas report their load to the autoscaler.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4, gt=0)
    max_ongoing_requests: int = Field(32, ge=1)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    cpus_per_replica: float = Field(0.5, ge=0)
    gpus_per_replica: float = Field(0, ge=0)
    upscale_delay_s: float = Field(5, ge=0)
    downscale_delay_s: float = Field(30, ge=0)
    ort_threads: int = Field(1, ge=1)
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    max_images_per_request: int = Field(256, ge=1)
    max_decoded_bytes: int = Field(DEFAULT_MAX_DECODED_BYTES, ge=1024)
    max_queued_requests: int = Field(64, ge=1)
    retry_after_s: float = Field(1.0, ge=0)
    request_timeout_s: float = Field(30.0, gt=0)
    auth_token_env: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    look_back_period_s: float = Field(30.0, gt=0)
    metrics_interval_s: float = Field(10.0, gt=0)

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise _field_error(f"must start with '/', got {value!r}")
        if value != "/" and value.endswith("/"):
            raise _field_error(f"must not end with '/' (except the root '/'), got {value!r}")
        if any(ch.isspace() or ch in "{}" for ch in value):
            raise _field_error(f"must be a plain path without spaces or braces, got {value!r}")
        return value

    @field_validator("max_replicas")
    @classmethod
    def _max_replicas(cls, value: int, info: ValidationInfo) -> int:
        min_replicas = info.data.get("min_replicas")
        if min_replicas is not None and value < min_replicas:
            raise _field_error(f"must be >= min_replicas ({min_replicas}), got {value}")
        return value

    @field_validator("max_batch_size")
    @classmethod
    def _max_batch_size(cls, value: int, info: ValidationInfo) -> int:
        max_ongoing = info.data.get("max_ongoing_requests")
        if max_ongoing is not None and value > max_ongoing:
            raise _field_error(
                f"must be <= max_ongoing_requests ({max_ongoing}), got {value}: a replica "
                "never holds more than max_ongoing_requests requests, so larger batches never fill"
            )
        return value

    def autoscaling_config(self) -> dict[str, Any]:
        """Ray Serve ``autoscaling_config`` of the model deployment."""
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": max(self.min_replicas, 1),
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
            "metrics_interval_s": self.metrics_interval_s,
        }

    def ray_actor_options(self) -> dict[str, Any]:
        """Resources Ray reserves for each replica."""
        return {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica}

    def local_url(self) -> str:
        """Base URL of the application as reached from this machine."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        prefix = "" if self.route_prefix == "/" else self.route_prefix
        return f"http://{host}:{self.port}{prefix}"
