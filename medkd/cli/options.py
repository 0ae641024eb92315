"""What several commands share: reading the job spec named on the command line, with ``--set`` overrides."""

from __future__ import annotations

import argparse

from medkd.spec.job import JobSpec, load_spec, parse_override


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """The spec file ``args.spec`` with every ``--set KEY=VALUE`` applied."""
    overrides = dict(parse_override(text) for text in (args.set or []))
    return load_spec(args.spec, overrides=overrides)
