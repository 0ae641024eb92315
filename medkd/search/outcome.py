"""What a search produced: every trial's record, and the Pareto front of the finished ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from medkd.core.progress import Progress
from medkd.search.context import TrialContext
from medkd.search.space import trial_distill_config
from medkd.students.candidate import CANDIDATE_FILE


class TrialRecord(BaseModel):
    trial_id: str
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint: str | None
    final: bool
    pareto: bool = False


class SearchOutcome(BaseModel):
    fingerprint: str
    experiment_path: str
    objectives: list[dict[str, str]]
    trials: list[TrialRecord]
    pareto: list[str]

    def pareto_trials(self) -> list[TrialRecord]:
        by_id = {t.trial_id: t for t in self.trials}
        return [by_id[i] for i in self.pareto]


def pareto_front(points: list[list[float]], modes: list[str]) -> list[int]:
    """Indices of the non-dominated points (ties kept)."""
    signs = np.array([1.0 if mode == "max" else -1.0 for mode in modes])
    values = np.asarray(points, dtype=np.float64) * signs
    front = []
    for i, row in enumerate(values):
        dominated = np.any(np.all(values >= row, axis=1) & np.any(values > row, axis=1))
        if not dominated:
            front.append(i)
    return front


def collect_outcome(
    grid: Any,
    *,
    search_fp: str,
    experiment_path: str,
    metrics: list[str],
    modes: list[str],
    progress: Progress,
    context: TrialContext,
) -> SearchOutcome:
    records: list[TrialRecord] = []
    for result in grid:
        trial_metrics = dict(result.metrics or {})
        trial_id = str(trial_metrics.get("trial_id", result.path.rsplit("/", 1)[-1] if result.path else "?"))
        final = bool(trial_metrics.get("final")) and result.checkpoint is not None
        candidate_config = trial_distill_config(dict(result.config or {}), context).model_dump()
        if final:
            with result.checkpoint.as_directory() as directory:
                candidate = json.loads((Path(directory) / CANDIDATE_FILE).read_text())
            candidate_config = candidate["config"]
        keep = {
            k: v for k, v in trial_metrics.items() if isinstance(v, (int, float, str, bool)) and k not in ("config",)
        }
        records.append(
            TrialRecord(
                trial_id=trial_id,
                status="error" if result.error else ("completed" if final else "stopped early"),
                config=candidate_config,
                metrics=keep,
                checkpoint=result.checkpoint.path if result.checkpoint is not None else None,
                final=final,
            )
        )
    finished = [r for r in records if r.final and all(m in r.metrics for m in metrics)]
    front_ids: list[str] = []
    if finished:
        indices = pareto_front([[float(r.metrics[m]) for m in metrics] for r in finished], modes)
        # Best first by the first objective.
        sign = -1.0 if modes[0] == "max" else 1.0
        front = sorted((finished[i] for i in indices), key=lambda r: sign * float(r.metrics[metrics[0]]))
        front_ids = [r.trial_id for r in front]
        for record in records:
            record.pareto = record.trial_id in front_ids
    progress.line(f"  {len(finished)}/{len(records)} trials finished, {len(front_ids)} on the Pareto front")
    return SearchOutcome(
        fingerprint=search_fp,
        experiment_path=experiment_path,
        objectives=[{"metric": m, "mode": mode} for m, mode in zip(metrics, modes)],
        trials=records,
        pareto=front_ids,
    )
