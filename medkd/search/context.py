"""``TrialContext``: what a student's training needs besides its configuration (data, cache access,
the search's budget, views), shipped once to every trial and to the final training."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from medkd.data.meta import DatasetMeta
from medkd.spec.job import JobSpec


class TrialContext(BaseModel):
    """Everything a trial reads besides its sampled parameters.

    ``data_refs`` holds the Ray object ref of the dataset's arrays (in a list, so Ray does not
    resolve it when the context is passed to a task) and ``events`` the progress queue actor.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    meta: DatasetMeta
    data_refs: list[Any]
    cache_url: str
    cache_namespace: str
    password_env: str | None
    teacher_fps: list[str]
    dataset_fp: str
    epochs: int
    batch_size: int
    ema_epochs: float | None
    seed: int
    cpus_per_trial: float
    constants: dict[str, Any]
    num_teachers: int
    needs_estimates: bool
    latency_runs: int
    augment: dict[str, Any] | None
    events: Any = None
    views: dict[str, Any] | None
    teacher_artifacts: list[str]
    cache_options: dict[str, Any]
    teacher_prior: list[float] | None = None
    teacher_temperatures: list[float] | None = None
    #: ``search.cpu_precision``: the precision students train in on CPU.
    cpu_precision: Literal["fp32", "bf16"] = "fp32"
    #: The quality objectives ASHA ranks on by their mean (``val_quality_mean``), when there are several.
    asha_qualities: list[str] | None = None


def constant_params(space: Any, num_teachers: int) -> dict[str, Any]:
    """Values of single-valued dimensions (Optuna only sees dimensions with a choice)."""
    constants: dict[str, Any] = {}
    for name in (
        "student",
        "width",
        "depth",
        "lr",
        "alpha",
        "temperature",
        "aggregation",
        "prune",
        "prune_amount",
        "quantize",
        "loss",
        "logit_standardization",
    ):
        dimension = getattr(space, name)
        if dimension is None:
            continue
        if isinstance(dimension, list) and len(dimension) == 1:
            constants[name] = dimension[0]
        elif not isinstance(dimension, list) and dimension.low == dimension.high:
            constants[name] = dimension.low
    return constants


def distilled_teachers(
    spec: JobSpec, teacher_fps: list[str], teachers: list[Any] | None = None
) -> tuple[list[str], list[Any] | None]:
    """The fingerprints (and artifacts) of the teachers students learn from: ``teachers[i].distill``.

    Args:
        spec: the job; its teachers with ``distill: false`` are left out.
        teacher_fps: every trained teacher's fingerprint, in the order of ``teachers``.
        teachers: the trained teachers' artifacts (anything with a ``name``), needed to match
            fingerprints to spec entries when a teacher is dropped.

    Raises:
        ValueError: a teacher is dropped but ``teachers`` does not name one per fingerprint.

    Examples::

        >>> fps, artifacts = distilled_teachers(spec, [t.fingerprint for t in trained], trained)
    """
    dropped = {t.name for t in spec.teachers if not t.distill}
    if not dropped:
        return teacher_fps, teachers
    if teachers is None or len(teachers) != len(teacher_fps):
        raise ValueError(
            "teachers[].distill: false needs the trained teachers (one per fingerprint) to know whose "
            "soft labels to leave out"
        )
    keep = [i for i, teacher in enumerate(teachers) if teacher.name not in dropped]
    return [teacher_fps[i] for i in keep], [teachers[i] for i in keep]


def search_context(
    spec: JobSpec,
    *,
    meta: DatasetMeta,
    data_ref: Any,
    teacher_fps: list[str],
    dataset_fp: str,
    cache_url: str,
    events: Any = None,
    views: dict[str, Any] | None = None,
    teachers: list[Any] | None = None,
) -> TrialContext:
    """What a student's training needs besides its config: data, cache access, the search's budget and views."""
    teacher_fps, teachers = distilled_teachers(spec, teacher_fps, teachers)
    search = spec.search
    return TrialContext(
        **{
            "meta": meta,
            "data_refs": [data_ref],
            "cache_url": cache_url,
            "cache_namespace": spec.cache.namespace,
            "password_env": spec.cache.password_env,
            "teacher_fps": teacher_fps,
            "dataset_fp": dataset_fp,
            "epochs": search.epochs,
            "batch_size": search.batch_size,
            "ema_epochs": search.ema_epochs,
            "cpu_precision": search.cpu_precision,
            "seed": spec.seed if search.seed is None else search.seed,
            "cpus_per_trial": search.cpus_per_trial,
            "constants": constant_params(search.space, len(teacher_fps)),
            "num_teachers": len(teacher_fps),
            # Tune checks every report carries every objective: cost objectives need estimates
            # until the compressed model exists (set by the search).
            "needs_estimates": False,
            "latency_runs": spec.export.latency_runs,
            "augment": search.augment.model_dump(mode="json") if search.augment is not None else None,
            "events": events,
            # FKD: {"views": K, "views_dataset_fp": ..., "seed": ...} from the soft-label stage, or None.
            "views": views or None,
            # Lets a trial restore soft labels lost from the cache mid-search from the teacher checkpoints.
            "teacher_artifacts": [a.model_dump_json() for a in teachers or []],
            "cache_options": {
                "encoding": spec.cache.encoding,
                "compression": spec.cache.compression,
                "topk": spec.cache.topk,
            },
        }
    )
