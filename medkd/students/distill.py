"""The student distillation loop: a student learns from cached teacher logits, never a teacher.

Teacher logits come from a callable ``teacher_logits(indices) -> (T, B, C[, *spatial])``, so the
same loop serves whole-split arrays (classification, fetched from the cache in one go) and
per-batch cache reads (segmentation, whose per-pixel logits are large).

With :class:`CachedViews` (FKD-style) the student trains on augmented images *and* their own
teacher logits: each sample of a batch shows either its original image or one of ``K`` cached
augmented views, rebuilt exactly from the view's stored parameters, with the teachers' logits
for that very view — augmentation without ever running a teacher.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from torch import nn

from medkd.core.cpu_features import warn_if_cpu_bf16_is_slow
from medkd.core.ema import WeightAverage, ema_decay
from medkd.core.metrics import classification_metrics, probabilities, segmentation_metrics
from medkd.data.meta import DatasetMeta
from medkd.data.teacher_logits import CachedViews, TeacherLogitsFn, ViewLogitsFn, array_teacher_logits  # noqa: F401  (re-exported)
from medkd.students.losses import create_loss, resolve_loss_name
from medkd.students.registry import create_student
from medkd.students.training_state import TrainingState


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
    teacher_temperatures: list[float] | None = Field(
        None,
        description="one temperature per teacher, fitted on val (search.calibrate_teachers): each teacher's "
        "logits are divided by its own before the KD temperature and the aggregation; None: raw logits",
    )
    loss: str | None = Field(None, description="logit loss family (hinton_kd, dkd, dist); None = the task's default")
    logit_standardization: bool = Field(False, description="z-score the logits in the KD term (CVPR 2024)")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    ema_epochs: float | None = Field(None, gt=0, description="weight averaging horizon in epochs; None = off")
    branches: int = Field(
        1,
        ge=1,
        description="weight soup: copies forked from the shared run at fork_fraction of "
        "the epochs, each finishing with its own data order; their weights "
        "are averaged (1 = one run)",
    )
    fork_fraction: float = Field(0.25, gt=0, lt=1, description="share of the epochs trained once before the fork")
    seed: int = 0
    prune: str = "none"
    prune_amount: float = Field(0.0, ge=0, lt=1)
    quantize: str = "none"
    cpu_precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: on CPU the student's forward pass runs under torch.autocast('cpu', dtype=torch.bfloat16) "
        "(weights, gradients, optimiser, losses and validation stay fp32); ignored on a GPU",
    )

    @model_serializer(mode="wrap")
    def _fp32_left_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # fp32 is what every configuration before the field trained in: left out of the dump, so
        # their trial configs, final-training fingerprints and saved training states stay as they were.
        data = handler(self)
        if data.get("cpu_precision") == "fp32":
            del data["cpu_precision"]
        return data


def uses_cpu_bf16(config: DistillConfig, device: torch.device) -> bool:
    """Whether ``config`` trains under bfloat16 autocast on ``device`` (``cpu_precision: bf16`` on a CPU).

    Examples:
        >>> uses_cpu_bf16(DistillConfig(cpu_precision="bf16"), torch.device("cpu"))
        True
        >>> uses_cpu_bf16(DistillConfig(cpu_precision="bf16"), torch.device("cuda"))
        False
    """
    return device.type == "cpu" and config.cpu_precision == "bf16"


def loss_name(meta: DatasetMeta) -> str:
    if meta.task == "segmentation":
        return "pixel_kd"
    return "multilabel_kd" if meta.multilabel else "hinton_kd"


def build_student(meta: DatasetMeta, config: DistillConfig) -> nn.Module:
    """The student of ``config``, its initial weights drawn from ``config.seed``.

    Seeding the initialisation (without touching the caller's global RNG) makes "same seed"
    mean "same starting weights", so a KD run and its no-KD baseline differ only in the loss.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return create_student(
            config.student,
            spatial_dims=meta.spatial_dims,
            in_channels=meta.in_channels,
            num_classes=meta.num_classes,
            image_size=meta.image_size,
            width=config.width,
            depth=config.depth,
        )


def build_distillation_loss(meta: DatasetMeta, config: DistillConfig) -> nn.Module:
    name = resolve_loss_name(
        meta.task,
        meta.multilabel,
        meta.num_classes,
        loss=config.loss,
        logit_standardization=config.logit_standardization,
    )
    options = {"logit_standardization": True} if config.logit_standardization else {}
    return create_loss(
        name,
        temperature=config.temperature,
        alpha=config.alpha,
        aggregation=config.aggregation,
        teacher_weights=config.teacher_weights,
        **options,
    )


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of ``images`` (computed on the model's device), as a float32 array."""
    model.eval()
    device = _device_of(model)
    outputs = [
        model(torch.from_numpy(images[start : start + batch_size]).to(device)).float().cpu().numpy()
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs)


def evaluate_logits(logits: np.ndarray, labels: np.ndarray, meta: DatasetMeta) -> dict[str, Any]:
    """Quality metrics of logits against labels, prefixed-free (``auc``, ``acc`` or ``dice``)."""
    if meta.task == "segmentation":
        return segmentation_metrics(logits, labels, num_classes=meta.num_classes, hd95=False)
    return classification_metrics(probabilities(logits, multilabel=meta.multilabel), labels, multilabel=meta.multilabel)


def quality_metric(meta: DatasetMeta) -> str:
    return "dice" if meta.task == "segmentation" else "auc"


def _targets(labels: torch.Tensor, meta: DatasetMeta) -> torch.Tensor:
    if meta.multilabel:
        return labels.float()
    return labels.long()


def distill(
    model: nn.Module,
    config: DistillConfig,
    *,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    teacher_logits: TeacherLogitsFn | None,
    meta: DatasetMeta,
    epochs: int | None = None,
    val_images: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    augment: Callable | None = None,
    views: CachedViews | None = None,
    on_epoch: Callable[[dict[str, Any]], bool | None] | None = None,
    resume: TrainingState | None = None,
    on_state: Callable[[TrainingState], None] | None = None,
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place with the multi-teacher KD loss of ``config``.

    With ``config.branches > 1`` the run is a weight soup: it trains alone for
    ``fork_fraction`` of the epochs, then that many copies (model, optimiser state, schedule)
    finish it, each with its own data order, and ``model`` gets their averaged weights with
    BatchNorm statistics recomputed on ``train_images``. The copies start in one basin, so their
    average is a good model (a one-model ensemble); one trained instance's quality varies less
    between seeds than a single run's.

    Args:
        teacher_logits: ``indices -> (T, B, ...)`` raw teacher logits for those training
            samples; ``None`` trains on hard labels only (needs ``alpha == 1``).
        epochs: overrides ``config.epochs`` (e.g. a short fine-tune after pruning).
        augment: online augmentation ``(images, masks) -> (images, masks)``; the KD target of an
            augmented image is then its original's logits.
        views: cached augmented views with their own teacher logits (FKD), in place of
            ``augment``; needs ``teacher_logits``.
        on_epoch: called with each epoch's record; returning ``True`` stops training.
        resume: a state ``on_state`` saved after epoch ``k`` of this very configuration: ``model``
            gets its weights and training continues with epoch ``k + 1``, exactly as the
            uninterrupted run would (data order, dropout and augmentation draws included, as long
            as ``augment`` is deterministic or has ``state_dict``/``load_state_dict``).
        on_state: called after each epoch before the soup's fork (with ``on_epoch`` after it)
            with the :class:`TrainingState` to resume from; its tensors are the live ones, so save
            them before returning.
        device: where to train (``cuda`` for a trial or final training that holds a GPU, see
            :func:`medkd.core.devices.reserved_gpu_device`); default the CPU. The model is moved
            there for training and is back on the CPU (where pruning and export run) on return.
            With ``config.cpu_precision == "bf16"`` on the CPU the forward pass runs under bfloat16
            autocast; the loss is computed in float32 and validation is always fp32 (as the exported
            model runs), so trials of either precision are compared alike.

    Returns:
        One record per epoch (loss parts, seconds, validation quality when val data is given),
        those of a resumed state's epochs first; a soup's branch epochs carry ``branch`` and a last
        record (``branches``) scores the soup.

    Examples:
        >>> saved = []
        >>> distill(model, config, **data, on_state=lambda state: saved.append(state.save(tmp_path / "s")))
        >>> distill(fresh_model, config, **data, resume=TrainingState.load(saved[-1]))  # the same student
    """
    if teacher_logits is None and config.alpha < 1:
        raise ValueError("teacher_logits is required unless alpha == 1 (hard labels only)")
    if augment is not None and teacher_logits is not None and meta.task == "segmentation":
        raise ValueError(
            "augment with teacher_logits misaligns per-pixel KD targets (the cached logits are of the "
            "un-augmented images): pass cached views (views=) instead"
        )
    if views is not None:
        if teacher_logits is None:
            raise ValueError("views need teacher_logits (the original images' logits, view 0)")
        if augment is not None:
            raise ValueError("pass either augment (online) or views (cached), not both")
        if views.num_samples != len(train_images):
            raise ValueError(f"views cover {views.num_samples} samples, train_images has {len(train_images)}")
    torch.manual_seed(config.seed)
    if teacher_logits is None:
        # Hard labels only: the same loss class with alpha = 1 computes exactly its hard term,
        # so a no-KD baseline uses the very CE (BCE, Dice+CE) of the KD runs.
        criterion = create_loss(loss_name(meta), temperature=config.temperature, alpha=1.0)
    else:
        criterion = build_distillation_loss(meta, config)
    device = torch.device(device or "cpu")
    model.to(device)
    criterion.to(device)
    calibration = _teacher_calibration(config, teacher_logits is not None, device)
    bf16 = uses_cpu_bf16(config, device)
    if bf16:
        warn_if_cpu_bf16_is_slow(f"student {config.student!r}")
    epochs = epochs or config.epochs
    steps_per_epoch = max(1, len(train_images) // config.batch_size)
    segmentation = meta.task == "segmentation"
    n = len(train_images)

    def run_epochs(run: TrainingRun, first: int, last: int, branch: int | None) -> tuple[list[dict[str, Any]], bool]:
        records: list[dict[str, Any]] = []
        stateful_augment = augment is not None and hasattr(augment, "state_dict")
        for epoch in range(first, last):
            run.model.train()
            if hasattr(criterion, "set_epoch"):  # a loss with a warm-up (DKD) scales its KD term by the epoch
                criterion.set_epoch(epoch + 1, epochs)
            started = time.perf_counter()
            order = run.rng.permutation(n)
            sums: dict[str, float] = {}
            seen = 0
            for step in range(steps_per_epoch):
                indices = np.sort(order[step * config.batch_size : (step + 1) * config.batch_size])
                images = torch.from_numpy(train_images[indices])
                labels = torch.from_numpy(train_labels[indices])
                teachers = None
                if views is not None:
                    images, labels, logits = views.batch(
                        indices, views.draw(run.rng, len(indices)), images, labels, teacher_logits, segmentation
                    )
                    teachers = torch.from_numpy(logits)
                else:
                    if augment is not None:
                        images, masks = augment(images, labels if segmentation else None)
                        labels = masks if segmentation else labels
                    if teacher_logits is not None:
                        teachers = torch.from_numpy(np.ascontiguousarray(teacher_logits(indices), dtype=np.float32))
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                teachers = None if teachers is None else teachers.to(device, non_blocking=True)
                if teachers is not None and calibration is not None:
                    if len(calibration) != len(teachers):
                        raise ValueError(
                            f"teacher_temperatures has {len(calibration)} values for {len(teachers)} teachers"
                        )
                    teachers = teachers / calibration.view(-1, *([1] * (teachers.ndim - 1)))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    outputs = run.model(images)
                # The losses run outside autocast on float32 logits: a softmax at temperature T of
                # bf16 logits (8 mantissa bits) would blur the teachers' small probabilities.
                loss, parts = criterion(outputs.float(), teachers, _targets(labels, meta))
                if teachers is None:
                    parts.pop("kd", None)
                run.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                run.optimizer.step()
                run.scheduler.step()
                if run.average is not None:
                    run.average.update(run.model)
                seen += len(indices)
                parts.setdefault("loss", float(loss.detach()))
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * len(indices)
            record: dict[str, Any] = {"epoch": epoch + 1, "epoch_seconds": time.perf_counter() - started}
            if branch is not None:
                record["branch"] = branch
            record.update({f"train_{k}": v / max(seen, 1) for k, v in sums.items()})
            record.update(_validation(run.result_model(), val_images, val_labels, meta))
            records.append(record)
            if on_state is not None and branch is None:
                tensors = run.state_dict()
                if stateful_augment:
                    tensors["augment"] = augment.state_dict()
                on_state(
                    TrainingState(
                        epoch=epoch + 1, epochs=epochs, config=settings, history=done + records, tensors=tensors
                    )
                )
            if on_epoch is not None and on_epoch(record):
                return records, True
        return records, False

    trunk = TrainingRun.start(model, config, total_steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)
    fork_at = epochs if config.branches == 1 else min(epochs - 1, max(1, round(epochs * config.fork_fraction)))
    settings = config.model_dump(mode="json")
    done: list[dict[str, Any]] = []
    if resume is not None:
        resume.check_resumes(settings, epochs)
        if resume.epoch > fork_at:
            raise ValueError(f"training state at epoch {resume.epoch} is past the soup's fork (epoch {fork_at})")
        trunk.load_state_dict(resume.tensors)
        if "augment" in resume.tensors and augment is not None and hasattr(augment, "load_state_dict"):
            augment.load_state_dict(resume.tensors["augment"])
        done = list(resume.history)
    records, stopped = run_epochs(trunk, resume.epoch if resume is not None else 0, fork_at, None)
    history = done + records
    if config.branches > 1 and not stopped and fork_at < epochs:
        finished = []
        for branch in range(1, config.branches + 1):
            run = trunk.fork(branch)
            records, _ = run_epochs(run, fork_at, epochs, branch)
            history.extend(records)
            finished.append(run.result_model())
        soup = average_state_dicts([m.state_dict() for m in finished])
        model.load_state_dict(soup)
        recalibrate_batchnorm(model, train_images, config.batch_size)
        record = {"epoch": epochs, "branches": config.branches, **_validation(model, val_images, val_labels, meta)}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    elif trunk.average is not None:
        model.load_state_dict(trunk.average.model.state_dict())
    model.eval().to("cpu")
    return history


class TrainingRun:
    """A model in training with its optimiser, schedule, weight average and data-order RNG."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        average: WeightAverage | None,
        rng: np.random.Generator,
        config: DistillConfig,
        total_steps: int,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.average, self.rng = model, optimizer, scheduler, average, rng
        self.config, self.total_steps = config, total_steps

    @staticmethod
    def _optimizer(model: nn.Module, config: DistillConfig, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.15
        )
        return optimizer, scheduler

    @classmethod
    def start(cls, model: nn.Module, config: DistillConfig, *, total_steps: int, steps_per_epoch: int) -> TrainingRun:
        optimizer, scheduler = cls._optimizer(model, config, total_steps)
        # As for the teachers: on a small val split, the average of the last epochs' weights is a
        # steadier model than any one of them (what is validated, compressed and served).
        average = WeightAverage(model, ema_decay(config.ema_epochs, steps_per_epoch)) if config.ema_epochs else None
        return cls(model, optimizer, scheduler, average, np.random.default_rng(config.seed), config, total_steps)

    def fork(self, branch: int) -> TrainingRun:
        """An independent copy that continues the same schedule with its own data order (and dropout)."""
        model = copy.deepcopy(self.model)
        optimizer, scheduler = self._optimizer(model, self.config, self.total_steps)
        # Deep-copied: load_state_dict keeps the tensors it is given, and Adam's moments are updated in place.
        optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        scheduler.load_state_dict(self.scheduler.state_dict())
        average = None if self.average is None else self.average.copy()
        seed = self.config.seed
        torch.manual_seed(seed * 1_000 + branch)
        return TrainingRun(
            model, optimizer, scheduler, average, np.random.default_rng([seed, branch]), self.config, self.total_steps
        )

    def state_dict(self) -> dict[str, Any]:
        """Weights, optimiser, schedule, weight average and the data-order and torch generators."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "average": None if self.average is None else self.average.state_dict(),
            "data_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        self.rng.bit_generator.state = state["data_rng"]
        torch.set_rng_state(state["torch_rng"])

    def result_model(self) -> nn.Module:
        return self.model if self.average is None else self.average.model


def _teacher_calibration(config: DistillConfig, distilling: bool, device: torch.device) -> torch.Tensor | None:
    if not distilling or not config.teacher_temperatures:
        return None
    values = torch.tensor(config.teacher_temperatures, dtype=torch.float32, device=device)
    if not torch.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"teacher_temperatures must be finite and > 0, got {config.teacher_temperatures}")
    return values


def _validation(
    model: nn.Module, val_images: np.ndarray | None, val_labels: np.ndarray | None, meta: DatasetMeta
) -> dict[str, float]:
    if val_images is None or val_labels is None:
        return {}
    metrics = evaluate_logits(predict_logits(model, val_images), val_labels, meta)
    name = quality_metric(meta)
    record = {f"val_{name}": float(metrics[name])}
    if "acc" in metrics:
        record["val_acc"] = float(metrics["acc"])
    return record


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors; other tensors (counters) from the first state.

    Examples:
        >>> soup = average_state_dicts([a.state_dict(), b.state_dict()])
    """
    if not states:
        raise ValueError("states must hold at least one state dict")
    keys = set(states[0])
    for state in states[1:]:
        if set(state) != keys:
            raise ValueError(f"state dicts differ in keys: {sorted(keys ^ set(state))}")
    return {
        key: (
            torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
            if value.is_floating_point()
            else value.clone()
        )
        for key, value in states[0].items()
    }


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: np.ndarray, batch_size: int) -> None:
    """Recompute BatchNorm statistics of ``model`` over ``images`` (averaged weights need their own)."""
    batches = [torch.from_numpy(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    torch.optim.swa_utils.update_bn(batches, model, device=_device_of(model))
    model.eval()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default
