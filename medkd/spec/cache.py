"""The ``cache:`` section: where the teachers' soft labels (raw logits) live."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from medkd.spec.base import StrictModel


class CacheSpec(StrictModel):
    """Where teacher soft labels (raw logits) live."""

    redis_url: str | None = Field(None, description="null: medkd starts and owns a local redis-server")
    password_env: str | None = Field(None, description="env var holding the Redis password")
    namespace: str = "medkd"
    encoding: Literal["float16", "float32"] = "float16"
    compression: Literal["zlib", "lzma"] | None = None
    topk: int | None = Field(None, gt=0, description="segmentation: keep the top-k class logits")
    views: int = Field(
        0,
        ge=0,
        le=64,
        description="FKD-style: also cache logits for this many augmented views of train (search.augment)",
    )

    @field_validator("redis_url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value
