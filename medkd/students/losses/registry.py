"""Registries of distillation losses and multi-teacher aggregation strategies (torchdistill-style).

Register a class (or factory) with a decorator and build it by name::

    @register_loss("my_kd")
    class MyKD(nn.Module): ...

    loss = create_loss("my_kd", temperature=4.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

FactoryT = TypeVar("FactoryT", bound=Callable[..., nn.Module])

_LOSSES: dict[str, Callable[..., nn.Module]] = {}
_AGGREGATIONS: dict[str, Callable[..., nn.Module]] = {}


def _register(table: dict[str, Callable[..., nn.Module]], kind: str, name: str) -> Callable[[FactoryT], FactoryT]:
    if not name:
        raise ValueError(f"{kind} name must be a non-empty string")

    def decorator(factory: FactoryT) -> FactoryT:
        existing = table.get(name)
        if existing is not None and (existing.__module__, existing.__qualname__) != (factory.__module__, factory.__qualname__):
            raise ValueError(f"{kind} {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        table[name] = factory
        return factory

    return decorator


def _create(table: dict[str, Callable[..., nn.Module]], kind: str, name: str, kwargs: dict) -> nn.Module:
    try:
        factory = table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table))}") from None
    return factory(**kwargs)


def register_loss(name: str) -> Callable[[FactoryT], FactoryT]:
    """Decorator registering a distillation loss class under ``name``."""
    return _register(_LOSSES, "loss", name)


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build the loss registered as ``name`` with ``kwargs``; ValueError lists known names."""
    return _create(_LOSSES, "loss", name, kwargs)


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def register_aggregation(name: str) -> Callable[[FactoryT], FactoryT]:
    """Decorator registering a multi-teacher aggregation strategy under ``name``."""
    return _register(_AGGREGATIONS, "aggregation", name)


def create_aggregation(name: str, **kwargs) -> nn.Module:
    """Build the aggregation strategy registered as ``name``; ValueError lists known names."""
    return _create(_AGGREGATIONS, "aggregation", name, kwargs)


def list_aggregations() -> list[str]:
    return sorted(_AGGREGATIONS)
