"""Reading the teachers' soft labels of the training split (and of its cached views) from Redis.

A trial never runs a teacher: it reads logits here. An entry lost or corrupted meanwhile is
restored through ``recover`` (see :mod:`medkd.softlabels.recovery`) and read again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from medkd.data.teacher_logits import CachedViews, TeacherLogitsFn, array_teacher_logits
from medkd.softlabels.manifest import CacheIntegrityError, CacheMissError
from medkd.softlabels.store import SoftLabelCache

RecoverFn = Callable[[int, "int | None"], None]  # (teacher index, view) -> entry restored in the cache


def cached_teacher_logits(
    cache: SoftLabelCache,
    teacher_fps: list[str],
    dataset_fp: str,
    *,
    segmentation: bool,
    view: int | None = None,
    recover: RecoverFn | None = None,
) -> TeacherLogitsFn:
    """``indices -> (T, B, ...)`` teacher logits of the training split (or of one cached view) from Redis.

    Classification logits are small: the whole split is fetched once. Per-pixel segmentation
    logits are fetched per batch. An entry lost or corrupted meanwhile is restored by
    ``recover(teacher_index, view)`` (from the teacher checkpoint) and read again; without
    ``recover`` the cache's error is raised.
    """

    def fetch(t: int, indices: np.ndarray | None) -> np.ndarray:
        try:
            return cache.fetch(teacher_fps[t], dataset_fp, "train", indices=indices, view=view)
        except (CacheMissError, CacheIntegrityError):
            if recover is None:
                raise
            recover(t, view)
            return cache.fetch(teacher_fps[t], dataset_fp, "train", indices=indices, view=view)

    if segmentation:
        return lambda indices: np.stack([fetch(t, indices) for t in range(len(teacher_fps))])
    return array_teacher_logits(np.stack([fetch(t, None) for t in range(len(teacher_fps))]))


def view_manifests(
    cache: SoftLabelCache, teacher_fps: list[str], views_dataset_fp: str, view: int
) -> tuple[list[Any], list[int]]:
    """Each teacher's manifest of FKD view ``view`` and the indices of the teachers it is missing for."""
    manifests = [cache.manifest(fp, views_dataset_fp, "train", view=view) for fp in teacher_fps]
    return manifests, [t for t, m in enumerate(manifests) if m is None or m.view_params is None]


def missing_views(
    cache: SoftLabelCache, teacher_fps: list[str], views_dataset_fp: str, num_views: int
) -> list[tuple[int, int]]:
    """``(teacher index, view)`` of every FKD view of ``views_dataset_fp`` not cached for a teacher."""
    return [(t, k) for k in range(num_views) for t in view_manifests(cache, teacher_fps, views_dataset_fp, k)[1]]


def cached_views(
    cache: SoftLabelCache,
    teacher_fps: list[str],
    views_dataset_fp: str,
    num_views: int,
    *,
    segmentation: bool,
    recover: RecoverFn | None = None,
) -> CachedViews:
    """The FKD views of the soft-label stage (``cache.views``): parameters from the manifests, logits from Redis.

    Raises:
        CacheMissError: a view is missing for a teacher (and ``recover`` is None).
        ValueError: the teachers' manifests disagree on a view's parameters (they must have seen
            the same augmented images).
    """
    params = []
    for k in range(num_views):
        manifests, missing = view_manifests(cache, teacher_fps, views_dataset_fp, k)
        if missing and recover is not None:
            for t in missing:
                recover(t, k)
            manifests, missing = view_manifests(cache, teacher_fps, views_dataset_fp, k)
        if missing:
            raise CacheMissError(
                f"augmented view {k} of {views_dataset_fp} is not cached for teacher(s) "
                f"{[teacher_fps[t] for t in missing]}"
            )
        if any(manifest.view_params != manifests[0].view_params for manifest in manifests[1:]):
            raise ValueError(f"teachers disagree on the parameters of augmented view {k} of {views_dataset_fp}")
        params.append(manifests[0].view_params)
    per_view = [
        cached_teacher_logits(cache, teacher_fps, views_dataset_fp, segmentation=segmentation, view=k, recover=recover)
        for k in range(num_views)
    ]
    return CachedViews(params, lambda k, indices: per_view[k](indices))
