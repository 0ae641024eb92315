"""The Ray Jobs client: submit a job spec, query, follow and stop jobs on a Ray cluster.

``submit_job`` uploads a staging directory (:mod:`medkd.cli.staging`) as the job's
``runtime_env.working_dir`` and runs ``python -m medkd.cli.main run <spec>`` there. Every
request sends the token of :mod:`medkd.cli.auth_token`. A missing or wrong token, an
unreachable address, or an unknown job id become one-line :class:`~medkd.cli.jobs_errors.JobsError`
messages.

Examples:

    >>> job_id = submit_job(Path("examples/quickstart.yaml"), "http://127.0.0.1:8265")  # doctest: +SKIP
    >>> job_status(job_id, "http://127.0.0.1:8265")["status"]  # doctest: +SKIP
    'RUNNING'
    >>> for chunk in iter_job_logs(job_id, "http://127.0.0.1:8265", follow=True):  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from medkd.cli.auth_token import auth_error, find_auth_token
from medkd.cli.jobs_errors import JobsConnectionError, JobsError, JobsNotFoundError, JobsSubmitWarning, first_line
from medkd.cli.staging import (
    DEFAULT_EXCLUDES,
    UPLOAD_LIMIT_BYTES,
    default_entrypoint,
    find_project_dir,
    job_slug,
    load_spec_mapping,
    staged_working_dir,
    validate_spec_locally,
    warn_relative_data_paths,
    warn_relative_output_dir,
)

ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
AGENT_WAIT_S = 60.0  # how long submit_job waits for a just-started head's job agent
_NO_AGENT = "No available agent to submit job"
_TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


def resolve_address(address: str | None = None) -> str:
    """The dashboard URL of the cluster: ``address``, else ``RAY_API_SERVER_ADDRESS``, else
    ``RAY_ADDRESS``.

    Raises:
        JobsError: no address anywhere, or it is not an ``http(s)://HOST:PORT`` URL.
    """
    source = "--address"
    if not address:
        for name in ADDRESS_ENV_VARS:
            if os.environ.get(name):
                address, source = os.environ[name], name
                break
    if not address:
        raise JobsError("no Ray cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    return check_address(address, source)


def check_address(address: str, source: str = "address") -> str:
    parts = urlsplit(address.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise JobsError(
            f"{source}={address!r} is not the HTTP address of a Ray dashboard; expected e.g. http://HEAD:8265"
        )
    return address.strip().rstrip("/")


@dataclass(frozen=True)
class _Connection:
    client: Any  # ray.job_submission.JobSubmissionClient
    address: str
    token: str | None


@contextlib.contextmanager
def _without_env(names: Sequence[str]) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _connect(address: str) -> _Connection:
    address = check_address(address)
    token = find_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    from ray.job_submission import JobSubmissionClient

    with _translate_errors(address, token):
        # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is
        # given; an explicit address must win (a driver's RAY_ADDRESS=auto would otherwise too).
        with _without_env(ADDRESS_ENV_VARS):
            client = JobSubmissionClient(address, headers=headers)
    return _Connection(client, address, token)


_STATUS_IN_MESSAGE = re.compile(r"status code (\d{3})")
_ERRNO_REASON = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


@contextlib.contextmanager
def _translate_errors(address: str, token: str | None, job_id: str | None = None) -> Iterator[None]:
    """Turn what Ray's client, requests and aiohttp raise into one-line :class:`JobsError`s."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except JobsError:
        raise
    except AuthenticationError:
        raise auth_error(address, token) from None
    except aiohttp.WSServerHandshakeError as error:
        if error.status in (401, 403):
            raise auth_error(address, token) from None
        if error.status == 404 and job_id is not None:
            raise JobsNotFoundError(f"no job {job_id!r} on the Ray cluster at {address}") from None
        raise JobsError(f"the Ray cluster at {address} refused to stream logs: HTTP {error.status}") from None
    except (ConnectionError, requests.exceptions.RequestException, aiohttp.ClientError) as error:
        reason = _ERRNO_REASON.search(str(error))
        raise JobsConnectionError(
            f"cannot reach the Ray dashboard at {address}"
            + (f" ({reason.group(1).strip()})" if reason else "")
            + ": is the head node running and its dashboard port reachable from here?"
        ) from None
    except RuntimeError as error:
        text = first_line(error)
        if "Version check returned 404" in text:
            raise JobsConnectionError(f"{address} answers HTTP but is not a Ray dashboard") from None
        match = _STATUS_IN_MESSAGE.search(text)
        status = int(match.group(1)) if match else None
        if status == 404 and job_id is not None:
            raise JobsNotFoundError(f"no job {job_id!r} on the Ray cluster at {address}") from None
        if status == 413:
            raise JobsError(
                f"the upload is larger than the Ray dashboard accepts "
                f"({UPLOAD_LIMIT_BYTES // 2**20} MiB zipped): exclude large files with --exclude "
                "or a .rayignore, and read data from storage the cluster can reach"
            ) from None
        raise JobsError(f"the Ray cluster at {address} refused the request: {text}") from None


def submit_job(
    spec_path: Path,
    address: str,
    *,
    project_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    submission_id: str | None = None,
    env: dict[str, str] | None = None,
    entrypoint_resources: Mapping[str, float] | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    include_project: bool = True,
    excludes: Sequence[str] = (),
    validate: bool = True,
    entrypoint: str | None = None,
) -> str:
    """Submit a job spec to a Ray cluster through the Jobs API; returns the submission id.

    The job runs ``python -m medkd.cli.main run <spec> [extra_args]`` in a working directory
    that mirrors the project plus the spec (see the module docstring).

    Args:
        spec_path: the job spec YAML.
        address: the cluster's dashboard URL, e.g. ``http://HEAD:8265``.
        project_dir: the project to upload; default :func:`find_project_dir`.
        extra_args: appended to the ``medkd run`` command line on the cluster.
        submission_id: the job id; default ``medkd-<spec name>-<random>``. Must be unused.
        env: environment variables for the job (``runtime_env.env_vars``). Nothing of this
            machine's environment is passed implicitly: its ``RAY_AUTH_*`` / ``RAY_ADDRESS``
            describe this machine, not the cluster, and the token would show in the dashboard.
        entrypoint_resources: custom resources reserved for the driver, e.g. ``{"head": 1}``.
        entrypoint_num_cpus: CPUs reserved for the driver (Ray's default: 0).
        entrypoint_num_gpus: GPUs reserved for the driver (Ray's default: 0).
        include_project: False uploads only the spec; the cluster's image must then have medkd
            installed.
        excludes: more patterns to leave out, added to :data:`DEFAULT_EXCLUDES`.
        validate: check the spec's fields here before uploading (data paths are not checked).
        entrypoint: replace the ``medkd run`` command (the upload is the same).

    Raises:
        JobsError: the spec is missing or invalid, or the cluster refused the job.
        JobsAuthError: missing or wrong authentication token.
        JobsConnectionError: nothing answers at ``address``, or not a Ray dashboard.
    """
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise JobsError(f"{spec_path}: job spec file not found")
    raw = load_spec_mapping(spec_path)
    if validate:
        validate_spec_locally(spec_path, raw)
    for key, value in (env or {}).items():
        if not isinstance(key, str) or not key or "=" in key or not isinstance(value, str):
            raise JobsError(f"env: {key!r}={value!r} is not a NAME=VALUE pair of strings")

    if include_project:
        project_dir = Path(project_dir).resolve() if project_dir is not None else find_project_dir()
        if project_dir is None:
            warnings.warn(
                "no medkd project found (no pyproject.toml + medkd/ above the current directory): "
                "uploading only the job spec, so the cluster's image must have medkd installed",
                JobsSubmitWarning,
                stacklevel=2,
            )
        elif not project_dir.is_dir():
            raise JobsError(f"project_dir: {project_dir} is not a directory")
    else:
        project_dir = None

    connection = _connect(address)
    all_excludes = [*DEFAULT_EXCLUDES, *excludes]
    with staged_working_dir(spec_path, project_dir, all_excludes, UPLOAD_LIMIT_BYTES) as stage:
        warn_relative_data_paths(raw, spec_path, stage.spec_moved)
        if entrypoint is None:
            warn_relative_output_dir(raw, spec_path, extra_args)
        if stage.total_bytes > UPLOAD_LIMIT_BYTES:
            warnings.warn(
                f"the upload is {stage.total_bytes / 2**20:.0f} MiB before compression and the "
                f"dashboard accepts {UPLOAD_LIMIT_BYTES // 2**20} MiB zipped: if it is refused, "
                "leave data out with --exclude or a .rayignore",
                JobsSubmitWarning,
                stacklevel=2,
            )
        for relpath, size in stage.too_large:
            warnings.warn(
                f"not uploading {relpath} ({size / 2**20:.0f} MiB, over the dashboard's "
                f"{UPLOAD_LIMIT_BYTES // 2**20} MiB limit): the job must read it from storage "
                "the cluster can reach",
                JobsSubmitWarning,
                stacklevel=2,
            )
        # The mirror already leaves out the excludes and the too-large files; Ray still applies
        # the project's .gitignore / .rayignore files, which are mirrored like any file.
        runtime_env: dict[str, Any] = {"working_dir": str(stage.root)}
        if env:
            runtime_env["env_vars"] = dict(env)
        command = entrypoint or default_entrypoint(stage.spec_relpath, extra_args)
        job_id = submission_id or f"medkd-{job_slug(raw, spec_path)}-{secrets.token_hex(4)}"
        metadata = {"medkd_spec": stage.spec_relpath.as_posix(), "medkd_job": job_slug(raw, spec_path)}
        # A head that has just started answers 500 "No available agent to submit job, please try
        # again later" until its job agent is up (seen on a loaded machine): wait for it, bounded.
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                with _translate_errors(connection.address, connection.token):
                    return connection.client.submit_job(
                        entrypoint=command,
                        submission_id=job_id,
                        runtime_env=runtime_env,
                        metadata=metadata,
                        entrypoint_num_cpus=entrypoint_num_cpus,
                        entrypoint_num_gpus=entrypoint_num_gpus,
                        entrypoint_resources=dict(entrypoint_resources) if entrypoint_resources else None,
                    )
            except JobsError as error:
                if _NO_AGENT not in str(error) or time.monotonic() > deadline:
                    raise
            time.sleep(1.0)


def _iso(milliseconds: int | None) -> str | None:
    if milliseconds is None:
        return None
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC).isoformat(timespec="seconds")


def _details_dict(details: Any) -> dict[str, Any]:
    start, end = details.start_time, details.end_time
    return {
        "job_id": details.submission_id or details.job_id,
        "type": str(getattr(details.type, "value", details.type)),
        "status": str(getattr(details.status, "value", details.status)),
        "message": details.message,
        "error_type": details.error_type,
        "entrypoint": details.entrypoint,
        "start_time": _iso(start),
        "end_time": _iso(end),
        "duration_s": round((end - start) / 1000, 3) if start and end else None,
        "driver_exit_code": details.driver_exit_code,
        "metadata": dict(details.metadata or {}),
    }


def job_status(job_id: str, address: str) -> dict[str, Any]:
    """Status of one job.

    Returns:
        ``job_id``, ``type``, ``status`` (PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED),
        ``message``, ``error_type``, ``entrypoint``, ``start_time`` / ``end_time`` (ISO 8601 UTC or
        None), ``duration_s``, ``driver_exit_code``, ``metadata``.

    Raises:
        JobsNotFoundError: no such job. (And as :func:`submit_job`.)
    """
    connection = _connect(address)
    with _translate_errors(connection.address, connection.token, job_id):
        return _details_dict(connection.client.get_job_info(job_id))


def list_jobs(address: str) -> list[dict[str, Any]]:
    """Every job the cluster knows (submitted ones and plain drivers), oldest first, as
    :func:`job_status` dicts."""
    connection = _connect(address)
    with _translate_errors(connection.address, connection.token):
        jobs = connection.client.list_jobs()
    return [_details_dict(job) for job in sorted(jobs, key=lambda job: job.start_time or 0)]


def stop_job(job_id: str, address: str) -> bool:
    """Ask the cluster to stop a job (SIGTERM, then SIGKILL after Ray's grace period).

    Returns:
        True if the job was running, False if it had already ended.
    """
    connection = _connect(address)
    with _translate_errors(connection.address, connection.token, job_id):
        return bool(connection.client.stop_job(job_id))


def iter_job_logs(job_id: str, address: str, *, follow: bool = False) -> Iterator[str]:
    """The job's driver output.

    Args:
        follow: keep streaming until the job ends (chunks as the driver writes them); otherwise
            the logs so far, line by line.
    """
    connection = _connect(address)
    if not follow:
        with _translate_errors(connection.address, connection.token, job_id):
            text = connection.client.get_job_logs(job_id)
        yield from text.splitlines(keepends=True)
        return
    with _translate_errors(connection.address, connection.token, job_id):
        connection.client.get_job_info(job_id)  # a clear "no such job" before streaming
    yield from _follow(connection, job_id)


def _follow(connection: _Connection, job_id: str) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    stream = connection.client.tail_job_logs(job_id)
    try:
        while True:
            with _translate_errors(connection.address, connection.token, job_id):
                try:
                    chunk = loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
            yield chunk
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(stream.aclose())
        loop.close()


def wait_for_job(job_id: str, address: str, *, timeout_s: float | None = None, poll_s: float = 1.0) -> dict[str, Any]:
    """Poll until the job reaches SUCCEEDED, FAILED or STOPPED; returns its final status.

    Raises:
        TimeoutError: still not finished after ``timeout_s`` seconds.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = job_status(job_id, address)
        if info["status"] in _TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {info['status']} after {timeout_s:g} s")
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------
# Command line
