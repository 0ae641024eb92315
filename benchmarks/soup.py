"""Weight soup vs one run: the served student's configuration trained both ways on the same seeds.

    python -m benchmarks.soup --run runs/bench-students-breastmnist-v6 [--data PATH.npz]
        [--seeds 0 1 2 3] [--branches 4] [--forks 0.25 0.5]

Needs the output folder of a finished ``python -m benchmarks.students`` run on the same data:
its soft-label cache (the managed redis-server's data under ``RUN/redis``) and its selected
student (``RUN/results.json``). Nothing re-runs a teacher.

For each seed, the selected configuration is trained as one run (``branches = 1``) and as a
soup of ``--branches`` branches forked at each of ``--forks`` (share of the epochs trained once
before the fork), each through the search's own recipe
(:func:`benchmarks._student_setup.kd_gain_run`: distill on the cached views -> compress -> INT8 ONNX)
and scored on val and test after compression. Runs are Ray tasks of 1 CPU, two at a time here.

Ends with ``RESULT single_val_auc=... single_test_auc=... single_test_auc_std=...
single_min_test_auc=... soup_val_auc=... soup_test_auc=... soup_test_auc_std=...
soup_min_test_auc=... soup_test_acc=... single_test_acc=...`` for the first fork of ``--forks``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from benchmarks._harness import configure_local_ray, load_average, mean_std, utc_date

configure_local_ray()

from benchmarks._student_setup import (  # noqa: E402
    check_students_run_args,
    load_students_run,
    retrain_variants,
    students_run_parser,
)


def log(message: str) -> None:
    print(f"[soup {time.strftime('%H:%M:%S')}] {message}", flush=True)


def variants(branches: int, forks: list[float]) -> dict[str, dict[str, Any]]:
    """Config updates per variant name: one run, then one soup per fork point."""
    out: dict[str, dict[str, Any]] = {"single": {"branches": 1}}
    for fork in forks:
        out[f"soup{branches}@{fork:g}"] = {"branches": branches, "fork_fraction": fork}
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in ("val_auc", "test_auc", "test_acc"):
        out[metric], out[f"{metric}_std"] = mean_std([r[metric] for r in runs])
    out["min_test_auc"] = min(r["test_auc"] for r in runs)
    return out


def markdown(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    lines = [
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}; wall {report['wall_seconds'] / 60:.1f} min; load average {report['load_average']}",
        f"- Configuration: {report['config']}",
        "",
        "| variant | val AUC | test AUC | test ACC | min test AUC | "
        + " | ".join(f"seed {s} test AUC / ACC" for s in seeds)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(seeds),
    ]
    for name, runs in report["runs"].items():
        s = report["summary"][name]
        per_seed = " | ".join(f"{r['test_auc']:.4f} / {r['test_acc']:.4f}" for r in runs)
        lines.append(
            f"| {name} | {s['val_auc']:.4f} ± {s['val_auc_std']:.4f} | {s['test_auc']:.4f} ± {s['test_auc_std']:.4f} "
            f"| {s['test_acc']:.4f} ± {s['test_acc_std']:.4f} | {s['min_test_auc']:.4f} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"


def result_line(summary: dict[str, dict[str, float]], soup: str) -> str:
    single, chosen = summary["single"], summary[soup]
    parts = {
        "single_val_auc": single["val_auc"],
        "single_test_auc": single["test_auc"],
        "single_test_auc_std": single["test_auc_std"],
        "single_min_test_auc": single["min_test_auc"],
        "single_test_acc": single["test_acc"],
        "soup_val_auc": chosen["val_auc"],
        "soup_test_auc": chosen["test_auc"],
        "soup_test_auc_std": chosen["test_auc_std"],
        "soup_min_test_auc": chosen["min_test_auc"],
        "soup_test_acc": chosen["test_acc"],
    }
    return "RESULT " + " ".join(f"{k}={v:.4f}" for k, v in parts.items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = students_run_parser("python -m benchmarks.soup", __doc__.split("\n\n")[0], seeds=[0, 1, 2, 3])
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--forks", type=float, nargs="+", default=[0.25, 0.5])
    args = parser.parse_args(argv)
    if args.branches < 2:
        parser.error(f"--branches must be >= 2, got {args.branches}")
    if any(not 0 < fork < 1 for fork in args.forks):
        parser.error(f"--forks must be in (0, 1), got {args.forks}")
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two seeds (a spread needs two)")
    check_students_run_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results, config, students, dataset = load_students_run(args.data, args.spec, args.run)
    runs = retrain_variants(
        args.run, students, results, dataset, config, variants(args.branches, args.forks), args.seeds, log
    )
    summary = {name: summarise(r) for name, r in runs.items()}
    report = {
        "command": "python -m benchmarks.soup " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": utc_date(),
        "load_average": load_average(),
        "wall_seconds": time.perf_counter() - started,
        "seeds": args.seeds,
        "config": {k: v for k, v in config.model_dump().items() if k not in ("branches", "fork_fraction", "seed")},
        "runs": runs,
        "summary": summary,
    }
    report["result_line"] = result_line(summary, next(name for name in runs if name != "single"))
    (args.run / "benchmark").mkdir(parents=True, exist_ok=True)
    (args.run / "benchmark" / "soup.json").write_text(json.dumps(report, indent=2, default=str))
    print(markdown(report))
    print(report["result_line"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
