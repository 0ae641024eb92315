"""Content fingerprints: stable hashes of configs and arrays.

A fingerprint is the hex SHA-256 of a canonical encoding, truncated to 16 characters for
readability in paths and Redis keys (64 bits: collisions are not a practical concern at
the scale of one user's artifacts).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

FINGERPRINT_LENGTH = 16


def _canonical(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and obj.is_integer():
        return int(obj) if abs(obj) < 2**53 else obj
    return obj


def fingerprint(*parts: Any) -> str:
    """Fingerprint of JSON-serialisable parts (pydantic models and numpy scalars allowed).

    Examples:
        >>> fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
        True
    """
    payload = json.dumps([_canonical(p) for p in parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:FINGERPRINT_LENGTH]


def array_digest(array: np.ndarray) -> str:
    """Digest of an array's dtype, shape and bytes."""
    contiguous = np.ascontiguousarray(array)
    digest = hashlib.sha256()
    digest.update(f"{contiguous.dtype.str}|{contiguous.shape}".encode())
    digest.update(memoryview(contiguous).cast("B"))
    return digest.hexdigest()[:FINGERPRINT_LENGTH]
