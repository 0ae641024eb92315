"""How each stage of ``benchmarks.students`` grows with the training split, from its budget rules.

    python -m benchmarks.profile_scale [--sizes 2000,5000,8000,34561] [--val-ratio 0.188]
        [--test-ratio 0.514] [--cnn-ms 15.5] [--vit-ms 8.0] [--infer-ms 4.8] [--student-ms 6.0] [--trial-s 26]

For each training-split size (28x28 images) it derives, from the same functions the benchmark
uses (:func:`medkd.teachers.recipe.auto_epochs`, :mod:`benchmarks._student_setup`), the work of
every stage in images processed, and an **extrapolated** time from per-image costs given on the
command line (defaults: the quiet 5,000-image run of 2026-11-26 in ``benchmarks/RESULTS.md``,
with the teachers and their inference sped up by the bf16 factors measured by
``benchmarks.profile_training``):

- teachers (CNN and ViT side by side, 1 CPU each: the slower one counts): ``epochs * n`` training
  images + ``epochs * n_val`` validation images each;
- soft labels: ``n + n_val + n_test + views * n`` teacher passes per teacher (both side by side);
- search: ``trials * epochs * n`` student samples at most, and the typical case of the 5,000-image
  run (2 trials complete, the others stopped by ASHA at the first rung), 2 trials at a time, plus
  each trial's fixed cost (compression, ONNX and INT8 export, latency; ``--trial-s``);
- KD gain: ``2 * seeds * epochs * n`` student samples, 2 at a time.

Val and test sizes follow OrganAMNIST's ratios to its training split by default. Splits of at
most 2,000 images also train the final weight soup and soup KD-gain runs, which this model leaves
out (use it above 2,000 images). The figures are
a model, not a measurement: they show how the work grows (exactly, from the rules) and what the
time would be at the given per-image costs. Ends with ``RESULT`` giving the extrapolated minutes
per size.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks._student_setup import search_trials, student_epochs, view_count
from medkd.teachers.recipe import auto_epochs

TEMPLATE_EPOCHS, TEMPLATE_TRIALS, TEMPLATE_VIEWS, TEMPLATE_GRACE = 40, 12, 8, 10  # examples/breastmnist.yaml
SEEDS = 3
CONCURRENT = 2  # search trials and KD-gain retrainings at a time on 2 CPUs
FIXED_S = 60.0  # Ray and redis start, data loading, export, speed (the 5,000-image run: about a minute)


def stage_work(n: int, val_ratio: float, test_ratio: float) -> dict[str, Any]:
    """Images processed per stage for a training split of ``n`` 28x28 images (see the module docstring)."""
    n_val, n_test = round(n * val_ratio), round(n * test_ratio)
    teacher_epochs = auto_epochs(n)
    epochs = student_epochs(n, TEMPLATE_EPOCHS)
    trials = search_trials(n, epochs, TEMPLATE_TRIALS)
    grace = max(1, round(TEMPLATE_GRACE * epochs / TEMPLATE_EPOCHS))
    views = min(epochs, view_count(n, TEMPLATE_VIEWS))
    complete = min(trials, 2)
    return {
        "n": n,
        "teacher_epochs": teacher_epochs,
        "teacher_train": teacher_epochs * n,
        "teacher_val": teacher_epochs * n_val,
        "views": views,
        "soft_label_passes": n + n_val + n_test + views * n,
        "trials": trials,
        "student_epochs": epochs,
        "grace": grace,
        "search_max": trials * epochs * n,
        "search_typical": (complete * epochs + (trials - complete) * grace) * n,
        "kd_gain": 2 * SEEDS * epochs * n,
    }


def stage_minutes(work: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Extrapolated minutes per stage from the per-image costs in ``args``."""
    infer = args.infer_ms * work["teacher_val"]
    teachers = max(args.cnn_ms * work["teacher_train"], args.vit_ms * work["teacher_train"]) + infer
    minutes = {
        "teachers": teachers / 1000 / 60,
        "soft_labels": args.infer_ms * work["soft_label_passes"] / 1000 / 60,
        "search": (args.student_ms * work["search_typical"] / 1000 + args.trial_s * work["trials"]) / CONCURRENT / 60,
        "kd_gain": args.student_ms * work["kd_gain"] / CONCURRENT / 1000 / 60,
        "fixed": FIXED_S / 60,
    }
    minutes["total"] = sum(minutes.values())
    return minutes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,5000,8000,34561")
    parser.add_argument("--val-ratio", type=float, default=6_491 / 34_561, help="val / train (OrganAMNIST's)")
    parser.add_argument("--test-ratio", type=float, default=17_778 / 34_561, help="test / train (OrganAMNIST's)")
    parser.add_argument("--cnn-ms", type=float, default=15.5, help="ResNet-18 teacher, ms per training image")
    parser.add_argument("--vit-ms", type=float, default=8.0, help="ViT teacher, ms per training image")
    parser.add_argument("--infer-ms", type=float, default=4.8, help="teacher inference, ms per image (slower one)")
    parser.add_argument(
        "--student-ms", type=float, default=6.0, help="student, ms per sample incl. per-trial costs (1 CPU)"
    )
    parser.add_argument("--trial-s", type=float, default=26.0, help="fixed seconds per search trial (1 CPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        "| train images | teacher epochs (images seen each) | soft-label passes per teacher (views) | "
        "search trials x epochs (rung), samples typical / max | KD gain samples | "
        "extrapolated min: teachers / soft labels / search / KD gain / total |"
    )
    print("|---|---|---|---|---|---|")
    totals = {}
    for n in (int(s) for s in args.sizes.split(",")):
        w = stage_work(n, args.val_ratio, args.test_ratio)
        m = stage_minutes(w, args)
        totals[n] = m["total"]
        print(
            f"| {n:,} | {w['teacher_epochs']} ({w['teacher_train']:,}) | {w['soft_label_passes']:,} ({w['views']}) | "
            f"{w['trials']} x {w['student_epochs']} ({w['grace']}), {w['search_typical']:,} / {w['search_max']:,} | "
            f"{w['kd_gain']:,} | {m['teachers']:.1f} / {m['soft_labels']:.1f} / {m['search']:.1f} / "
            f"{m['kd_gain']:.1f} / **{m['total']:.1f}** |"
        )
    print("RESULT " + " ".join(f"extrapolated_min_{n}={v:.1f}" for n, v in totals.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
