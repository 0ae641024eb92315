"""``medkd serve MODEL_DIR``: serve an exported model (or every Pareto model of a run) until stopped,
or write the Serve config file that ``serve deploy`` and a RayService take."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import ray

from medkd.serve import ha_proxy
from medkd.serve.app import deploy, resolve_model_dir, serve_until_stopped
from medkd.serve.serve_config import write_serve_config
from medkd.spec.base import SpecError
from medkd.spec.job import parse_override
from medkd.spec.serve import ServeConfig


def serve_config_from_args(args: argparse.Namespace):
    settings = {
        "host": args.host,
        "port": args.port,
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
    }
    settings.update(parse_override(text) for text in (args.set or []))
    try:
        return ServeConfig(**settings)
    except ValueError as error:
        raise SpecError(f"medkd serve --set: {error}") from error


def write_config(args: argparse.Namespace) -> int:
    """Write the Serve config of MODEL_DIR (for `serve deploy` or a RayService) instead of serving."""
    model_dir = Path(args.model_dir)
    # A local directory is written as an absolute path; a path that only exists on the cluster
    # (e.g. /shared/runs/quickstart) is written as given and must be absolute.
    if model_dir.exists():
        model_dir = model_dir.resolve()
    path = write_serve_config(args.config_out, model_dir, serve_config_from_args(args))
    print(
        f"wrote {path}: deploy it with `serve deploy {path}` (Ray's CLI), or embed it as a RayService's serveConfigV2",
        flush=True,
    )
    return 0


def serve(args: argparse.Namespace) -> int:
    if args.config_out:
        return write_config(args)
    model_dir = resolve_model_dir(args.model_dir)  # an export directory or a run's output_dir
    config = serve_config_from_args(args)
    started_ray = not ray.is_initialized()
    # HAProxy + direct ingress when haproxy is installed: read by Serve's processes at start-up, so
    # set before this command starts its own Ray instance (a running cluster's owner sets them).
    fast_path = ha_proxy.enable(own_ray=started_ray and not os.environ.get("RAY_ADDRESS"))
    print(fast_path.message, flush=True)
    try:
        if started_ray:
            ray.init(
                address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=True, dashboard_host="127.0.0.1"
            )
        url = deploy(model_dir, config)
        print(f"serving {model_dir} at {url} (POST {url.rstrip('/')}/predict) — Ctrl-C or SIGTERM to stop", flush=True)
        # Drains requests, then ends the Ray instance this command started (no agent left behind).
        serve_until_stopped(shutdown_ray=started_ray)
    finally:
        fast_path.close()
    return 0
