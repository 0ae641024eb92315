"""Typed configuration of the serving layer and of the exported model it serves.

``ServeConfig`` is the ``serve:`` section of the job spec: where the HTTP endpoint listens, how
Ray Serve autoscales replicas and how requests are batched. ``ModelMetadata`` / ``InputMeta``
describe the ``metadata.json`` that the export stage writes next to ``model.onnx``.

Examples:
    >>> cfg = ServeConfig(max_replicas=4, max_batch_size=8)
    >>> cfg.autoscaling_config()["max_replicas"]
    4
    >>> ServeConfig(min_replicas=3, max_replicas=2)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    pydantic_core._pydantic_core.ValidationError: max_replicas: must be >= min_replicas (3), got 2
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


def _field_error(message: str) -> PydanticCustomError:
    # A custom error keeps pydantic from prefixing "Value error, " to the message, so the
    # job spec reports e.g. "serve.max_replicas: must be >= min_replicas (3), got 2".
    return PydanticCustomError("medkd_invalid", "{message}", {"message": message})


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
        batch_wait_timeout_s: how long the first request of a batch waits for others.
        cpus_per_replica: CPUs Ray reserves for each replica (fractions allowed).
        gpus_per_replica: GPUs Ray reserves for each replica (0: CPU inference).
        upscale_delay_s: sustained load needed before the autoscaler adds replicas.
        downscale_delay_s: sustained idleness needed before the autoscaler removes replicas.
        ort_threads: ONNX Runtime intra-op threads per replica.
        max_body_bytes: largest accepted request body; larger ones get HTTP 413.
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
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    cpus_per_replica: float = Field(0.5, ge=0)
    gpus_per_replica: float = Field(0, ge=0)
    upscale_delay_s: float = Field(5, ge=0)
    downscale_delay_s: float = Field(30, ge=0)
    ort_threads: int = Field(1, ge=1)
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)

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


class InputMeta(BaseModel):
    """How raw images become the model's input (must match training).

    Raw pixels (integers) are multiplied by ``scale``; then every channel is normalised as
    ``(x - mean[c]) / std[c]``. Float images are taken to be in [0, 1] already — unless the
    model was trained on raw intensities (``clip``/``offset`` set, e.g. CT in Hounsfield
    units), in which case every input is ``(clip(x) - offset) * scale`` first.
    """

    model_config = ConfigDict(extra="allow")

    in_channels: int = Field(ge=1)
    spatial_dims: Literal[2, 3]
    image_size: list[int] = Field(min_length=2, max_length=3)
    scale: float = Field(1.0 / 255.0, gt=0)
    offset: float = 0.0
    clip: list[float] | None = Field(None, min_length=2, max_length=2)
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, value: list[int], info: ValidationInfo) -> list[int]:
        if any(size <= 0 for size in value):
            raise _field_error(f"every size must be > 0, got {value}")
        spatial_dims = info.data.get("spatial_dims")
        if spatial_dims is not None and len(value) != spatial_dims:
            raise _field_error(f"has {len(value)} sizes but spatial_dims is {spatial_dims}")
        return value

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, value: list[float], info: ValidationInfo) -> list[float]:
        if not value or not all(math.isfinite(v) for v in value):
            raise _field_error(f"needs finite numbers, got {value}")
        if info.field_name == "std" and any(v <= 0 for v in value):
            raise _field_error(f"every std must be > 0, got {value}")
        in_channels = info.data.get("in_channels")
        if in_channels is not None and len(value) not in (1, in_channels):
            raise _field_error(f"needs 1 or in_channels ({in_channels}) values, got {len(value)}")
        return value


class ModelMetadata(BaseModel):
    """The ``metadata.json`` the export stage writes beside ``model.onnx``.

    Only the fields serving needs are typed; lineage (teachers, trial, metrics, ...) is kept
    as given and returned by ``GET /metadata``.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_id: str = Field(min_length=1)
    task: Literal["classification", "segmentation"]
    multilabel: bool = False
    num_classes: int = Field(ge=1)
    class_names: list[str] | None = None
    input: InputMeta

    @field_validator("class_names")
    @classmethod
    def _class_names(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        num_classes = info.data.get("num_classes")
        if value is not None and num_classes is not None and len(value) != num_classes:
            raise _field_error(f"has {len(value)} names but num_classes is {num_classes}")
        return value

    def label(self, index: int) -> str:
        """Name of class ``index`` (its number when the export gave no names)."""
        return self.class_names[index] if self.class_names else str(index)
