"""``medkd submit | status | logs | stop | jobs``: the command line of the Ray Jobs client.

The work is done by :mod:`medkd.cli.jobs_client` (requests), :mod:`medkd.cli.staging` (the
upload) and :mod:`medkd.cli.auth_token` (the token); this module parses arguments, prints
results and turns :class:`~medkd.cli.jobs_errors.JobsError` into one ``medkd: error: ...`` line.

Examples:
    >>> parser = argparse.ArgumentParser(prog="medkd")
    >>> add_jobs_parsers(parser.add_subparsers())
    >>> args = parser.parse_args(["status", "medkd-demo-1234", "--address", "http://127.0.0.1:8265"])
    >>> args.jobs_command
    'status'
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medkd.cli.jobs_client import (
    iter_job_logs,
    job_status,
    list_jobs,
    resolve_address,
    stop_job,
    submit_job,
    wait_for_job,
)
from medkd.cli.jobs_errors import JobsError, JobsSubmitWarning


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise argparse.ArgumentTypeError(f'expected a JSON object of numbers, e.g. {{"head": 1}}, got {text!r}')
    return {k: float(v) for k, v in value.items()}


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_jobs_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``submit``, ``status``, ``logs``, ``stop`` and ``jobs`` on ``subparsers``.

    Each sets ``args.handler = run_jobs_command``, so the caller dispatches with
    ``sys.exit(args.handler(args))``.
    """
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--address",
        default=None,
        help="the cluster's dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)",
    )

    submit = subparsers.add_parser(
        "submit",
        parents=[connection],
        help="run a job spec on a Ray cluster (Ray Jobs API)",
        description="Upload the project and JOB.yaml to a Ray cluster and run `medkd run JOB.yaml` "
        "there. Prints the job id on stdout. The token is taken from RAY_AUTH_TOKEN, "
        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. A relative output_dir in the spec lands in "
        "the job's temporary working directory on the cluster: use an absolute path on "
        "storage the cluster keeps.",
    )
    submit.add_argument("spec", type=Path, metavar="JOB.yaml", help="the job spec")
    submit.add_argument(
        "--project-dir", type=Path, default=None, help="project to upload (default: found from the current directory)"
    )
    submit.add_argument(
        "--no-project", action="store_true", help="upload only the spec (the cluster image has medkd installed)"
    )
    submit.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also leave out PATTERN: a name or glob at any depth (*.npz, data), or a path from the project "
        "root (/data/raw); repeatable",
    )
    submit.add_argument("--submission-id", default=None, help="job id to use (default: medkd-<name>-<random>)")
    submit.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for the job (repeatable)",
    )
    submit.add_argument(
        "--pass-env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this machine's $NAME to the job if it is set (repeatable)",
    )
    submit.add_argument("--entrypoint-num-cpus", type=_non_negative, default=None, help="CPUs reserved for the driver")
    submit.add_argument("--entrypoint-num-gpus", type=_non_negative, default=None, help="GPUs reserved for the driver")
    submit.add_argument(
        "--entrypoint-resources",
        type=_resources,
        default=None,
        metavar="JSON",
        help="custom resources for the driver, e.g. '{\"head\": 1}'",
    )
    submit.add_argument("--no-validate", action="store_true", help="do not check the spec's fields before uploading")
    submit.add_argument(
        "--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it succeeded"
    )
    submit.add_argument(
        "--run-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="everything after this is passed to `medkd run` on the cluster (put it last)",
    )
    submit.set_defaults(handler=run_jobs_command, jobs_command="submit")

    status = subparsers.add_parser("status", parents=[connection], help="status of a cluster job")
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=run_jobs_command, jobs_command="status")

    logs = subparsers.add_parser("logs", parents=[connection], help="logs of a cluster job")
    logs.add_argument("job_id", metavar="JOB_ID")
    logs.add_argument(
        "--follow", "-f", action="store_true", help="stream until the job ends; exit 0 only if it succeeded"
    )
    logs.set_defaults(handler=run_jobs_command, jobs_command="logs")

    stop = subparsers.add_parser("stop", parents=[connection], help="stop a cluster job")
    stop.add_argument("job_id", metavar="JOB_ID")
    stop.add_argument("--wait", action="store_true", help="wait until the job has ended")
    stop.set_defaults(handler=run_jobs_command, jobs_command="stop")

    jobs = subparsers.add_parser("jobs", parents=[connection], help="list the cluster's jobs")
    jobs.add_argument("--json", action="store_true", help="print the list as JSON")
    jobs.set_defaults(handler=run_jobs_command, jobs_command="jobs")


def _eprint(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _stream_logs(job_id: str, address: str) -> int:
    try:
        for chunk in iter_job_logs(job_id, address, follow=True):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        _eprint(f"stopped following; job {job_id} keeps running (medkd stop {job_id} ends it)")
        return 130
    final = wait_for_job(job_id, address, timeout_s=30, poll_s=0.5)
    _eprint(f"job {job_id} {final['status']}: {final['message'] or ''}".rstrip(": "))
    return 0 if final["status"] == "SUCCEEDED" else 1


def _cmd_submit(args: argparse.Namespace, address: str) -> int:
    env = dict(args.env)
    for name in args.pass_env:
        if name in os.environ:
            env[name] = os.environ[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", JobsSubmitWarning)
        try:
            job_id = submit_job(
                args.spec,
                address,
                project_dir=args.project_dir,
                extra_args=args.run_args,
                submission_id=args.submission_id,
                env=env or None,
                entrypoint_resources=args.entrypoint_resources,
                entrypoint_num_cpus=args.entrypoint_num_cpus,
                entrypoint_num_gpus=args.entrypoint_num_gpus,
                include_project=not args.no_project,
                excludes=args.exclude,
                validate=not args.no_validate,
            )
        finally:
            for warning in caught:
                if issubclass(warning.category, JobsSubmitWarning):
                    _eprint(f"medkd: warning: {warning.message}")
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    print(job_id, flush=True)
    _eprint(f"submitted {args.spec} to {address} as job {job_id}")
    if args.follow:
        return _stream_logs(job_id, address)
    _eprint(f"  status: medkd status {job_id} --address {address}")
    _eprint(f"  logs:   medkd logs {job_id} --follow --address {address}")
    _eprint(f"  stop:   medkd stop {job_id} --address {address}")
    return 0


_STATUS_FIELDS = (
    "job_id",
    "status",
    "message",
    "error_type",
    "entrypoint",
    "start_time",
    "end_time",
    "duration_s",
    "driver_exit_code",
)


def _cmd_status(args: argparse.Namespace, address: str) -> int:
    info = job_status(args.job_id, address)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for field in _STATUS_FIELDS:
        if info.get(field) is not None:
            print(f"{field + ':':<18}{info[field]}")
    return 0


def _cmd_logs(args: argparse.Namespace, address: str) -> int:
    if args.follow:
        return _stream_logs(args.job_id, address)
    for line in iter_job_logs(args.job_id, address):
        sys.stdout.write(line)
    sys.stdout.flush()
    return 0


def _cmd_stop(args: argparse.Namespace, address: str) -> int:
    was_running = stop_job(args.job_id, address)
    if not was_running:
        info = job_status(args.job_id, address)
        print(f"job {args.job_id} is not running ({info['status']}); nothing to stop")
        return 0
    print(f"stop requested for job {args.job_id}")
    if args.wait:
        info = wait_for_job(args.job_id, address, timeout_s=120, poll_s=0.5)
        print(f"job {args.job_id} {info['status']}")
    return 0


def _cmd_jobs(args: argparse.Namespace, address: str) -> int:
    jobs = list_jobs(address)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    if not jobs:
        print(f"no jobs on {address}")
        return 0
    rows = [("JOB_ID", "STATUS", "NAME", "START (UTC)", "DURATION_S")]
    for job in jobs:
        rows.append(
            (
                job["job_id"] or "-",
                job["status"],
                job["metadata"].get("medkd_job", "-"),
                (job["start_time"] or "-").replace("+00:00", ""),
                "-" if job["duration_s"] is None else f"{job['duration_s']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _quiet_ray_client_logs() -> None:
    """Ray's client logs every upload step at INFO; on the command line only warnings matter."""
    import ray.job_submission  # noqa: F401  (its modules set their loggers to INFO on import)

    for name in (
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
        "ray._private.runtime_env.packaging",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


_COMMANDS: dict[str, Callable[[argparse.Namespace, str], int]] = {
    "submit": _cmd_submit,
    "status": _cmd_status,
    "logs": _cmd_logs,
    "stop": _cmd_stop,
    "jobs": _cmd_jobs,
}


def run_jobs_command(args: argparse.Namespace) -> int:
    """Run the sub-command chosen by :func:`add_jobs_parsers`; returns the exit code.

    Errors are printed as one ``medkd: error: ...`` line on stderr (exit code 1), never as a
    traceback.
    """
    command = _COMMANDS.get(getattr(args, "jobs_command", None))
    _quiet_ray_client_logs()
    if command is None:
        _eprint(f"medkd: error: unknown jobs command {getattr(args, 'jobs_command', None)!r}")
        return 2
    try:
        return command(args, resolve_address(args.address))
    except (JobsError, TimeoutError) as error:
        _eprint(f"medkd: error: {error}")
        return 1
