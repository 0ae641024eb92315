"""What a search trial's per-epoch checkpoint costs, and whether resuming from it is exact.

    python -m benchmarks.trial_checkpoint [--epochs 4] [--num-train 546] [--image-size 28]

For each search student at the largest width of the default space (1.0), on synthetic data of
BreastMNIST's training size (546 images, 28x28) with one thread (a 1-CPU trial), distillation
runs with the trial's ``on_state`` hook doing what a trial does after every epoch: save the
:class:`~medkd.students.training_state.TrainingState` to a fresh directory and copy it once more
(Tune persists a reported checkpoint by copying it into the trial's storage). Measured: the epoch
time, the checkpoint time (save + copy), the state's size, the time to load it back; then a run
resumed from the middle epoch's state is compared with the uninterrupted run, weight by weight.

Ends with ``RESULT checkpoint_overhead_pct=<worst student: checkpoint time / epoch time, %>
checkpoint_ms=… epoch_ms=… state_kb=… restore_ms=… resume_exact=<1 when every resumed run equals
its uninterrupted run to the bit>``. The Tune report itself is sent every epoch with or without a
checkpoint, so it is not part of the overhead.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._harness import print_result
from medkd.data.meta import DatasetMeta
from medkd.students.distill import DistillConfig, array_teacher_logits, build_student, distill
from medkd.students.training_state import TrainingState

STUDENTS = ("resnet_tiny", "mobilenet_tiny", "vit_micro")


def synthetic(num_train: int, image_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and one teacher's logits (the label plus noise)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, num_train)
    images = (rng.normal(0, 0.5, (num_train, 1, image_size, image_size)) + labels[:, None, None, None]).astype(
        np.float32
    )
    logits = (np.eye(2)[labels] * 3 + rng.normal(0, 1, (num_train, 2))).astype(np.float32)[None]
    return images, labels[:, None].astype(np.int64), logits


def measure(student: str, args: argparse.Namespace, work: Path) -> dict[str, float]:
    images, labels, logits = synthetic(args.num_train, args.image_size)
    meta = DatasetMeta(
        task="classification",
        multilabel=False,
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        image_size=[args.image_size] * 2,
    )
    config = DistillConfig(student=student, width=1.0, epochs=args.epochs, batch_size=64, alpha=0.5, ema_epochs=1.0)
    data = {
        "train_images": images,
        "train_labels": labels,
        "teacher_logits": array_teacher_logits(logits),
        "meta": meta,
        "val_images": images[:78],
        "val_labels": labels[:78],
    }
    saves: list[float] = []
    sizes: list[int] = []
    middle = max(1, args.epochs // 2)

    def on_state(state: TrainingState) -> None:
        started = time.perf_counter()
        local = state.save(Path(tempfile.mkdtemp(dir=work)))
        stored = work / f"{student}-epoch{state.epoch}"
        shutil.copytree(local, stored)  # Tune's persist_current_checkpoint, local storage
        shutil.rmtree(local)
        saves.append(time.perf_counter() - started)
        sizes.append(sum(p.stat().st_size for p in stored.iterdir()))

    initial = build_student(meta, config)
    uninterrupted = copy.deepcopy(initial)
    history = distill(uninterrupted, config, on_state=on_state, **data)
    started = time.perf_counter()
    state = TrainingState.load(work / f"{student}-epoch{middle}")
    restore = time.perf_counter() - started
    resumed = copy.deepcopy(initial)
    distill(resumed, config, resume=state, **data)
    exact = all(
        torch.equal(a, b)
        for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values(), strict=True)
    )
    epoch_s = statistics.median(r["epoch_seconds"] for r in history)
    checkpoint_s = statistics.median(saves)
    return {
        "epoch_ms": 1000 * epoch_s,
        "checkpoint_ms": 1000 * checkpoint_s,
        "overhead_pct": 100 * checkpoint_s / epoch_s,
        "state_kb": max(sizes) / 1024,
        "restore_ms": 1000 * restore,
        "exact": float(exact),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the resume starts at the middle one)")
    parser.add_argument("--num-train", type=int, default=546, help="training images (BreastMNIST has 546)")
    parser.add_argument("--image-size", type=int, default=28, help="image side in pixels")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (a resume needs an epoch before the last)")
    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="medkd-bench-trial-checkpoint-") as work:
        for student in STUDENTS:
            rows[student] = measure(student, args, Path(work))
    print(f"{'student':16} {'epoch ms':>9} {'ckpt ms':>8} {'overhead %':>10} {'state KB':>9} {'load ms':>8} exact")
    for student, row in rows.items():
        print(
            f"{student:16} {row['epoch_ms']:9.1f} {row['checkpoint_ms']:8.1f} {row['overhead_pct']:10.2f} "
            f"{row['state_kb']:9.0f} {row['restore_ms']:8.1f} {int(row['exact'])}"
        )
    worst = max(rows.values(), key=lambda row: row["overhead_pct"])
    print_result(
        {
            "checkpoint_overhead_pct": worst["overhead_pct"],
            "checkpoint_ms": worst["checkpoint_ms"],
            "epoch_ms": worst["epoch_ms"],
            "state_kb": round(max(r["state_kb"] for r in rows.values())),
            "restore_ms": max(r["restore_ms"] for r in rows.values()),
            "resume_exact": int(all(r["exact"] == 1.0 for r in rows.values())),
        },
        digits=2,
    )


if __name__ == "__main__":
    main()
