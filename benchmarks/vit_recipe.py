"""A quick probe of the ViT teacher's recipe on a MedMNIST file's *validation* split (never test).

Trains :mod:`medkd.teachers.recipe`'s ViT (patch 2 at 28 px, 4 blocks, width 128, AdamW with
weight decay 0.05 off biases/norms, cosine decay, label smoothing 0.1, EMA of the weights over
``epochs / 10`` epochs, flips) in one process on one thread, with a variant of the schedule,
and reports the EMA model's val AUC after every epoch. It is a plain PyTorch loop, not the Ray
teacher stage, so two configurations can be compared cheaply on a shared machine::

    python -m benchmarks.vit_recipe --config recipe --epochs 8
    python -m benchmarks.vit_recipe --config warmup_lr1e-3 --epochs 8

Ends with ``RESULT config=… epochs=… best_val_auc=… last_val_auc=… seconds=…``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from benchmarks._harness import data_file, print_result
from medkd.teachers import create_teacher
from medkd.teachers.recipe import VIT_HEADS, vit_hidden_size, vit_patch_size

CONFIGS = {
    "recipe": {"lr": 5e-4, "warmup_epochs": 0},  # medkd.teachers.recipe as of 2026-12-05
    "warmup": {"lr": 5e-4, "warmup_epochs": 3},
    "warmup_lr1e-3": {"lr": 1e-3, "warmup_epochs": 3},
}
BATCH = 32


def _prepare(images: np.ndarray) -> torch.Tensor:
    x = torch.tensor(images, dtype=torch.float32) / 255.0
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def run(data: Path, config: str, epochs: int, seed: int = 0) -> dict[str, float]:
    settings = CONFIGS[config]
    arrays = np.load(data)
    x_train, y_train = _prepare(arrays["train_images"]), torch.tensor(arrays["train_labels"][:, 0]).long()
    x_val, y_val = _prepare(arrays["val_images"]), arrays["val_labels"][:, 0]
    mean, std = x_train.mean(), x_train.std()
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    num_classes = int(y_train.max()) + 1
    image_size = list(x_train.shape[2:])
    torch.manual_seed(seed)
    model = create_teacher(
        "vit",
        spatial_dims=2,
        in_channels=x_train.shape[1],
        num_classes=num_classes,
        image_size=image_size,
        patch_size=vit_patch_size(image_size),
        pos_embed_type="sincos",
        hidden_size=vit_hidden_size(2),
        mlp_dim=256,
        num_layers=4,
        num_heads=VIT_HEADS,
    )
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=settings["lr"]
    )
    steps_per_epoch = math.ceil(len(x_train) / BATCH)
    total, warm = epochs * steps_per_epoch, settings["warmup_epochs"] * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    decay_rate = 1 - 1 / (max(1.0, epochs / 10) * steps_per_epoch)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay_rate)
    )
    generator = torch.Generator().manual_seed(seed)
    start, history = time.time(), []
    for epoch in range(epochs):
        model.train()
        for index in torch.randperm(len(x_train), generator=generator).split(BATCH):
            x = x_train[index]
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = nn.functional.cross_entropy(model(x), y_train[index], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            ema.update_parameters(model)
        ema.eval()
        with torch.no_grad():
            probs = torch.softmax(ema(x_val), dim=1).numpy()
        auc = roc_auc_score(y_val, probs[:, 1]) if num_classes == 2 else roc_auc_score(y_val, probs, multi_class="ovr")
        history.append(float(auc))
        print(f"{config} epoch {epoch + 1}: val AUC {auc:.4f} ({time.time() - start:.0f} s)", flush=True)
    return {"best_val_auc": max(history), "last_val_auc": history[-1], "seconds": time.time() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vit_recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="a 2D MedMNIST .npz (default: BreastMNIST)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="recipe")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    outcome = run(args.data or data_file("breastmnist.npz"), args.config, args.epochs)
    print_result({"config": args.config, "epochs": args.epochs, **outcome})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
