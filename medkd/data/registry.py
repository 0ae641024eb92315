"""Registry of data adapters, one per data spec ``kind`` (decorator registration).

Examples:
    >>> @register_adapter("my-kind")  # doctest: +SKIP
    ... def load_my_kind(spec) -> RawData: ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from medkd.data.dataset import RawData

Adapter = Callable[[Any], RawData]
_ADAPTERS: dict[str, Adapter] = {}
_F = TypeVar("_F", bound=Adapter)


def register_adapter(kind: str) -> Callable[[_F], _F]:
    """Register ``fn(spec) -> RawData`` as the adapter of data specs with this ``kind``."""
    if not kind or not isinstance(kind, str):
        raise ValueError(f"register_adapter: kind must be a non-empty string, got {kind!r}")

    def decorator(fn: _F) -> _F:
        existing = _ADAPTERS.get(kind)
        if existing is not None and existing is not fn:
            raise ValueError(f"register_adapter: kind {kind!r} is already registered to {existing.__qualname__}")
        _ADAPTERS[kind] = fn
        return fn

    return decorator


def get_adapter(kind: str) -> Adapter:
    try:
        return _ADAPTERS[kind]
    except KeyError:
        raise ValueError(f"no data adapter for kind {kind!r}; available: {available_adapters()}") from None


def available_adapters() -> list[str]:
    return sorted(_ADAPTERS)
