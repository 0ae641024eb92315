"""Write ``medkd/spec/catalog.json`` from the registries: ``python -m medkd.cli.catalog``.

The job spec validates names against that file (fast, no torch import); a test regenerates the
catalog in memory and fails when the file is stale.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import medkd.data.loader  # noqa: F401  (importing a family registers it)
import medkd.students  # noqa: F401
import medkd.students.compression  # noqa: F401
import medkd.teachers  # noqa: F401
from medkd.core.registry import all_registries
from medkd.spec.catalog import CATALOG_FILE, SPEC_KINDS


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def build_catalog() -> dict[str, dict[str, dict[str, Any]]]:
    """``{kind: {name: info}}`` for every registry the spec names things from."""
    registries = all_registries()
    return {
        kind: {
            entry.name: {k: _plain(v) for k, v in sorted(entry.info.items())} for entry in registries[kind].entries()
        }
        for kind in SPEC_KINDS
    }


def render_catalog() -> str:
    return json.dumps(build_catalog(), indent=1, sort_keys=True) + "\n"


def main() -> int:
    CATALOG_FILE.write_text(render_catalog())
    print(f"wrote {CATALOG_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
