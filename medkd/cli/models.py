"""``medkd models RUN_DIR [--select ID_OR_RANK]``: a run's exported Pareto models, and which one is served."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medkd.registry.export import ExportError
from medkd.registry.layout import SELECTED_FILE, registry_dir


def models(args: argparse.Namespace) -> int:
    """List a run's exported (Pareto) models, or select which one `medkd serve RUN_DIR` serves."""
    registry = registry_dir(Path(args.run_dir))
    entries = sorted(p for p in registry.glob("*/metadata.json")) if registry.is_dir() else []
    if not entries:
        raise ExportError(f"{registry}: no exported models (run the job first)")
    models = [json.loads(p.read_text()) for p in entries]
    models.sort(key=lambda m: m["search"]["pareto_rank"])
    selected = (registry / SELECTED_FILE).read_text().strip() if (registry / SELECTED_FILE).is_file() else None
    if args.select is not None:
        matches = [m for m in models if m["model_id"] == args.select or str(m["search"]["pareto_rank"]) == args.select]
        if not matches:
            raise ExportError(f"--select {args.select}: no model with that id or Pareto rank in {registry}")
        selected = matches[0]["model_id"]
        (registry / SELECTED_FILE).write_text(selected + "\n")
        print(f"selected {selected}")
    for model in models:
        metrics = model["metrics"]
        quality = {k: v for k, v in metrics["test"].items() if k in ("auc", "acc", "dice")}
        mark = "*" if model["model_id"] == selected else " "
        print(
            f"{mark} rank {model['search']['pareto_rank']}  {model['model_id']}  {model['config']['student']} "
            f"w={model['config']['width']:.2f} {model['config']['quantize']}  params={metrics['params']:,}  "
            f"bytes={metrics['model_bytes']:,}  latency={metrics['latency_ms']:.3f}ms  "
            + "  ".join(f"test_{k}={v:.4f}" for k, v in quality.items() if v is not None)
        )
    return 0
