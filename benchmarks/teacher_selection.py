"""Teacher selection on val (``search.teacher_selection: val_contribution``): what the rule drops on a
finished run, and what that does to the served student's configuration, same budget and seeds.

    python -m benchmarks.teacher_selection --run runs/bench-students-breastmnist-s12 \
        --data $MEDKD_DATA_DIR/breastmnist.npz [--seeds 0 1 2] [--epochs E] [--rule-only] [--each-teacher] [--no-ce]

Needs the output folder of a finished ``python -m benchmarks.students`` run on the same data: its
soft-label cache (the managed redis-server's data under ``RUN/redis``) and its selected student
(``RUN/results.json``). Nothing re-trains a teacher; a teacher the run did not distill from (the rule
dropped it) has no cached FKD views, so ``kd_<name>`` first computes them from its checkpoint in
``RUN/teachers``. ``ce`` and ``kd_all`` are read from the run's own KD gain when it trained the same
configuration at the same seeds.

1. The rule (:func:`medkd.registry.teacher_selection.select_teachers_for`, the run's operating point
   and ``distill: false`` teachers) on the teachers' cached val logits: one line per decision, with the
   val figures and paired-bootstrap SEs, and how often it drops each teacher over 20 bootstrap seeds
   (how close to the noise the decision is).
2. Unless ``--rule-only``: the served configuration trained once per seed as ``ce`` (no teacher),
   ``kd_all`` (the teachers the run's students learned from) and ``kd_selected`` (the teachers the
   rule keeps; not trained when it keeps them all) and, with ``--each-teacher``, ``kd_<name>`` from each
   teacher alone (``--no-ce`` leaves out ``ce``), each through the search's own recipe
   (:func:`benchmarks._student_setup.kd_gain_run`: distill -> compress -> INT8 ONNX), scored on val
   and test. Choose by val; test is reported beside it.

Ends with ``RESULT dataset=NAME dropped=... ce_val_auc=... kd_all_val_auc=... kd_selected_val_auc=...
... best_by_val=VARIANT``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import PASSWORD_ENV, configure_local_ray, load_average, managed_redis, utc_date

configure_local_ray()

from benchmarks._student_setup import (  # noqa: E402
    build_spec,
    check_students_run_args,
    kd_gain_runs,
    load_students_run,
    retrain_variants,
    students_run_parser,
    teacher_subset,
)
from medkd.data.meta import DatasetMeta  # noqa: E402
from medkd.registry.teacher_selection import (  # noqa: E402
    TeacherSelection,
    decision_lines,
    select_teachers,
    select_teachers_for,
)
from medkd.softlabels.store import SoftLabelCache  # noqa: E402

METRICS = ("val_auc", "val_acc", "test_auc", "test_acc")
STABILITY_SEEDS = 20


def log(message: str) -> None:
    print(f"[teacher-selection {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_rule(
    run: Path, students: argparse.Namespace, results: dict[str, Any], dataset: Any
) -> tuple[TeacherSelection, dict[str, int]]:
    """The rule on the run's cached val logits, and per teacher the number of bootstrap seeds that drop it."""
    with managed_redis(run / "redis", password_env=PASSWORD_ENV) as redis:
        spec = build_spec(students, redis_port=redis.port, dataset=dataset)
        spec = spec.model_copy(
            update={"search": spec.search.model_copy(update={"teacher_selection": "val_contribution"})}
        )
        cache = SoftLabelCache(spec.cache.redis_url, namespace=spec.cache.namespace, password_env=PASSWORD_ENV)
        try:
            val_logits = {
                t["name"]: cache.fetch(t["fingerprint"], results["dataset"]["fingerprint"], "val")
                for t in results["teachers"]
            }
        finally:
            cache.close()
    labels = dataset.splits["val"].labels
    multilabel = DatasetMeta.of(dataset).multilabel
    choice = select_teachers_for(spec, val_logits, labels, multilabel=multilabel)
    drops = {name: 0 for name in val_logits}
    for seed in range(STABILITY_SEEDS):
        other = select_teachers(
            val_logits,
            labels,
            manual=choice.manual,
            multilabel=multilabel,
            target_sensitivity=spec.export.target_sensitivity,
            positive_class=spec.export.positive_class,
            seed=seed,
        )
        for name in other.dropped:
            drops[name] += 1
    return choice, drops


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in METRICS:
        values = [r[metric] for r in runs]
        out[metric] = statistics.fmean(values)
        out[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def best_by_val(summary: dict[str, dict[str, float]]) -> str:
    """Highest mean val AUC, then val accuracy (the selection's order), ties by name."""
    return max(sorted(summary), key=lambda name: (summary[name]["val_auc"], summary[name]["val_acc"]))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}; wall {report['wall_seconds'] / 60:.1f} min; load average {report['load_average']}",
        f"- Rule: {report['selection']['rule']}",
        *(f"- {line}" for line in report["decisions"]),
        f"- Bootstrap seeds (of {STABILITY_SEEDS}) on which the rule drops each teacher: {report['stability']}",
    ]
    if report.get("runs"):
        seeds = report["seeds"]
        lines += [
            f"- Configuration: {report['config']}",
            "",
            "| variant | val AUC | val ACC | test AUC | test ACC | "
            + " | ".join(f"seed {s} val / test AUC, ACC" for s in seeds)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(seeds),
        ]
        for name, runs in report["runs"].items():
            s = report["summary"][name]
            marker = " (best val)" if name == report["best_by_val"] else ""
            per_seed = " | ".join(
                f"{r['val_auc']:.4f}, {r['val_acc']:.4f} / {r['test_auc']:.4f}, {r['test_acc']:.4f}" for r in runs
            )
            cells = " | ".join(f"{s[m]:.4f} ± {s[f'{m}_std']:.4f}" for m in METRICS)
            lines.append(f"| {name}{marker} | {cells} | {per_seed} |")
    return "\n".join(lines) + "\n"


def result_line(dataset: str, report: dict[str, Any]) -> str:
    parts = [f"dataset={dataset}", f"dropped={','.join(report['selection']['dropped']) or 'none'}"]
    for name, s in report.get("summary", {}).items():
        parts += [f"{name}_{m}={s[m]:.4f}" for m in METRICS]
    if report.get("summary"):
        parts.append(f"best_by_val={report['best_by_val']}")
    return "RESULT " + " ".join(parts)


def variants_for(
    learned_from: list[str],
    kept: list[str],
    teachers: list[str],
    *,
    with_ce: bool = True,
    each_teacher: bool = False,
) -> dict[str, dict[str, Any]]:
    """The trained variants: ``ce`` (no teacher; unless ``with_ce`` is False), ``kd_all`` (the teachers
    the run's students learned from), ``kd_selected`` (the rule's, when it differs) and, with
    ``each_teacher``, ``kd_<name>`` for every teacher of the run alone (what each one's soft labels
    are worth), except one already trained as another variant."""
    variants: dict[str, dict[str, Any]] = {"ce": {"alpha": 1.0}} if with_ce else {}
    variants["kd_all"] = {"teachers": list(learned_from)}
    if set(kept) != set(learned_from):
        variants["kd_selected"] = {"teachers": list(kept)}
    if each_teacher:
        trained = [set(v["teachers"]) for v in variants.values() if "teachers" in v]
        variants.update({f"kd_{name}": {"teachers": [name]} for name in teachers if {name} not in trained})
    return variants


def reusable_kd_gain(
    run: Path, config: Any, results: dict[str, Any], variants: dict[str, dict[str, Any]], seeds: list[int]
) -> dict[str, list[dict[str, Any]]]:
    """The variants the run's KD gain already trained (:func:`benchmarks._student_setup.kd_gain_runs`):
    ``ce``, and ``kd_all`` when distilling from the run's teachers leaves ``config`` as it is."""
    gain = kd_gain_runs(run, config, seeds)
    if not gain:
        return {}
    reused = {"ce": gain["ce"]} if "ce" in variants else {}
    if (
        "kd_all" in variants
        and config.model_copy(update=teacher_subset(variants["kd_all"], config, {}, results)[0]) == config
    ):
        reused["kd_all"] = gain["kd"]
    return reused


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = students_run_parser("python -m benchmarks.teacher_selection", __doc__.split("\n\n")[0], seeds=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override the configuration's epochs (smoke runs)")
    parser.add_argument("--rule-only", action="store_true", help="apply the rule only; train nothing")
    parser.add_argument("--each-teacher", action="store_true", help="also distill from each teacher alone")
    parser.add_argument("--no-ce", action="store_true", help="skip the variant without teachers")
    args = parser.parse_args(argv)
    check_students_run_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results, config, students, dataset = load_students_run(args.data, args.spec, args.run)
    if args.epochs is not None:
        config = config.model_copy(update={"epochs": args.epochs})
    choice, drops = run_rule(args.run, students, results, dataset)
    decisions = decision_lines(choice)
    for line in decisions:
        log(line)
    log(f"bootstrap seeds (of {STABILITY_SEEDS}) dropping each teacher: {drops}")
    report: dict[str, Any] = {
        "command": "python -m benchmarks.teacher_selection " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": utc_date(),
        "load_average": load_average(),
        "dataset": args.data.stem,
        "selection": choice.model_dump(mode="json"),
        "decisions": decisions,
        "stability": drops,
        "seeds": args.seeds,
    }
    if not args.rule_only:
        learned_from = (results.get("ensemble") or {}).get("distilled") or [t["name"] for t in results["teachers"]]
        variants = variants_for(
            learned_from,
            choice.kept,
            [t["name"] for t in results["teachers"]],
            with_ce=not args.no_ce,
            each_teacher=args.each_teacher,
        )
        if "kd_selected" not in variants:
            log("the rule keeps every teacher the run learned from: kd_selected is kd_all, not trained again")
        reused = reusable_kd_gain(args.run, config, results, variants, args.seeds)
        runs = retrain_variants(args.run, students, results, dataset, config, variants, args.seeds, log, reused=reused)
        report["runs"] = runs
        report["summary"] = {name: summarise(r) for name, r in runs.items()}
        report["best_by_val"] = best_by_val(report["summary"])
        report["config"] = {k: v for k, v in config.model_dump().items() if k not in ("seed", "teacher_weights")}
    report["wall_seconds"] = time.perf_counter() - started
    report["result_line"] = result_line(args.data.stem, report)
    (args.run / "benchmark").mkdir(parents=True, exist_ok=True)
    (args.run / "benchmark" / "teacher_selection.json").write_text(json.dumps(report, indent=2, default=str))
    print(markdown(report))
    print(report["result_line"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
