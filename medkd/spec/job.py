"""The job spec: one YAML file that drives the whole pipeline.

Every section is a pydantic model with ``extra="forbid"``, so a typo is an error that names the
field (``teachers[1].epochs: must be > 0``) instead of a silently ignored key.

Examples:
    >>> spec = load_spec("examples/quickstart.yaml")  # doctest: +SKIP
    >>> spec.fingerprint()  # doctest: +SKIP
    '3f2a9c0d1e4b5a67'
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medkd.spec.data import AugmentSpec, DataSpec
from medkd.core.fingerprint import fingerprint
from medkd.spec.serve import ServeConfig


class SpecError(ValueError):
    """A job spec that cannot be used; the message names the file and every bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _fingerprint_dump(model: BaseModel, *, exclude: set[str] | None = None,
                      added_later: tuple[str, ...] = ("ema_epochs",)) -> dict[str, Any]:
    """``model``'s fields for a fingerprint. Fields ``added_later`` are left out while unset (None),
    so what was fingerprinted before they existed keeps its fingerprint (and its cached results)."""
    fields = model.model_dump(mode="json", exclude=exclude)
    for name in added_later:
        if name in fields and fields[name] is None:
            del fields[name]
    return fields


class TeacherSpec(_Strict):
    """One teacher of the ensemble, trained by its own Ray Train ``TorchTrainer``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field(description="registry name, e.g. resnet18, densenet121, vit, unet, unetr")
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
        None, gt=0,
        description="keep an exponential moving average of the weights over about this many trailing epochs; "
                    "validation, checkpoint selection and the teacher itself use the averaged weights",
    )
    augment: AugmentSpec | None = None
    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: Literal["auto"] | bool = "auto"
    mixed_precision: bool = True
    max_failures: int = Field(2, ge=0)
    seed: int | None = None

    def training_fingerprint_fields(self) -> dict[str, Any]:
        """The fields that change the trained weights (not resources)."""
        return _fingerprint_dump(self, exclude={"name", "num_workers", "cpus_per_worker", "use_gpu", "max_failures"})


class CacheSpec(_Strict):
    """Where teacher soft labels (raw logits) live."""

    redis_url: str | None = Field(None, description="null: medkd starts and owns a local redis-server")
    password_env: str | None = Field(None, description="env var holding the Redis password")
    namespace: str = "medkd"
    encoding: Literal["float16", "float32"] = "float16"
    compression: Literal["zlib", "lzma"] | None = None
    topk: int | None = Field(None, gt=0, description="segmentation: keep the top-k class logits")
    views: int = Field(
        0, ge=0, le=64,
        description="FKD-style: also cache logits for this many augmented views of train (search.augment)",
    )

    @field_validator("redis_url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


class Range(_Strict):
    """A numeric search range."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log ranges need low > 0")
        return self


Dimension = Union[Range, list[Any]]


class SearchSpace(_Strict):
    """Each dimension is a list (categorical) or a ``{low, high, log}`` range."""

    student: list[str] = Field(default_factory=lambda: ["resnet_tiny"], min_length=1)
    width: Dimension = Field(default_factory=lambda: Range(low=0.25, high=1.0))
    depth: Dimension = Field(default_factory=lambda: [1.0])
    temperature: Dimension = Field(default_factory=lambda: Range(low=1.0, high=8.0))
    alpha: Dimension = Field(default_factory=lambda: Range(low=0.0, high=0.9))
    aggregation: list[Literal["mean", "weighted", "confidence"]] = Field(
        default_factory=lambda: ["mean", "confidence"], min_length=1
    )
    teacher_weight: Dimension = Field(
        default_factory=lambda: Range(low=0.0, high=1.0),
        description="for 'weighted' aggregation: one weight per teacher drawn from this range",
    )
    lr: Dimension = Field(default_factory=lambda: Range(low=1e-3, high=1e-2, log=True))
    prune: list[Literal["none", "unstructured", "channels"]] = Field(default_factory=lambda: ["none"])
    prune_amount: Dimension = Field(default_factory=lambda: Range(low=0.0, high=0.5))
    quantize: list[Literal["none", "int8_static", "int8_dynamic", "fp16"]] = Field(
        default_factory=lambda: ["int8_static"], min_length=1
    )


ObjectiveMetric = Literal["val_auc", "val_acc", "val_dice", "latency_ms", "params", "model_bytes"]


class Objective(_Strict):
    metric: ObjectiveMetric
    mode: Literal["max", "min"]


class SearchSpec(_Strict):
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
            Objective(metric="latency_ms", mode="min"),
        ],
        min_length=1,
    )
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, gt=0)
    ema_epochs: float | None = Field(
        None, gt=0,
        description="students keep an exponential moving average of their weights over about this many trailing "
                    "epochs; validation, compression and export use the averaged weights",
    )
    final_epochs: int | None = Field(
        None, gt=0,
        description="after the search, the selected student is trained again from scratch for this many epochs "
                    "(same configuration, seed, soft labels and views), compressed and validated as in a trial, "
                    "and that model is exported and served; None: export the search trial as it is",
    )
    final_branches: int | None = Field(
        None, ge=2,
        description="after the search, the selected student is trained again as a weight soup: one run to a "
                    "quarter of its epochs, then this many copies finish it, each with its own data order, and "
                    "their weights are averaged (BatchNorm statistics recomputed); (1 + 3 * branches) / 4 times a "
                    "trial's training. Combines with final_epochs; None: no soup",
    )
    space: SearchSpace = Field(default_factory=SearchSpace)
    augment: AugmentSpec | None = None
    seed: int | None = None

    def fingerprint_fields(self) -> dict[str, Any]:
        """The search's settings for its fingerprint (not the final training's: it runs after the trials)."""
        return _fingerprint_dump(self, exclude={"final_epochs", "final_branches"})

    @property
    def final_training(self) -> bool:
        return self.final_epochs is not None or self.final_branches is not None


class ExportSpec(_Strict):
    select: Literal["best"] | int = Field(
        "best", description="'best' by the first objective on the Pareto front, or a Pareto index"
    )
    parity_atol: float = Field(1e-3, gt=0, description="max |logit difference| ONNX vs PyTorch (fp32)")
    latency_runs: int = Field(50, gt=0)


class RaySpec(_Strict):
    address: str | None = Field(None, description="null: start a local Ray cluster")
    num_cpus: int | None = Field(None, gt=0)
    num_gpus: int | None = Field(None, ge=0)
    storage_path: str | None = Field(None, description="Ray Train/Tune storage; default output_dir/ray")


class JobSpec(_Strict):
    """A whole medkd job."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    task: Literal["classification", "segmentation"] = "classification"
    seed: int = 0
    data: DataSpec
    teachers: list[TeacherSpec] = Field(min_length=1)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    output_dir: Path = Path("runs/default")
    ray: RaySpec = Field(default_factory=RaySpec)

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        names = [t.name for t in self.teachers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"teachers: duplicate names {duplicates}")
        if self.cache.views and self.search.augment is None:
            raise ValueError("cache.views needs search.augment (the augmentation whose views are cached)")
        if (self.task == "segmentation" and self.search.augment is not None and self.search.augment.enabled
                and not self.cache.views):
            raise ValueError(
                "search.augment: for segmentation, online augmentation would move the images away from the "
                "teachers' cached per-pixel logits; set cache.views (K > 0) to train on cached augmented views "
                "whose logits match them"
            )
        data_task = getattr(self.data, "task", None)
        if data_task is not None and data_task != self.task and not (
            self.task == "classification" and data_task == "multilabel"
        ):
            raise ValueError(f"data.task is {data_task!r} but task is {self.task!r}")
        return self

    def fingerprint(self) -> str:
        return fingerprint(self.model_dump(mode="json", exclude={"output_dir", "ray", "serve"}))

    def teacher_seed(self, teacher: TeacherSpec) -> int:
        return self.seed if teacher.seed is None else teacher.seed


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


_DATA_KINDS = {"synthetic", "medmnist", "folder", "decathlon"}


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid job spec ({error.error_count()} problem(s))"]
    for item in error.errors():
        # pydantic puts the discriminated-union tag (e.g. 'synthetic') into the location.
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        if len(loc) > 2 and loc[0] == "data" and loc[1] in _DATA_KINDS:
            loc = loc[:1] + loc[2:]  # drop pydantic's discriminated-union tag
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] == "greater_than":
            message = f"must be > {item['ctx']['gt']}"
        elif item["type"] == "greater_than_equal":
            message = f"must be >= {item['ctx']['ge']}"
        lines.append(f"  {_location(loc)}: {message}")
    return "\n".join(lines)


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """``${VAR}`` and ``${VAR:-default}`` in data paths, so specs can point at a data folder."""
    return _ENV_VAR.sub(lambda m: os.environ.get(m.group(1), m.group(2) if m.group(2) is not None else m.group(0)), text)


def parse_spec(raw: dict[str, Any], source: str = "<spec>", base_dir: Path | None = None) -> JobSpec:
    """Validate a spec dict; relative data paths resolve against ``base_dir`` (the YAML's folder)."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a job spec must be a YAML mapping, got {type(raw).__name__}")
    data = raw.get("data")
    if isinstance(data, dict):
        raw = {**raw, "data": {k: expand_env(v) if k in ("path", "base_dir") and isinstance(v, str) else v for k, v in data.items()}}
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(format_validation_error(error, source)) from None
    if base_dir is not None:
        spec = _resolve_paths(spec, base_dir)
    return spec


def _resolve_paths(spec: JobSpec, base_dir: Path) -> JobSpec:
    data = spec.data
    updates: dict[str, Any] = {}
    for field in ("path", "base_dir"):
        value = getattr(data, field, None)
        if isinstance(value, Path) and not value.is_absolute():
            candidate = (base_dir / value).resolve()
            if candidate.exists() or not value.exists():
                updates[field] = candidate
    if updates:
        spec = spec.model_copy(update={"data": data.model_copy(update=updates)})
    return spec


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Load and validate a YAML job spec.

    Args:
        path: the YAML file.
        overrides: dotted-key overrides, e.g. ``{"search.num_trials": 2}``.

    Raises:
        SpecError: the file is missing, is not YAML, or a field is invalid (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: job spec file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, source=str(path))
    return parse_spec(raw, source=str(path), base_dir=path.resolve().parent)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str = "<spec>") -> None:
    """Set ``search.num_trials`` or ``teachers.0.epochs`` (list items by index) in ``raw``."""
    node: Any = raw
    parts = dotted.split(".")
    if not all(parts):
        raise SpecError(f"{source}: override {dotted!r}: empty key part")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError(f"{source}: override {dotted!r}: {where} is not an item of the "
                                f"{len(node)}-item list {'.'.join(parts[:depth])}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:  # absent, or a null section such as `serve:`
                    node[part] = {}
                node = node[part]
        else:
            raise SpecError(f"{source}: override {dotted!r}: {'.'.join(parts[:depth])} is a value, not a section")


def parse_override(text: str) -> tuple[str, Any]:
    """``search.num_trials=2`` -> ``("search.num_trials", 2)`` (value parsed as YAML)."""
    if "=" not in text:
        raise SpecError(f"override {text!r}: expected KEY=VALUE, e.g. search.num_trials=2")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)
