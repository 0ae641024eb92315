"""``medkd validate JOB.yaml``: check a spec without importing torch or Ray (well under a second)."""

from __future__ import annotations

import argparse

from medkd.cli.options import spec_from_args


def validate(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    spec.data.check_paths()  # a missing data file is reported now, not after Ray starts
    print(
        f"{args.spec}: valid job spec {spec.name!r} (fingerprint {spec.fingerprint()}), "
        f"task {spec.task}, data {spec.data.kind}, {len(spec.teachers)} teacher(s), "
        f"{spec.search.num_trials} search trial(s)"
    )
    return 0
