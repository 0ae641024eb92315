"""The student distillation loop: a student learns from cached teacher logits, never a teacher.

Teacher logits come from a callable ``teacher_logits(indices) -> (T, B, C[, *spatial])``, so the
same loop serves whole-split arrays (classification, fetched from the cache in one go) and
per-batch cache reads (segmentation, whose per-pixel logits are large).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from medkd.platform.metrics import classification_metrics, probabilities, segmentation_metrics
from medkd.students.losses import create_loss
from medkd.students.registry import create_student

TeacherLogitsFn = Callable[[np.ndarray], np.ndarray]


class DistillConfig(BaseModel):
    """Everything that determines one student's training (a search trial's configuration)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    student: str = "resnet_tiny"
    width: float = Field(1.0, gt=0)
    depth: float = Field(1.0, gt=0)
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the hard-label loss; 1 = no KD")
    aggregation: str = "mean"
    teacher_weights: list[float] | None = None
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    seed: int = 0
    prune: str = "none"
    prune_amount: float = Field(0.0, ge=0, lt=1)
    quantize: str = "none"


def loss_name(meta: dict[str, Any]) -> str:
    if meta["task"] == "segmentation":
        return "pixel_kd"
    return "multilabel_kd" if meta["multilabel"] else "hinton_kd"


def build_student(meta: dict[str, Any], config: DistillConfig) -> nn.Module:
    """The student of ``config``, its initial weights drawn from ``config.seed``.

    Seeding the initialisation (without touching the caller's global RNG) makes "same seed"
    mean "same starting weights", so a KD run and its no-KD baseline differ only in the loss.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return create_student(
            config.student,
            spatial_dims=meta["spatial_dims"],
            in_channels=meta["in_channels"],
            num_classes=meta["num_classes"],
            image_size=meta["image_size"],
            width=config.width,
            depth=config.depth,
        )


def build_distillation_loss(meta: dict[str, Any], config: DistillConfig) -> nn.Module:
    return create_loss(
        loss_name(meta),
        temperature=config.temperature,
        alpha=config.alpha,
        aggregation=config.aggregation,
        teacher_weights=config.teacher_weights,
    )


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    outputs = [
        model(torch.from_numpy(images[start : start + batch_size])).float().numpy()
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs)


def evaluate_logits(logits: np.ndarray, labels: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """Quality metrics of logits against labels, prefixed-free (``auc``, ``acc`` or ``dice``)."""
    if meta["task"] == "segmentation":
        return segmentation_metrics(logits, labels, num_classes=meta["num_classes"], hd95=False)
    return classification_metrics(probabilities(logits, multilabel=meta["multilabel"]), labels, multilabel=meta["multilabel"])


def quality_metric(meta: dict[str, Any]) -> str:
    return "dice" if meta["task"] == "segmentation" else "auc"


def _targets(labels: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    if meta["multilabel"]:
        return labels.float()
    return labels.long()


def distill(
    model: nn.Module,
    config: DistillConfig,
    *,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    teacher_logits: TeacherLogitsFn | None,
    meta: dict[str, Any],
    epochs: int | None = None,
    val_images: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    augment: Callable | None = None,
    on_epoch: Callable[[dict[str, Any]], bool | None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place with the multi-teacher KD loss of ``config``.

    Args:
        teacher_logits: ``indices -> (T, B, ...)`` raw teacher logits for those training
            samples; ``None`` trains on hard labels only (needs ``alpha == 1``).
        epochs: overrides ``config.epochs`` (e.g. a short fine-tune after pruning).
        on_epoch: called with each epoch's record; returning ``True`` stops training.

    Returns:
        One record per epoch (loss parts, seconds, validation quality when val data is given).
    """
    if teacher_logits is None and config.alpha < 1:
        raise ValueError("teacher_logits is required unless alpha == 1 (hard labels only)")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if teacher_logits is None:
        # Hard labels only: the same loss class with alpha = 1 computes exactly its hard term,
        # so a no-KD baseline uses the very CE (BCE, Dice+CE) of the KD runs.
        criterion = create_loss(loss_name(meta), temperature=config.temperature, alpha=1.0)
    else:
        criterion = build_distillation_loss(meta, config)
    epochs = epochs or config.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(train_images) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    history: list[dict[str, Any]] = []
    n = len(train_images)
    for epoch in range(epochs):
        model.train()
        started = time.perf_counter()
        order = rng.permutation(n)
        sums: dict[str, float] = {}
        seen = 0
        for step in range(steps_per_epoch):
            indices = np.sort(order[step * config.batch_size : (step + 1) * config.batch_size])
            images = torch.from_numpy(train_images[indices])
            labels = torch.from_numpy(train_labels[indices])
            if augment is not None:
                segmentation = meta["task"] == "segmentation"
                images, masks = augment(images, labels if segmentation else None)
                labels = masks if segmentation else labels
            student_logits = model(images)
            teachers = None
            if teacher_logits is not None:
                teachers = torch.from_numpy(np.ascontiguousarray(teacher_logits(indices), dtype=np.float32))
            loss, parts = criterion(student_logits, teachers, _targets(labels, meta))
            if teachers is None:
                parts.pop("kd", None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            batch = len(indices)
            seen += batch
            parts.setdefault("loss", float(loss.detach()))
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value) * batch
        record: dict[str, Any] = {"epoch": epoch + 1, "epoch_seconds": time.perf_counter() - started}
        record.update({f"train_{k}": v / max(seen, 1) for k, v in sums.items()})
        if val_images is not None and val_labels is not None:
            metrics = evaluate_logits(predict_logits(model, val_images), val_labels, meta)
            name = quality_metric(meta)
            record[f"val_{name}"] = float(metrics[name])
            if "acc" in metrics:
                record["val_acc"] = float(metrics["acc"])
        history.append(record)
        if on_epoch is not None and on_epoch(record):
            break
    model.eval()
    return history


def array_teacher_logits(stacked: np.ndarray) -> TeacherLogitsFn:
    """Teacher logits held in memory as one (T, N, ...) array."""
    return lambda indices: stacked[:, indices]


def finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default
