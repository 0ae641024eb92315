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
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from medkd.core.errors import field_error
from medkd.core.fingerprint import fingerprint
from medkd.spec import catalog
from medkd.spec.base import SpecError, StrictModel
from medkd.spec.cache import CacheSpec
from medkd.spec.cluster import RaySpec
from medkd.spec.data import DataSpec
from medkd.spec.export import ExportSpec
from medkd.spec.search import SearchSpec
from medkd.spec.serve import ServeConfig
from medkd.spec.teachers import TeacherSpec
from medkd.spec.tracking import TrackingSpec


class JobSpec(StrictModel):
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
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _some_teacher_distilled(self) -> JobSpec:
        if not any(t.distill for t in self.teachers):
            fields = ", ".join(f"teachers[{i}].distill" for i in range(len(self.teachers)))
            raise field_error(f"{fields}: at least one teacher must keep distill: true (students need soft labels)")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        names = [t.name for t in self.teachers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"teachers: duplicate names {duplicates}")
        if self.task == "segmentation" and self.search.teacher_selection != "all":
            raise field_error(
                f"search.teacher_selection: {self.search.teacher_selection!r} scores the teachers' ensemble on "
                "val accuracy and AUC, which classification has; segmentation takes 'all' (drop a teacher "
                "with teachers[i].distill: false)"
            )
        if self.cache.views and self.search.augment is None:
            raise ValueError("cache.views needs search.augment (the augmentation whose views are cached)")
        if (
            self.task == "segmentation"
            and self.search.augment is not None
            and self.search.augment.enabled
            and not self.cache.views
        ):
            raise ValueError(
                "search.augment: for segmentation, online augmentation would move the images away from the "
                "teachers' cached per-pixel logits; set cache.views (K > 0) to train on cached augmented views "
                "whose logits match them"
            )
        for where, kind, names in [
            *((f"teachers[{i}].model", "teacher", [t.model]) for i, t in enumerate(self.teachers)),
            # the default student list is for classification; only names the spec gives are checked
            *(
                [("search.space.student", "student", self.search.space.student)]
                if "student" in self.search.space.model_fields_set
                else []
            ),
        ]:
            for name in names:
                task = catalog.info(kind, name)["task"]
                if task != self.task:
                    fitting = ", ".join(n for n in catalog.names(kind) if catalog.info(kind, n)["task"] == self.task)
                    raise field_error(
                        f"{where}: {name!r} is a {task} {kind} but task is {self.task!r}; "
                        f"{self.task} {kind}s: {fitting}"
                    )
        data_task = getattr(self.data, "task", None)
        if (
            data_task is not None
            and data_task != self.task
            and not (self.task == "classification" and data_task == "multilabel")
        ):
            raise ValueError(f"data.task is {data_task!r} but task is {self.task!r}")
        return self

    def fingerprint(self) -> str:
        return fingerprint(self.model_dump(mode="json", exclude={"output_dir", "ray", "serve", "tracking"}))

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
        lines.append(f"  {_location(loc)}: {message}" if loc else f"  {message}")
    return "\n".join(lines)


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """``${VAR}`` and ``${VAR:-default}`` in data paths, so specs can point at a data folder."""
    return _ENV_VAR.sub(
        lambda m: os.environ.get(m.group(1), m.group(2) if m.group(2) is not None else m.group(0)), text
    )


def parse_spec(raw: dict[str, Any], source: str = "<spec>", base_dir: Path | None = None) -> JobSpec:
    """Validate a spec dict; relative data paths resolve against ``base_dir`` (the YAML's folder)."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a job spec must be a YAML mapping, got {type(raw).__name__}")
    data = raw.get("data")
    if isinstance(data, dict):
        raw = {
            **raw,
            "data": {
                k: expand_env(v) if k in ("path", "base_dir") and isinstance(v, str) else v for k, v in data.items()
            },
        }
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
                raise SpecError(
                    f"{source}: override {dotted!r}: {where} is not an item of the "
                    f"{len(node)}-item list {'.'.join(parts[:depth])}"
                )
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
