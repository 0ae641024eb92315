"""The per-worker training loop of one teacher (runs inside a Ray Train worker).

Checkpoints every epoch (model, optimiser, scheduler, early-stopping state), so a worker lost
mid-run resumes from its last epoch; Ray Train keeps the best checkpoints by the validation
metric.

The pieces that define *what* is trained — :func:`build_optimizer`, :func:`build_scheduler`,
:func:`build_loss`, :func:`epoch_augmentation`, :func:`train_epoch`, :func:`validate` — are plain
PyTorch and shared with anything that must train a teacher exactly the same way without Ray
(``benchmarks/train_overhead.py`` measures Ray Train's cost against them).

Randomness is derived from ``(seed, rank, epoch)`` at the start of every epoch (shuffle order and
augmentation views), so a run resumed from epoch ``k`` sees the same batches from epoch ``k`` on
as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medkd.core.cpu_features import warn_if_cpu_bf16_is_slow
from medkd.core.ema import WeightAverage, ema_decay
from medkd.core.metrics import classification_metrics, probabilities, segmentation_metrics
from medkd.core.progress import send_event
from medkd.data import AugmentSpec, build_augmentation
from medkd.data.meta import DatasetMeta
from medkd.teachers.registry import create_teacher

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
VAL_BATCH_SIZE = 256
#: Quarters reached sooner than this into the epoch print no line: at 5,000 images (epochs of 1-2 min) that
#: leaves one or two lines per epoch, at 35,000 (epochs of 10+ min) all three.
PROGRESS_AFTER_S = 60.0


def worker_threads(cpus_per_worker: float) -> int:
    """Intra-op threads for a worker holding ``cpus_per_worker`` CPUs (at least 1)."""
    return max(1, int(math.floor(cpus_per_worker)))


def build_teacher_model(teacher: dict[str, Any], meta: DatasetMeta) -> nn.Module:
    return create_teacher(
        teacher["model"],
        spatial_dims=meta.spatial_dims,
        in_channels=meta.in_channels,
        num_classes=meta.num_classes,
        image_size=meta.image_size,
        **teacher["model_kwargs"],
    )


def build_optimizer(model: nn.Module, teacher: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD; biases and normalisation weights get no weight decay (as timm)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": teacher["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if teacher["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=teacher["lr"])
    return torch.optim.SGD(groups, lr=teacher["lr"], momentum=0.9, nesterov=True)


def build_scheduler(optimizer: torch.optim.Optimizer, teacher: dict[str, Any]) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch: cosine decay over ``epochs`` (to 1% of ``lr``) or constant."""
    if teacher["scheduler"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=teacher["epochs"], eta_min=teacher["lr"] * 0.01
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


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


def class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """Inverse-frequency weights ``N / (K * count_k)`` (sklearn's "balanced")."""
    counts = np.bincount(labels.astype(np.int64).ravel(), minlength=num_classes).astype(np.float64)
    counts = np.maximum(counts, 1.0)
    weights = counts.sum() / (num_classes * counts)
    return weights.tolist()


def build_criterion(teacher: dict[str, Any], meta: DatasetMeta, train_labels: np.ndarray) -> nn.Module:
    weighted = teacher["class_weighting"] and meta.task == "classification" and not meta.multilabel
    weights = class_weights(train_labels, meta.num_classes) if weighted else None
    return build_loss(meta.task, meta.multilabel, weights, teacher["label_smoothing"])


def epoch_augmentation(teacher: dict[str, Any], meta: DatasetMeta, seed: int, rank: int, epoch: int) -> Any:
    """The teacher's augmentation seeded for one epoch of one worker, or None."""
    if not teacher.get("augment"):
        return None

    spec = AugmentSpec.model_validate(teacher["augment"])
    if not spec.enabled:
        return None
    return build_augmentation(
        spec, meta.spatial_dims, meta.task, seed=np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0]
    )


def train_epoch(
    model: nn.Module,
    loader: Any,
    *,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    augment: Any,
    meta: DatasetMeta,
    device: torch.device,
    use_amp: bool,
    average: Any = None,
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss per sample.

    ``average`` (a :class:`~medkd.core.ema.WeightAverage`) is updated after every step;
    ``on_batch`` is called with the number of batches done after each one.
    """
    model.train()
    segmentation = meta.task == "segmentation"
    total, count = 0.0, 0
    for batch, (images, labels) in enumerate(loader, start=1):
        if augment is not None:
            images, masks = augment(images, labels if segmentation else None)
            labels = masks if segmentation else labels
        optimizer.zero_grad(set_to_none=True)
        # float16 on CUDA, bfloat16 on CPU (each device type's autocast default, stated for the reader).
        dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
            loss = criterion(model(images), loss_target(labels, meta.task, meta.multilabel))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if average is not None:
            average.update(model.module if hasattr(model, "module") else model)
        total += float(loss.detach()) * len(images)
        count += len(images)
        if on_batch is not None:
            on_batch(batch)
    return total / max(count, 1)


class EpochQuarters:
    """Sends a ``teacher_progress`` event at each quarter of a long epoch, so an epoch of
    minutes (a ResNet-18 over 35k images on one CPU) is not silent until it ends.

    Args:
        queue: the driver's progress queue (``None``: nothing is sent).
        teacher: the teacher's name.
        epoch: this epoch, from 1.
        epochs: the teacher's epochs.
        batches: batches in the epoch (this worker's).
        images: images in the epoch (all workers').

    Examples:
        >>> quarters = EpochQuarters(None, "cnn", 1, 3, batches=100, images=6400)
        >>> [quarters(done) for done in (25, 50)]
        [None, None]
    """

    def __init__(self, queue: Any, teacher: str, epoch: int, epochs: int, *, batches: int, images: int) -> None:
        self.queue, self.teacher, self.epoch, self.epochs = queue, teacher, epoch, epochs
        self.batches, self.images = max(1, batches), images
        self.started = time.perf_counter()
        self.next_quarter = 1

    def __call__(self, done: int) -> None:
        quarter = done * 4 // self.batches
        if self.queue is None or quarter < self.next_quarter or quarter >= 4:
            return
        self.next_quarter = quarter + 1
        seconds = time.perf_counter() - self.started
        if seconds < PROGRESS_AFTER_S:
            return
        send_event(
            self.queue,
            {
                "kind": "teacher_progress",
                "teacher": self.teacher,
                "epoch": self.epoch,
                "epochs": self.epochs,
                "fraction": done / self.batches,
                "images": round(self.images * done / self.batches),
                "total": self.images,
                "seconds": seconds,
            },
        )


def uses_cpu_bf16(teacher: dict[str, Any], device: torch.device) -> bool:
    """Whether ``teacher`` (a ``TeacherSpec`` dump) trains and infers under bfloat16 autocast on ``device``."""
    return device.type == "cpu" and teacher.get("cpu_precision") == "bf16"


@torch.no_grad()
def predict(
    model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device, *, bf16: bool = False
) -> np.ndarray:
    """Raw logits of ``model`` over ``images`` (N, C, *spatial), in float32.

    Args:
        bf16: run the forward pass under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (a teacher
            trained with ``cpu_precision: bf16``; ignored off the CPU).
    """
    model.eval()
    outputs = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and device.type == "cpu"):
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device)
            outputs.append(model(batch).float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)


def evaluate(logits: np.ndarray, labels: np.ndarray, meta: DatasetMeta) -> dict[str, Any]:
    if meta.task == "segmentation":
        return segmentation_metrics(logits, labels, num_classes=meta.num_classes, hd95=False)
    probs = probabilities(logits, multilabel=meta.multilabel)
    return classification_metrics(probs, labels, multilabel=meta.multilabel)


@torch.no_grad()
def validate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    criterion: nn.Module,
    meta: DatasetMeta,
    device: torch.device,
    bf16: bool = False,
) -> dict[str, Any]:
    """Validation metrics of ``model`` plus ``loss`` (the training criterion, mean per sample).

    ``bf16``: predict under bfloat16 autocast on CPU (see :func:`predict`).
    """
    logits = predict(model, images, VAL_BATCH_SIZE, device, bf16=bf16)
    metrics = evaluate(logits, labels, meta)
    total = 0.0
    for start in range(0, len(logits), VAL_BATCH_SIZE):
        batch = torch.from_numpy(logits[start : start + VAL_BATCH_SIZE]).to(device)
        target = loss_target(
            torch.from_numpy(labels[start : start + VAL_BATCH_SIZE]).to(device), meta.task, meta.multilabel
        )
        total += float(criterion(batch, target)) * len(batch)
    metrics["loss"] = total / max(len(logits), 1)
    return metrics


def primary_score(metrics: dict[str, Any], metric_name: str) -> float:
    """The model-selection score: the metric, or minus the loss where it is undefined (nan)."""
    score = float(metrics[metric_name])
    return score if math.isfinite(score) else -float(metrics["loss"])


def train_teacher_loop(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``; ``config`` is built by :mod:`medkd.teachers.train`."""
    teacher = config["teacher"]
    meta = config["dataset"]
    seed = int(config["seed"])
    # Ray sets OMP_NUM_THREADS to the worker's CPUs; torch's own pool must match it too.
    torch.set_num_threads(worker_threads(teacher["cpus_per_worker"]))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(seed)

    splits = ray.get(config["data_ref"])
    train_x, train_y = splits["train"]
    val_x, val_y = splits["val"]

    model = build_teacher_model(teacher, meta)
    device = ray.train.torch.get_device()
    cpu_bf16 = uses_cpu_bf16(teacher, device)
    if cpu_bf16 and rank == 0:
        warn_if_cpu_bf16_is_slow(f"teacher {teacher['name']!r}")
    # CUDA: float16 autocast with a GradScaler; CPU: autocast's default dtype is bfloat16 (no scaler needed).
    use_amp = (device.type == "cuda" and teacher["mixed_precision"]) or cpu_bf16
    optimizer = build_optimizer(model, teacher)
    scheduler = build_scheduler(optimizer, teacher)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda")

    state: dict[str, Any] = {"epoch": 0, "best": -math.inf, "bad_epochs": 0, "history": [], "resumed_from": []}
    saved_average = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = torch.load(Path(directory) / STATE_FILE, weights_only=True, map_location="cpu")
            # With EMA, MODEL_FILE holds the averaged weights (the teacher); the trained ones are in the state.
            model.load_state_dict(
                saved["model"]
                if "model" in saved
                else torch.load(Path(directory) / MODEL_FILE, weights_only=True, map_location="cpu")
            )
            saved_average = saved.get("average")
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = json.loads((Path(directory) / META_FILE).read_text())["state"]
        state.setdefault("resumed_from", []).append(state["epoch"])
        if teacher["patience"] is not None and state["bad_epochs"] >= teacher["patience"]:
            return  # lost after its early-stopping epoch was checkpointed: it is finished

    model = ray.train.torch.prepare_model(model)
    plain_model = model.module if hasattr(model, "module") else model
    criterion = build_criterion(teacher, meta, train_y).to(device)

    dataset = TensorDataset(torch.from_numpy(train_x), torch.from_numpy(train_y))
    generator = torch.Generator()
    loader = DataLoader(
        dataset,
        batch_size=teacher["batch_size"],
        shuffle=True,
        drop_last=len(dataset) > teacher["batch_size"],
        generator=generator,
    )
    loader = ray.train.torch.prepare_data_loader(loader)
    average = None
    if teacher.get("ema_epochs"):
        # Built from the prepared model (on its device), with this worker's real steps per epoch.
        average = WeightAverage(plain_model, ema_decay(teacher["ema_epochs"], max(1, len(loader))))
        if saved_average is not None:
            average.load_state_dict(saved_average)
    metric_name = "dice" if meta.task == "segmentation" else "auc"

    for epoch in range(state["epoch"], teacher["epochs"]):
        generator.manual_seed(seed * 100_003 + epoch)  # world 1: the RandomSampler's order
        if world > 1 and hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])
        train_loss = train_epoch(
            model,
            loader,
            criterion=criterion,
            optimizer=optimizer,
            scaler=scaler,
            augment=epoch_augmentation(teacher, meta, seed, rank, epoch),
            meta=meta,
            device=device,
            use_amp=use_amp,
            average=average,
            on_batch=EpochQuarters(
                config.get("progress_queue") if rank == 0 else None,
                teacher["name"],
                epoch + 1,
                teacher["epochs"],
                batches=len(loader),
                images=len(dataset),
            ),
        )
        scheduler.step()
        train_seconds = time.perf_counter() - started
        evaluated = average.model if average is not None else plain_model
        val_metrics = validate(evaluated, val_x, val_y, criterion=criterion, meta=meta, device=device, bf16=cpu_bf16)
        score = primary_score(val_metrics, metric_name)
        improved = score > state["best"]
        state["best"] = max(state["best"], score)
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["epoch"] = epoch + 1
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            f"val_{metric_name}": score,
            **({"val_acc": float(val_metrics["acc"])} if "acc" in val_metrics else {}),
            "val_loss": float(val_metrics["loss"]),
            "lr": lr,
            "train_seconds": train_seconds,
            "epoch_seconds": time.perf_counter() - started,
            "workers": world,  # fewer than num_workers after an elastic restart on a smaller cluster
            "node": ray.util.get_node_ip_address(),  # where rank 0 ran this epoch (results.json shows it)
        }
        state["history"].append(record)
        stop = teacher["patience"] is not None and state["bad_epochs"] >= teacher["patience"]
        reported = save_checkpoint(plain_model, optimizer, scheduler, state, record, average) if rank == 0 else None
        # SYNC upload (bounded: at most one report waits for the controller, which consumes one
        # per RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); ASYNC would let fast epochs pile up unbounded
        # checkpoint copies on local disk. The local copy is deleted once it is in storage.
        ray.train.report(
            {**record, "stopped_early": stop},
            checkpoint=reported,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.SYNC,
            delete_local_checkpoint_after_upload=True,
        )
        if stop:
            break


def save_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    record: dict[str, Any],
    average: WeightAverage | None = None,
) -> ray.train.Checkpoint:
    """Everything a resumed run needs, in a fresh local directory (deleted by Ray after upload).

    ``MODEL_FILE`` is the teacher: the averaged weights when EMA is on (the trained weights are
    then kept in ``STATE_FILE`` for resuming), else the trained weights.
    """
    directory = Path(tempfile.mkdtemp(prefix="medkd-teacher-checkpoint-"))
    torch.save((average.model if average is not None else model).state_dict(), directory / MODEL_FILE)
    training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if average is not None:
        training_state.update(model=model.state_dict(), average=average.state_dict())
    torch.save(training_state, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps({"state": state, "metrics": record}))
    return ray.train.Checkpoint.from_directory(str(directory))
