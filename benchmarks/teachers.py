"""Teacher quality on a real MedMNIST file: the recipe's teachers (a CNN and a ViT, or any registry
names), their ensemble, and what each one adds to it on val.

Loads the ``.npz`` through medkd's data layer, trains both teachers through medkd's real teacher
stage (:func:`medkd.teachers.train.train_teachers`: one Ray Train ``TorchTrainer`` per teacher,
side by side on a local 2-CPU Ray cluster started here), and scores every teacher and the
ensemble (mean of the teachers' softmax) on the test split with :mod:`medkd.core.metrics`::

    python -m benchmarks.teachers --data ../shared/data/breastmnist.npz [--seeds 2] [--epochs auto]
        [--models resnet18,efficientnet_b0,vit]

Ends with ``RESULT best_teacher_auc=… best_teacher_acc=… ensemble_auc=… ensemble_acc=…
kept_ensemble_auc=… kept_ensemble_acc=… wall_s=…`` (means over seeds). The "best teacher" of a
seed is the one with the best *validation* AUC (the test split is never used to choose), so its
test numbers are what a user would get. Each teacher's contribution is the val leave-one-out
table the pipeline reports (:func:`medkd.core.contribution.leave_one_out`), and the "kept"
ensemble is the one ``search.teacher_selection: val_contribution``
(:func:`medkd.registry.teacher_selection.select_teachers`) would distill from; its test figures
are read after val decided.

``--models`` takes registry names: a CNN (``resnet18``, ``densenet121``, ``efficientnet_b0``, …)
trains with the recipe CNN's settings, a ViT with the recipe ViT's, so a comparison changes the
architecture only.

The teachers are :func:`medkd.teachers.recipe.teacher_recipe`'s (see that module for the
recipe: epoch budget, early stopping, weight averaging, optimiser, augmentation and models);
it is the same for every MedMNIST set and only reads properties of the data.

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
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import configure_local_ray, format_mean_std, local_ray, print_result

configure_local_ray()  # before anything below imports Ray

import torch  # noqa: E402

from medkd.core.contribution import leave_one_out  # noqa: E402
from medkd.core.metrics import classification_metrics, ensemble_probabilities  # noqa: E402
from medkd.core.progress import Progress  # noqa: E402
from medkd.data import MedMNISTDataSpec, load_dataset  # noqa: E402
from medkd.data.medmnist import medmnist_flag  # noqa: E402
from medkd.data.meta import DatasetMeta  # noqa: E402
from medkd.registry.teacher_selection import select_teachers  # noqa: E402
from medkd.spec.job import parse_spec  # noqa: E402
from medkd.teachers.loop import predict  # noqa: E402
from medkd.teachers.recipe import teacher_recipe  # noqa: E402
from medkd.teachers.registry import list_teachers, teacher_family  # noqa: E402
from medkd.teachers.train import load_teacher_model, train_teachers  # noqa: E402

DEFAULT_MODELS = "resnet18,vit"

DEFAULT_MAX_TRAIN = 5_000
DEFAULT_MAX_VAL = 2_000
PAPER_BASELINES = {  # MedMNIST v2, ResNet-18 (28), test AUC / ACC (../shared/data/README.md)
    "breastmnist": (0.901, 0.863),
    "bloodmnist": (0.998, 0.958),
}


def teacher_specs(
    models: list[str], *, n_train: int, class_names: list[str], image_size: list[int], epochs: int | None
) -> list[dict[str, Any]]:
    """One recipe teacher spec per registry name, named after it: a CNN gets the recipe CNN's
    training settings, a ViT the recipe ViT's (:func:`medkd.teachers.recipe.teacher_recipe`).

    Raises:
        SystemExit: an unknown or repeated name, or a segmentation (U-Net family) teacher.
    """
    if len(set(models)) != len(models):
        raise SystemExit(f"--models {','.join(models)}: a teacher is named twice")
    classifiers = list_teachers("cnn") + list_teachers("vit")
    specs = []
    for model in models:
        if model not in classifiers:
            raise SystemExit(f"--models: {model!r} is not a classification teacher (known: {', '.join(classifiers)})")
        family = teacher_family(model)
        cnn, vit = teacher_recipe(
            n_train=n_train,
            class_names=class_names,
            image_size=image_size,
            epochs=epochs,
            **({"cnn": model} if family == "cnn" else {"vit": model}),
        )
        specs.append({**(cnn if family == "cnn" else vit), "name": model})
    return specs


def score_teachers(
    val_logits: dict[str, Any],
    val_labels: Any,
    test_logits: dict[str, Any],
    test_labels: Any,
    *,
    multilabel: bool = False,
) -> dict[str, Any]:
    """Val first: each teacher's val figures, its leave-one-out contribution and the teachers the
    val rule keeps; then test: each teacher, the whole ensemble and the kept one.

    Returns ``{"teachers": {name: {"val_auc", "val_acc", "contribution", "test_auc", "test_acc",
    "test_f1", "test_ece"}}, "ensemble": {...}, "kept": [...], "kept_ensemble": {...},
    "selection": TeacherSelection as a dict}``.
    """

    def metrics(logits: list[Any], labels: Any) -> dict[str, float]:
        found = classification_metrics(
            ensemble_probabilities(logits, multilabel=multilabel), labels, multilabel=multilabel
        )
        return {key: float(found[key]) for key in ("auc", "acc", "f1_macro", "ece")}

    contributions = leave_one_out(val_logits, val_labels, multilabel=multilabel)
    selection = select_teachers(val_logits, val_labels, multilabel=multilabel)
    teachers = {}
    for name in val_logits:
        val, test = metrics([val_logits[name]], val_labels), metrics([test_logits[name]], test_labels)
        teachers[name] = {
            "val_auc": val["auc"],
            "val_acc": val["acc"],
            "contribution": contributions["teachers"][name]["contribution"],
            **{f"test_{key}": value for key, value in test.items()},
        }
    return {
        "teachers": teachers,
        "ensemble": {"val": contributions["all"], "test": metrics(list(test_logits.values()), test_labels)},
        "kept": selection.kept,
        "kept_ensemble": metrics([test_logits[name] for name in selection.kept], test_labels),
        "selection": selection.model_dump(),
    }


def run_seed(
    seed: int, *, dataset: Any, data_ref: Any, teachers: list[dict[str, Any]], output_dir: Path, progress: Any
) -> dict[str, Any]:
    """Train the teachers for one seed; returns each teacher's and the ensembles' metrics (:func:`score_teachers`)."""
    spec = parse_spec(
        {
            "name": f"bench-teachers-{dataset.name}-s{seed}",
            "task": "classification",
            "seed": seed,
            "data": {"kind": "synthetic"},  # placeholder: the dataset is passed in already loaded
            "teachers": teachers,
            "output_dir": str(output_dir),
        }
    )
    meta = DatasetMeta.of(dataset)
    started = time.perf_counter()
    artifacts, _ = train_teachers(
        spec, dataset, data_ref, output_dir=output_dir, storage_path=str(output_dir / "ray"), progress=progress
    )
    train_wall = time.perf_counter() - started

    torch.set_num_threads(2)
    splits = {name: (dataset.splits[name].images, dataset.splits[name].labels) for name in ("val", "test")}
    logits: dict[str, dict[str, Any]] = {"val": {}, "test": {}}
    for artifact in artifacts:
        model = load_teacher_model(artifact, meta)
        for split, (images, _) in splits.items():
            logits[split][artifact.name] = predict(model, images, 256, torch.device("cpu"))
    scores = score_teachers(
        logits["val"], splits["val"][1], logits["test"], splits["test"][1], multilabel=dataset.multilabel
    )
    rows = [
        {
            "teacher": artifact.name,
            "model": artifact.model,
            "params": artifact.params,
            "epochs_run": artifact.epochs_run,
            "best_epoch": artifact.best_epoch,
            "train_s": artifact.train_seconds,
            **scores["teachers"][artifact.name],
        }
        for artifact in artifacts
    ]
    best = max(rows, key=lambda row: row["val_auc"])
    ensemble, kept = scores["ensemble"]["test"], scores["kept_ensemble"]
    return {
        "seed": seed,
        "teachers": rows,
        "best_teacher": best["teacher"],
        "best_teacher_auc": best["test_auc"],
        "best_teacher_acc": best["test_acc"],
        "ensemble_val_auc": scores["ensemble"]["val"]["auc"],
        "ensemble_val_acc": scores["ensemble"]["val"]["acc"],
        "ensemble_auc": ensemble["auc"],
        "ensemble_acc": ensemble["acc"],
        "ensemble_f1": ensemble["f1_macro"],
        "ensemble_ece": ensemble["ece"],
        "kept": scores["kept"],
        "kept_ensemble_auc": kept["auc"],
        "kept_ensemble_acc": kept["acc"],
        "selection": scores["selection"],
        "train_wall_s": train_wall,
    }


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def print_table(results: list[dict[str, Any]]) -> None:
    """Per seed: each teacher (val, its val contribution to the ensemble, test) and the ensembles."""
    header = (
        f"{'seed':>4}  {'model':<16} {'params':>8} {'epochs':>6} {'best':>4} {'val AUC':>8} {'val ACC':>8} "
        f"{'+AUC val':>9} {'+ACC val':>9} {'test AUC':>9} {'test ACC':>9} {'ECE':>6} {'train s':>8}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        for row in result["teachers"]:
            gain = row["contribution"] or {}
            print(
                f"{result['seed']:>4}  {row['model']:<16} {row['params'] / 1e6:>7.2f}M {row['epochs_run']:>6} "
                f"{row['best_epoch']:>4} {row['val_auc']:>8.4f} {row['val_acc']:>8.4f} {_signed(gain.get('auc')):>9} "
                f"{_signed(gain.get('acc')):>9} {row['test_auc']:>9.4f} {row['test_acc']:>9.4f} "
                f"{row['test_ece']:>6.3f} {row['train_s']:>8.0f}"
            )
        print(
            f"{result['seed']:>4}  {'ensemble (all)':<16} {'':>8} {'':>6} {'':>4} {result['ensemble_val_auc']:>8.4f} "
            f"{result['ensemble_val_acc']:>8.4f} {'':>9} {'':>9} {result['ensemble_auc']:>9.4f} "
            f"{result['ensemble_acc']:>9.4f} {result['ensemble_ece']:>6.3f} {result['train_wall_s']:>8.0f}"
        )
        print(
            f"{result['seed']:>4}  {'ensemble (kept)':<16} kept on val: {', '.join(result['kept'])}; "
            f"test AUC {result['kept_ensemble_auc']:.4f}, ACC {result['kept_ensemble_acc']:.4f}"
        )
    print("+AUC / +ACC val: the ensemble's val figure with the teacher minus without it (positive: it helps).")
    if len(results) > 1:
        print("-" * len(header))
        models = [row["model"] for row in results[0]["teachers"]]
        for i, model in enumerate(models):
            aucs = [r["teachers"][i]["test_auc"] for r in results]
            accs = [r["teachers"][i]["test_acc"] for r in results]
            print(f"mean  {model:<16} test AUC {format_mean_std(aucs)}  test ACC {format_mean_std(accs)}")
        for label, prefix in (
            ("ensemble", "ensemble"),
            ("kept (val)", "kept_ensemble"),
            ("best (val)", "best_teacher"),
        ):
            print(
                f"mean  {label:<16} test AUC {format_mean_std([r[prefix + '_auc'] for r in results])}  "
                f"test ACC {format_mean_std([r[prefix + '_acc'] for r in results])}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.teachers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="a MedMNIST v2 .npz file (2D or 3D)")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (0, 1, ...); reports mean ± std")
    parser.add_argument("--epochs", default="auto", help="'auto' (sample budget, see module docs) or an int")
    parser.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help="comma-separated teacher registry names, e.g. resnet18,efficientnet_b0,vit (default: %(default)s)",
    )
    parser.add_argument(
        "--class-weighting",
        action="store_true",
        help="ablation: inverse-frequency class weights in the loss (off in the recipe)",
    )
    parser.add_argument(
        "--max-train", type=int, default=DEFAULT_MAX_TRAIN, help="stratified cap of the train split (0: all)"
    )
    parser.add_argument("--max-val", type=int, default=DEFAULT_MAX_VAL, help="stratified cap of the val split (0: all)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--output", type=Path, default=None, help="keep checkpoints here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    if not args.models:
        parser.error("--models must name at least one teacher")
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
    progress = Progress()
    dataset = load_dataset(
        MedMNISTDataSpec(path=args.data.resolve())
    )  # every data problem is reported here, before Ray starts
    if dataset.task != "classification":
        raise SystemExit(f"{args.data}: benchmarks.teachers needs a classification set, got {dataset.task}")
    caps = {
        split: cap
        for split, cap in (("train", args.max_train), ("val", args.max_val))
        if cap and len(dataset.splits[split]) > cap
    }
    if caps:
        dataset = dataset.subset(caps, seed=0)
    sizes = {name: len(split) for name, split in dataset.splits.items()}
    teachers = teacher_specs(
        args.models,
        n_train=sizes["train"],
        class_names=list(dataset.class_names),
        image_size=list(dataset.image_size),
        epochs=args.epochs,
    )
    if args.class_weighting:  # ablation: inverse-frequency class weights in the loss
        teachers = [{**teacher, "class_weighting": True} for teacher in teachers]
    progress.line(
        f"{dataset.name}: {sizes} ({'subsampled ' + str(caps) if caps else 'full splits'}), {dataset.num_classes} classes, "
        f"{'multi-label' if dataset.multilabel else 'single-label'}, image {list(dataset.image_size)}x{dataset.in_channels}ch; "
        f"epochs {teachers[0]['epochs']} (patience {teachers[0]['patience']}), flips {'on' if teachers[0]['augment']['flip'] else 'off'}"
    )

    started = time.perf_counter()
    results = []
    with local_ray(num_cpus=args.num_cpus) as ray:
        progress.line(f"ray.init: {time.perf_counter() - started:.1f}s")
        data_ref = ray.put(dataset.arrays())
        with tempfile.TemporaryDirectory(prefix="medkd-bench-teachers-") as tmp:
            root = args.output.resolve() if args.output else Path(tmp)
            for seed in range(args.seeds):
                progress.line(f"== seed {seed} ==")
                results.append(
                    run_seed(
                        seed,
                        dataset=dataset,
                        data_ref=data_ref,
                        teachers=teachers,
                        output_dir=root / f"seed{seed}",
                        progress=progress,
                    )
                )
                r = results[-1]
                progress.line(
                    f"seed {seed}: best teacher ({r['best_teacher']}) test AUC {r['best_teacher_auc']:.3f} "
                    f"ACC {r['best_teacher_acc']:.3f}; ensemble AUC {r['ensemble_auc']:.3f} ACC {r['ensemble_acc']:.3f}; "
                    f"kept on val: {', '.join(r['kept'])}"
                )
    wall = time.perf_counter() - wall_started

    print()
    print(f"dataset {dataset.name} ({args.data}), splits {sizes}, seeds {args.seeds}, wall {wall:.0f}s")
    print_table(results)
    baseline = PAPER_BASELINES.get(medmnist_flag(args.data))
    if baseline:
        print(f"MedMNIST v2 ResNet-18 (28) test: AUC {baseline[0]:.3f} / ACC {baseline[1]:.3f}")
    summary = {
        key: statistics.mean(r[key] for r in results)
        for key in (
            "best_teacher_auc",
            "best_teacher_acc",
            "ensemble_auc",
            "ensemble_acc",
            "kept_ensemble_auc",
            "kept_ensemble_acc",
        )
    }
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "data": str(args.data),
                    "sizes": sizes,
                    "teachers": teachers,
                    "results": results,
                    "summary": summary,
                    "wall_s": wall,
                },
                indent=2,
                default=float,
            )
        )
    print_result({**summary, "wall_s": f"{wall:.0f}"})
    return 0 if all(math.isfinite(v) for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
