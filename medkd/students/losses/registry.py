"""Registries of distillation losses and multi-teacher aggregation strategies (torchdistill-style).

Register a class (or factory) with a decorator and build it by name::

    @register_loss("my_kd", applies_to="single_label")
    class MyKD(nn.Module): ...

    loss = create_loss("my_kd", temperature=4.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

from torch import nn

from medkd.core.registry import Registry

FactoryT = TypeVar("FactoryT", bound=Callable[..., nn.Module])

LOSSES: Registry[Callable[..., nn.Module]] = Registry("loss", plural="losses")
AGGREGATIONS: Registry[Callable[..., nn.Module]] = Registry("aggregation")


LossTarget = Literal["single_label", "multilabel", "segmentation"]


def register_loss(name: str, *, applies_to: LossTarget) -> Callable[[FactoryT], FactoryT]:
    """Decorator registering a distillation loss class under ``name``.

    Args:
        name: the registry name.
        applies_to: the outputs the loss distils: "single_label" (softmax over classes),
            "multilabel" (a sigmoid per label) or "segmentation" (per-pixel softmax). The search's
            ``loss`` dimension offers the single-label ones.
    """
    return LOSSES.register(name, applies_to=applies_to)


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build the loss registered as ``name`` with ``kwargs``; ValueError lists known names."""
    return LOSSES.create(name, **kwargs)


def list_losses() -> list[str]:
    return LOSSES.names()


def register_aggregation(name: str) -> Callable[[FactoryT], FactoryT]:
    """Decorator registering a multi-teacher aggregation strategy under ``name``."""
    return AGGREGATIONS.register(name)


def create_aggregation(name: str, **kwargs) -> nn.Module:
    """Build the aggregation strategy registered as ``name``; ValueError lists known names."""
    return AGGREGATIONS.create(name, **kwargs)


def list_aggregations() -> list[str]:
    return AGGREGATIONS.names()
