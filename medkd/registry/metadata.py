"""The typed ``metadata.json`` that the export stage writes beside ``model.onnx`` and that the
server reads: one model for the writer and the reader.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from medkd.core.errors import field_error as _field_error
from medkd.registry.calibration import ARGMAX, Calibration, OperatingPoint, calibrated_probabilities


class InputMeta(BaseModel):
    """How raw images become the model's input (must match training).

    Raw pixels (integers) are multiplied by ``scale``; then every channel is normalised as
    ``(x - mean[c]) / std[c]``. Float images are taken to be in [0, 1] already — unless the
    model was trained on raw intensities (``clip``/``offset`` set, e.g. CT in Hounsfield
    units), in which case every input is ``(clip(x) - offset) * scale`` first.
    """

    model_config = ConfigDict(extra="allow")

    in_channels: int = Field(ge=1)
    spatial_dims: Literal[2, 3]
    image_size: list[int] = Field(min_length=2, max_length=3)
    scale: float = Field(1.0 / 255.0, gt=0)
    offset: float = 0.0
    clip: list[float] | None = Field(None, min_length=2, max_length=2)
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, value: list[int], info: ValidationInfo) -> list[int]:
        if any(size <= 0 for size in value):
            raise _field_error(f"every size must be > 0, got {value}")
        spatial_dims = info.data.get("spatial_dims")
        if spatial_dims is not None and len(value) != spatial_dims:
            raise _field_error(f"has {len(value)} sizes but spatial_dims is {spatial_dims}")
        return value

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, value: list[float], info: ValidationInfo) -> list[float]:
        if not value or not all(math.isfinite(v) for v in value):
            raise _field_error(f"needs finite numbers, got {value}")
        if info.field_name == "std" and any(v <= 0 for v in value):
            raise _field_error(f"every std must be > 0, got {value}")
        in_channels = info.data.get("in_channels")
        if in_channels is not None and len(value) not in (1, in_channels):
            raise _field_error(f"needs 1 or in_channels ({in_channels}) values, got {len(value)}")
        return value


class TeacherLineage(BaseModel):
    """A teacher the student learnt from, and where its soft labels are cached."""

    name: str
    model: str
    family: str
    fingerprint: str
    params: int
    cache_keys: dict[str, str] = Field(default_factory=dict)


class SearchLineage(BaseModel):
    """The search trial the model comes from."""

    fingerprint: str
    trial_id: str
    pareto_rank: int | None = Field(None, description="None: exported beside the front (tied with its best)")
    objectives: list[dict[str, str]] = Field(default_factory=list)


class FinalTrainingLineage(BaseModel):
    """The selected configuration trained again after the search (``search.final_*``)."""

    fingerprint: str
    epochs: int
    search_epochs: int
    branches: int = 1
    seed: int | None = None  # its own seed, not the search trial's (None: an entry from before)
    search_val: dict[str, Any] = Field(default_factory=dict)


class ModelMetrics(BaseModel):
    """Quality of the compressed model (val from its training, test scored by the export) and its cost."""

    val: dict[str, Any] = Field(default_factory=dict)
    test: dict[str, Any] = Field(default_factory=dict)
    latency_ms: float
    params: int
    model_bytes: int
    fp32_bytes: int | None = None


class Parity(BaseModel):
    """ONNX vs PyTorch on the same inputs."""

    max_abs_diff: float
    argmax_agreement: float | None = None
    compressed_argmax_agreement: float | None = None


class ModelMetadata(BaseModel):
    """The ``metadata.json`` the export stage writes beside ``model.onnx`` and the server reads.

    The serving contract (task, classes, input, calibration, operating points) and the lineage
    (job, dataset, teachers, search trial, final training, metrics, parity) are typed; lineage
    fields are optional so that a model exported by hand (or by an older medkd) still serves.
    Unknown fields are kept and returned by ``GET /metadata``.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_id: str = Field(min_length=1)
    task: Literal["classification", "segmentation"]
    multilabel: bool = False
    num_classes: int = Field(ge=1)
    class_names: list[str] | None = None
    input: InputMeta
    calibration: Calibration | None = Field(
        None, description="temperature scaling fitted on val; None: raw probabilities"
    )
    operating_points: list[OperatingPoint] = Field(default_factory=list, description="chosen on val by the export")
    operating_point: str = Field(ARGMAX, description="the operating point whose decision the endpoint returns")
    created_at: str | None = None
    job: str | None = None
    job_fingerprint: str | None = None
    dataset: dict[str, str] | None = None
    teachers: list[TeacherLineage] = Field(default_factory=list)
    search: SearchLineage | None = None
    final_training: FinalTrainingLineage | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    metrics: ModelMetrics | None = None
    parity: Parity | None = None
    files: dict[str, str] = Field(default_factory=dict)
    export_seconds: float | None = None

    @model_validator(mode="after")
    def _served_point_exists(self) -> ModelMetadata:
        names = [point.name for point in self.operating_points]
        if self.operating_point != ARGMAX and self.operating_point not in names:
            raise ValueError(f"operating_point {self.operating_point!r} is not one of operating_points {names}")
        point = self.served_point()
        if point.kind == "threshold" and (self.multilabel or self.num_classes != 2):
            raise ValueError(f"operating_point {point.name!r} is a threshold, which needs a binary single-label model")
        return self

    def served_point(self) -> OperatingPoint:
        """The operating point the endpoint decides at (argmax when the export stored none)."""
        named = {point.name: point for point in self.operating_points}
        return named.get(self.operating_point) or OperatingPoint(name=ARGMAX, kind="argmax")

    @field_validator("class_names")
    @classmethod
    def _class_names(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        num_classes = info.data.get("num_classes")
        if value is not None and num_classes is not None and len(value) != num_classes:
            raise _field_error(f"has {len(value)} names but num_classes is {num_classes}")
        return value

    def label(self, index: int) -> str:
        """Name of class ``index`` (its number when the export gave no names)."""
        return self.class_names[index] if self.class_names else str(index)

    def classify(self, logits: np.ndarray) -> list[dict[str, Any]]:
        """Per-image calibrated probabilities and the decision at the served operating point.

        The one place where served logits become a decision: softmax over classes (a sigmoid per
        label for multi-label models, a sigmoid on the single logit of a binary model) of the
        logits divided by the calibration temperature fitted on val, then the decision of
        :attr:`operating_point` (argmax, or a binary threshold chosen on val for a target
        sensitivity).

        Args:
            logits: ``(N, K)`` model outputs (``(N, 1)`` for a binary single-logit model).

        Returns:
            One dict per image: ``probabilities`` (K calibrated values), ``predicted_class`` and
            ``predicted_label`` (the decision at the operating point), ``operating_point`` (its
            name, with ``threshold`` for a threshold point) and, for multi-label models,
            ``predicted_labels`` (p >= 0.5).

        Examples:
            >>> meta = ModelMetadata(model_id="m", task="classification", num_classes=2,
            ...     class_names=["benign", "malignant"],
            ...     input={"in_channels": 1, "spatial_dims": 2, "image_size": [28, 28]})
            >>> meta.classify(np.array([[0.0, 2.0]]))[0]["predicted_label"]
            'malignant'
        """
        logits = np.asarray(logits).reshape(len(logits), -1)
        temperature = self.calibration.temperature if self.calibration is not None else 1.0
        probabilities = calibrated_probabilities(logits, temperature, multilabel=self.multilabel)
        point = self.served_point()
        decisions = point.decide(probabilities, multilabel=self.multilabel)
        # Whole-array conversions, one dict per row: a 64-image batch answer in less than half
        # the time of a per-row loop (it runs on the serving replica's event loop).
        predicted = (probabilities.argmax(axis=1) if self.multilabel else decisions).tolist()
        labels = {index: self.label(index) for index in set(predicted)}
        rows = zip(probabilities.tolist(), predicted, strict=True)
        shared: dict[str, Any] = {"operating_point": point.name}
        if point.threshold is not None:
            shared["threshold"] = point.threshold
        results: list[dict[str, Any]] = [
            {"probabilities": row, "predicted_class": index, "predicted_label": labels[index], **shared}
            for row, index in rows
        ]
        if self.multilabel:
            label = self.label
            for result, row in zip(results, decisions.tolist(), strict=True):
                result["predicted_labels"] = [label(i) for i, on in enumerate(row) if on]
        return results
