"""``medkd`` command line: run and validate jobs, submit them to a cluster, manage the cache.

    medkd run JOB.yaml [--resume] [--keep-serving] [--no-serve] [--set search.num_trials=2]
    medkd validate JOB.yaml
    medkd submit JOB.yaml --address http://HEAD:8265 | status | logs [--follow] | stop | jobs
    medkd cache ls | stats | verify | purge
    medkd serve MODEL_DIR [--port N] [--set max_batch_size=8] [--config-out serve_config.yaml]
    medkd models RUN_DIR [--select RANK]
    medkd cluster local up [--netns] [--workers N] | down | status
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from medkd.spec.job import SpecError, load_spec, parse_override


def _spec_from_args(args: argparse.Namespace):
    overrides = dict(parse_override(text) for text in (args.set or []))
    return load_spec(args.spec, overrides=overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    spec.data.check_paths()  # a missing data file is reported now, not after Ray starts
    print(f"{args.spec}: valid job spec {spec.name!r} (fingerprint {spec.fingerprint()}), "
          f"task {spec.task}, data {spec.data.kind}, {len(spec.teachers)} teacher(s), "
          f"{spec.search.num_trials} search trial(s)")
    if args.check_data:
        from medkd.data import load_dataset

        dataset = load_dataset(spec.data)
        print(f"data: {dataset.name} {dataset.fingerprint} {dataset.summary()}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from medkd.pipeline.runner import run_job

    spec = _spec_from_args(args)
    run_job(spec, resume=args.resume, keep_serving=args.keep_serving, serve=not args.no_serve)
    return 0


def _serve_config_from_args(args: argparse.Namespace):
    from medkd.spec.serve import ServeConfig

    settings = {"host": args.host, "port": args.port, "min_replicas": args.min_replicas,
                "max_replicas": args.max_replicas}
    settings.update(parse_override(text) for text in (args.set or []))
    try:
        return ServeConfig(**settings)
    except ValueError as error:
        raise SpecError(f"medkd serve --set: {error}") from error


def cmd_serve_config_out(args: argparse.Namespace) -> int:
    """Write the Serve config of MODEL_DIR (for `serve deploy` or a RayService) instead of serving."""
    from medkd.serve.serve_config import write_serve_config

    model_dir = Path(args.model_dir)
    # A local directory is written as an absolute path; a path that only exists on the cluster
    # (e.g. /shared/runs/quickstart) is written as given and must be absolute.
    if model_dir.exists():
        model_dir = model_dir.resolve()
    path = write_serve_config(args.config_out, model_dir, _serve_config_from_args(args))
    print(f"wrote {path}: deploy it with `serve deploy {path}` (Ray's CLI), or embed it as a RayService's serveConfigV2",
          flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.config_out:
        return cmd_serve_config_out(args)
    import ray

    from medkd.serve.app import deploy, resolve_model_dir, serve_until_stopped

    model_dir = resolve_model_dir(args.model_dir)  # an export directory or a run's output_dir
    config = _serve_config_from_args(args)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=True, dashboard_host="127.0.0.1")
    url = deploy(model_dir, config)
    print(f"serving {model_dir} at {url} (POST {url.rstrip('/')}/predict) — Ctrl-C or SIGTERM to stop", flush=True)
    # Drains requests, then ends the Ray instance this command started (no agent left behind).
    serve_until_stopped(shutdown_ray=started_ray)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List a run's exported (Pareto) models, or select which one `medkd serve RUN_DIR` serves."""
    import json

    from medkd.registry.export import SELECTED_FILE, ExportError, registry_dir

    registry = registry_dir(Path(args.run_dir))
    entries = sorted(p for p in registry.glob("*/metadata.json")) if registry.is_dir() else []
    if not entries:
        raise ExportError(f"{registry}: no exported models (run the job first)")
    models = [json.loads(p.read_text()) for p in entries]
    models.sort(key=lambda m: m["search"]["pareto_rank"])
    selected = (registry / SELECTED_FILE).read_text().strip() if (registry / SELECTED_FILE).is_file() else None
    if args.select is not None:
        matches = [m for m in models if m["model_id"] == args.select or str(m["search"]["pareto_rank"]) == args.select]
        if not matches:
            raise ExportError(f"--select {args.select}: no model with that id or Pareto rank in {registry}")
        selected = matches[0]["model_id"]
        (registry / SELECTED_FILE).write_text(selected + "\n")
        print(f"selected {selected}")
    for model in models:
        metrics = model["metrics"]
        quality = {k: v for k, v in metrics["test"].items() if k in ("auc", "acc", "dice")}
        mark = "*" if model["model_id"] == selected else " "
        print(f"{mark} rank {model['search']['pareto_rank']}  {model['model_id']}  {model['config']['student']} "
              f"w={model['config']['width']:.2f} {model['config']['quantize']}  params={metrics['params']:,}  "
              f"bytes={metrics['model_bytes']:,}  latency={metrics['latency_ms']:.3f}ms  "
              + "  ".join(f"test_{k}={v:.4f}" for k, v in quality.items() if v is not None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medkd", description="Multi-teacher knowledge distillation for medical imaging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_spec(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("spec", type=Path, help="job spec (YAML)")
        sub.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec field, e.g. search.num_trials=2")

    run = commands.add_parser("run", help="run a job end to end on this machine or RAY_ADDRESS")
    with_spec(run)
    run.add_argument("--resume", action="store_true", help="resume an interrupted search (Tuner.restore)")
    run.add_argument("--keep-serving", action="store_true", help="keep the endpoint up after the demo request")
    run.add_argument("--no-serve", action="store_true", help="skip the serve stage")
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", help="check a job spec (and optionally its data) without running")
    with_spec(validate)
    validate.add_argument("--check-data", action="store_true", help="also load and validate the dataset")
    validate.set_defaults(handler=cmd_validate)

    serve = commands.add_parser("serve", help="serve an exported model directory (or a run's output_dir)")
    serve.add_argument("model_dir")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--min-replicas", type=int, default=1)
    serve.add_argument("--max-replicas", type=int, default=2)
    serve.add_argument("--set", action="append", metavar="FIELD=VALUE",
                       help="any serve: setting of a job spec, e.g. --set max_batch_size=8 --set gpus_per_replica=1")
    serve.add_argument("--config-out", metavar="FILE",
                       help="write the Ray Serve config for MODEL_DIR to FILE and exit (deploy it with "
                            "`serve deploy FILE`; cluster/kuberay/rayservice.yaml embeds one)")
    serve.set_defaults(handler=cmd_serve)

    models = commands.add_parser("models", help="list a run's exported Pareto models; --select one to serve")
    models.add_argument("run_dir", help="a run's output_dir")
    models.add_argument("--select", metavar="ID_OR_RANK", help="make this model the one `medkd serve RUN_DIR` serves")
    models.set_defaults(handler=cmd_models)

    try:
        from medkd.cli.jobs import add_jobs_parsers

        add_jobs_parsers(commands)
    except ImportError:  # pragma: no cover - optional during development
        pass
    from medkd.cli.cluster import add_cluster_parser

    add_cluster_parser(commands)
    try:
        from medkd.softlabels.admin import add_cache_parser

        add_cache_parser(commands)
    except ImportError:  # pragma: no cover
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        known = _known_error(error)
        if known is None:
            raise
        print(f"error: {known}", file=sys.stderr)
        return 1


def _known_error(error: Exception) -> str | None:
    """User-facing errors are printed as one message, not a traceback."""
    names = {"DataValidationError", "DataFileNotFoundError", "ModelDirError", "RedisServerNotFound", "JobsError", "JobsAuthError", "JobsConnectionError",
             "ExportError", "SearchInterrupted", "TeacherTrainingError", "RedisServerError", "RedisConnectionError", "CacheMissError", "CacheIntegrityError", "RequestError", "ServeRequestError", "ServeConfigError", "ClusterError"}
    if type(error).__name__ in names or any(c.__name__ in names for c in type(error).__mro__):
        return str(error)
    return None


if __name__ == "__main__":
    sys.exit(main())
