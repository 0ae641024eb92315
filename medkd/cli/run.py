"""``medkd run JOB.yaml``: the whole pipeline on this machine, or on the cluster at ``RAY_ADDRESS``."""

from __future__ import annotations

import argparse

from medkd.cli.options import spec_from_args
from medkd.pipeline.runner import run_job


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    run_job(spec, resume=args.resume, keep_serving=args.keep_serving, serve=not args.no_serve)
    return 0
