"""The ``teachers:`` section: one entry per teacher of the ensemble."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from medkd.spec.base import StrictModel, fingerprint_dump
from medkd.spec.catalog import check_name
from medkd.spec.data import AugmentSpec


class TeacherSpec(StrictModel):
    """One teacher of the ensemble, trained by its own Ray Train ``TorchTrainer``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field(description="teacher registry name, e.g. resnet18, densenet121, vit, unet, unetr")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    scheduler: Literal["cosine", "none"] = "cosine"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weighting: bool = False
    patience: int | None = Field(None, gt=0, description="early stopping on the validation metric")
    ema_epochs: float | None = Field(
        None,
        gt=0,
        description="keep an exponential moving average of the weights over about this many trailing epochs; "
        "validation, checkpoint selection and the teacher itself use the averaged weights",
    )
    augment: AugmentSpec | None = None
    num_workers: int = Field(1, gt=0)
    min_workers: int | None = Field(
        None,
        gt=0,
        description="elastic training: when nodes are lost, go on with as few as this many workers (from the last "
        "checkpoint) instead of waiting for num_workers; None: always num_workers",
    )
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: Literal["auto"] | bool = "auto"
    mixed_precision: bool = True
    cpu_precision: Literal["fp32", "bf16"] | None = Field(
        None,
        description="precision of training and inference on CPU: bf16 runs forward and loss under "
        "torch.autocast('cpu', dtype=torch.bfloat16) (weights, gradients and optimiser stay fp32), ~2x faster for "
        "the recipe's ResNet-18 and ViT at 28 px on CPUs with AVX512-BF16 (benchmarks/RESULTS.md, scale); None or "
        "fp32: full fp32. The teacher's soft labels and validation use the same precision. GPUs use mixed_precision",
    )
    max_failures: int = Field(2, ge=0)
    seed: int | None = None
    distill: bool = Field(
        True,
        description="whether students learn from this teacher's soft labels; false drops it from the soft labels "
        "(and the search) without retraining anything, e.g. when leaving it out helps the ensemble on val",
    )

    @model_validator(mode="after")
    def _min_workers_within_num_workers(self) -> TeacherSpec:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed num_workers ({self.num_workers})")
        return self

    @field_validator("model")
    @classmethod
    def _registered_model(cls, value: str) -> str:
        return check_name("teacher", value)

    def training_fingerprint_fields(self) -> dict[str, Any]:
        """The fields that change the trained weights (not resources)."""
        resources = {"num_workers", "min_workers", "cpus_per_worker", "use_gpu", "max_failures"}
        # distill chooses who students learn from, not the weights: the search fingerprint sees it.
        # fp32 is what every teacher trained in before cpu_precision existed.
        added_later = {"ema_epochs": (None,), "cpu_precision": (None, "fp32")}
        return fingerprint_dump(self, exclude={"name", "distill", *resources}, added_later=added_later)
