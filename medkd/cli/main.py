"""``medkd`` command line: run and validate jobs, submit them to a cluster, manage the cache.

    medkd run JOB.yaml [--resume] [--keep-serving] [--no-serve] [--set search.num_trials=2]
    medkd validate JOB.yaml [--check-data]
    medkd submit JOB.yaml --address http://HEAD:8265 | status | logs [--follow] | stop | jobs
    medkd cache ls | stats | verify | purge
    medkd serve MODEL_DIR [--port N] [--set max_batch_size=8] [--config-out serve_config.yaml]
    medkd models RUN_DIR [--select RANK]
    medkd cluster local up [--netns] [--workers N] | down | status

Commands that need torch or Ray (run, serve, models, validate --check-data) are modules of this
package named by their handler (``"medkd.cli.run:run"``) and imported only when they run, so
``medkd validate`` and ``--help`` answer in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from medkd.cli.cluster import add_cluster_parser
from medkd.cli.jobs import add_jobs_parsers
from medkd.cli.validate import validate as validate_spec
from medkd.softlabels.admin import add_cache_parser
from medkd.spec.base import SpecError

Handler = Callable[[argparse.Namespace], "int | None"]


def load_handler(handler: Handler | str) -> Handler:
    """A command's function, imported from ``"module:function"`` when given by name."""
    if callable(handler):
        return handler
    module, _, function = handler.partition(":")
    return getattr(importlib.import_module(module), function)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medkd", description="Multi-teacher knowledge distillation for medical imaging"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_spec(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("spec", type=Path, help="job spec (YAML)")
        sub.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a spec field, e.g. search.num_trials=2"
        )

    run = commands.add_parser("run", help="run a job end to end on this machine or RAY_ADDRESS")
    with_spec(run)
    run.add_argument("--resume", action="store_true", help="resume an interrupted search (Tuner.restore)")
    run.add_argument("--keep-serving", action="store_true", help="keep the endpoint up after the demo request")
    run.add_argument("--no-serve", action="store_true", help="skip the serve stage")
    run.set_defaults(handler="medkd.cli.run:run")

    validate = commands.add_parser("validate", help="check a job spec (and optionally its data) without running")
    with_spec(validate)
    validate.add_argument("--check-data", action="store_true", help="also load and validate the dataset")
    validate.set_defaults(handler=validate_spec)

    serve = commands.add_parser("serve", help="serve an exported model directory (or a run's output_dir)")
    serve.add_argument("model_dir")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--min-replicas", type=int, default=1)
    serve.add_argument("--max-replicas", type=int, default=2)
    serve.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="any serve: setting of a job spec, e.g. --set max_batch_size=8 --set gpus_per_replica=1",
    )
    serve.add_argument(
        "--config-out",
        metavar="FILE",
        help="write the Ray Serve config for MODEL_DIR to FILE and exit (deploy it with "
        "`serve deploy FILE`; cluster/kuberay/rayservice.yaml embeds one)",
    )
    serve.set_defaults(handler="medkd.cli.serve:serve")

    models = commands.add_parser("models", help="list a run's exported Pareto models; --select one to serve")
    models.add_argument("run_dir", help="a run's output_dir")
    models.add_argument("--select", metavar="ID_OR_RANK", help="make this model the one `medkd serve RUN_DIR` serves")
    models.set_defaults(handler="medkd.cli.models:models")

    add_jobs_parsers(commands)
    add_cluster_parser(commands)
    add_cache_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "check_data", False):
        args.handler = "medkd.cli.check_data:check_data"
    try:
        return int(load_handler(args.handler)(args) or 0)
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
    names = {
        "DataValidationError",
        "DataFileNotFoundError",
        "ModelDirError",
        "RedisServerNotFound",
        "JobsError",
        "JobsAuthError",
        "JobsConnectionError",
        "ExportError",
        "SearchInterrupted",
        "TeacherTrainingError",
        "RedisServerError",
        "RedisConnectionError",
        "CacheMissError",
        "CacheIntegrityError",
        "RequestError",
        "ServeRequestError",
        "ServeConfigError",
        "ClusterError",
    }
    if type(error).__name__ in names or any(c.__name__ in names for c in type(error).__mro__):
        return str(error)
    return None


if __name__ == "__main__":
    sys.exit(main())
