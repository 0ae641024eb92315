"""Pixel-wise KD for segmentation: a small U-Net student vs its U-Net teacher, with and without KD.

    python -m benchmarks.seg_students [--image-size 64] [--num-train 512] [--num-test 512] [--seeds 3]
        [--teacher-epochs 60] [--student-epochs 120] [--width 0.5] [--depth 1] [--alpha 0.5] [--temperature 2]
        [--lr 3e-3] [--quantize int8_static] [--spec examples/segmentation.yaml]
        [--output runs/bench-seg-students] [--set KEY=VALUE ...]

One process, one local Ray cluster of **1 CPU**, one managed redis-server holding the soft-label
cache (its data under ``--output``, so a re-run finds the teacher and its logits):

1. **Data**: medkd's synthetic 2D segmentation set of ``examples/segmentation.yaml`` (4 classes:
   background + 3 object classes, difficulty 0.5), loaded with ``load_dataset`` from the spec's
   ``data`` section (``--image-size`` / ``--num-*`` override it; the test split defaults to 512
   images, not the spec's 128, whose test Dice is too noisy to compare students 1 point apart).
2. **Teacher**: the spec's ``unet`` teacher (MONAI UNet, residual units, batch norm, Dice+CE,
   a small affine augmentation, best-val-Dice checkpoint) trained through medkd's real teacher stage
   (:func:`medkd.teachers.train.train_teachers`: a Ray Train ``TorchTrainer``, 1 worker, 1 CPU);
   its per-pixel logits for every split are cached by
   :func:`medkd.softlabels.compute.cache_teacher_logits` in the :class:`SoftLabelCache`
   (float16, as the spec says). The teacher's test Dice is scored from its cached test logits.
   With ``cache.views: K`` in the spec (the example has 16), its logits on K augmented views of
   train (``search.augment``) are cached too (FKD).
3. **Students**: ``unet_small`` at ``--width`` (parameters at most 1/5 of the teacher's at the
   default) distilled with the ``pixel_kd`` loss through the search's own recipe
   (:func:`medkd.search.recipe.train_candidate`: distill -> prune (none) -> ONNX -> INT8 static
   QDQ), for each seed once **with KD** (``--alpha`` hard-loss weight, ``--temperature``,
   ``mean`` aggregation; teacher logits read per batch from Redis, never from a teacher) and once
   **without KD** (``alpha = 1``: Dice+CE only, ``teacher_logits=None``), same seed = same initial
   weights. With cached views, the KD student trains on them (each view's own pixel logits, the
   mask moved with the image) as a search trial does, and the no-KD student on online
   augmentation with the same ``search.augment``, so both see augmented data. Each is scored on test as exported and compressed (what the search and the
   server use); the FP32 ONNX export is scored too, to show the quantization cost.
   Students run in the driver, one after the other, 1 torch thread.

Dice everywhere is :func:`medkd.core.metrics.segmentation_metrics`' ``dice``: argmax masks,
per-class Dice averaged over images (images where a class is absent from both prediction and
truth are skipped), then averaged over the 3 foreground classes.

Ends with ``RESULT teacher_dice=… student_kd_dice=… student_ce_dice=… dice_gap=… kd_gain_dice=…
param_ratio=…``. All Dice values, ``dice_gap`` (teacher − KD student) and ``kd_gain_dice``
(KD student − no-KD student) are **fractions** (0.02 = 2 Dice points); student Dice values are
means over seeds; ``param_ratio`` = student parameters / teacher parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import PASSWORD_ENV, configure_local_ray, managed_redis, mean_std
from medkd.data.meta import DatasetMeta

configure_local_ray()

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = REPO_ROOT / "examples" / "segmentation.yaml"
DEFAULT_OUTPUT = REPO_ROOT / "runs" / "bench-seg-students"
TEACHER_NAME = "unet"
STUDENT = "unet_small"
MAX_PARAM_RATIO = 0.2  # the budget: at most 1/5 of the teacher's parameters
TARGET_GAP = 0.02  # ... within 2 Dice points of the teacher
QUANTIZE_CHOICES = ("int8_static", "int8_dynamic", "fp16", "none")


def log(message: str) -> None:
    print(f"[seg_students {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- spec


def build_spec(args: argparse.Namespace, redis_port: int) -> Any:
    """``--spec`` with this benchmark's data sizes, its one teacher, a 1-CPU Ray and its cache."""
    from medkd.spec.job import JobSpec, SpecError, load_spec, parse_override

    overrides: dict[str, Any] = {
        "name": "bench-seg-students",
        "data.image_size": args.image_size,
        "data.num_train": args.num_train,
        "data.num_val": args.num_val,
        "data.num_test": args.num_test,
        "output_dir": str(Path(args.output).resolve()),
        "cache.redis_url": f"redis://127.0.0.1:{redis_port}/0",
        "cache.password_env": PASSWORD_ENV,
        "ray.num_cpus": 1,
        "serve.enabled": False,
    }
    for text in args.set or []:
        key, value = parse_override(text)
        overrides[key] = value
    spec = load_spec(args.spec, overrides)
    if spec.task != "segmentation":
        raise SpecError(f"{args.spec}: task is {spec.task!r}; this benchmark needs a segmentation spec")
    teachers = [t for t in spec.teachers if t.name == TEACHER_NAME]
    if not teachers:
        raise SpecError(f"{args.spec}: no teacher named {TEACHER_NAME!r} (found {[t.name for t in spec.teachers]})")
    raw = spec.model_dump(mode="json")
    raw["teachers"] = [
        teachers[0]
        .model_copy(update={"epochs": args.teacher_epochs, "cpus_per_worker": 1.0, "num_workers": 1})
        .model_dump(mode="json")
    ]
    return JobSpec.model_validate(raw)  # re-validated with the one teacher


# --------------------------------------------------------------------------- teacher


def teacher_stage(spec: Any, dataset: Any, meta: DatasetMeta, cache: Any, progress: Any) -> dict[str, Any]:
    """Train (or find) the teacher with Ray Train, cache its logits, score it from the cache."""
    import ray

    from medkd.softlabels.compute import cache_teacher_logits, cache_view_logits
    from medkd.students.distill import evaluate_logits
    from medkd.teachers.train import train_teachers

    output_dir = Path(spec.output_dir)
    data_ref = ray.put({name: (s.images, s.labels) for name, s in dataset.splits.items()})
    started = time.perf_counter()
    artifacts, status = train_teachers(
        spec, dataset, data_ref, output_dir=output_dir, storage_path=str(output_dir / "ray"), progress=progress
    )
    train_seconds = time.perf_counter() - started
    options = {"encoding": spec.cache.encoding, "compression": spec.cache.compression, "topk": spec.cache.topk}
    started = time.perf_counter()
    report = cache_teacher_logits(
        cache,
        artifacts,
        dataset_fp=dataset.fingerprint,
        meta=meta,
        data_ref=data_ref,
        cache_options=options,
        progress=progress,
    )
    views = None
    if spec.cache.views:
        # FKD for segmentation: the teacher's pixel logits on augmented views of train, so the
        # KD student trains on augmented images with targets that moved with them.
        views = cache_view_logits(
            cache,
            artifacts,
            dataset_fp=dataset.fingerprint,
            meta=meta,
            data_ref=data_ref,
            num_train=len(dataset.splits["train"].images),
            views=spec.cache.views,
            augment=spec.search.augment,
            seed=spec.seed,
            cache_options=options,
            progress=progress,
        )
    cache_seconds = time.perf_counter() - started
    artifact = artifacts[0]
    scores = {
        split: evaluate_logits(
            cache.fetch(artifact.fingerprint, dataset.fingerprint, split), dataset.splits[split].labels, meta
        )
        for split in ("val", "test")
    }
    return {
        "name": artifact.name,
        "model": artifact.model,
        "model_kwargs": artifact.model_kwargs,
        "fingerprint": artifact.fingerprint,
        "params": artifact.params,
        "status": status[artifact.name],
        "epochs_run": artifact.epochs_run,
        "best_epoch": artifact.best_epoch,
        "train_seconds": artifact.train_seconds,
        "stage_seconds": train_seconds,
        "soft_label_seconds": cache_seconds,
        "soft_label_bytes": sum(s["bytes"] for s in report[artifact.name]["splits"].values()),
        "val_dice": float(scores["val"]["dice"]),
        "test_dice": float(scores["test"]["dice"]),
        "test_dice_per_class": [float(v) for v in scores["test"]["dice_per_class"]],
        "views": views,
    }


# --------------------------------------------------------------------------- students


def student_config(args: argparse.Namespace, spec: Any, seed: int, kd: bool) -> Any:
    from medkd.students.distill import DistillConfig

    return DistillConfig(
        student=STUDENT,
        width=args.width,
        depth=args.depth,
        temperature=args.temperature,
        alpha=args.alpha if kd else 1.0,
        aggregation="mean",
        lr=args.lr,
        epochs=args.student_epochs,
        batch_size=spec.search.batch_size,
        seed=seed,
        prune="none",
        quantize=args.quantize,
    )


def train_student(
    config: Any,
    *,
    kind: str,
    spec: Any,
    dataset: Any,
    meta: DatasetMeta,
    cache: Any,
    teacher_fp: str,
    directory: Path,
    views: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One student through the search's recipe; test Dice of its compressed and FP32 exports."""
    from medkd.search.recipe import train_candidate, trial_augmentation
    from medkd.softlabels.reading import cached_teacher_logits, cached_views
    from medkd.students.candidate import FP32_FILE, MODEL_FILE
    from medkd.students.compression import OnnxModel
    from medkd.students.distill import build_student, evaluate_logits

    splits = dataset.splits
    kd = config.alpha < 1
    # Per batch from Redis (per-pixel logits are large), as a search trial reads them.
    teacher_logits = cached_teacher_logits(cache, [teacher_fp], dataset.fingerprint, segmentation=True) if kd else None
    fkd_views = None
    if kd and views:  # as a search trial: the cached views with their own pixel logits
        fkd_views = cached_views(cache, [teacher_fp], views["views_dataset_fp"], views["views"], segmentation=True)
    augment_spec = spec.search.augment.model_dump(mode="json") if spec.search.augment is not None else None
    augment = trial_augmentation(augment_spec, meta, config.seed)
    history: list[dict[str, Any]] = []

    def on_epoch(record: dict[str, Any]) -> None:
        history.append(record)
        if record["epoch"] == config.epochs or record["epoch"] % 5 == 0:
            log(
                f"    {kind} seed {config.seed}: epoch {record['epoch']}/{config.epochs} "
                f"val Dice {record.get('val_dice', float('nan')):.4f} ({record['epoch_seconds']:.1f}s/epoch)"
            )

    started = time.perf_counter()
    metrics = train_candidate(
        build_student(meta, config),
        config,
        meta=meta,
        train=(splits["train"].images, splits["train"].labels),
        val=(splits["val"].images, splits["val"].labels),
        teacher_logits=teacher_logits,
        augment=augment,
        directory=directory,
        latency_runs=spec.export.latency_runs,
        on_epoch=on_epoch,
        views=fkd_views,
    )
    seconds = time.perf_counter() - started
    test_x, test_y = splits["test"].images, splits["test"].labels
    served = evaluate_logits(OnnxModel(directory / MODEL_FILE, threads=1).predict(test_x), test_y, meta)
    fp32 = evaluate_logits(OnnxModel(directory / FP32_FILE, threads=1).predict(test_x), test_y, meta)
    return {
        "kind": kind,
        "seed": config.seed,
        "config": config.model_dump(),
        "test_dice": float(served["dice"]),
        "test_dice_per_class": [float(v) for v in served["dice_per_class"]],
        "test_dice_fp32": float(fp32["dice"]),
        "val_dice": float(metrics["val_dice"]),
        "params": int(metrics["params_total"]),
        "model_bytes": int(metrics["model_bytes"]),
        "latency_ms": float(metrics["latency_ms"]),
        "seconds": round(seconds, 1),
        "history": [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in history],
    }


def student_stage(
    args: argparse.Namespace,
    spec: Any,
    dataset: Any,
    meta: DatasetMeta,
    cache: Any,
    teacher_fp: str,
    seeds: list[int],
    views: dict[str, Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {"kd": [], "ce": []}
    root = Path(spec.output_dir) / "students"
    for seed in seeds:  # KD and no-KD alternate, so load from other processes hits both alike
        for kind in ("kd", "ce"):
            config = student_config(args, spec, seed, kind == "kd")
            log(
                f"  student {kind} seed {seed}: {STUDENT} width {config.width}, alpha {config.alpha}, "
                f"T {config.temperature}, {config.epochs} epochs, lr {config.lr}, quantize {config.quantize}"
            )
            run = train_student(
                config,
                kind=kind,
                spec=spec,
                dataset=dataset,
                meta=meta,
                cache=cache,
                teacher_fp=teacher_fp,
                directory=root / f"{kind}-seed{seed}",
                views=views,
            )
            runs[kind].append(run)
            log(
                f"  student {kind} seed {seed}: test Dice {run['test_dice']:.4f} ({config.quantize}), "
                f"{run['test_dice_fp32']:.4f} (FP32 ONNX), val {run['val_dice']:.4f}, {run['seconds']:.0f}s"
            )
    return runs


# --------------------------------------------------------------------------- report


def summarise(teacher: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind, rows in runs.items():
        for key in ("test_dice", "test_dice_fp32", "val_dice"):
            summary[f"{kind}_{key}"] = mean_std([r[key] for r in rows])
    student_params = runs["kd"][0]["params"]
    summary.update(
        {
            "student_params": student_params,
            "param_ratio": student_params / teacher["params"],
            "dice_gap": teacher["test_dice"] - summary["kd_test_dice"][0],
            "kd_gain_dice": summary["kd_test_dice"][0] - summary["ce_test_dice"][0],
            "paired_gain": [k["test_dice"] - c["test_dice"] for k, c in zip(runs["kd"], runs["ce"])],
        }
    )
    return summary


def fmt(pair: tuple[float, float], n: int) -> str:
    return f"{pair[0]:.4f} ± {pair[1]:.4f}" if n > 1 else f"{pair[0]:.4f}"


def table(
    teacher: dict[str, Any], runs: dict[str, list[dict[str, Any]]], summary: dict[str, Any], args: argparse.Namespace
) -> str:
    n = len(runs["kd"])
    per_class = lambda values: " / ".join(f"{v:.3f}" for v in values)  # noqa: E731
    q = args.quantize
    lines = [
        f"| model | params | params / teacher | test Dice ({q} ONNX) | test Dice (FP32 ONNX) | val Dice | test Dice per class (1/2/3) |",
        "|---|---|---|---|---|---|---|",
        f"| teacher {teacher['model']} (PyTorch FP32, cached float16 logits) | {teacher['params']:,} | 1 | "
        f"{teacher['test_dice']:.4f} | | {teacher['val_dice']:.4f} | {per_class(teacher['test_dice_per_class'])} |",
    ]
    for kind, label in (("kd", f"KD (alpha {args.alpha}, T {args.temperature})"), ("ce", "no KD (alpha 1, Dice+CE)")):
        lines.append(
            f"| **{STUDENT} w{args.width:g} d{args.depth:g} {label}**, {n} seed(s) | {summary['student_params']:,} | "
            f"{summary['param_ratio']:.3f} | **{fmt(summary[f'{kind}_test_dice'], n)}** | "
            f"{fmt(summary[f'{kind}_test_dice_fp32'], n)} | {fmt(summary[f'{kind}_val_dice'], n)} | |"
        )
        for run in runs[kind]:
            lines.append(
                f"| &nbsp;&nbsp;{kind} seed {run['seed']} | | | {run['test_dice']:.4f} | {run['test_dice_fp32']:.4f} | "
                f"{run['val_dice']:.4f} | {per_class(run['test_dice_per_class'])} |"
            )
    return "\n".join(lines)


def verdict(summary: dict[str, Any]) -> str:
    gap_ok = summary["dice_gap"] <= TARGET_GAP
    params_ok = summary["param_ratio"] <= MAX_PARAM_RATIO
    return (
        f"target (within {TARGET_GAP * 100:.0f} Dice points at <= 1/5 of the parameters): "
        f"gap {summary['dice_gap'] * 100:+.2f} points ({'met' if gap_ok else 'NOT met'}), "
        f"params {summary['param_ratio']:.3f} of the teacher's ({'met' if params_ok else 'NOT met'}); "
        f"KD vs no KD {summary['kd_gain_dice'] * 100:+.2f} points "
        f"(per seed {', '.join(f'{g * 100:+.2f}' for g in summary['paired_gain'])})"
    )


def result_line(teacher: dict[str, Any], summary: dict[str, Any]) -> str:
    return (
        f"RESULT teacher_dice={teacher['test_dice']:.4f} student_kd_dice={summary['kd_test_dice'][0]:.4f} "
        f"student_ce_dice={summary['ce_test_dice'][0]:.4f} dice_gap={summary['dice_gap']:.4f} "
        f"kd_gain_dice={summary['kd_gain_dice']:.4f} param_ratio={summary['param_ratio']:.4f}"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.seg_students",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--image-size", type=int, default=64, help="synthetic image side (pixels)")
    parser.add_argument("--num-train", type=int, default=512, help="training images")
    parser.add_argument("--num-val", type=int, default=128, help="validation images (model selection)")
    parser.add_argument(
        "--num-test", type=int, default=512, help="test images (reported; more than the spec's 128 to cut test noise)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="student seeds (each trains a KD and a no-KD student)")
    parser.add_argument("--teacher-epochs", type=int, default=60, help="teacher epochs (early stopping per the spec)")
    parser.add_argument("--student-epochs", type=int, default=120, help="epochs of every student")
    parser.add_argument("--width", type=float, default=0.5, help=f"{STUDENT} width multiplier")
    parser.add_argument(
        "--depth", type=float, default=1.0, help=f"{STUDENT} depth multiplier (levels = round(4 * depth))"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="KD students' hard-loss (Dice+CE) weight, in [0, 1)")
    parser.add_argument("--temperature", type=float, default=2.0, help="KD temperature")
    parser.add_argument("--lr", type=float, default=3e-3, help="student peak learning rate (one-cycle)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="int8_static", help="student compression")
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="segmentation job spec template")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="output folder (teacher, cache, students)")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any other spec override, e.g. data.difficulty=0.7"
    )
    args = parser.parse_args(argv)
    for name in ("image_size", "num_train", "num_val", "num_test", "seeds", "teacher_epochs", "student_epochs"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.image_size < 16 or args.image_size % 2:
        parser.error(f"--image-size must be an even integer >= 16 (a U-Net halves it), got {args.image_size}")
    if not 0 < args.width <= 4:
        parser.error(f"--width must be in (0, 4], got {args.width}")
    if not 0 < args.depth <= 2:
        parser.error(f"--depth must be in (0, 2], got {args.depth}")
    if not 0 <= args.alpha < 1:
        parser.error(f"--alpha must be in [0, 1) (1 would make the KD student the no-KD baseline), got {args.alpha}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if not args.spec.is_file():
        parser.error(f"--spec {args.spec}: file not found")
    if args.output.exists() and not args.output.is_dir():
        parser.error(f"--output {args.output}: exists and is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import ray
    import torch

    from medkd.core.progress import Progress
    from medkd.data import load_dataset
    from medkd.pipeline.runner import init_ray
    from medkd.softlabels.store import SoftLabelCache
    from medkd.spec.job import SpecError
    from medkd.students.distill import DistillConfig, build_student

    torch.set_num_threads(1)
    try:
        first = build_spec(args, redis_port=1)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output_dir = Path(first.output_dir)
    dataset = load_dataset(first.data)
    meta = DatasetMeta.of(dataset)
    sizes = {name: len(split.images) for name, split in dataset.splits.items()}
    log(f"data {dataset.name} ({dataset.fingerprint}): {sizes}, {meta.image_size} px, {meta.num_classes} classes")
    probe = build_student(meta, DistillConfig(student=STUDENT, width=args.width, depth=args.depth))
    probe_params = sum(p.numel() for p in probe.parameters())
    load_before = os.getloadavg()

    # The password reaches the spec (cache.password_env) through PASSWORD_ENV.
    with managed_redis(output_dir / "redis", password_env=PASSWORD_ENV) as redis:
        spec = build_spec(args, redis_port=redis.port)
        cache = SoftLabelCache(
            spec.cache.redis_url, namespace=spec.cache.namespace, password_env=spec.cache.password_env
        )
        teacher_spec = spec.teachers[0]
        log(
            f"teacher {teacher_spec.model} {teacher_spec.model_kwargs}, {teacher_spec.epochs} epochs (patience "
            f"{teacher_spec.patience}); student {STUDENT} width {args.width} ({probe_params:,} params); "
            f"redis-server 127.0.0.1:{redis.port}; output {output_dir}"
        )
        started_ray = init_ray(spec)
        try:
            log("teacher stage: Ray Train (1 worker, 1 CPU), then soft labels -> Redis")
            teacher = teacher_stage(spec, dataset, meta, cache, Progress())
        finally:
            if started_ray:
                ray.shutdown()
        log(
            f"teacher {teacher['status']}: {teacher['params']:,} params, best epoch {teacher['best_epoch']}/"
            f"{teacher['epochs_run']}, test Dice {teacher['test_dice']:.4f} (val {teacher['val_dice']:.4f}); "
            f"stage {teacher['stage_seconds']:.0f}s, soft labels {teacher['soft_label_seconds']:.0f}s "
            f"({teacher['soft_label_bytes'] / 2**20:.1f} MiB)"
        )
        if probe_params / teacher["params"] > MAX_PARAM_RATIO:
            log(
                f"warning: width {args.width} gives {probe_params / teacher['params']:.3f} of the teacher's parameters, "
                f"over the 1/5 budget"
            )
        seeds = [spec.seed + 1 + i for i in range(args.seeds)]
        log(f"students: seeds {seeds} x (KD, no KD), in this process, 1 torch thread")
        students_started = time.perf_counter()
        runs = student_stage(args, spec, dataset, meta, cache, teacher["fingerprint"], seeds, views=teacher["views"])
        students_seconds = time.perf_counter() - students_started
        cache.close()

    summary = summarise(teacher, runs)
    wall = time.perf_counter() - started
    report = {
        "command": "python -m benchmarks.seg_students " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_start": load_before,
        "load_average_end": os.getloadavg(),
        "data": {
            "name": dataset.name,
            "fingerprint": dataset.fingerprint,
            "sizes": sizes,
            **spec.data.model_dump(mode="json"),
        },
        "teacher": teacher,
        "students": runs,
        "summary": summary,
        "wall_seconds": wall,
        "students_seconds": students_seconds,
    }
    report["result_line"] = result_line(teacher, summary)
    text = table(teacher, runs, summary, args)
    (output_dir / "seg_students.json").write_text(json.dumps(report, indent=2, default=str))
    print()
    print(text)
    print()
    print(verdict(summary))
    trained = (
        ""
        if teacher["status"] == "ran"
        else f", {teacher['status']}: trained earlier in {teacher['train_seconds']:.0f}s"
    )
    print(
        f"wall {wall:.0f}s (teacher stage {teacher['stage_seconds']:.0f}s{trained}, soft labels {teacher['soft_label_seconds']:.0f}s, "
        f"students {students_seconds:.0f}s); load average {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
        f"report {output_dir / 'seg_students.json'}"
    )
    print(report["result_line"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
