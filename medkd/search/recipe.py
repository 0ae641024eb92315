"""The one training recipe behind every search trial, the final training and the benchmarks:
distill, prune (and fine-tune), compress and export a candidate, reading teacher logits from the
soft-label cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medkd.data import AugmentSpec, build_augmentation
from medkd.data.meta import DatasetMeta
from medkd.data.teacher_logits import CachedViews, TeacherLogitsFn
from medkd.search.context import TrialContext
from medkd.softlabels.reading import cached_teacher_logits, cached_views
from medkd.softlabels.recovery import cache_recovery
from medkd.softlabels.store import SoftLabelCache
from medkd.students.candidate import apply_pruning, export_candidate
from medkd.students.distill import DistillConfig, distill
from medkd.students.training_state import TrainingState

FINETUNE_AFTER_CHANNEL_PRUNING = 0.2  # fraction of the training epochs


CALIBRATION_SAMPLES = 128  # training images that calibrate INT8 activation ranges


def trial_augmentation(augment: dict[str, Any] | None, meta: DatasetMeta, seed: int) -> Any:
    """The student's training augmentation (``search.augment``), or ``None`` when it is off.

    Teacher logits are cached for the un-augmented training images, so the KD target of an
    augmented view is its source image's; mild, label-preserving views (flips, small affine)
    keep that target valid.
    """
    if not augment:
        return None
    spec = AugmentSpec.model_validate(augment)
    if not spec.enabled:
        return None
    return build_augmentation(spec, meta.spatial_dims, meta.task, seed=seed)


def teacher_logits_source(
    context: TrialContext, train_images: np.ndarray
) -> tuple[TeacherLogitsFn, CachedViews | None]:
    """The cached teacher logits of train and, with FKD views, of the views (a trial's and the final training's)."""
    cache = SoftLabelCache(context.cache_url, namespace=context.cache_namespace, password_env=context.password_env)
    fps, dataset_fp = context.teacher_fps, context.dataset_fp
    segmentation = context.meta.task == "segmentation"
    recover = cache_recovery(
        cache,
        artifacts=context.teacher_artifacts,
        dataset_fp=dataset_fp,
        meta=context.meta,
        cache_options=context.cache_options,
        train_images=train_images,
        augment=context.augment,
        views=context.views,
        events=context.events,
    )
    originals = cached_teacher_logits(cache, fps, dataset_fp, segmentation=segmentation, recover=recover)
    views = context.views
    if not views:
        return originals, None
    return originals, cached_views(
        cache, fps, views["views_dataset_fp"], views["views"], segmentation=segmentation, recover=recover
    )


def calibration_samples(train_images: np.ndarray, seed: int, size: int = CALIBRATION_SAMPLES) -> np.ndarray:
    """A seeded random subset of the training images for INT8 calibration (and export examples)."""
    rng = np.random.default_rng(seed)
    return train_images[rng.choice(len(train_images), size=min(len(train_images), size), replace=False)]


def train_candidate(
    model: torch.nn.Module,
    config: DistillConfig,
    *,
    meta: DatasetMeta,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    teacher_logits: Any,
    augment: Any,
    directory: Path,
    latency_runs: int,
    on_epoch: Any = None,
    views: CachedViews | None = None,
    device: torch.device | None = None,
    resume: TrainingState | None = None,
    on_state: Any = None,
) -> dict[str, Any]:
    """Distill ``model``, prune (and fine-tune) and export the compressed candidate to ``directory``.

    The one recipe behind every search trial; benchmarks call it too (e.g. with
    ``teacher_logits=None`` and ``alpha=1`` for the no-KD baseline), so what they compare is
    trained and compressed exactly as the served model. With ``views`` (cached FKD views) the
    student trains on those instead of ``augment``. Returns :func:`export_candidate`'s metrics
    (quality of the compressed model on ``val``). ``device`` is where the student trains (the
    trial's reserved GPU, see :func:`medkd.core.devices.reserved_gpu_device`); pruning, export
    and quantization run on the CPU. ``resume`` / ``on_state`` resume and save the distillation's
    state between epochs (see :func:`distill`); pruning, fine-tuning and export always run in full
    after it.
    """
    train_x, train_y = train
    val_x, val_y = val
    calibration = calibration_samples(train_x, config.seed)
    if views is not None:
        augment = None
    distill(
        model,
        config,
        train_images=train_x,
        train_labels=train_y,
        teacher_logits=teacher_logits,
        meta=meta,
        val_images=val_x,
        val_labels=val_y,
        augment=augment,
        views=views,
        on_epoch=on_epoch,
        device=device,
        resume=resume,
        on_state=on_state,
    )
    model = apply_pruning(model, config, torch.from_numpy(calibration[:2]))
    if config.prune == "channels" and config.prune_amount > 0:
        finetune = max(1, round(config.epochs * FINETUNE_AFTER_CHANNEL_PRUNING))
        # A short, low-rate fine-tune of the one pruned model: no weight average (its horizon
        # would span most of it), no soup.
        distill(
            model,
            config.model_copy(update={"lr": config.lr / 3, "ema_epochs": None, "branches": 1}),
            train_images=train_x,
            train_labels=train_y,
            teacher_logits=teacher_logits,
            meta=meta,
            epochs=finetune,
            augment=augment,
            views=views,
            device=device,
        )
    return export_candidate(
        model,
        config,
        meta=meta,
        calibration=calibration,
        val_images=val_x,
        val_labels=val_y,
        directory=directory,
        latency_runs=latency_runs,
    )
