"""Restoring soft labels lost from the cache (eviction, a restarted redis-server) from the teacher
checkpoints, so a search never fails or trains on nothing because Redis forgot an entry."""

from __future__ import annotations

from typing import Any

import numpy as np

from medkd.core.progress import send_event
from medkd.data.meta import DatasetMeta
from medkd.softlabels.compute import recover_train_logits, view_params
from medkd.softlabels.reading import RecoverFn
from medkd.softlabels.store import SoftLabelCache
from medkd.spec.data import AugmentSpec
from medkd.teachers.train import TeacherArtifact


def cache_recovery(
    cache: SoftLabelCache,
    *,
    artifacts: list[str],
    dataset_fp: str,
    meta: DatasetMeta,
    cache_options: dict[str, Any],
    train_images: np.ndarray,
    augment: dict[str, Any] | None = None,
    views: dict[str, Any] | None = None,
    events: Any = None,
) -> RecoverFn | None:
    """``recover(teacher_index, view)``: restore a lost train entry from the teacher's checkpoint.

    Args:
        cache: the soft-label cache to restore into.
        artifacts: the teachers' :class:`~medkd.teachers.train.TeacherArtifact` as JSON, in cache order.
        dataset_fp: the dataset fingerprint the train logits are cached under.
        meta: the dataset's shape.
        cache_options: encoding, compression and top-k of the entries.
        train_images: the training split.
        augment: ``search.augment`` (a dict), needed to rebuild a cached view.
        views: ``{"views": K, "views_dataset_fp": ..., "seed": ...}`` when views are cached.
        events: the progress queue that hears about a recomputation.

    Returns:
        None when there are no teacher artifacts to recompute from (the cache's error then stands).
    """
    if not artifacts:
        return None
    views = views or {}

    def recover(t: int, view: int | None) -> None:
        artifact = TeacherArtifact.model_validate_json(artifacts[t])
        send_event(
            events,
            {
                "kind": "message",
                "message": f"  soft labels of teacher {artifact.name} "
                f"(train{'' if view is None else f', view {view}'}) lost from the cache: recomputing",
            },
        )
        if view is None:
            recover_train_logits(
                cache, artifact, dataset_fp=dataset_fp, meta=meta, images=train_images, cache_options=cache_options
            )
            return
        params = view_params(
            AugmentSpec.model_validate(augment), len(train_images), seed=views["seed"], view=view, meta=meta
        )
        recover_train_logits(
            cache,
            artifact,
            dataset_fp=views["views_dataset_fp"],
            meta=meta,
            images=train_images,
            cache_options=cache_options,
            view=view,
            view_params=params,
        )

    return recover
