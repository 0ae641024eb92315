"""Stage 1: train the teacher ensemble with Ray Train, one ``TorchTrainer`` per teacher.

Teachers are launched from driver threads so they run side by side when the cluster has room
and queue when it does not (Ray schedules the worker groups; nothing here waits on another
teacher). A teacher whose fingerprint already has a finished artifact is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import ray
import torch
from pydantic import BaseModel
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError, UserCallback
from ray.train.torch import TorchTrainer

from medkd.core.devices import probe_reserved_gpus
from medkd.core.fingerprint import fingerprint
from medkd.core.progress import Progress, send_event
from medkd.data.meta import DatasetMeta
from medkd.spec.job import JobSpec
from medkd.teachers.faults import (
    LostNodeDeadline,
    TeacherTrainingError,
    alive_nodes,
    lost_node_wait_s,
    training_failure_message,
)
from medkd.teachers.loop import META_FILE, MODEL_FILE, train_teacher_loop
from medkd.teachers.registry import create_teacher, teacher_family, teacher_revision, teacher_task

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s)
# and takes at most one report per poll; the last report and the end of a run each wait for a
# poll. 0.5 s cuts ~3 s off every teacher (benchmarks/RESULTS.md, train_overhead) for a
# negligible polling cost. Set before fit(); Train propagates it to the controller and workers.
TRAIN_POLL_INTERVAL_S = "0.5"

ARTIFACT_FILE = "teacher.json"


class TeacherArtifact(BaseModel):
    """A trained teacher: its best checkpoint and how it got there."""

    name: str
    model: str
    family: str
    model_kwargs: dict[str, Any]
    fingerprint: str
    params: int
    checkpoint: str
    epochs_run: int
    best_epoch: int
    best_val: float
    history: list[dict[str, Any]]
    train_seconds: float
    resumed_from: list[int] = []  # epochs the run resumed from after a failure (empty: no restart)
    cpu_precision: str | None = None  # "bf16": its soft labels are computed under bf16 autocast too (TeacherSpec)


def teacher_fingerprint(teacher: Any, dataset_fp: str, seed: int, task: str) -> str:
    """Hash of (teacher spec, dataset fingerprint, training config, seed): see ARCHITECTURE.md, "Fingerprints".

    A builder revision above 1 (:func:`medkd.teachers.registry.register_teacher`) is hashed too, so a
    teacher whose builder was fixed is trained again; revision 1 leaves every earlier fingerprint as it was.
    """
    fields = teacher.training_fingerprint_fields()
    revision = teacher_revision(teacher.model)
    if revision > 1:
        fields = {**fields, "model_revision": revision}
    return fingerprint("teacher", fields, dataset_fp, seed, task)


def artifact_dir(output_dir: Path, teacher_name: str, teacher_fp: str) -> Path:
    return Path(output_dir) / "teachers" / f"{teacher_name}-{teacher_fp}"


def load_teacher_model(artifact: TeacherArtifact, meta: DatasetMeta) -> torch.nn.Module:
    model = create_teacher(
        artifact.model,
        spatial_dims=meta.spatial_dims,
        in_channels=meta.in_channels,
        num_classes=meta.num_classes,
        image_size=meta.image_size,
        **artifact.model_kwargs,
    )
    model.load_state_dict(torch.load(artifact.checkpoint, weights_only=True, map_location="cpu"))
    return model.eval()


def find_artifact(output_dir: Path, teacher_name: str, teacher_fp: str) -> TeacherArtifact | None:
    """The complete artifact of this teacher in ``output_dir``, or None.

    Its checkpoint is the ``model.pt`` beside the ``teacher.json`` that was found, not the path the
    teacher stage recorded, so an output folder (or a teacher's folder) can be moved or copied.

    Raises:
        ValueError: the ``teacher.json`` found is not a teacher artifact (names the file).
    """
    directory = artifact_dir(output_dir, teacher_name, teacher_fp)
    path = directory / ARTIFACT_FILE
    if not path.is_file() or not (directory / MODEL_FILE).is_file():
        return None
    try:
        artifact = TeacherArtifact.model_validate_json(path.read_text())
    except ValueError as error:
        raise ValueError(
            f"{path}: not a teacher artifact ({error}); delete its folder to train the teacher again"
        ) from None
    if artifact.fingerprint != teacher_fp:
        return None
    return artifact.model_copy(update={"name": teacher_name, "checkpoint": str((directory / MODEL_FILE).resolve())})


def adopt_artifact(output_dir: Path, teacher_name: str, teacher_fp: str) -> tuple[TeacherArtifact, Path] | None:
    """The same training found under another name in ``output_dir``, copied to this teacher's folder.

    The fingerprint leaves the name out, so a renamed teacher, or a teacher folder copied in from
    another run (``teachers/<name>-<fingerprint>``), is not trained again.

    Returns:
        The artifact under ``teacher_name`` and the folder it was copied from, or None.
    """
    target = artifact_dir(output_dir, teacher_name, teacher_fp)
    for source in sorted((Path(output_dir) / "teachers").glob(f"*-{teacher_fp}")):
        if source == target or not source.is_dir():
            continue
        found = find_artifact(output_dir, source.name[: -len(teacher_fp) - 1], teacher_fp)
        if found is None:
            continue
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / MODEL_FILE, target / MODEL_FILE)
        adopted = found.model_copy(update={"name": teacher_name, "checkpoint": str((target / MODEL_FILE).resolve())})
        write_artifact(target, adopted)
        return adopted, source
    return None


def write_artifact(directory: Path, artifact: TeacherArtifact) -> None:
    """Write ``teacher.json`` last and atomically: its presence marks the artifact complete (a crash
    before it re-trains, and Ray Train resumes the run from its last checkpoint)."""
    tmp = directory / (ARTIFACT_FILE + ".tmp")
    tmp.write_text(artifact.model_dump_json(indent=2))
    tmp.replace(directory / ARTIFACT_FILE)


def epoch_timing_line(teacher: str, record: dict[str, Any], epochs: int, seconds_so_far: list[float]) -> str:
    """One progress line saying where a teacher's epoch went and when the teacher should be done.

    Args:
        record: the epoch's report (``epoch``, ``epoch_seconds``, ``train_seconds``).
        seconds_so_far: every reported epoch's ``epoch_seconds`` of this run, this one included
            (the ETA is their mean times the epochs left; early stopping may end sooner).

    Examples:
        >>> epoch_timing_line("cnn", {"epoch": 1, "epoch_seconds": 120.0, "train_seconds": 110.0}, 3, [120.0])
        '  teacher cnn: epoch 1/3 took 120s (train 110s, validation and checkpoint 10s); ETA 4.0 min'
    """
    total, train = float(record["epoch_seconds"]), float(record["train_seconds"])
    left = max(0, epochs - int(record["epoch"]))
    eta = left * sum(seconds_so_far) / max(1, len(seconds_so_far)) / 60
    return (
        f"  teacher {teacher}: epoch {record['epoch']}/{epochs} took {total:.0f}s "
        f"(train {train:.0f}s, validation and checkpoint {total - train:.0f}s); ETA {eta:.1f} min"
    )


class _ProgressCallback(UserCallback):
    """Forwards each reported epoch from the Train controller to the driver's progress queue,
    with a line on the epoch's time and the teacher's ETA, and a line for each worker failure
    (Ray Train restarts the workers from the last checkpoint, which a user should see happen)."""

    def __init__(self, queue: Any, teacher: str, epochs: int, max_failures: int = 0) -> None:
        self.queue, self.teacher, self.epochs, self.max_failures = queue, teacher, epochs, max_failures
        self.epoch_seconds: list[float] = []
        self.failures = 0

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.failures += 1
        errors = "; ".join(
            f"worker {rank}: {' '.join(str(error).split())[:300]}" for rank, error in sorted(worker_exceptions.items())
        )
        then = (
            "Ray Train restarts the workers from the last checkpoint"
            if self.failures <= self.max_failures
            else "no restart left"
        )
        message = f"  teacher {self.teacher}: failure {self.failures} of {self.max_failures} allowed ({errors}); {then}"
        send_event(self.queue, {"kind": "teacher_failure", "message": message})

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics:
            first = metrics[0]
            send_event(
                self.queue,
                {
                    "kind": "teacher_epoch",
                    "teacher": self.teacher,
                    "epoch": first.get("epoch"),
                    "epochs": self.epochs,
                    "metrics": {k: v for k, v in first.items() if k.startswith(("val_", "train_loss"))},
                },
            )
            if "epoch_seconds" in first and "train_seconds" in first:
                self.epoch_seconds.append(float(first["epoch_seconds"]))
                line = epoch_timing_line(self.teacher, first, self.epochs, self.epoch_seconds)
                send_event(self.queue, {"kind": "teacher_time", "message": line})


def _use_gpu(setting: Any) -> bool:
    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(setting)


def train_one_teacher(
    teacher: Any,
    *,
    teacher_fp: str,
    seed: int,
    meta: DatasetMeta,
    data_ref: Any,
    output_dir: Path,
    storage_path: str,
    events: Any = None,
) -> TeacherArtifact:
    """Fit one teacher with a ``TorchTrainer`` and publish its best checkpoint as an artifact."""
    started = time.perf_counter()
    metric = "val_dice" if meta.task == "segmentation" else "val_auc"
    run_name = f"teacher-{teacher.name}-{teacher_fp}"
    elastic = teacher.min_workers is not None and teacher.min_workers < teacher.num_workers
    nodes_before = alive_nodes()
    use_gpu = _use_gpu(teacher.use_gpu)
    if use_gpu:  # on a node whose declared GPU is unusable, Train's NCCL set-up would fail opaquely
        probe_reserved_gpus(
            f"teachers[{teacher.name}].use_gpu", workers=teacher.num_workers, cpus_per_worker=teacher.cpus_per_worker
        )
    trainer = TorchTrainer(
        train_teacher_loop,
        train_loop_config={
            "teacher": teacher.model_dump(mode="json"),
            "dataset": meta,
            "seed": seed,
            "data_ref": data_ref,
            "progress_queue": events,
        },
        scaling_config=ScalingConfig(
            # Elastic: after a lost node, Train restarts from the last checkpoint with as many
            # workers as the cluster still places (at least min_workers).
            num_workers=(teacher.min_workers, teacher.num_workers) if elastic else teacher.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": teacher.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=metric, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=teacher.max_failures),
            callbacks=[
                _ProgressCallback(events, teacher.name, teacher.epochs, teacher.max_failures),
                LostNodeDeadline(nodes_before, wait_s=lost_node_wait_s(), what=f"teacher {teacher.name!r}"),
            ],
        ),
    )
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except TrainingFailedError as error:
        lost = {node_id: address for node_id, address in nodes_before.items() if node_id not in alive_nodes()}
        raise TeacherTrainingError(
            training_failure_message(teacher, error, lost=lost, run_dir=Path(storage_path) / run_name)
        ) from error
    best_checkpoint, best_metrics = max(
        result.best_checkpoints or [],
        key=lambda pair: pair[1].get(metric, float("-inf")),
        default=(result.checkpoint, result.metrics),
    )
    if best_checkpoint is None:
        raise RuntimeError(f"teacher {teacher.name!r} finished without a checkpoint")

    directory = artifact_dir(output_dir, teacher.name, teacher_fp)
    directory.mkdir(parents=True, exist_ok=True)
    with best_checkpoint.as_directory() as checkpoint_dir:
        shutil.copy2(Path(checkpoint_dir) / MODEL_FILE, directory / MODEL_FILE)
        history = json.loads((Path(checkpoint_dir) / META_FILE).read_text())["state"]["history"]
    with result.checkpoint.as_directory() as checkpoint_dir:
        final_state = json.loads((Path(checkpoint_dir) / META_FILE).read_text())["state"]
    full_history = final_state["history"]
    model = create_teacher(
        teacher.model,
        spatial_dims=meta.spatial_dims,
        in_channels=meta.in_channels,
        num_classes=meta.num_classes,
        image_size=meta.image_size,
        **teacher.model_kwargs,
    )
    artifact = TeacherArtifact(
        name=teacher.name,
        model=teacher.model,
        family=teacher_family(teacher.model),
        model_kwargs=teacher.model_kwargs,
        fingerprint=teacher_fp,
        params=sum(p.numel() for p in model.parameters()),
        checkpoint=str((directory / MODEL_FILE).resolve()),
        epochs_run=len(full_history),
        best_epoch=int(history[-1]["epoch"]),
        best_val=float(best_metrics.get(metric, float("nan"))),
        history=full_history,
        train_seconds=time.perf_counter() - started,
        resumed_from=final_state.get("resumed_from", []),
        cpu_precision=teacher.cpu_precision,
    )
    write_artifact(directory, artifact)
    return artifact


def check_teachers(teachers: list[Any], meta: DatasetMeta) -> None:
    """Fail before any training starts if a teacher cannot be trained on this dataset.

    Checks that each teacher's family matches the task (a U-Net on a classification set, or a
    classifier on masks, would only fail inside a Ray worker) and builds each model once, so
    bad ``model_kwargs`` or an image size the network cannot take are reported here.

    Raises:
        ValueError: naming ``teachers[i]`` and the problem.
    """
    for index, teacher in enumerate(teachers):
        where = f"teachers[{index}] ({teacher.name!r})"
        try:
            task = teacher_task(teacher.model)
        except ValueError as error:
            raise ValueError(f"{where}.model: {error}") from None
        if task != meta.task:
            raise ValueError(f"{where}.model: {teacher.model!r} is a {task} teacher but the dataset is {meta.task}")
        try:
            create_teacher(
                teacher.model,
                spatial_dims=meta.spatial_dims,
                in_channels=meta.in_channels,
                num_classes=meta.num_classes,
                image_size=meta.image_size,
                **teacher.model_kwargs,
            )
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None


def train_teachers(
    spec: JobSpec,
    dataset: Any,
    data_ref: Any,
    *,
    output_dir: Path,
    storage_path: str,
    progress: Progress,
    events: Any = None,
    on_ready: Callable[[TeacherArtifact], None] | None = None,
) -> tuple[list[TeacherArtifact], dict[str, str]]:
    """Train (or find) every teacher of the spec; returns artifacts and ``{name: ran|skipped}``.

    ``on_ready`` is called with each teacher's artifact as soon as it is trained, while the other
    teachers may still train (the pipeline starts its soft labels there). Teachers found on disk
    are handed over at once when none trains, else with the first that ends, so their work does
    not take the CPUs the trainings are being placed on.
    """
    meta = DatasetMeta.of(dataset)
    check_teachers(list(spec.teachers), meta)
    artifacts: dict[str, TeacherArtifact] = {}
    status: dict[str, str] = {}
    pending = []
    for teacher in spec.teachers:
        seed = spec.teacher_seed(teacher)
        teacher_fp = teacher_fingerprint(teacher, dataset.fingerprint, seed, spec.task)
        found = find_artifact(output_dir, teacher.name, teacher_fp)
        adopted = None if found is not None else adopt_artifact(output_dir, teacher.name, teacher_fp)
        if found is not None or adopted is not None:
            where = "" if adopted is None else f" in {adopted[1].name} (the same training), copied"
            progress.line(f"  teacher {teacher.name} ({teacher.model}, {teacher_fp}): skipped, checkpoint found{where}")
            artifacts[teacher.name] = found if found is not None else adopted[0]
            status[teacher.name] = "skipped"
        else:
            progress.line(f"  teacher {teacher.name} ({teacher.model}, {teacher_fp}): training {teacher.epochs} epochs")
            pending.append((teacher, teacher_fp, seed))

    notify = on_ready or (lambda artifact: None)
    waiting = [artifacts[t.name] for t in spec.teachers if t.name in artifacts]  # found on disk
    if not pending:
        for artifact in waiting:
            notify(artifact)
    else:
        pool = ThreadPoolExecutor(max_workers=len(pending), thread_name_prefix="medkd-teacher")
        try:
            futures = {
                teacher.name: pool.submit(
                    train_one_teacher,
                    teacher,
                    teacher_fp=teacher_fp,
                    seed=seed,
                    meta=meta,
                    data_ref=data_ref,
                    output_dir=output_dir,
                    storage_path=storage_path,
                    events=events,
                )
                for teacher, teacher_fp, seed in pending
            }
            errors = []
            names = {future: name for name, future in futures.items()}
            for future in as_completed(names):
                name = names[future]
                for artifact in waiting:  # with the first teacher that ends
                    notify(artifact)
                waiting = []
                try:
                    artifacts[name] = future.result()
                except TeacherTrainingError as error:  # keep the other teachers' results
                    errors.append(str(error))
                except Exception as error:
                    errors.append(f"{name}: {error}")
                else:
                    status[name] = "ran"
                    a = artifacts[name]
                    progress.line(
                        f"  teacher {name}: done in {a.train_seconds:.0f}s, best epoch {a.best_epoch}, val={a.best_val:.4f}"
                    )
                    notify(a)
            if errors:
                raise TeacherTrainingError("teacher training failed:\n  " + "\n  ".join(errors))
        except KeyboardInterrupt:
            # Leaving the pool would wait for every teacher to finish its epochs (a Train run started
            # off the main thread does not hear Ctrl-C). Return at once instead: the caller's
            # ray.shutdown (or the driver's exit) ends the runs, whose checkpoints stay for --resume.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    return [artifacts[t.name] for t in spec.teachers], status
