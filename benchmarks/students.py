"""Students end to end on one MedMNIST file: quality, KD gain and speed of the served INT8 student.

    python -m benchmarks.students --data PATH.npz [--seeds 3] [--trials N] [--epochs E]
        [--spec examples/breastmnist.yaml] [--output runs/bench-students-NAME] [--set KEY=VALUE ...]
        [--threads 1] [--latency-runs 200] [--rounds 3] [--append-results benchmarks/RESULTS.md]

One process, one local Ray cluster (2 CPUs here), one managed redis-server holding the soft-label
cache (its data under the output folder, so a re-run finds the teachers and their logits):

1. **Pipeline**: medkd's own ``run_job`` (serve disabled) on the spec template (default
   ``examples/breastmnist.yaml``) pointed at ``--data``: teachers (Ray Train) -> soft labels
   (Redis) -> search (Ray Tune + Optuna, multi-objective) -> compression -> export. The selected
   INT8 student's **test** AUC/ACC, parameters and bytes come from its registry entry.
   Budgets scale with the training split (a small split keeps the template's search): search
   epochs ~24k samples per trial (``--epochs auto``, ASHA's grace period scaled alike), trials
   ~270k student samples in all (at least 6), FKD views ~10k teacher passes per teacher; on 546
   images that is the template's 12 trials x 40 epochs and 8 views, on 5,000 images 9 trials x
   6 epochs (ASHA rung at 2) and 2 views. Above 5,000 images the epoch floors (teachers 8,
   trials 6) shrink as ``sqrt(5,000 / n)`` (``medkd.teachers.recipe.scaled_floor``), so the
   images seen grow as the square root of the split: OrganAMNIST's 34,561 images get teachers of
   3 epochs (bf16 autocast, as the recipe sets from 2,000 images on), 6 trials x 2 epochs (ASHA
   rung at 1) and 1 view. The template's final weight soup
   (``search.final_branches``) is kept for splits of at most 2,000 images; larger splits get a
   final training of one fresh draw at the search's epochs instead. Samples are counted in 28x28 images
   (``medkd.teachers.recipe.image_cost``: a 64x64 image counts 5.2, a 28^3 volume 28), so larger
   images and 3D sets get budgets of about the same compute.
2. **KD gain**: the served student's configuration (with its final training's epochs and weight
   soup, when the spec has them) retrained with ``--seeds`` fresh seeds, once
   with its searched KD settings and once with ``alpha = 1`` (cross-entropy only, no teacher),
   same architecture, epochs, learning rate, augmentation and seeds; teacher logits come from
   the soft-label cache (``SoftLabelCache.fetch``), never from a teacher; with ``cache.views`` in
   the spec the KD runs train on the cached augmented views (FKD) as the search did, the CE runs
   on online augmentation with the same ``search.augment``. Both go through the
   search's own recipe (:func:`medkd.search.recipe.train_candidate`: distill -> prune ->
   ONNX -> INT8) and are scored on test after compression. Runs are Ray tasks, 1 CPU each.
3. **Speed**: every teacher exported to FP32 ONNX; batch-1 CPU latency (ONNX Runtime, the
   same ``--threads``, warm-up, median of ``--latency-runs``) of the INT8 student, its FP32
   export and each teacher, measured alternately for ``--rounds`` rounds (median of the round
   medians), so load from other processes hits all of them alike. The ensemble's latency is the
   sum of its teachers' (they run one after another for one request).

Where the time and memory go: each stage's seconds are logged when the pipeline ends (the
teachers log each epoch's time and their ETA as they train), and the peak memory of the
benchmark's whole process tree (driver, Ray's processes and workers, redis-server; PSS sampled
every 2 s from ``/proc``, :mod:`benchmarks._memory`) is recorded per phase in the report.

Ends with ``RESULT student_auc=... student_acc=... student_params=... student_bytes=...
teacher_ensemble_auc=... kd_gain_auc=... speedup_vs_ensemble=... wall_min=... peak_memory_mb=...``
where ``kd_gain_auc`` is mean test AUC (KD) - mean test AUC (CE only) over the seeds,
``speedup_vs_ensemble`` is ensemble latency / INT8 student latency and ``peak_memory_mb`` the
process tree's peak PSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    PASSWORD_ENV,
    append_section,
    configure_local_ray,
    load_average,
    managed_redis,
    mean_std,
    take_turns,
    utc_date,
)

configure_local_ray()

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from benchmarks._memory import PeakMemory  # noqa: E402
from benchmarks._student_setup import (  # noqa: E402  (re-exported: the spec of this benchmark)
    DEFAULT_DATA,
    DEFAULT_SPEC,
    MIN_STUDENT_EPOCHS,
    MIN_TRIALS,
    SEARCH_SAMPLE_BUDGET,
    SOUP_MAX_TRAIN_SIZE,
    STUDENT_SAMPLE_BUDGET,
    build_spec,
    kd_gain_run,
    retraining_inputs,
    search_trials,
    student_epochs,
    view_count,
    with_search,
    without_flips,
)
from medkd.data import load_dataset  # noqa: E402
from medkd.data.meta import DatasetMeta  # noqa: E402
from medkd.pipeline.runner import init_ray, run_job  # noqa: E402
from medkd.students.compression import export_onnx, measure_latency, model_size_bytes  # noqa: E402
from medkd.students.distill import DistillConfig  # noqa: E402
from medkd.teachers.train import artifact_dir, find_artifact, load_teacher_model  # noqa: E402

__all__ = [
    "SOUP_MAX_TRAIN_SIZE",
    "build_spec",
    "main",
    "parse_args",
    "published_rows",
    "search_trials",
    "student_epochs",
    "view_count",
    "with_search",
    "without_flips",
]
RESNET18_PARAMS = 11_200_000  # MedMNIST v2's ResNet-18 (28), the parameter budget is 1/10 of it


def log(message: str) -> None:
    print(f"[students {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- KD gain


def kd_gain(spec: Any, results: dict[str, Any], dataset: Any, meta: DatasetMeta, seeds: list[int]) -> dict[str, Any]:
    best = DistillConfig.model_validate(results["best"]["config"])
    if best.alpha >= 1:
        log("  the selected student was trained without KD (alpha = 1): KD gain is 0 by construction")
    data_ref, cache, augment = retraining_inputs(spec, results, dataset)
    task = ray.remote(num_cpus=1)(kd_gain_run)
    configs = {("kd", seed): best.model_copy(update={"seed": seed}) for seed in seeds}
    configs.update({("ce", seed): best.model_copy(update={"seed": seed, "alpha": 1.0}) for seed in seeds})
    refs = {
        key: task.remote(cfg.model_dump_json(), meta, [data_ref], cache, augment, spec.export.latency_runs)
        for key, cfg in configs.items()
    }
    runs: dict[str, list[dict[str, Any]]] = {"kd": [], "ce": []}
    for (kind, seed), ref in refs.items():
        run = ray.get(ref)
        runs[kind].append(run)
        log(
            f"  {kind} seed {seed}: INT8 test AUC {run['test_auc']:.4f} ACC {run['test_acc']:.4f} ({run['seconds']:.0f}s)"
        )
    summary: dict[str, Any] = {"seeds": seeds, "config": best.model_dump(), "runs": runs}
    for kind in ("kd", "ce"):
        for metric in ("test_auc", "test_acc"):
            summary[f"{kind}_{metric}_mean"], summary[f"{kind}_{metric}_std"] = mean_std(
                [r[metric] for r in runs[kind]]
            )
    summary["gain_auc"] = summary["kd_test_auc_mean"] - summary["ce_test_auc_mean"]
    summary["gain_acc"] = summary["kd_test_acc_mean"] - summary["ce_test_acc_mean"]
    paired = [k["test_auc"] - c["test_auc"] for k, c in zip(runs["kd"], runs["ce"])]
    summary["paired_gain_auc"] = paired
    summary["seeds_kd_better"] = sum(g > 0 for g in paired)
    return summary


# --------------------------------------------------------------------------- speed


def export_teachers(
    results: dict[str, Any], output_dir: Path, meta: DatasetMeta, example: np.ndarray
) -> dict[str, Path]:
    paths = {}
    for entry in results["teachers"]:
        artifact = find_artifact(output_dir, entry["name"], entry["fingerprint"])
        if artifact is None:
            raise SystemExit(
                f"teacher {entry['name']}: no checkpoint in {artifact_dir(output_dir, entry['name'], entry['fingerprint'])}"
            )
        target = output_dir / "benchmark" / f"teacher-{entry['name']}-fp32.onnx"
        if not target.is_file():
            export_onnx(load_teacher_model(artifact, meta), torch.from_numpy(example), target)
        paths[entry["name"]] = target
    return paths


def measure_speed(
    models: dict[str, Path], input_shape: tuple[int, ...], *, threads: int, runs: int, rounds: int
) -> dict[str, float]:
    def median_ms(path: Path) -> Callable[[], float]:
        return lambda: measure_latency(path, input_shape, threads=threads, runs=runs).median_ms

    # Each model's median latency per round, the models taking turns (measure_latency warms up itself).
    medians = take_turns({name: median_ms(path) for name, path in models.items()}, rounds)
    return {name: statistics.median(values) for name, values in medians.items()}


def speed(
    results: dict[str, Any], output_dir: Path, meta: DatasetMeta, dataset: Any, args: argparse.Namespace
) -> dict[str, Any]:
    example = dataset.splits["train"].images[:2]
    teachers = export_teachers(results, output_dir, meta, example)
    student_int8 = Path(results["best"]["onnx_path"])
    student_fp32 = student_int8.with_name("model_fp32.onnx")
    models = {
        "student_int8": student_int8,
        "student_fp32": student_fp32,
        **{f"teacher_{k}": v for k, v in teachers.items()},
    }
    latency = measure_speed(
        models, (1, *example.shape[1:]), threads=args.threads, runs=args.latency_runs, rounds=args.rounds
    )
    ensemble_ms = sum(latency[f"teacher_{name}"] for name in teachers)
    sizes = {name: model_size_bytes(path) for name, path in models.items()}
    return {
        "threads": args.threads,
        "runs": args.latency_runs,
        "rounds": args.rounds,
        "latency_ms": latency,
        "bytes": sizes,
        "ensemble_ms": ensemble_ms,
        "ensemble_bytes": sum(sizes[f"teacher_{name}"] for name in teachers),
        "speedup_vs_ensemble": ensemble_ms / latency["student_int8"],
        "int8_vs_fp32_speedup": latency["student_fp32"] / latency["student_int8"],
        "int8_vs_fp32_size": sizes["student_int8"] / sizes["student_fp32"],
    }


# --------------------------------------------------------------------------- report


def fmt(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


#: Published MedMNIST v2 results for the table, by data file name (only files of 28 px have them here).
PUBLISHED_ROWS = {
    "breastmnist.npz": "| MedMNIST v2 ResNet-18 (28), published | 0.901 (BreastMNIST) | 0.863 (BreastMNIST) | 11.2 M | | |",
}


def published_rows(dataset_file: str) -> list[str]:
    """The published-baseline row for this data file, none for a file without one (another set's
    numbers would only mislead)."""
    row = PUBLISHED_ROWS.get(Path(dataset_file).name.lower())
    return [row] if row else []


def markdown(report: dict[str, Any]) -> str:
    r, kd, sp = report["results"], report["kd_gain"], report["speed"]
    best, ens = r["best"], r["ensemble"]["test_metrics"]
    cfg = best["config"]
    n = len(kd["seeds"])
    stages = ", ".join(f"{name} {stage['seconds']:.0f}s" for name, stage in r["stages"].items())
    lines = [
        f"## Students: {report['dataset']} ({report['date']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Wall time: {report['wall_seconds'] / 60:.1f} min on {report['machine']} "
        f"(stages: {stages}; "
        f"KD gain {report['kd_gain_seconds']:.0f}s, speed {report['speed_seconds']:.0f}s).  ",
        f"Training split: {report['train_size']} images. Load average (1, 5, 15 min) at the end of the run: "
        f"{report['load_average']}; timings taken while other work ran are pessimistic.",
        "",
        f"Selected student (INT8 static, served): `{cfg['student']}` width {cfg['width']:.3g}, depth {cfg['depth']:.3g}, "
        f"T={cfg['temperature']:.3g}, alpha={cfg['alpha']:.3g} (CE weight), aggregation {cfg['aggregation']}, "
        f"lr {cfg['lr']:.3g}, {cfg['epochs']} epochs, prune {cfg['prune']} {cfg['prune_amount']:.2g}.",
        "",
        "| model | test AUC | test ACC | params | bytes | batch-1 latency (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for teacher in r["teachers"]:
        tm = teacher.get("test_metrics", {})
        key = f"teacher_{teacher['name']}"
        lines.append(
            f"| teacher {teacher['name']} ({teacher['model']}, FP32) | {tm.get('auc', float('nan')):.4f} | "
            f"{tm.get('acc', float('nan')):.4f} | {teacher['params']:,} | {sp['bytes'][key]:,} | {sp['latency_ms'][key]:.2f} |"
        )
    lines += [
        f"| teacher ensemble (FP32, sum of latencies) | {ens['auc']:.4f} | {ens['acc']:.4f} | "
        f"{sum(t['params'] for t in r['teachers']):,} | {sp['ensemble_bytes']:,} | {sp['ensemble_ms']:.2f} |",
        f"| **selected student INT8** ({served_instance(r)}) | **{best['test_metrics']['auc']:.4f}** | **{best['test_metrics']['acc']:.4f}** | "
        f"{best['params']:,} | {best['size_bytes']:,} | {sp['latency_ms']['student_int8']:.3f} |",
        f"| selected student FP32 ONNX | | | {best['params']:,} | {sp['bytes']['student_fp32']:,} | {sp['latency_ms']['student_fp32']:.3f} |",
        f"| same student INT8, KD, {n} fresh seeds | {fmt(kd['kd_test_auc_mean'], kd['kd_test_auc_std'])} | "
        f"{fmt(kd['kd_test_acc_mean'], kd['kd_test_acc_std'])} | | | |",
        f"| same student INT8, CE only (alpha=1), same {n} seeds | {fmt(kd['ce_test_auc_mean'], kd['ce_test_auc_std'])} | "
        f"{fmt(kd['ce_test_acc_mean'], kd['ce_test_acc_std'])} | | | |",
        *published_rows(report["dataset"]),
        "",
        f"- KD gain (INT8, test AUC, seeds {kd['seeds']}): **{kd['gain_auc'] * 100:+.2f} points** "
        f"(ACC {kd['gain_acc'] * 100:+.2f}); per seed {', '.join(f'{g * 100:+.2f}' for g in kd['paired_gain_auc'])}; "
        f"KD better on {kd['seeds_kd_better']}/{n} seeds.",
        f"- Speed ({sp['threads']} thread, median of {sp['runs']} runs x {sp['rounds']} alternating rounds): INT8 student "
        f"**{sp['speedup_vs_ensemble']:.1f}x** faster than the FP32 ensemble; INT8 vs FP32 student: "
        f"{sp['int8_vs_fp32_speedup']:.2f}x faster, size {sp['int8_vs_fp32_size']:.2f}x.",
        f"- Student parameters: {best['params']:,} = {best['params'] / RESNET18_PARAMS:.3f} of ResNet-18's 11.2 M.",
        teacher_selection_line(r),
        fresh_seeds_line(r, kd),
        memory_line(report.get("memory", {})),
        "",
        "```",
        report["result_line"],
        "```",
        "",
    ]
    return "\n".join(lines)


def served_instance(results: dict[str, Any]) -> str:
    """Which instance of the selected configuration is served: the search's or the final training's.

    Examples:
        >>> served_instance({"final": {"served": True}}), served_instance({"final": None})
        ('final training, fresh seed', 'search instance')
    """
    return "final training, fresh seed" if (results.get("final") or {}).get("served") else "search instance"


def fresh_seeds_line(results: dict[str, Any], kd: dict[str, Any]) -> str:
    """Where the served instance's test accuracy lies among the KD gain's fresh seeds of its configuration,
    in their standard deviations (the issue's "no lucky or unlucky draw"), and why that instance is served.

    Examples:
        >>> fresh_seeds_line({"best": {"test_metrics": {"acc": 0.91}}}, {"kd_test_acc_mean": 0.9, "kd_test_acc_std": 0.005})
        '- Served instance (search instance): test ACC 0.9100, +2.0 SD from the fresh seeds (0.9000 ± 0.0050).'
    """
    acc = results["best"]["test_metrics"]["acc"]
    mean, std = kd["kd_test_acc_mean"], kd["kd_test_acc_std"]
    where = f"{(acc - mean) / std:+.1f} SD" if std > 0 else f"{acc - mean:+.4f} (no spread)"
    line = f"- Served instance ({served_instance(results)}): test ACC {acc:.4f}, {where} from the fresh seeds ({mean:.4f} ± {std:.4f})."
    judged = (results.get("selection") or {}).get("final")
    return line + (f" Val: {judged['reason']}." if judged else "")


def teacher_selection_line(results: dict[str, Any]) -> str:
    """Whose soft labels the students learned from, and each decision of ``search.teacher_selection`` (val).

    Examples:
        >>> teacher_selection_line({"ensemble": {"distilled": ["cnn", "vit"]}})
        '- Students learned from: cnn, vit (search.teacher_selection: all).'
    """
    ensemble = results.get("ensemble") or {}
    choice = ensemble.get("teacher_selection") or {}
    kept = ", ".join(ensemble.get("distilled") or [t["name"] for t in results.get("teachers", [])])
    line = f"- Students learned from: {kept} (search.teacher_selection: {choice.get('mode', 'all')})."
    reasons = [step["reason"] for step in choice.get("steps") or []]
    return line + (" On val: " + "; ".join(reasons) + "." if reasons else "")


def result_line(report: dict[str, Any]) -> str:
    best = report["results"]["best"]
    return (
        f"RESULT student_auc={best['test_metrics']['auc']:.4f} student_acc={best['test_metrics']['acc']:.4f} "
        f"student_params={best['params']} student_bytes={best['size_bytes']} "
        f"teacher_ensemble_auc={report['results']['ensemble']['test_metrics']['auc']:.4f} "
        f"kd_gain_auc={report['kd_gain']['gain_auc']:.4f} speedup_vs_ensemble={report['speed']['speedup_vs_ensemble']:.1f} "
        f"wall_min={report['wall_seconds'] / 60:.1f} peak_memory_mb={report['memory']['peak_total_mb']}"
    )


def stage_times(results: dict[str, Any]) -> str:
    """``"teachers 1334s (52%), soft_labels 164s (6%), ..."``: each pipeline stage's share of the pipeline.

    Examples:
        >>> stage_times({"stages": {"teachers": {"seconds": 30.0}, "search": {"seconds": 10.0}}})
        'teachers 30s (75%), search 10s (25%)'
    """
    stages = {name: float(stage["seconds"]) for name, stage in results["stages"].items()}
    total = sum(stages.values()) or 1.0
    return ", ".join(f"{name} {seconds:.0f}s ({100 * seconds / total:.0f}%)" for name, seconds in stages.items())


def memory_line(memory: dict[str, Any]) -> str:
    """The report's memory bullet (peak PSS of the benchmark's process tree, per phase)."""
    if not memory.get("measured"):
        return "- Peak memory: not measured (no /proc on this system)."
    phases = ", ".join(f"{name} {mb:,} MB" for name, mb in memory["by_phase_mb"].items())
    return (
        f"- Peak memory (PSS of the driver, Ray's processes and workers and redis-server, sampled every "
        f"{memory['interval_s']:g} s): **{memory['peak_total_mb']:,} MB** in all ({phases}); largest single process "
        f"{memory['peak_process_mb']:,} MB; up to {memory['peak_processes']} processes."
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.students", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MedMNIST .npz (default: %(default)s)")
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="job spec template (default: %(default)s)")
    parser.add_argument("--output", help="output folder (default: runs/bench-students-<data name>)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the KD-gain comparison (>= 2)")
    parser.add_argument(
        "--trials",
        type=int,
        help=f"override search.num_trials (default: the spec's, cut to ~{SEARCH_SAMPLE_BUDGET} student samples "
        f"over the search, at least {MIN_TRIALS} trials)",
    )
    parser.add_argument(
        "--epochs",
        default="auto",
        help=f"search epochs: an int, or 'auto' (default): ~{STUDENT_SAMPLE_BUDGET} training samples per trial, "
        f"at least {MIN_STUDENT_EPOCHS} epochs, at most the spec's search.epochs",
    )
    parser.add_argument(
        "--teachers",
        choices=("recipe", "spec"),
        default="recipe",
        help="recipe (default): medkd.teachers.recipe.teacher_recipe for this data; spec: the template's",
    )
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other spec override")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for every latency")
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--append-results", type=Path, help="append the markdown section to this file")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (a spread needs at least two seeds)")
    if args.epochs != "auto" and not (args.epochs.isdigit() and int(args.epochs) > 0):
        parser.error(f"--epochs must be a positive int or 'auto', got {args.epochs!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    first = build_spec(args, redis_port=1)
    output_dir = Path(first.output_dir)
    dataset = load_dataset(first.data)
    meta = DatasetMeta.of(dataset)
    # The password reaches the spec (cache.password_env) and Ray workers through PASSWORD_ENV.
    with PeakMemory() as memory, managed_redis(output_dir / "redis", password_env=PASSWORD_ENV) as redis:
        spec = build_spec(args, redis_port=redis.port, dataset=dataset)
        log(
            f"teachers: {', '.join(f'{t.name}={t.model} x{t.epochs} epochs' for t in spec.teachers)}; "
            f"search: {spec.search.num_trials} trials x {spec.search.epochs} epochs; cached views: {spec.cache.views}; "
            f"final weight soup: {spec.search.final_branches or 'off'}"
        )
        log(f"job {spec.name}: {args.data} -> {output_dir}; redis-server 127.0.0.1:{redis.port}")
        started_ray = init_ray(spec)
        try:
            pipeline_started = time.perf_counter()
            memory.phase("pipeline")
            results = run_job(spec, serve=False)
            pipeline_seconds = time.perf_counter() - pipeline_started
            log(
                f"pipeline done in {pipeline_seconds:.0f}s; selected {results['best']['model_id']}: INT8 test "
                f"AUC {results['best']['test_metrics']['auc']:.4f} ACC {results['best']['test_metrics']['acc']:.4f}"
            )
            log(f"  where the pipeline's time went: {stage_times(results)}; peak memory {memory.peak_total_mb:.0f} MB")
            seeds = [spec.seed + 1 + i for i in range(args.seeds)]
            log(f"KD gain: {len(seeds)} seeds x (KD, CE only), Ray tasks of 1 CPU")
            memory.phase("kd_gain")
            t0 = time.perf_counter()
            gain = kd_gain(spec, results, dataset, meta, seeds)
            kd_seconds = time.perf_counter() - t0
        finally:
            if started_ray:
                ray.shutdown()
        log(f"KD gain done in {kd_seconds:.0f}s; speed: exporting teachers to FP32 ONNX, measuring batch-1 latency")
        memory.phase("speed")
        t0 = time.perf_counter()
        timing = speed(results, output_dir, meta, dataset, args)
        speed_seconds = time.perf_counter() - t0

    report = {
        "dataset": Path(args.data).name,
        "date": utc_date(),
        "command": "python -m benchmarks.students " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{os.cpu_count()} CPUs",
        "load_average": load_average(),
        "train_size": len(dataset.splits["train"].images),
        "wall_seconds": time.perf_counter() - started,
        "pipeline_seconds": pipeline_seconds,
        "kd_gain_seconds": kd_seconds,
        "speed_seconds": speed_seconds,
        # "final" and "selection" name the served instance (search's or the final training's) and why.
        "results": {
            k: results.get(k) for k in ("best", "ensemble", "teachers", "stages", "search", "final", "selection")
        },
        "kd_gain": gain,
        "speed": timing,
        "memory": memory.summary(),
    }
    for teacher in report["results"]["teachers"]:
        teacher.pop("history", None)
    report["result_line"] = result_line(report)
    text = markdown(report)
    (output_dir / "benchmark").mkdir(parents=True, exist_ok=True)
    (output_dir / "benchmark" / "students.json").write_text(json.dumps(report, indent=2, default=str))
    (output_dir / "benchmark" / "students.md").write_text(text)
    print(text)
    if args.append_results:
        append_section(text, args.append_results)
        log(f"appended to {args.append_results}")
    print(report["result_line"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
