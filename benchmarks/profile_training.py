"""Where a training step's time goes on CPU, and what the standard CPU levers change (issue 13 item 4).

    python -m benchmarks.profile_training [--data PATH.npz] [--batches 6] [--rounds 3] [--models resnet18,vit,resnet_tiny]
        [--variants fp32,bf16,fp32_cl,bf16_cl] [--batch-sizes 32] [--threads 1] [--inference]

For each model (a recipe teacher or a search student at the data's size) and each variant, a
few training steps of the teacher loop's own pieces (``medkd.teachers.loop``: its optimiser, loss
and augmentation) are timed per phase after one warm-up step: ``data`` (batch slicing and the
random flip/affine augmentation), ``forward`` (model + loss), ``backward``, ``optimizer``
(AdamW step, zero_grad). Variants: ``fp32``; ``bf16`` = ``torch.autocast("cpu",
dtype=torch.bfloat16)`` around forward and loss; ``_cl`` = ``channels_last`` model and inputs.
``--inference`` also times the soft-label pass (``medkd.teachers.loop.predict``'s forward, no
grad) per 1,000 images in the precisions of ``--variants`` (fp32 and/or bf16).

Prints one line per (model, variant, batch size, threads) and ends with ``RESULT`` naming the
ms per training image of each; short (seconds per line), for side-by-side comparison only, not
a throughput guarantee (the machine is shared: run the variants in one invocation, they take
turns).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._harness import data_file, load_average
from medkd.data import AugmentSpec, build_augmentation, load_dataset
from medkd.data.meta import DatasetMeta
from medkd.students.distill import DistillConfig, build_student
from medkd.teachers.loop import build_loss, build_optimizer, build_teacher_model
from medkd.teachers.recipe import teacher_recipe

PHASES = ("data", "forward", "backward", "optimizer")
VARIANTS = ("fp32", "bf16", "fp32_cl", "bf16_cl")
STUDENTS = {"resnet_tiny", "mobilenet_tiny"}


def build_model(name: str, meta: DatasetMeta, n_train: int, class_names: list[str]) -> tuple[torch.nn.Module, dict]:
    """The recipe's teacher ``name`` ("resnet18" / "vit") or a width-1 search student, and its training spec."""
    if name in STUDENTS:
        model = build_student(meta, DistillConfig(student=name, width=1.0))
        return model, {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4}
    recipe = teacher_recipe(n_train=n_train, class_names=class_names, image_size=list(meta.image_size))
    teacher = next(t for t in recipe if t["model"] == name)
    teacher.setdefault("model_kwargs", {})
    return build_teacher_model(teacher, meta), teacher


class StepTimer:
    """One (model, variant, batch size) set up once; :meth:`run` times some steps of it per phase."""

    def __init__(
        self, model: torch.nn.Module, spec: dict[str, Any], meta: DatasetMeta, *, variant: str, batch_size: int
    ) -> None:
        self.channels_last = variant.endswith("_cl")
        self.bf16 = variant.startswith("bf16")
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.model.train()
        self.optimizer = build_optimizer(self.model, spec)
        self.criterion = build_loss("classification", False, None, 0.1)
        self.augment = build_augmentation(
            AugmentSpec.model_validate(
                {"flip": 0.0, "affine": {"prob": 0.5, "rotate_degrees": 10, "scale": [0.9, 1.1], "translate": 0.05}}
            ),
            meta.spatial_dims,
            "classification",
            seed=0,
        )
        self.batch_size = batch_size
        self.rng = np.random.default_rng(0)

    def run(self, images: np.ndarray, labels: np.ndarray, batches: int) -> dict[str, float]:
        """Seconds per phase, summed over ``batches`` steps after one warm-up step."""
        totals = dict.fromkeys(PHASES, 0.0)
        for step in range(batches + 1):
            t0 = time.perf_counter()
            index = self.rng.integers(0, len(images), self.batch_size)
            x, y = torch.from_numpy(images[index]), torch.from_numpy(labels[index]).long()
            x, _ = self.augment(x, None)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            t1 = time.perf_counter()
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
            with autocast:
                loss = self.criterion(self.model(x), y)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
            if step:  # step 0 warms up (oneDNN primitive creation, caches)
                for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    totals[phase] += seconds
        return totals


@torch.no_grad()
def time_inference(model: torch.nn.Module, images: np.ndarray, *, bf16: bool, batch_size: int = 128) -> float:
    """Seconds per 1,000 images of a no-grad forward pass (as the soft-label stage), after a warm-up batch."""
    model.eval()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        model(torch.from_numpy(images[:batch_size]))
        started = time.perf_counter()
        for start in range(0, len(images), batch_size):
            model(torch.from_numpy(images[start : start + batch_size])).float()
    return (time.perf_counter() - started) * 1000 / len(images)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=data_file("organamnist.npz"))
    parser.add_argument("--batches", type=int, default=6, help="timed steps per round (after 1 warm-up step)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the variants take turns, medians are shown")
    parser.add_argument("--models", default="resnet18,vit,resnet_tiny")
    parser.add_argument("--variants", default="fp32,bf16")
    parser.add_argument("--batch-sizes", default="32")
    parser.add_argument("--threads", default="1", help="comma-separated torch intra-op thread counts")
    parser.add_argument("--inference", action="store_true", help="also time the soft-label forward pass")
    parser.add_argument("--inference-images", type=int, default=1024)
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dataset = load_dataset({"kind": "medmnist", "path": str(args.data)})
    meta = DatasetMeta.of(dataset)
    train = dataset.splits["train"]
    images, labels = train.images, train.labels.reshape(len(train.labels), -1)[:, 0]
    print(f"[profile] {args.data.name}: {len(images)} train images {tuple(images.shape[1:])}; load {load_average()}")
    per_image: dict[str, float] = {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name in args.models.split(","):
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                timers = {}
                for variant in args.variants.split(","):
                    torch.manual_seed(0)
                    model, spec = build_model(name, meta, len(images), list(dataset.class_names))
                    timers[variant] = StepTimer(model, spec, meta, variant=variant, batch_size=batch_size)
                # The variants take turns (rounds), so load from other processes hits them alike.
                rounds: dict[str, list[dict[str, float]]] = {variant: [] for variant in timers}
                for _ in range(args.rounds):
                    for variant, timer in timers.items():
                        rounds[variant].append(timer.run(images, labels, args.batches))
                n = args.batches * batch_size
                for variant, runs in rounds.items():
                    ms = {phase: statistics.median(1000 * r[phase] / n for r in runs) for phase in PHASES}
                    key = f"{name}_{variant}_b{batch_size}_t{threads}"
                    per_image[key] = statistics.median(1000 * sum(r.values()) / n for r in runs)
                    print(
                        f"[profile] {key}: {per_image[key]:.2f} ms/image, median of {args.rounds} rounds ("
                        + ", ".join(f"{p} {ms[p]:.2f}" for p in PHASES)
                        + f"); {len(images)} images -> {per_image[key] * len(images) / 1000 / 60:.1f} min/epoch",
                        flush=True,
                    )
            if args.inference and name not in STUDENTS:
                model, _ = build_model(name, meta, len(images), list(dataset.class_names))
                # Only the precisions asked for: on a CPU without native bf16 kernels, bf16 is emulated
                # and many times slower than fp32.
                precisions = {variant.startswith("bf16") for variant in args.variants.split(",")}
                times: dict[bool, list[float]] = {bf16: [] for bf16 in sorted(precisions)}
                for _ in range(args.rounds):
                    for bf16 in times:
                        times[bf16].append(time_inference(model, images[: args.inference_images], bf16=bf16))
                for bf16, runs in times.items():
                    key = f"infer_{name}_{'bf16' if bf16 else 'fp32'}_t{threads}"
                    per_image[key] = statistics.median(runs)
                    print(f"[profile] {key}: {per_image[key]:.3f} ms/image (forward, no grad, batch 128)", flush=True)
    print(f"[profile] load {load_average()}")
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in per_image.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
