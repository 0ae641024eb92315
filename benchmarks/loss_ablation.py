"""Loss ablation: the served student's configuration distilled with each logit loss, same budget and seeds.

    python -m benchmarks.loss_ablation --run runs/bench-students-breastmnist [--data PATH.npz]
        [--seeds 0 1 2] [--losses hinton_kd dkd dist] [--standardization auto|off|on] [--epochs E]

    # the issue's table: one finished benchmarks.students run per set, then
    python -m benchmarks.loss_ablation --run runs/bench-students-breastmnist --data $MEDKD_DATA_DIR/breastmnist.npz
    python -m benchmarks.loss_ablation --run runs/bench-students-bloodmnist --data $MEDKD_DATA_DIR/bloodmnist.npz

Needs the output folder of a finished ``python -m benchmarks.students`` run on the same data: its
soft-label cache (the managed redis-server's data under ``RUN/redis``) and its selected student
(``RUN/results.json``). Nothing re-runs a teacher.

The selected configuration (student, width, learning rate, temperature, alpha, aggregation,
epochs, soup, pruning, quantization) is trained once per seed with each variant, changing only
the loss: ``ce`` (``alpha = 1``, no teacher), then every ``--losses`` family (Hinton KD, DKD
with the paper's ``nckd_weight = 8``, DIST with ``beta = gamma = 1``) and, with
``--standardization auto`` on sets of three or more classes (``on`` insists), each again with
logit standardization (``+ls``). Every run goes through the search's own recipe
(:func:`benchmarks.students.kd_gain_run`: distill -> compress -> INT8 ONNX) and is scored on val
and test after compression; runs are Ray tasks of 1 CPU, two at a time here. Choose by val:
the table's last column says which variant val prefers.

``--ls-losses`` limits the standardized variants to some losses (the issue's orientation rows are KD,
DKD, DIST and KD + standardization: ``--ls-losses hinton_kd``). ``ce`` and ``hinton_kd`` are read
from the run's own KD gain (``RUN/benchmark/students.json``) when it trained the same configuration
at the same seeds, since a (configuration, seed) trains to the same model (``--retrain-all`` trains
them anyway).

Ends with ``RESULT dataset=NAME ce_test_auc=... ce_test_acc=... hinton_kd_test_auc=... ...
best_by_val=VARIANT best_by_val_acc=VARIANT``: mean test AUC and ACC of every variant over the
seeds, and which variant val AUC and val accuracy prefer.

``--study kd_accuracy`` (issue 13: why KD costs accuracy) trains, on VAL only (test is never
scored), the configuration as it is (``kd``), with the teachers' soft labels temperature-calibrated
on val first (``kd_calibrated``, what ``search.calibrate_teachers`` does), with a higher
hard-label weight (``alpha_A``, ``--high-alpha``) and, with ``--with-ce``, without teachers (``ce``)::

    python -m benchmarks.loss_ablation --study kd_accuracy --run runs/bench-students-breastmnist \
        --data $MEDKD_DATA_DIR/breastmnist.npz --branches 1

and ends with ``RESULT study=kd_accuracy dataset=NAME kd_val_auc=... kd_val_acc=... ...
best_by_val_acc=VARIANT``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import configure_local_ray, load_average, utc_date

configure_local_ray()

from benchmarks._student_setup import (  # noqa: E402
    check_students_run_args,
    kd_gain_runs,
    load_students_run,
    retrain_variants,
    served_config,
    students_run_parser,
)
from medkd.data.meta import DatasetMeta  # noqa: E402
from medkd.students.losses.families import CLASSIFICATION_LOSSES  # noqa: E402
from medkd.students.losses.standardization import MIN_STANDARDIZED_CLASSES  # noqa: E402


def log(message: str) -> None:
    print(f"[loss-ablation {time.strftime('%H:%M:%S')}] {message}", flush=True)


def variants(
    losses: list[str], num_classes: int, standardization: str, standardized: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Config updates per variant: the no-KD baseline, each loss, and each loss (of ``standardized``,
    default all) + logit standardization.

    Raises:
        ValueError: ``--standardization on`` for a set with fewer than three classes.
    """
    if standardization == "on" and num_classes < MIN_STANDARDIZED_CLASSES:
        raise ValueError(
            f"--standardization on: logit standardization needs at least {MIN_STANDARDIZED_CLASSES} "
            f"classes, this set has {num_classes} (use auto or off)"
        )
    out: dict[str, dict[str, Any]] = {"ce": {"alpha": 1.0, "loss": None, "logit_standardization": False}}
    for loss in losses:
        out[loss] = {"loss": loss, "logit_standardization": False}
    if standardization != "off" and num_classes >= MIN_STANDARDIZED_CLASSES:
        for loss in losses if standardized is None else [loss for loss in losses if loss in standardized]:
            out[f"{loss}+ls"] = {"loss": loss, "logit_standardization": True}
    return out


def accuracy_variants(high_alpha: float, with_ce: bool = False) -> dict[str, dict[str, Any]]:
    """``--study kd_accuracy``: KD as configured, KD on val-calibrated teachers, KD with more CE (and,
    ``--with-ce``, no teachers)."""
    return {
        **({"ce": {"alpha": 1.0}} if with_ce else {}),
        "kd": {},
        "kd_calibrated": {"calibrate_teachers": True},
        f"alpha_{high_alpha:.2f}": {"alpha": high_alpha},
    }


def summarise(
    runs: list[dict[str, Any]], metrics: tuple[str, ...] = ("val_auc", "val_acc", "test_auc", "test_acc")
) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in metrics:
        values = [r[metric] for r in runs]
        out[metric] = statistics.fmean(values)
        out[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def best_by_val(summary: dict[str, dict[str, float]], metric: str = "val_auc") -> str:
    """The variant with the highest mean val ``metric`` (val AUC: what a search ranks first), ties by name."""
    return max(sorted(summary), key=lambda name: summary[name][metric])


def _run_lines(report: dict[str, Any], data_note: str = "") -> list[str]:
    """The command, date and data lines both tables start with."""
    return [
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}; wall {report['wall_seconds'] / 60:.1f} min; load average {report['load_average']}",
        f"- Data: {report['dataset']}{data_note}; configuration: {report['config']}",
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    lines = [
        *_run_lines(report),
        "| variant | val AUC | val ACC | test AUC | test ACC | "
        + " | ".join(f"seed {s} test AUC / ACC" for s in seeds)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(seeds),
    ]
    for name, runs in report["runs"].items():
        s = report["summary"][name]
        per_seed = " | ".join(f"{r['test_auc']:.4f} / {r['test_acc']:.4f}" for r in runs)
        best = [m for m, key in (("val AUC", "best_by_val"), ("val ACC", "best_by_val_acc")) if report.get(key) == name]
        marker = f" (best {', '.join(best)})" if best else ""
        lines.append(
            f"| {name}{marker} | {s['val_auc']:.4f} ± {s['val_auc_std']:.4f} | {s['val_acc']:.4f} ± "
            f"{s['val_acc_std']:.4f} | {s['test_auc']:.4f} ± "
            f"{s['test_auc_std']:.4f} | {s['test_acc']:.4f} ± {s['test_acc_std']:.4f} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"


def val_markdown(report: dict[str, Any]) -> str:
    """The ``--study kd_accuracy`` table: val AUC and ACC per variant, mean ± sd and per seed."""
    seeds = report["seeds"]
    lines = [
        *_run_lines(report, " (val only; test not scored)"),
        "| variant | val AUC | val ACC | " + " | ".join(f"seed {s} val AUC / ACC" for s in seeds) + " |",
        "|---|---|---|" + "---|" * len(seeds),
    ]
    for name, runs in report["runs"].items():
        s = report["summary"][name]
        per_seed = " | ".join(f"{r['val_auc']:.4f} / {r['val_acc']:.4f}" for r in runs)
        lines.append(
            f"| {name} | {s['val_auc']:.4f} ± {s['val_auc_std']:.4f} | {s['val_acc']:.4f} ± {s['val_acc_std']:.4f} "
            f"| {per_seed} |"
        )
    return "\n".join(lines) + "\n"


def val_result_line(dataset: str, summary: dict[str, dict[str, float]]) -> str:
    parts = ["study=kd_accuracy", f"dataset={dataset}"]
    for name, s in summary.items():
        key = name.replace(".", "")
        parts += [f"{key}_val_auc={s['val_auc']:.4f}", f"{key}_val_acc={s['val_acc']:.4f}"]
    best = max(sorted(summary), key=lambda name: (summary[name]["val_acc"], summary[name]["val_auc"]))
    return "RESULT " + " ".join(parts) + f" best_by_val_acc={best}"


def result_line(dataset: str, summary: dict[str, dict[str, float]]) -> str:
    parts = [f"dataset={dataset}"]
    for name, s in summary.items():
        key = name.replace("+", "_")
        parts += [f"{key}_test_auc={s['test_auc']:.4f}", f"{key}_test_acc={s['test_acc']:.4f}"]
    return (
        "RESULT "
        + " ".join(parts)
        + f" best_by_val={best_by_val(summary)} best_by_val_acc={best_by_val(summary, 'val_acc')}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = students_run_parser("python -m benchmarks.loss_ablation", __doc__.split("\n\n")[0], seeds=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=list(CLASSIFICATION_LOSSES))
    parser.add_argument("--standardization", default="auto", help="auto (>= 3 classes), on or off")
    parser.add_argument(
        "--ls-losses", nargs="+", default=None, help="only these of --losses also run standardized (default: all)"
    )
    parser.add_argument(
        "--retrain-all", action="store_true", help="train ce and hinton_kd even when the run's KD gain has them"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the configuration's epochs (smoke runs)")
    parser.add_argument("--study", choices=["losses", "kd_accuracy"], default="losses", help="what to compare")
    parser.add_argument("--high-alpha", type=float, default=0.7, help="kd_accuracy: the higher CE weight")
    parser.add_argument("--branches", type=int, default=None, help="override the configuration's soup branches")
    parser.add_argument("--with-ce", action="store_true", help="kd_accuracy: also train without teachers")
    parser.add_argument(
        "--config-from",
        type=Path,
        default=None,
        help="train the configuration another benchmarks.students run served (same data) on --run's teachers, "
        "to compare two runs' teachers on one student; the CE runs of that run's KD gain are reused",
    )
    parser.add_argument("--only", nargs="+", default=None, help="kd_accuracy: train only these variants")
    args = parser.parse_args(argv)
    if not 0 <= args.high_alpha < 1:
        parser.error(f"--high-alpha must lie in [0, 1), got {args.high_alpha}")
    if args.branches is not None and args.branches < 1:
        parser.error(f"--branches must be >= 1, got {args.branches}")
    offered = list(accuracy_variants(args.high_alpha, args.with_ce))
    if args.only and (args.study != "kd_accuracy" or set(args.only) - set(offered)):
        parser.error(f"--only: choose among the kd_accuracy variants {offered}, got {args.only}")
    unknown = [loss for loss in args.losses if loss not in CLASSIFICATION_LOSSES]
    if unknown:
        parser.error(f"--losses: unknown {unknown}; choose from {list(CLASSIFICATION_LOSSES)}")
    if len(set(args.losses)) != len(args.losses):
        parser.error(f"--losses: each loss once, got {args.losses}")
    if args.ls_losses is not None and set(args.ls_losses) - set(args.losses):
        parser.error(f"--ls-losses: choose among --losses {args.losses}, got {args.ls_losses}")
    if args.standardization not in ("auto", "on", "off"):
        parser.error(f"--standardization must be auto, on or off, got {args.standardization!r}")
    check_students_run_args(parser, args)
    if args.config_from is not None and not (args.config_from / "results.json").is_file():
        parser.error(
            f"--config-from {args.config_from}: no results.json (the output folder of a benchmarks.students run)"
        )
    return args


def reusable_runs(args: argparse.Namespace, config: Any) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """The trainings of ``config`` at ``--seeds`` that need not run again, each with the run folder it
    comes from: those of ``--run``'s KD gain, and with ``--config-from`` the CE ones of that run's KD gain
    when ``--run`` has none (CE reads no teacher; its KD runs learned from the other run's teachers, so
    they are not reused). Empty with ``--retrain-all``."""
    if args.retrain_all:
        return {}
    gain = {kind: (args.run, runs) for kind, runs in kd_gain_runs(args.run, config, args.seeds).items()}
    if args.config_from is not None:
        other = kd_gain_runs(args.config_from, config, args.seeds)
        if "ce" in other:
            gain.setdefault("ce", (args.config_from, other["ce"]))
    return gain


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results, config, students, dataset = load_students_run(args.data, args.spec, args.run)
    if args.config_from is not None:
        config = served_config(args.config_from, dataset.fingerprint)
    if args.epochs is not None:
        config = config.model_copy(update={"epochs": args.epochs})
    if args.branches is not None:
        config = config.model_copy(update={"branches": args.branches})
    meta = DatasetMeta.of(dataset)
    if args.study == "kd_accuracy":
        return kd_accuracy_study(args, argv, started, results, config, students, dataset)
    if meta.task != "classification" or meta.multilabel:
        raise SystemExit(f"--data {args.data}: the logit losses are for single-label classification")
    try:
        chosen = variants(args.losses, meta.num_classes, args.standardization, args.ls_losses)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    gain = reusable_runs(args, config)
    # The KD gain's "kd" is this table's hinton_kd when the served configuration is plain Hinton KD;
    # its "ce" (alpha 1) never reads a teacher, whatever the loss.
    plain_kd = config.loss in (None, "hinton_kd") and not config.logit_standardization
    pairs = (("ce", "ce"), ("kd", "hinton_kd")) if plain_kd else (("ce", "ce"),)
    reused_pairs = {name: gain[kind] for kind, name in pairs if kind in gain and name in chosen}
    reused = {name: runs for name, (_, runs) in reused_pairs.items()}
    reused_from = {name: source for name, (source, _) in reused_pairs.items()}
    runs = retrain_variants(
        args.run, students, results, dataset, config, chosen, args.seeds, log, reused=reused, reused_from=reused_from
    )
    summary = {name: summarise(r) for name, r in runs.items()}
    report = {
        "command": "python -m benchmarks.loss_ablation " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": utc_date(),
        "load_average": load_average(),
        "wall_seconds": time.perf_counter() - started,
        "dataset": args.data.stem,
        "seeds": args.seeds,
        "config": {
            k: v
            for k, v in config.model_dump().items()
            if k not in ("seed", "loss", "logit_standardization", "teacher_weights")
        },
        "runs": runs,
        "summary": summary,
        "reused_from_kd_gain": {name: str(source) for name, source in reused_from.items()},
        "best_by_val": best_by_val(summary),
        "best_by_val_acc": best_by_val(summary, "val_acc"),
    }
    report["result_line"] = result_line(args.data.stem, summary)
    (args.run / "benchmark").mkdir(parents=True, exist_ok=True)
    (args.run / "benchmark" / "loss_ablation.json").write_text(json.dumps(report, indent=2, default=str))
    print(markdown(report))
    print(report["result_line"], flush=True)
    return 0


def kd_accuracy_study(args, argv, started, results, config, students, dataset) -> int:
    """``--study kd_accuracy``: every variant once per seed, scored on val only."""
    variants = accuracy_variants(args.high_alpha, args.with_ce)
    if args.only:
        variants = {name: update for name, update in variants.items() if name in args.only}
    runs = retrain_variants(args.run, students, results, dataset, config, variants, args.seeds, log, score_test=False)
    summary = {name: summarise(r, ("val_auc", "val_acc")) for name, r in runs.items()}
    report = {
        "command": "python -m benchmarks.loss_ablation " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": utc_date(),
        "load_average": load_average(),
        "wall_seconds": time.perf_counter() - started,
        "dataset": args.data.stem,
        "seeds": args.seeds,
        "config": {k: v for k, v in config.model_dump().items() if k not in ("seed", "teacher_temperatures")},
        "runs": runs,
        "summary": summary,
    }
    report["result_line"] = val_result_line(args.data.stem, summary)
    (args.run / "benchmark").mkdir(parents=True, exist_ok=True)
    (args.run / "benchmark" / "kd_accuracy.json").write_text(json.dumps(report, indent=2, default=str))
    print(val_markdown(report))
    print(report["result_line"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
