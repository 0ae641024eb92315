"""``medkd validate JOB.yaml --check-data``: the spec, then its dataset loaded and checked (imports torch)."""

from __future__ import annotations

import argparse

from medkd.cli.options import spec_from_args
from medkd.cli.validate import validate
from medkd.data.loader import load_dataset


def check_data(args: argparse.Namespace) -> int:
    validate(args)
    dataset = load_dataset(spec_from_args(args).data)
    print(f"data: {dataset.name} {dataset.fingerprint} {dataset.summary()}")
    return 0
