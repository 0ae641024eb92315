"""Registry of data adapters, one per data spec ``kind`` (decorator registration).

Examples:
    >>> @register_adapter("my-kind")  # doctest: +SKIP
    ... def load_my_kind(spec) -> RawData: ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from medkd.core.registry import Registry
from medkd.data.dataset import RawData

Adapter = Callable[[Any], RawData]
ADAPTERS: Registry[Adapter] = Registry("data adapter")
_F = TypeVar("_F", bound=Adapter)


def register_adapter(kind: str) -> Callable[[_F], _F]:
    """Register ``fn(spec) -> RawData`` as the adapter of data specs with this ``kind``."""
    return ADAPTERS.register(kind)


def get_adapter(kind: str) -> Adapter:
    return ADAPTERS.get(kind).obj


def available_adapters() -> list[str]:
    return ADAPTERS.names()
