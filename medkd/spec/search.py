"""The ``search:`` section: the Ray Tune + Optuna search space, objectives and budgets."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from medkd.core.errors import field_error
from medkd.spec import catalog
from medkd.spec.base import StrictModel, fingerprint_dump
from medkd.spec.catalog import check_name
from medkd.spec.data import AugmentSpec


class Range(StrictModel):
    """A numeric search range."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log ranges need low > 0")
        return self


Dimension = Range | list[Any]


class SearchSpace(StrictModel):
    """Each dimension is a list (categorical) or a ``{low, high, log}`` range."""

    student: list[str] = Field(default_factory=lambda: ["resnet_tiny"], min_length=1)
    width: Dimension = Field(default_factory=lambda: Range(low=0.25, high=1.0))
    depth: Dimension = Field(default_factory=lambda: [1.0])
    temperature: Dimension = Field(default_factory=lambda: Range(low=1.0, high=8.0))
    alpha: Dimension = Field(default_factory=lambda: Range(low=0.0, high=0.9))
    aggregation: list[str] = Field(default_factory=lambda: ["mean", "confidence"], min_length=1)
    teacher_weight: Dimension = Field(
        default_factory=lambda: Range(low=0.0, high=1.0),
        description="for 'weighted' aggregation: one weight per teacher drawn from this range",
    )
    lr: Dimension = Field(default_factory=lambda: Range(low=1e-3, high=1e-2, log=True))
    prune: list[Literal["none", "unstructured", "channels"]] = Field(default_factory=lambda: ["none"])
    prune_amount: Dimension = Field(default_factory=lambda: Range(low=0.0, high=0.5))
    quantize: list[str] = Field(
        default_factory=lambda: ["int8_static"],
        min_length=1,
        description="quantization modes of the served student: int8_static; int8_static_7bit (7-bit weights: fast "
        "and exact INT8 on x86 CPUs without VNNI); int8_dynamic; fp16 (GPU serving); none",
    )
    loss: list[str] | None = Field(
        None,
        min_length=1,
        description="logit distillation loss of single-label classification students (Hinton KD, DKD, DIST); "
        "None: Hinton KD",
    )
    logit_standardization: list[bool] | None = Field(
        None,
        min_length=1,
        description="z-score the logits in the KD term (CVPR 2024), e.g. [false, true]; needs >= 3 classes; None: off",
    )

    @field_validator("student", "aggregation", "quantize")
    @classmethod
    def _registered_names(cls, value: list[str], info: ValidationInfo) -> list[str]:
        kind = {"student": "student", "aggregation": "aggregation", "quantize": "quantization mode"}[info.field_name]
        return [check_name(kind, name) for name in value]

    @field_validator("loss")
    @classmethod
    def _single_label_losses(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            check_name("loss", name)
            applies_to = catalog.info("loss", name)["applies_to"]
            if applies_to != "single_label":
                offered = ", ".join(
                    n for n in catalog.names("loss") if catalog.info("loss", n)["applies_to"] == "single_label"
                )
                raise field_error(
                    f"{name!r} is a {applies_to} loss; the search chooses among single-label "
                    f"classification losses: {offered}"
                )
        return value


# Space dimensions added after searches were fingerprinted: left out of the fingerprint while unset.
SPACE_ADDED_LATER: dict[str, tuple[Any, ...]] = {"loss": (None,), "logit_standardization": (None,)}
#: SearchSpec fields that came later, left out at the value every earlier search had (off, fp32).
SEARCH_ADDED_LATER: dict[str, tuple[Any, ...]] = {
    "ema_epochs": (None,),
    "calibrate_teachers": (False,),
    "cpu_precision": ("fp32",),
}


ObjectiveMetric = Literal["val_auc", "val_acc", "val_dice", "latency_ms", "params", "model_bytes"]


class Objective(StrictModel):
    metric: ObjectiveMetric
    mode: Literal["max", "min"]


class SearchSpec(StrictModel):
    """Ray Tune + Optuna search over students, distillation and compression settings."""

    num_trials: int = Field(8, gt=0)
    max_concurrent: int = Field(2, gt=0)
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    objectives: list[Objective] = Field(
        default_factory=lambda: [
            Objective(metric="val_auc", mode="max"),
            Objective(metric="val_acc", mode="max"),
            Objective(metric="latency_ms", mode="min"),
        ],
        min_length=1,
        description="what Optuna's multi-objective sampler and the Pareto front weigh, first the quality the "
        "selection ranks by; by default the ranking (val AUC), the decision a user gets (val accuracy "
        "at argmax, the MedMNIST ACC) and the cost (batch-1 latency of the compressed model). With "
        "several quality objectives ASHA stops trials on their mean (val_quality_mean)",
    )
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, gt=0)
    ema_epochs: float | None = Field(
        None,
        gt=0,
        description="students keep an exponential moving average of their weights over about this many trailing "
        "epochs; validation, compression and export use the averaged weights",
    )
    final_epochs: int | None = Field(
        None,
        gt=0,
        description="after the search, the selected student is trained again from scratch for this many epochs "
        "(same configuration, soft labels and views, a fresh seed), compressed and validated as in a trial, "
        "and that model is exported and served unless val says it is worse than the trial's beyond the noise "
        "(registry.selection.compare_final); equal to search.epochs: one more draw of the configuration; "
        "None: export the search trial as it is",
    )
    final_branches: int | None = Field(
        None,
        ge=2,
        description="after the search, the selected student is trained again as a weight soup: one run to a "
        "quarter of its epochs, then this many copies finish it, each with its own data order, and "
        "their weights are averaged (BatchNorm statistics recomputed); (1 + 3 * branches) / 4 times a "
        "trial's training. Combines with final_epochs; None: no soup",
    )
    calibrate_teachers: bool = Field(
        False,
        description="classification: before distillation, each teacher's logits are divided by a temperature "
        "fitted on val (lowest val NLL), so the soft labels carry calibrated confidences; the KD "
        "temperature applies on top. Off by default: on BreastMNIST (3 seeds) it raised val AUC on every "
        "seed (+0.021 on average, within the 78-image val split's noise) but not val accuracy "
        "(benchmarks/RESULTS.md, kd_accuracy)",
    )
    cpu_precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="precision of student training on CPU (search trials, the final training): bf16 runs the "
        "forward pass under torch.autocast('cpu', dtype=torch.bfloat16) (weights, gradients, optimiser, the "
        "distillation losses and validation stay fp32), 1.4-1.6x faster per image for the search's students at "
        "28 px on CPUs with AVX512-BF16 (benchmarks/RESULTS.md, scale); fp32: full fp32. Ignored on a GPU",
    )
    teacher_selection: Literal["all", "val_contribution"] = Field(
        "all",
        description="whose soft labels the students learn from. all: every teacher with distill: true. "
        "val_contribution: after the soft labels are cached, the equal-weight ensemble is scored on val without "
        "each teacher (leave-one-out, from the cached val logits: no teacher re-runs) and a teacher is dropped "
        "when the ensemble without it has a higher val accuracy at the served operating point by more than one "
        "paired-bootstrap standard error and a val AUC not lower by more than one (the student selection's "
        "yardstick); greedily, the worst first, while two or more remain. teachers[i].distill: false always "
        "drops. Classification only",
    )
    space: SearchSpace = Field(default_factory=SearchSpace)
    augment: AugmentSpec | None = None
    seed: int | None = None

    def fingerprint_fields(self) -> dict[str, Any]:
        """The search's settings for its fingerprint (not the final training's: it runs after the trials).

        ``teacher_selection`` is left out: what it decides reaches the fingerprint as the teachers the
        students learn from, so a search whose teachers it keeps keeps its fingerprint."""
        exclude = {"final_epochs", "final_branches", "teacher_selection"}
        fields = fingerprint_dump(self, exclude=exclude, added_later=SEARCH_ADDED_LATER)
        fields["space"] = fingerprint_dump(self.space, added_later=SPACE_ADDED_LATER)
        return fields

    @property
    def final_training(self) -> bool:
        return self.final_epochs is not None or self.final_branches is not None

    def trial_resources(self) -> dict[str, float]:
        """Ray resources of one search trial (``tune.with_resources``).

        Examples:
            >>> SearchSpec(cpus_per_trial=2, gpus_per_trial=0.5).trial_resources()
            {'cpu': 2.0, 'gpu': 0.5}
        """
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}
