"""Does bfloat16 autocast keep a student's validation quality? Same student and budget, fp32 vs bf16.

    python -m benchmarks.student_precision [--data PATH.npz] [--train 3000] [--epochs 4]
        [--seeds 0,1] [--student resnet_tiny] [--width 0.75] [--teacher-epochs 2]

Validation only (never test). A teacher (the same student family at width 1, trained on hard
labels in fp32 for ``--teacher-epochs``) gives fixed KD logits; then each seed trains the student
twice through :func:`medkd.students.distill.distill` (Hinton KD, T=4, alpha 0.5, batch 64, AdamW
with one-cycle, as in a search trial) on the first ``--train`` training images: ``cpu_precision``
fp32, then bf16, taking turns in one process with one torch thread (a Ray trial's CPU). Validation
is fp32 for both, on the whole val split. Each run prints its per-epoch val lines; the last lines
are the table and a ``RESULT`` with the mean val AUC / ACC and seconds per epoch of each precision.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks._harness import data_file, load_average
from medkd.data import load_dataset
from medkd.data.meta import DatasetMeta
from medkd.students.distill import DistillConfig, array_teacher_logits, build_student, distill, predict_logits

PRECISIONS = ("fp32", "bf16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.student_precision", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data", type=Path, default=data_file("bloodmnist.npz"))
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds, e.g. 0,1")
    parser.add_argument("--student", default="resnet_tiny")
    parser.add_argument("--width", type=float, default=0.75)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    dataset = load_dataset({"kind": "medmnist", "path": str(args.data)})
    meta = DatasetMeta.of(dataset)
    train, val = dataset.splits["train"], dataset.splits["val"]
    train_x, train_y = train.images[: args.train], train.labels[: args.train]
    print(f"[precision] {args.data.name}: {len(train_x)} train / {len(val.images)} val; load {load_average()}")
    teacher_config = DistillConfig(student=args.student, width=1.0, alpha=1.0, epochs=args.teacher_epochs, seed=99)
    teacher = build_student(meta, teacher_config)
    distill(teacher, teacher_config, train_images=train_x, train_labels=train_y, teacher_logits=None, meta=meta)
    teacher_logits = array_teacher_logits(predict_logits(teacher, train_x)[None])
    runs: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for precision in PRECISIONS:
            config = DistillConfig(
                student=args.student,
                width=args.width,
                temperature=4.0,
                alpha=0.5,
                lr=5e-3,
                epochs=args.epochs,
                batch_size=64,
                seed=seed,
                cpu_precision=precision,
            )
            history = distill(
                build_student(meta, config),
                config,
                train_images=train_x,
                train_labels=train_y,
                teacher_logits=teacher_logits,
                meta=meta,
                val_images=val.images,
                val_labels=val.labels,
            )
            for record in history:
                print(
                    f"[precision] seed {seed} {precision} epoch {record['epoch']}: train loss "
                    f"{record['train_loss']:.4f}, val AUC {record['val_auc']:.4f} ACC {record['val_acc']:.4f} "
                    f"({record['epoch_seconds']:.0f}s, load {load_average()})",
                    flush=True,
                )
            last = history[-1]
            runs[precision].append(
                {
                    "seed": seed,
                    "val_auc": last["val_auc"],
                    "val_acc": last["val_acc"],
                    "loss": last["train_loss"],
                    "epoch_seconds": float(np.mean([r["epoch_seconds"] for r in history])),
                }
            )
    print("| precision | seed | final train loss | val AUC | val ACC | s per epoch |\n|---|---|---|---|---|---|")
    for precision, results in runs.items():
        for r in results:
            print(
                f"| {precision} | {r['seed']} | {r['loss']:.4f} | {r['val_auc']:.4f} | {r['val_acc']:.4f} | "
                f"{r['epoch_seconds']:.1f} |"
            )
    summary = {
        f"{p}_{key}": statistics.mean(r[key] for r in results)
        for p, results in runs.items()
        for key in ("val_auc", "val_acc", "epoch_seconds")
    }
    summary["acc_drop_points"] = 100 * (summary["fp32_val_acc"] - summary["bf16_val_acc"])
    print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in summary.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
