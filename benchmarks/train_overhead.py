"""Ray Train's overhead for one teacher: the same training through Ray Train and in plain PyTorch.

Both sides train the same model on the same data for the same epochs with the same pieces of
:mod:`medkd.teachers.loop` (model, AdamW + cosine, loss, batch size, shuffling, per-epoch
validation on the val split) and the same number of intra-op threads:

- **plain**: a ``for epoch`` loop in this process calling ``train_epoch`` and ``validate``;
- **ray**: medkd's teacher stage for one teacher (``train_one_teacher``: a ``TorchTrainer``
  with 1 worker running ``train_teacher_loop``, which also checkpoints every epoch and reports
  to Ray Train, then publishes the best checkpoint as an artifact).

What is timed: ``plain_s`` from building the model to the end of the last epoch; ``ray_fit_s``
the whole ``train_one_teacher`` call — the controller and worker-group start-up, the object
store fetch of the data, the per-epoch checkpoints and reports, the teardown and the artifact
copy are all Ray Train's cost and are counted. Starting the Ray cluster (``ray.init``) happens
once per cluster, not per teacher, and is reported separately (``ray_init_s``). The breakdown
also shows the pure training time per side (``*_train_s``: sum of the per-epoch training time,
without validation) so a per-step slowdown (e.g. a thread-count mismatch) is told apart from
fixed start-up cost.

Runs are interleaved plain, ray, ray, plain, ... (``--repeats`` pairs) and the medians compared,
so a change of machine load during the run hits both sides alike::

    python -m benchmarks.train_overhead [--model resnet10] [--num-train 2048] [--epochs 5] [--threads 1]

Ends with ``RESULT train_overhead_ratio=…`` (median ray_fit_s / median plain_s; target ≤ 1.15).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from medkd.data.meta import DatasetMeta

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def teacher_spec(args: argparse.Namespace) -> Any:
    from medkd.spec.teachers import TeacherSpec

    return TeacherSpec(
        name="overhead",
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=1e-3,
        label_smoothing=0.1,
        class_weighting=True,
        augment={"flip": 0.5, "affine": {"prob": 0.5, "rotate_degrees": 10}} if args.augment else None,
        cpus_per_worker=float(args.threads),
        use_gpu=False,
        max_failures=0,
    )


def train_plain(
    teacher: dict[str, Any], meta: DatasetMeta, arrays: dict[str, Any], seed: int, threads: int
) -> dict[str, Any]:
    """The teacher loop without Ray: same model, optimiser, schedule, loss, batches and validation."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from medkd.teachers.loop import (
        build_criterion,
        build_optimizer,
        build_scheduler,
        build_teacher_model,
        epoch_augmentation,
        train_epoch,
        validate,
    )

    torch.set_num_threads(threads)
    started = time.perf_counter()
    torch.manual_seed(seed)
    train_x, train_y = arrays["train"]
    val_x, val_y = arrays["val"]
    device = torch.device("cpu")
    model = build_teacher_model(teacher, meta)
    optimizer = build_optimizer(model, teacher)
    scheduler = build_scheduler(optimizer, teacher)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    criterion = build_criterion(teacher, meta, train_y)
    generator = torch.Generator()
    dataset = TensorDataset(torch.from_numpy(train_x), torch.from_numpy(train_y))
    loader = DataLoader(
        dataset,
        batch_size=teacher["batch_size"],
        shuffle=True,
        drop_last=len(dataset) > teacher["batch_size"],
        generator=generator,
    )
    train_seconds, epoch_seconds, val_auc = [], [], float("nan")
    for epoch in range(teacher["epochs"]):
        generator.manual_seed(seed * 100_003 + epoch)
        epoch_started = time.perf_counter()
        train_epoch(
            model,
            loader,
            criterion=criterion,
            optimizer=optimizer,
            scaler=scaler,
            augment=epoch_augmentation(teacher, meta, seed, 0, epoch),
            meta=meta,
            device=device,
            use_amp=False,
        )
        scheduler.step()
        train_seconds.append(time.perf_counter() - epoch_started)
        val_auc = float(validate(model, val_x, val_y, criterion=criterion, meta=meta, device=device)["auc"])
        epoch_seconds.append(time.perf_counter() - epoch_started)
    return {
        "total_s": time.perf_counter() - started,
        "train_s": sum(train_seconds),
        "loop_s": sum(epoch_seconds),
        "val_auc": val_auc,
    }


def train_ray(
    teacher_spec_: Any, meta: DatasetMeta, data_ref: Any, seed: int, output_dir: Path, run: int
) -> dict[str, Any]:
    from medkd.teachers.train import train_one_teacher

    started = time.perf_counter()
    artifact = train_one_teacher(
        teacher_spec_,
        teacher_fp=f"overhead{run}",
        seed=seed,
        meta=meta,
        data_ref=data_ref,
        output_dir=output_dir,
        storage_path=str(output_dir / "ray"),
    )
    total = time.perf_counter() - started
    history = artifact.history
    return {
        "total_s": total,
        "train_s": sum(r["train_seconds"] for r in history),
        "loop_s": sum(r["epoch_seconds"] for r in history),
        "val_auc": float(history[-1]["val_auc"]),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet10", help="teacher registry name")
    parser.add_argument("--num-train", type=int, default=2048, help="synthetic training images")
    parser.add_argument("--num-val", type=int, default=256, help="synthetic validation images")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (= the Ray worker's CPUs)")
    parser.add_argument("--augment", action="store_true", help="also run the teacher recipe's augmentation")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved plain/ray pairs (medians are compared)")
    args = parser.parse_args(argv)
    for name in ("num_train", "num_val", "image_size", "epochs", "batch_size", "threads", "repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from medkd.data import SyntheticDataSpec, load_dataset

    dataset = load_dataset(
        SyntheticDataSpec(
            num_train=args.num_train, num_val=args.num_val, num_test=16, image_size=args.image_size, num_classes=2
        )
    )
    meta, arrays = DatasetMeta.of(dataset), dataset.arrays()
    spec = teacher_spec(args)
    teacher = spec.model_dump(mode="json")
    print(
        f"workload: {args.model}, {args.num_train} train / {args.num_val} val images {args.image_size}x{args.image_size}, "
        f"{args.epochs} epochs, batch {args.batch_size}, {args.threads} thread(s), augment={args.augment}",
        flush=True,
    )

    started = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=max(2, args.threads),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}},
    )
    ray_init = time.perf_counter() - started
    plain_runs, ray_runs = [], []
    try:
        data_ref = ray.put(arrays)
        with tempfile.TemporaryDirectory(prefix="medkd-overhead-") as tmp:
            for pair in range(args.repeats):
                order = ("plain", "ray") if pair % 2 == 0 else ("ray", "plain")
                for side in order:
                    if side == "plain":
                        plain_runs.append(train_plain(teacher, meta, arrays, seed=0, threads=args.threads))
                        run = plain_runs[-1]
                    else:
                        ray_runs.append(train_ray(spec, meta, data_ref, seed=0, output_dir=Path(tmp), run=pair))
                        run = ray_runs[-1]
                    print(
                        f"  {side:<5} total {run['total_s']:7.1f}s  epochs {run['loop_s']:7.1f}s  "
                        f"train {run['train_s']:7.1f}s  val AUC {run['val_auc']:.3f}",
                        flush=True,
                    )
    finally:
        ray.shutdown()

    def median(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    plain_s, ray_s = median(plain_runs, "total_s"), median(ray_runs, "total_s")
    ratio = ray_s / plain_s
    print()
    print(f"ray.init (once per cluster, not in the ratio): {ray_init:.1f}s")
    print(f"{'':<22}{'plain':>9}{'ray':>9}{'ratio':>8}")
    for label, key in (("total (timed)", "total_s"), ("epochs (train+val)", "loop_s"), ("training only", "train_s")):
        p, r = median(plain_runs, key), median(ray_runs, key)
        print(f"{label:<22}{p:>8.1f}s{r:>8.1f}s{r / p:>8.3f}")
    print(f"ray fixed cost (start-up, checkpoints, teardown, artifact): {ray_s - median(ray_runs, 'loop_s'):.1f}s")
    print(
        f"RESULT train_overhead_ratio={ratio:.3f} plain_s={plain_s:.1f} ray_fit_s={ray_s:.1f} ray_init_s={ray_init:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
