"""Does bfloat16 autocast keep a recipe teacher's validation quality? A few short epochs, fp32 vs bf16.

    python -m benchmarks.profile_precision --precision bf16 [--model resnet18] [--data PATH.npz]
        [--train 2000] [--val 1000] [--epochs 3] [--seed 0]

Trains one recipe teacher (:func:`medkd.teachers.recipe.teacher_recipe` for a training split of
``--train`` images, ``--epochs`` epochs so the cosine schedule completes) without Ray, through the
teacher loop's own pieces (:mod:`medkd.teachers.loop`: optimiser, scheduler, loss, augmentation,
``train_epoch`` with its autocast, weight averaging, ``validate``), on the first ``--train``
training and ``--val`` validation images of the file, in one thread. Run ``--precision fp32`` and
``--precision bf16`` side by side (same seed, same batches) and compare the per-epoch val lines
and the ``RESULT`` (val AUC / ACC of the averaged weights after the last epoch, seconds per epoch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._harness import data_file, load_average
from medkd.core.ema import WeightAverage, ema_decay
from medkd.data import load_dataset
from medkd.data.meta import DatasetMeta
from medkd.spec.teachers import TeacherSpec
from medkd.teachers.loop import (
    build_criterion,
    build_optimizer,
    build_scheduler,
    build_teacher_model,
    epoch_augmentation,
    train_epoch,
    validate,
)
from medkd.teachers.recipe import teacher_recipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_precision", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--precision", choices=("fp32", "bf16"), required=True)
    parser.add_argument("--model", choices=("resnet18", "vit"), default="resnet18")
    parser.add_argument("--data", type=Path, default=data_file("organamnist.npz"))
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    dataset = load_dataset({"kind": "medmnist", "path": str(args.data)})
    meta = DatasetMeta.of(dataset)
    train, val = dataset.splits["train"], dataset.splits["val"]
    train_x, train_y = train.images[: args.train], train.labels[: args.train]
    val_x, val_y = val.images[: args.val], val.labels[: args.val]
    recipe = teacher_recipe(
        n_train=len(train_x), class_names=list(dataset.class_names), image_size=list(meta.image_size)
    )
    entry = next(t for t in recipe if t["model"] == args.model)
    entry.update(epochs=args.epochs, cpu_precision=args.precision)
    teacher = TeacherSpec.model_validate(entry).model_dump(mode="json")
    model = build_teacher_model(teacher, meta)
    optimizer = build_optimizer(model, teacher)
    scheduler = build_scheduler(optimizer, teacher)
    criterion = build_criterion(teacher, meta, train_y)
    generator = torch.Generator()
    loader = DataLoader(
        TensorDataset(torch.from_numpy(train_x), torch.from_numpy(train_y)),
        batch_size=teacher["batch_size"],
        shuffle=True,
        drop_last=True,
        generator=generator,
    )
    average = WeightAverage(model, ema_decay(teacher["ema_epochs"], len(loader)))
    bf16 = args.precision == "bf16"
    device = torch.device("cpu")
    print(f"[precision] {args.model} {args.precision}: {len(train_x)} train / {len(val_x)} val; load {load_average()}")
    metrics, seconds = {}, []
    for epoch in range(args.epochs):
        generator.manual_seed(args.seed * 100_003 + epoch)
        started = time.perf_counter()
        loss = train_epoch(
            model,
            loader,
            criterion=criterion,
            optimizer=optimizer,
            scaler=torch.amp.GradScaler("cuda", enabled=False),
            augment=epoch_augmentation(teacher, meta, args.seed, 0, epoch),
            meta=meta,
            device=device,
            use_amp=bf16,
            average=average,
        )
        scheduler.step()
        seconds.append(time.perf_counter() - started)
        metrics = validate(average.model, val_x, val_y, criterion=criterion, meta=meta, device=device, bf16=bf16)
        print(
            f"[precision] epoch {epoch + 1}/{args.epochs}: train loss {loss:.4f}, val AUC {metrics['auc']:.4f} "
            f"ACC {metrics['acc']:.4f} ({seconds[-1]:.0f}s, load {load_average()})",
            flush=True,
        )
    print(
        f"RESULT model={args.model} precision={args.precision} val_auc={metrics['auc']:.4f} "
        f"val_acc={metrics['acc']:.4f} epoch_seconds={sum(seconds) / len(seconds):.1f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
