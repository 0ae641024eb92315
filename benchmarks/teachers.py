"""Teacher quality on a real MedMNIST file: a CNN and a ViT teacher, and their ensemble.

Loads the ``.npz`` through medkd's data layer, trains both teachers through medkd's real teacher
stage (:func:`medkd.teachers.train.train_teachers`: one Ray Train ``TorchTrainer`` per teacher,
side by side on a local 2-CPU Ray cluster started here), and scores every teacher and the
ensemble (mean of the teachers' softmax) on the test split with :mod:`medkd.core.metrics`::

    python -m benchmarks.teachers --data ../shared/data/breastmnist.npz [--seeds 2] [--epochs auto]

Ends with ``RESULT best_teacher_auc=… best_teacher_acc=… ensemble_auc=… ensemble_acc=… wall_s=…``
(means over seeds). The "best teacher" of a seed is the one with the best *validation* AUC (the
test split is never used to choose), so its test numbers are what a user would get.

The recipe (:func:`teacher_recipe`) is the method, not numbers tuned to one file; it is the
same for every MedMNIST set and only reads properties of the data:

- budget: ``epochs = clamp(SAMPLE_BUDGET / (n_train * image_cost), MIN_EPOCHS, MAX_EPOCHS)`` —
  about the same compute for every set (a 5,000-image split at 28x28 gets 8 epochs, BreastMNIST's
  546 images 40), where :func:`image_cost` counts an image in 28x28 images (1 at 28x28, 5.2 at
  64x64, 28 for a 28^3 volume: convolutions cost per pixel), early stopping after ``patience = max(5, epochs // 4)`` epochs without a better
  validation AUC, and the best-validation-AUC checkpoint is the teacher;
- weight averaging: an exponential moving average of the weights over the last
  ``max(1, epochs / 10)`` epochs is what is validated, selected and used as the teacher (on a
  few dozen validation images, picking among raw per-epoch weights is mostly picking noise);
- AdamW (weight decay 0.05, none on biases / norms), cosine decay, label smoothing 0.1, plain
  (unweighted) cross-entropy, batch 32 — inverse-frequency class weights move the decision
  threshold towards the minority class, which costs accuracy and calibration (the ablation in
  ``benchmarks/RESULTS.md``); ``class_weighting: true`` in a spec turns them on;
- augmentation: random flips of every spatial axis — except when a class name is laterality
  specific ("left"/"right", e.g. OrganMNIST's kidney-left), where a flip would change the
  label — plus a small random affine (±10°, zoom 0.9–1.1, shift ≤ 5 %);
- models: ``resnet18`` (small stem at 28 px, as the MedMNIST v2 baseline) and a small ``vit``
  (4 blocks, width 128 — 132 in 3D, see :func:`vit_hidden_size` —, 4 heads, fixed sin-cos
  position embedding) on fine patches: the smallest patch giving at most 256 tokens
  (:func:`vit_patch_size`: 2 at 28 px, 14x14 tokens).

Splits larger than ``--max-train`` (default 5,000) / ``--max-val`` (2,000) are stratified
subsamples, so the command stays within the 30-minute budget on any 2D 28x28 MedMNIST set; the
test split is always used whole. 3D sets (28^3) cost far more per image: measured on 2 CPUs, the
3D ResNet-18 teacher (33 M parameters) took 320-380 s per epoch on 240 volumes, so the recipe's
epochs run for hours there without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
from medkd.data.meta import DatasetMeta

SAMPLE_BUDGET = 40_000  # training samples seen per teacher (before early stopping)
MIN_EPOCHS = 8
MAX_EPOCHS = 40
DEFAULT_MAX_TRAIN = 5_000
DEFAULT_MAX_VAL = 2_000
PAPER_BASELINES = {  # MedMNIST v2, ResNet-18 (28), test AUC / ACC (../shared/data/README.md)
    "breastmnist": (0.901, 0.863),
}


REFERENCE_PIXELS = 28 * 28  # budgets are counted in 28x28 images


def image_cost(image_size: tuple[int, ...] | list[int] | None) -> float:
    """What one image costs to train on, in 28x28 images: 1 at 28x28, 5.2 at 64x64, 28 for 28^3."""
    if image_size is None:
        return 1.0
    if not image_size or any(int(side) <= 0 for side in image_size):
        raise ValueError(f"image_size must be positive sides, got {list(image_size)}")
    return math.prod(int(side) for side in image_size) / REFERENCE_PIXELS


def auto_epochs(n_train: int, image_size: tuple[int, ...] | list[int] | None = None) -> int:
    """Epochs for a training split of ``n_train`` images of ``image_size`` (see the module docstring)."""
    if n_train <= 0:
        raise ValueError(f"n_train must be > 0, got {n_train}")
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, round(SAMPLE_BUDGET / (n_train * image_cost(image_size))))))


def laterality_specific(class_names: list[str]) -> bool:
    """Whether a class name says left or right, so mirroring an image could change its label."""
    words = " ".join(class_names).lower().replace("-", " ").replace("_", " ").split()
    return any(word in ("left", "right") for word in words)


def vit_patch_size(image_size: tuple[int, ...] | list[int]) -> int:
    """The smallest patch in (2, 4, 8, 16, 32) that divides every axis and gives at most 256 tokens
    in 2D (512 in 3D): 2 for 28x28 (14x14 tokens), 4 for 64x64 or 28^3, 16 for 224x224.

    Small images need small patches: a 4x4 patch leaves a 28x28 image 49 tokens and a ViT
    trained from scratch on a few hundred images then barely leaves chance level (measured on
    BreastMNIST: val AUC 0.70 after 17 epochs with patch 4, 0.85 with patch 2).
    """
    budget = 256 if len(image_size) == 2 else 512
    for patch in (2, 4, 8, 16, 32):
        if all(size % patch == 0 for size in image_size) and math.prod(size // patch for size in image_size) <= budget:
            return patch
    raise ValueError(f"no patch size in (2, 4, 8, 16, 32) fits image_size {list(image_size)}")


VIT_HEADS = 4
VIT_WIDTH = 128


def vit_hidden_size(spatial_dims: int, width: int = VIT_WIDTH, heads: int = VIT_HEADS) -> int:
    """The recipe ViT's token width: ``width`` rounded up to a multiple of the heads and of the
    sin-cos position embedding's ``2 * spatial_dims`` (a sin and a cos per axis): 128 in 2D,
    132 in 3D (MONAI's 3D sin-cos embedding needs a width divisible by 6).
    """
    step = math.lcm(heads, 2 * spatial_dims)
    return -(-width // step) * step


def teacher_recipe(
    *,
    n_train: int,
    class_names: list[str],
    image_size: tuple[int, ...] | list[int],
    epochs: int | None = None,
    cnn: str = "resnet18",
    vit: str = "vit",
    cpus_per_worker: float = 1.0,
) -> list[dict[str, Any]]:
    """The two teacher specs (``teachers:`` entries of a job spec) for a classification set.

    Args:
        n_train: size of the training split (sets the epoch budget when ``epochs`` is None).
        class_names: the dataset's class names (laterality-specific names disable flips).
        image_size: the images' spatial size (sets the ViT's patch size and, with ``n_train``,
            the epoch budget).
        epochs: fixed epochs instead of :func:`auto_epochs`.
        cnn: registry name of the CNN teacher.
        vit: registry name of the ViT teacher (its size is set here when it is ``vit``).
        cpus_per_worker: CPUs of each teacher's single Ray Train worker.
    """
    epochs = auto_epochs(n_train, image_size) if epochs is None else epochs
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    augment: dict[str, Any] = {
        "flip": 0.0 if laterality_specific(class_names) else 0.5,
        "affine": {"prob": 0.5, "rotate_degrees": 10, "scale": [0.9, 1.1], "translate": 0.05},
    }
    common = {
        "epochs": epochs,
        "batch_size": 32,
        "optimizer": "adamw",
        "weight_decay": 0.05,
        "scheduler": "cosine",
        "label_smoothing": 0.1,
        "class_weighting": False,
        "patience": max(5, epochs // 4),
        "ema_epochs": max(1.0, epochs / 10),
        "augment": augment,
        "cpus_per_worker": cpus_per_worker,
    }
    vit_kwargs: dict[str, Any] = {"patch_size": vit_patch_size(image_size), "pos_embed_type": "sincos"}
    if vit == "vit":  # a small, fine-grained ViT: many tokens, few layers (CPU-sized)
        vit_kwargs.update({"hidden_size": vit_hidden_size(len(image_size)), "mlp_dim": 256, "num_layers": 4,
                           "num_heads": VIT_HEADS})
    return [
        {"name": "cnn", "model": cnn, "lr": 1e-3, **common},
        {"name": "vit", "model": vit, "model_kwargs": vit_kwargs, "lr": 5e-4, **common},
    ]


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def run_seed(
    seed: int, *, dataset: Any, data_ref: Any, teachers: list[dict[str, Any]], output_dir: Path, progress: Any
) -> dict[str, Any]:
    """Train both teachers for one seed; returns per-teacher and ensemble metrics."""
    import torch

    from medkd.core.metrics import classification_metrics, ensemble_probabilities, probabilities
    from medkd.spec.job import parse_spec
    from medkd.teachers.loop import predict
    from medkd.teachers.train import load_teacher_model, train_teachers

    spec = parse_spec({
        "name": f"bench-teachers-{dataset.name}-s{seed}",
        "task": "classification",
        "seed": seed,
        "data": {"kind": "synthetic"},  # placeholder: the dataset is passed in already loaded
        "teachers": teachers,
        "output_dir": str(output_dir),
    })
    meta = DatasetMeta.of(dataset)
    started = time.perf_counter()
    artifacts, _ = train_teachers(
        spec, dataset, data_ref, output_dir=output_dir, storage_path=str(output_dir / "ray"), progress=progress
    )
    train_wall = time.perf_counter() - started

    torch.set_num_threads(2)
    test_x, test_y = dataset.splits["test"].images, dataset.splits["test"].labels
    multilabel = dataset.multilabel
    rows, test_logits = [], []
    for artifact in artifacts:
        logits = predict(load_teacher_model(artifact, meta), test_x, 256, torch.device("cpu"))
        test_logits.append(logits)
        metrics = classification_metrics(probabilities(logits, multilabel=multilabel), test_y, multilabel=multilabel)
        rows.append({
            "teacher": artifact.name, "model": artifact.model, "params": artifact.params,
            "epochs_run": artifact.epochs_run, "best_epoch": artifact.best_epoch, "val_auc": artifact.best_val,
            "test_auc": metrics["auc"], "test_acc": metrics["acc"], "test_f1": metrics["f1_macro"],
            "test_ece": metrics["ece"], "train_s": artifact.train_seconds,
        })
    ensemble = classification_metrics(ensemble_probabilities(test_logits, multilabel=multilabel), test_y, multilabel=multilabel)
    best = max(rows, key=lambda row: row["val_auc"])
    return {
        "seed": seed,
        "teachers": rows,
        "best_teacher": best["teacher"],
        "best_teacher_auc": best["test_auc"],
        "best_teacher_acc": best["test_acc"],
        "ensemble_auc": ensemble["auc"],
        "ensemble_acc": ensemble["acc"],
        "ensemble_f1": ensemble["f1_macro"],
        "ensemble_ece": ensemble["ece"],
        "train_wall_s": train_wall,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    header = f"{'seed':>4}  {'model':<10} {'params':>8} {'epochs':>7} {'best':>5} {'val AUC':>8} {'test AUC':>9} {'test ACC':>9} {'F1':>6} {'ECE':>6} {'train s':>8}"
    print(header)
    print("-" * len(header))
    for result in results:
        for row in result["teachers"]:
            print(
                f"{result['seed']:>4}  {row['model']:<10} {row['params'] / 1e6:>7.2f}M {row['epochs_run']:>7} "
                f"{row['best_epoch']:>5} {row['val_auc']:>8.3f} {row['test_auc']:>9.3f} {row['test_acc']:>9.3f} "
                f"{row['test_f1']:>6.3f} {row['test_ece']:>6.3f} {row['train_s']:>8.0f}"
            )
        print(
            f"{result['seed']:>4}  {'ensemble':<10} {'':>8} {'':>7} {'':>5} {'':>8} {result['ensemble_auc']:>9.3f} "
            f"{result['ensemble_acc']:>9.3f} {result['ensemble_f1']:>6.3f} {result['ensemble_ece']:>6.3f} "
            f"{result['train_wall_s']:>8.0f}"
        )
    if len(results) > 1:
        print("-" * len(header))
        models = [row["model"] for row in results[0]["teachers"]]
        for i, model in enumerate(models):
            aucs = [r["teachers"][i]["test_auc"] for r in results]
            accs = [r["teachers"][i]["test_acc"] for r in results]
            print(f"mean  {model:<10} test AUC {_mean_spread(aucs)}  test ACC {_mean_spread(accs)}")
        print(f"mean  {'ensemble':<10} test AUC {_mean_spread([r['ensemble_auc'] for r in results])}  "
              f"test ACC {_mean_spread([r['ensemble_acc'] for r in results])}")
        print(f"mean  {'best (val)':<10} test AUC {_mean_spread([r['best_teacher_auc'] for r in results])}  "
              f"test ACC {_mean_spread([r['best_teacher_acc'] for r in results])}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.teachers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="a MedMNIST v2 .npz file (2D or 3D)")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (0, 1, ...); reports mean ± std")
    parser.add_argument("--epochs", default="auto", help="'auto' (sample budget, see module docs) or an int")
    parser.add_argument("--cnn", default="resnet18", help="CNN teacher registry name")
    parser.add_argument("--vit", default="vit", help="ViT teacher registry name")
    parser.add_argument("--class-weighting", action="store_true",
                        help="ablation: inverse-frequency class weights in the loss (off in the recipe)")
    parser.add_argument("--max-train", type=int, default=DEFAULT_MAX_TRAIN, help="stratified cap of the train split (0: all)")
    parser.add_argument("--max-val", type=int, default=DEFAULT_MAX_VAL, help="stratified cap of the val split (0: all)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--output", type=Path, default=None, help="keep checkpoints here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.seeds <= 0:
        parser.error("--seeds must be >= 1")
    if args.epochs != "auto":
        try:
            args.epochs = int(args.epochs)
        except ValueError:
            parser.error(f"--epochs must be 'auto' or a positive integer, got {args.epochs!r}")
        if args.epochs <= 0:
            parser.error(f"--epochs must be 'auto' or a positive integer, got {args.epochs}")
    else:
        args.epochs = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall_started = time.perf_counter()

    import ray

    from medkd.data import MedMNISTDataSpec, load_dataset
    from medkd.data.medmnist import medmnist_flag
    from medkd.core.progress import Progress

    progress = Progress()
    dataset = load_dataset(MedMNISTDataSpec(path=args.data.resolve()))  # every data problem is reported here, before Ray starts
    if dataset.task != "classification":
        raise SystemExit(f"{args.data}: benchmarks.teachers needs a classification set, got {dataset.task}")
    caps = {split: cap for split, cap in (("train", args.max_train), ("val", args.max_val)) if cap and len(dataset.splits[split]) > cap}
    if caps:
        dataset = dataset.subset(caps, seed=0)
    sizes = {name: len(split) for name, split in dataset.splits.items()}
    teachers = teacher_recipe(n_train=sizes["train"], class_names=dataset.class_names, image_size=dataset.image_size,
                              epochs=args.epochs, cnn=args.cnn, vit=args.vit)
    if args.class_weighting:  # ablation: inverse-frequency class weights in the loss
        teachers = [{**teacher, "class_weighting": True} for teacher in teachers]
    progress.line(
        f"{dataset.name}: {sizes} ({'subsampled ' + str(caps) if caps else 'full splits'}), {dataset.num_classes} classes, "
        f"{'multi-label' if dataset.multilabel else 'single-label'}, image {list(dataset.image_size)}x{dataset.in_channels}ch; "
        f"epochs {teachers[0]['epochs']} (patience {teachers[0]['patience']}), flips {'on' if teachers[0]['augment']['flip'] else 'off'}"
    )

    started = time.perf_counter()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})
    progress.line(f"ray.init: {time.perf_counter() - started:.1f}s")
    results = []
    try:
        data_ref = ray.put(dataset.arrays())
        with tempfile.TemporaryDirectory(prefix="medkd-bench-teachers-") as tmp:
            root = args.output.resolve() if args.output else Path(tmp)
            for seed in range(args.seeds):
                progress.line(f"== seed {seed} ==")
                results.append(run_seed(seed, dataset=dataset, data_ref=data_ref, teachers=teachers,
                                        output_dir=root / f"seed{seed}", progress=progress))
                r = results[-1]
                progress.line(f"seed {seed}: best teacher ({r['best_teacher']}) test AUC {r['best_teacher_auc']:.3f} "
                              f"ACC {r['best_teacher_acc']:.3f}; ensemble AUC {r['ensemble_auc']:.3f} ACC {r['ensemble_acc']:.3f}")
    finally:
        ray.shutdown()
    wall = time.perf_counter() - wall_started

    print()
    print(f"dataset {dataset.name} ({args.data}), splits {sizes}, seeds {args.seeds}, wall {wall:.0f}s")
    print_table(results)
    baseline = PAPER_BASELINES.get(medmnist_flag(args.data))
    if baseline:
        print(f"MedMNIST v2 ResNet-18 (28) test: AUC {baseline[0]:.3f} / ACC {baseline[1]:.3f}")
    summary = {key: statistics.mean(r[key] for r in results) for key in ("best_teacher_auc", "best_teacher_acc", "ensemble_auc", "ensemble_acc")}
    if args.json:
        args.json.write_text(json.dumps({"data": str(args.data), "sizes": sizes, "teachers": teachers, "results": results,
                                         "summary": summary, "wall_s": wall}, indent=2, default=float))
    fields = " ".join(f"{key}={value:.4f}" for key, value in summary.items())
    print(f"RESULT {fields} wall_s={wall:.0f}")
    return 0 if all(math.isfinite(v) for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
