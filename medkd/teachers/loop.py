"""The per-worker training loop of one teacher (runs inside a Ray Train worker).

Checkpoints every epoch (model, optimiser, scheduler, early-stopping state), so a worker lost
mid-run resumes from its last epoch; Ray Train keeps the best checkpoints by the validation
metric.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray
import ray.train
import ray.train.torch

from medkd.platform.metrics import classification_metrics, probabilities, segmentation_metrics
from medkd.teachers.registry import create_teacher

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


def build_loss(task: str, multilabel: bool, class_weights: list[float] | None, label_smoothing: float) -> nn.Module:
    if task == "segmentation":
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)
    if multilabel:
        return nn.BCEWithLogitsLoss()
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def loss_target(labels: torch.Tensor, task: str, multilabel: bool) -> torch.Tensor:
    if task == "segmentation":
        return labels.unsqueeze(1)  # DiceCELoss expects (N, 1, *spatial) class indices
    if multilabel:
        return labels.float()
    return labels.long()


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """Raw logits of ``model`` over ``images`` (N, C, *spatial), in float32."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        outputs.append(model(batch).float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)


def evaluate(logits: np.ndarray, labels: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    if meta["task"] == "segmentation":
        return segmentation_metrics(logits, labels, num_classes=meta["num_classes"], hd95=False)
    probs = probabilities(logits, multilabel=meta["multilabel"])
    return classification_metrics(probs, labels, multilabel=meta["multilabel"])


def _class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    counts = np.bincount(labels.astype(np.int64).ravel(), minlength=num_classes).astype(np.float64)
    counts = np.maximum(counts, 1.0)
    weights = counts.sum() / (num_classes * counts)
    return weights.tolist()


def train_teacher_loop(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``; ``config`` is built by :mod:`medkd.teachers.train`."""
    teacher = config["teacher"]
    meta = config["dataset"]
    torch.set_num_threads(max(1, int(math.floor(teacher["cpus_per_worker"]))))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"])

    splits = ray.get(config["data_ref"])
    train_x, train_y = splits["train"]
    val_x, val_y = splits["val"]

    model = create_teacher(
        teacher["model"],
        spatial_dims=meta["spatial_dims"],
        in_channels=meta["in_channels"],
        num_classes=meta["num_classes"],
        image_size=meta["image_size"],
        **teacher["model_kwargs"],
    )
    device = ray.train.torch.get_device()
    use_amp = device.type == "cuda" and teacher["mixed_precision"]
    optimizer = (
        torch.optim.AdamW(model.parameters(), lr=teacher["lr"], weight_decay=teacher["weight_decay"])
        if teacher["optimizer"] == "adamw"
        else torch.optim.SGD(model.parameters(), lr=teacher["lr"], momentum=0.9, weight_decay=teacher["weight_decay"], nesterov=True)
    )
    epochs = teacher["epochs"]
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        if teacher["scheduler"] == "cosine"
        else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    state = {"epoch": 0, "best": -math.inf, "bad_epochs": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model.load_state_dict(torch.load(Path(directory) / MODEL_FILE, weights_only=True, map_location="cpu"))
            saved = torch.load(Path(directory) / STATE_FILE, weights_only=True, map_location="cpu")
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = json.loads((Path(directory) / META_FILE).read_text())["state"]

    model = ray.train.torch.prepare_model(model)
    plain_model = model.module if hasattr(model, "module") else model
    class_weights = (
        _class_weights(train_y, meta["num_classes"])
        if teacher["class_weighting"] and meta["task"] == "classification" and not meta["multilabel"]
        else None
    )
    criterion = build_loss(meta["task"], meta["multilabel"], class_weights, teacher["label_smoothing"]).to(device)
    augment = None
    if teacher.get("augment"):
        from medkd.platform.data import AugmentSpec, build_augmentation

        augment = build_augmentation(AugmentSpec.model_validate(teacher["augment"]), meta["spatial_dims"], meta["task"])

    dataset = TensorDataset(torch.from_numpy(train_x), torch.from_numpy(train_y))
    generator = torch.Generator().manual_seed(config["seed"])
    loader = DataLoader(dataset, batch_size=teacher["batch_size"], shuffle=True, drop_last=len(dataset) > teacher["batch_size"], generator=generator)
    loader = ray.train.torch.prepare_data_loader(loader)
    metric_name = "dice" if meta["task"] == "segmentation" else "auc"

    for epoch in range(state["epoch"], epochs):
        if world > 1 and hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        total, count = 0.0, 0
        for images, labels in loader:
            if augment is not None:
                segmentation = meta["task"] == "segmentation"
                images, masks = augment(images, labels if segmentation else None)
                labels = masks if segmentation else labels
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                loss = criterion(model(images), loss_target(labels, meta["task"], meta["multilabel"]))
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += float(loss.detach()) * len(images)
            count += len(images)
        scheduler.step()
        val_logits = predict(plain_model, val_x, 256, device)
        val_metrics = evaluate(val_logits, val_y, meta)
        score = float(val_metrics[metric_name])
        if not math.isfinite(score):
            score = -float(val_metrics.get("loss", 0.0))
        improved = score > state["best"]
        state["best"] = max(state["best"], score)
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["epoch"] = epoch + 1
        record = {
            "epoch": epoch + 1,
            "train_loss": total / max(count, 1),
            f"val_{metric_name}": score,
            "val_acc": float(val_metrics.get("acc", float("nan"))),
            "epoch_seconds": time.perf_counter() - started,
        }
        state["history"].append(record)
        stop = teacher["patience"] is not None and state["bad_epochs"] >= teacher["patience"]
        with tempfile.TemporaryDirectory() as directory:
            reported = None
            if rank == 0:
                torch.save(plain_model.state_dict(), Path(directory) / MODEL_FILE)
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, Path(directory) / STATE_FILE)
                (Path(directory) / META_FILE).write_text(json.dumps({"state": state, "metrics": record}))
                reported = ray.train.Checkpoint.from_directory(directory)
            ray.train.report({**record, "stopped_early": stop}, checkpoint=reported)
        if stop:
            break
