"""What every section of the job spec shares: strict models, the spec error, fingerprint dumps."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict


class SpecError(ValueError):
    """A job spec that cannot be used; the message names the file and every bad field."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def fingerprint_dump(
    model: BaseModel,
    *,
    exclude: set[str] | None = None,
    added_later: Mapping[str, tuple[Any, ...]] = MappingProxyType({"ema_epochs": (None,)}),
) -> dict[str, Any]:
    """``model``'s fields for a fingerprint. A field ``added_later`` is left out while its value is one
    of those it maps to (what every fingerprint before the field meant), so what was fingerprinted
    before it existed keeps its fingerprint (and its cached results)."""
    fields = model.model_dump(mode="json", exclude=exclude)
    for name, as_before in added_later.items():
        if name in fields and fields[name] in as_before:
            del fields[name]
    return fields
