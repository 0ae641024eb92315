"""The ``export:`` section: which Pareto student is selected and how the ONNX export is checked."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medkd.spec.base import StrictModel


class ExportSpec(StrictModel):
    select: Literal["best"] | int = Field(
        "best", description="'best' by the first objective on the Pareto front, or a Pareto index"
    )
    parity_atol: float = Field(1e-3, gt=0, description="max |logit difference| ONNX vs PyTorch (fp32)")
    latency_runs: int = Field(50, gt=0)
    target_sensitivity: float | None = Field(
        None,
        gt=0,
        le=1,
        description="binary tasks: the served decision is the highest threshold on the calibrated probability of "
        "positive_class whose val sensitivity reaches this (None: argmax)",
    )
    positive_class: int = Field(
        1, ge=0, le=1, description="binary tasks: the class whose detection counts as sensitivity"
    )
