"""What every section of the job spec shares: strict models, the spec error, fingerprint dumps."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class SpecError(ValueError):
    """A job spec that cannot be used; the message names the file and every bad field."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def fingerprint_dump(
    model: BaseModel, *, exclude: set[str] | None = None, added_later: tuple[str, ...] = ("ema_epochs",)
) -> dict[str, Any]:
    """``model``'s fields for a fingerprint. Fields ``added_later`` are left out while unset (None),
    so what was fingerprinted before they existed keeps its fingerprint (and its cached results)."""
    fields = model.model_dump(mode="json", exclude=exclude)
    for name in added_later:
        if name in fields and fields[name] is None:
            del fields[name]
    return fields
