"""What a soft-label entry is: its manifest, the publish options, the name rules and errors.

A published entry (see :mod:`medkd.softlabels.store` for the keys) is described by one
:class:`Manifest`, stored as JSON in Redis and checksummed (blake2b over every other field),
so a reader can tell a complete, consistent entry from a corrupt or foreign one.

Examples:
    >>> options = PublishOptions(encoding="float32", chunk_size=64)
    >>> check_name("split", "train")
    'train'
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medkd.softlabels.codec import CODECS

SOFTLABEL_FORMAT_VERSION = 1
ENCODINGS: dict[str, type[np.floating]] = {"float16": np.float16, "float32": np.float32}
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


@dataclass(frozen=True)
class PublishOptions:
    """How an entry is encoded and chunked (the keyword arguments of ``publish``)."""

    encoding: str = "float16"
    compression: str | None = None
    topk: int | None = None
    view: int | None = None
    view_params: list[dict[str, Any]] | None = None
    chunk_size: int = 256
    max_chunk_bytes: int = 1 << 20


class CacheIntegrityError(Exception):
    """A cached entry is corrupt, truncated, inconsistent with its manifest, or missing chunks."""

    def __init__(self, message: str, *, prefix: str | None = None, generation: str | None = None) -> None:
        super().__init__(message)
        self.prefix = prefix
        self.generation = generation


class CacheMissError(LookupError):
    """No manifest for the requested (teacher, dataset, split, view)."""


class Manifest(BaseModel):
    """What a published entry contains and how to read it back."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format_version: int = SOFTLABEL_FORMAT_VERSION
    teacher_fp: str
    dataset_fp: str
    split: str
    view: int | None = None
    num_samples: int = Field(ge=0)
    sample_shape: tuple[int, ...]
    dtype: str = Field(description="dtype of the logits given to publish()")
    encoding: Literal["float16", "float32"]
    compression: str | None = None
    topk: int | None = None
    chunk_size: int = Field(gt=0)
    num_chunks: int = Field(ge=0)
    checksums: list[list[int]] = Field(description="per chunk: the checksum of each encoded array in it")
    chunk_nbytes: list[int]
    nbytes: int = Field(ge=0, description="bytes stored in Redis for the chunks")
    created_at: float
    generation: str
    teacher_spec: dict[str, Any] = Field(default_factory=dict)
    view_params: list[dict[str, Any]] | None = None
    checksum: str = Field("", description="blake2b of every other field")

    def compute_checksum(self) -> str:
        body = self.model_dump(mode="json", exclude={"checksum"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)


class Problem(BaseModel):
    """One finding of :meth:`SoftLabelCache.verify`."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["corrupt_manifest", "missing_chunk", "corrupt_chunk", "orphan_chunks"]
    prefix: str
    message: str
    teacher_fp: str | None = None
    split: str | None = None
    chunk: int | None = None


def check_name(argument: str, value: str) -> str:
    """``value`` if it is a valid key component (1-128 characters of ``[A-Za-z0-9_.-]``).

    Args:
        argument: the argument's name, for the error message.
        value: the name to check.

    Raises:
        ValueError: naming ``argument`` and the rule.

    Examples:
        >>> check_name("teacher_fp", "ab12")
        'ab12'
    """
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{argument} must be 1-128 characters of [A-Za-z0-9_.-], got {value!r}")
    return value


def check_view(view: int | None) -> int | None:
    """``view`` as an int (a non-negative augmentation view index), or None.

    Examples:
        >>> check_view(np.int64(2))
        2
    """
    if view is None:
        return None
    if isinstance(view, bool) or not isinstance(view, (int, np.integer)) or view < 0:
        raise ValueError(f"view must be a non-negative int or None, got {view!r}")
    return int(view)


def validate_publish(logits: Any, teacher_spec: Any, options: PublishOptions) -> None:
    """Check what is about to be published; every error names the argument.

    Args:
        logits: raw logits, ``(N, C, ...)`` floating point, finite.
        teacher_spec: JSON-serialisable dict describing the teacher.
        options: encoding, compression, top-k, view and chunking.

    Raises:
        ValueError: bad logits or options.

    Examples:
        >>> validate_publish(np.zeros((2, 3), np.float32), {}, PublishOptions())
    """
    encoding, compression, topk = options.encoding, options.compression, options.topk
    view, view_params, chunk_size = options.view, options.view_params, options.chunk_size
    if not isinstance(logits, np.ndarray):
        raise ValueError(f"logits must be a numpy array, got {type(logits).__name__}")
    if logits.dtype.kind != "f":
        raise ValueError(f"logits must be floating point (raw logits), got dtype {logits.dtype}")
    if logits.ndim < 2:
        raise ValueError(f"logits must have shape (N, C, ...), got {logits.shape}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
    if compression is not None and compression not in CODECS:
        raise ValueError(f"compression must be None or one of {sorted(CODECS)}, got {compression!r}")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or inf (did the teacher diverge?)")
    if encoding == "float16" and logits.size and float(np.abs(logits).max()) > _FLOAT16_MAX:
        raise ValueError(
            f"logits exceed the float16 range (max |z| = {float(np.abs(logits).max()):.4g}); use encoding='float32'"
        )
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or not 1 <= topk < logits.shape[1]:
            raise ValueError(f"topk must be an int in [1, {logits.shape[1] - 1}] (C={logits.shape[1]}), got {topk!r}")
        if logits.shape[1] > 65536:
            raise ValueError(f"topk supports at most 65536 classes, got {logits.shape[1]}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(options.max_chunk_bytes, (int, np.integer)) or options.max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be a positive int, got {options.max_chunk_bytes!r}")
    if not isinstance(teacher_spec, dict):
        raise ValueError(f"teacher_spec must be a dict, got {type(teacher_spec).__name__}")
    try:
        json.dumps(teacher_spec)
    except (TypeError, ValueError) as error:
        raise ValueError(f"teacher_spec must be JSON-serialisable: {error}") from error
    if view is None and view_params is not None:
        raise ValueError("view_params given without view: pass the view index they belong to")
    if view is not None:
        if view_params is None:
            raise ValueError(f"view={view}: view_params (one dict of augmentation parameters per sample) is required")
        if not isinstance(view_params, list) or len(view_params) != logits.shape[0]:
            length = len(view_params) if isinstance(view_params, list) else "?"
            raise ValueError(
                f"view_params must be a list of {logits.shape[0]} dicts (one per sample), "
                f"got {type(view_params).__name__} of length {length}"
            )
        if not all(isinstance(p, dict) for p in view_params):
            raise ValueError("view_params must contain one dict per sample")
        try:
            json.dumps(view_params)
        except (TypeError, ValueError) as error:
            raise ValueError(f"view_params must be JSON-serialisable: {error}") from error
