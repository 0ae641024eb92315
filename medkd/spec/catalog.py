"""The names the job spec may use, read from ``catalog.json`` without importing torch.

The registries (:mod:`medkd.core.registry`) are the single source of truth, but filling them
imports every model family (torch, MONAI, torchvision: seconds). ``catalog.json`` is generated
from them by ``python -m medkd.cli.catalog`` and a test fails when it drifts, so ``medkd validate``
can reject a misspelt model, loss, aggregation or quantization name in well under a second,
before anything runs.

Examples:
    >>> check_name("student", "resnet_tiny")
    'resnet_tiny'
    >>> check_name("student", "resnet_tiyn")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ValueError: unknown student 'resnet_tiyn'; known students: mobilenet_tiny, resnet_tiny, ...
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from medkd.core.errors import field_error

CATALOG_FILE = Path(__file__).with_name("catalog.json")

# The registries the spec names things from, with the plural used in messages.
SPEC_KINDS = {
    "teacher": "teachers",
    "student": "students",
    "loss": "losses",
    "aggregation": "aggregations",
    "quantization mode": "quantization modes",
}


@cache
def catalog() -> dict[str, dict[str, dict[str, Any]]]:
    """``{kind: {name: info}}`` as last generated from the registries."""
    return json.loads(CATALOG_FILE.read_text())


def names(kind: str) -> list[str]:
    return sorted(catalog()[kind])


def info(kind: str, name: str) -> dict[str, Any]:
    return catalog()[kind][name]


def check_name(kind: str, name: str) -> str:
    """``name`` if the ``kind`` registry has it; else a field error listing the known names."""
    known = catalog()[kind]
    if name not in known:
        raise field_error(
            f"unknown {kind} {name!r}; known {SPEC_KINDS.get(kind, kind + 's')}: {', '.join(sorted(known))}"
        )
    return name
