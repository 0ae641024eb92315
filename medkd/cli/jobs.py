"""Cluster submission through the Ray Jobs API: ``medkd submit | status | logs | stop | jobs``.

``medkd submit JOB.yaml --address http://HEAD:8265`` sends the job spec and the medkd project to a
Ray cluster and runs ``python -m medkd.cli.main run <spec>`` there. What is uploaded (the
job's ``runtime_env.working_dir``) is a *staging directory* that mirrors the project:

* every directory of the project is re-created and every file is a symlink to the original (no
  bytes copied; Ray's packager follows the links when it zips), minus :data:`DEFAULT_EXCLUDES`
  (``.git``, ``.venv``, ``runs/``, caches, ``*.onnx`` outputs, ...) and minus single files too
  large for the dashboard's upload limit;
* the job spec is a real copy at its own path relative to the project (so relative data paths
  in it resolve exactly as they do locally), or at the staging root when it lives outside the
  project.

Staging rather than pointing ``working_dir`` at the project has one reason: the spec must reach
the cluster even when it lives outside the project, in an excluded folder such as ``runs/``, or
has local edits. ``py_modules=[medkd]`` plus a spec-only working dir would drop ``examples/`` and
the relative paths in the spec. Ray still applies ``.gitignore`` / ``.rayignore`` (mirrored like
any file), and its content hash makes a re-submit of an unchanged project skip the upload.

On the cluster the job's working directory is that unpacked package: a relative ``output_dir``
in the spec lands there, in a per-job temporary folder that Ray may garbage-collect. Give cluster
jobs an absolute ``output_dir`` on storage the cluster keeps (a volume, NFS, ...).

Ray 2.60 turns token authentication on by default. The token is found the way Ray finds it
(:func:`find_auth_token`) and always sent as ``Authorization: Bearer ...`` -- Ray's own client
only sends it when the *local* ``RAY_AUTH_MODE`` is ``token``. A missing or wrong token, an
unreachable address, or an unknown job id become one-line :class:`JobsError` messages.

Examples:
    >>> job_id = submit_job(Path("examples/quickstart.yaml"), "http://127.0.0.1:8265")  # doctest: +SKIP
    >>> job_status(job_id, "http://127.0.0.1:8265")["status"]  # doctest: +SKIP
    'RUNNING'
    >>> for chunk in iter_job_logs(job_id, "http://127.0.0.1:8265", follow=True):  # doctest: +SKIP
    ...     print(chunk, end="")
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import json
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, Sequence

import yaml

ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TOKEN_ENV_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV_VAR = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")
CLI_MODULE = "medkd.cli.main"

#: Never uploaded. A pattern without ``/`` matches a file or folder name at any depth (``*`` and
#: ``?`` wildcards); a pattern with a ``/`` is a path from the project root.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git",
    ".hg",
    ".venv",
    "venv",
    ".tox",
    "__pycache__",
    "*.pyc",
    "*.pyo",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".ipynb_checkpoints",
    "node_modules",
    "*.egg-info",
    ".DS_Store",
    "*.onnx",
    "*.onnx.data",
    "/runs",
    "/build",
    "/dist",
    "/.medkd",
)

#: The Ray dashboard refuses request bodies above this, working_dir uploads included
#: (``ray._private.ray_constants.DASHBOARD_CLIENT_MAX_SIZE``; not imported here because importing
#: Ray costs seconds on every ``medkd`` command; a test keeps the two equal).
UPLOAD_LIMIT_BYTES = 100 * 1024**2

_TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class JobsError(Exception):
    """A Ray Jobs request that could not be carried out; the message is one line for the user."""


class JobsAuthError(JobsError):
    """The cluster requires a token and none was found, or it rejected the token sent."""


class JobsConnectionError(JobsError):
    """The address does not answer, or does not answer like a Ray dashboard."""


class JobsNotFoundError(JobsError):
    """The cluster has no job with that id."""


class JobsSubmitWarning(UserWarning):
    """Something in the upload that will probably not work on the cluster (the job still goes)."""


# --------------------------------------------------------------------------------------------
# Address and token


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
        raise JobsError(
            "no Ray cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS"
        )
    return _check_address(address, source)


def _check_address(address: str, source: str = "address") -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(address.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise JobsError(
            f"{source}={address!r} is not the HTTP address of a Ray dashboard; "
            "expected e.g. http://HEAD:8265"
        )
    return address.strip().rstrip("/")


def find_auth_token() -> str | None:
    """The Ray authentication token of this machine's user, found the way Ray 2.60 finds it.

    Order: the ``RAY_AUTH_TOKEN`` environment variable, the file named by
    ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token`` (written by ``ray start`` /
    ``ray.init()`` / ``ray get-auth-token --generate``); surrounding whitespace is stripped.
    This is Ray's own loader (the one behind ``ray get-auth-token``), so it also covers what Ray
    adds, such as Kubernetes service-account tokens; a pure-Python lookup in the same order is
    the fallback when that loader is unavailable.

    Returns:
        The token, or None when there is none.

    Raises:
        JobsAuthError: ``RAY_AUTH_TOKEN_PATH`` is set but the file is missing or empty (Ray
            treats that as an error rather than falling back to the default file).
    """
    try:
        from ray._raylet import AuthenticationTokenLoader
        from ray.exceptions import AuthenticationError
    except ImportError:  # pragma: no cover - only without Ray's compiled core
        return _find_auth_token_python()
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the loader caches per process; the environment may have changed
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return None
        return loader.get_raw_token(ignore_auth_mode=True) or None
    except AuthenticationError as error:
        if os.environ.get(TOKEN_PATH_ENV_VAR):
            raise JobsAuthError(_token_path_error()) from None
        raise JobsAuthError(f"cannot load the Ray authentication token: {_first_line(error)}") from None
    finally:
        # The loader is process-wide: a token cached here (e.g. for a remote head) would be sent
        # by this process's own Ray clients later, e.g. to a local cluster without auth.
        loader.reset_cache()


def _find_auth_token_python() -> str | None:
    token = os.environ.get(TOKEN_ENV_VAR, "").strip()
    if token:
        return token
    if os.environ.get(TOKEN_PATH_ENV_VAR):
        path = Path(os.environ[TOKEN_PATH_ENV_VAR]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError:
            token = ""
        if not token:
            raise JobsAuthError(_token_path_error())
        return token
    path = DEFAULT_TOKEN_PATH.expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _token_path_error() -> str:
    return (
        f"{TOKEN_PATH_ENV_VAR}={os.environ.get(TOKEN_PATH_ENV_VAR)!r} does not name a readable, "
        f"non-empty token file: fix it or unset it"
    )


def _token_source() -> str:
    """Where :func:`find_auth_token` took the token from, for error messages."""
    if os.environ.get(TOKEN_ENV_VAR, "").strip():
        return TOKEN_ENV_VAR
    if os.environ.get(TOKEN_PATH_ENV_VAR):
        return f"{TOKEN_PATH_ENV_VAR}={os.environ[TOKEN_PATH_ENV_VAR]}"
    return str(DEFAULT_TOKEN_PATH)


# --------------------------------------------------------------------------------------------
# Client and error translation


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
    address = _check_address(address)
    token = find_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    from ray.job_submission import JobSubmissionClient

    with _translate_errors(address, token):
        # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is
        # given; an explicit address must win (a driver's RAY_ADDRESS=auto would otherwise too).
        with _without_env(ADDRESS_ENV_VARS):
            client = JobSubmissionClient(address, headers=headers)
    return _Connection(client, address, token)


def _missing_token_message(address: str) -> str:
    return (
        f"the Ray cluster at {address} requires an authentication token and none was found: "
        f"set {TOKEN_ENV_VAR}, set {TOKEN_PATH_ENV_VAR} to a file holding it, or save it to "
        f"{DEFAULT_TOKEN_PATH} (print it on the head node with `ray get-auth-token`)"
    )


def _wrong_token_message(address: str) -> str:
    return (
        f"the Ray cluster at {address} rejected the authentication token from {_token_source()}: "
        "it is not this cluster's token (print the right one on the head node with "
        "`ray get-auth-token`)"
    )


def _auth_error(address: str, token: str | None) -> JobsAuthError:
    return JobsAuthError(_wrong_token_message(address) if token else _missing_token_message(address))


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
        raise _auth_error(address, token) from None
    except aiohttp.WSServerHandshakeError as error:
        if error.status in (401, 403):
            raise _auth_error(address, token) from None
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
        text = _first_line(error)
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------------------------
# Upload staging


def find_project_dir(start: Path | None = None) -> Path | None:
    """The medkd project to upload: the first folder from ``start`` (default: the current
    directory) upwards that holds ``pyproject.toml`` and ``medkd/__init__.py``; else the checkout
    the running ``medkd`` package was imported from (an editable install); else None."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "medkd" / "__init__.py").is_file():
            return folder
    import medkd

    checkout = Path(medkd.__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return checkout
    return None


def _matches(relative: PurePosixPath, patterns: Sequence[str]) -> bool:
    """gitignore-like: ``name`` / ``*.ext`` match any component; ``/a/b`` is anchored."""
    text = relative.as_posix()
    for pattern in patterns:
        if pattern.startswith("/") or "/" in pattern.rstrip("/"):
            anchored = pattern.strip("/")
            if fnmatch.fnmatchcase(text, anchored) or text.startswith(anchored + "/"):
                return True
        elif any(fnmatch.fnmatchcase(part, pattern.rstrip("/")) for part in relative.parts):
            return True
    return False


@dataclass
class _Stage:
    root: Path
    too_large: list[tuple[str, int]]
    total_bytes: int
    spec_relpath: PurePosixPath = PurePosixPath()
    spec_moved: bool = False  # not at its own place in the project (outside it, or excluded)


def _mirror_project(project_dir: Path, stage: Path, excludes: Sequence[str], max_file_bytes: int) -> _Stage:
    too_large: list[tuple[str, int]] = []
    total = 0
    for folder, dirnames, filenames in os.walk(project_dir):
        here = Path(folder)
        rel_folder = PurePosixPath(here.relative_to(project_dir).as_posix())
        dirnames[:] = [d for d in sorted(dirnames) if not _matches(rel_folder / d, excludes)]
        for name in dirnames:
            source = here / name
            if source.is_symlink():  # os.walk does not descend into it; Ray will follow it
                (stage / rel_folder / name).symlink_to(source.resolve())
            else:
                (stage / rel_folder / name).mkdir()
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
        for name in sorted(filenames):
            rel = rel_folder / name
            if _matches(rel, excludes):
                continue
            source = here / name
            try:
                size = source.stat().st_size
            except OSError:  # a dangling symlink
                continue
            if size >= max_file_bytes:
                too_large.append((rel.as_posix(), size))
                continue
            total += size
            (stage / rel).symlink_to(source.resolve())
    return _Stage(stage, too_large, total)


def _load_spec_mapping(spec_path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(spec_path.read_text())
    except yaml.YAMLError as error:
        raise JobsError(f"{spec_path}: not valid YAML: {_first_line(error)}") from None
    if not isinstance(raw, dict):
        raise JobsError(f"{spec_path}: a job spec must be a YAML mapping, got {type(raw).__name__}")
    return raw


def _validate_spec_locally(spec_path: Path, raw: dict[str, Any]) -> None:
    """Reject a spec with unknown keys or bad values before anything is uploaded.

    Data paths are not resolved or checked here: they are read on the cluster.
    """
    try:
        from medkd.spec.job import SpecError, parse_spec
    except ImportError:  # the spec module cannot be imported here; the cluster validates
        return
    try:
        parse_spec(raw, source=str(spec_path))
    except SpecError as error:
        raise JobsError(
            f"{error} (fix the spec, or pass --no-validate if it is only valid on the cluster)"
        ) from None


def _warn_relative_data_paths(raw: dict[str, Any], spec_path: Path, moved: bool) -> None:
    """Warn when the spec was moved in the upload and has data paths relative to its folder."""
    data = raw.get("data")
    if not moved or not isinstance(data, dict):
        return
    for key in ("path", "base_dir"):
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            warnings.warn(
                f"{spec_path}: data.{key}={value!r} is relative to the spec's folder, which is "
                "not uploaded as such (the spec goes to the root of the job's working directory): "
                "use an absolute path on storage the cluster can read",
                JobsSubmitWarning,
                stacklevel=3,
            )


def _spec_relpath(spec_path: Path, project_dir: Path | None, excludes: Sequence[str]) -> tuple[PurePosixPath, bool]:
    """Where the spec goes in the upload, and whether that moves it: its own place in the
    project (relative paths in it keep working), or the root when it is outside the project or
    in an excluded folder."""
    if project_dir is not None and spec_path.is_relative_to(project_dir):
        relpath = PurePosixPath(spec_path.relative_to(project_dir).as_posix())
        if not _matches(relpath, excludes):
            return relpath, False
    return PurePosixPath(spec_path.name), True


def _warn_relative_output_dir(raw: dict[str, Any], spec_path: Path, extra_args: Sequence[str]) -> None:
    if any(arg.startswith("output_dir=") for arg in extra_args):
        return
    output_dir = raw.get("output_dir", "runs/default")
    if isinstance(output_dir, str) and not Path(output_dir).is_absolute():
        warnings.warn(
            f"{spec_path}: output_dir={output_dir!r} is relative: on the cluster it is inside the "
            "job's temporary working directory, which Ray deletes later; use an absolute path on "
            "storage the cluster keeps, e.g. --run-args --set output_dir=/shared/runs/NAME",
            JobsSubmitWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def _staged_working_dir(
    spec_path: Path, project_dir: Path | None, excludes: Sequence[str], max_file_bytes: int
) -> Iterator[_Stage]:
    with tempfile.TemporaryDirectory(prefix="medkd-submit-") as tmp:
        root = Path(tmp) / "working_dir"
        root.mkdir()
        if project_dir is not None:
            stage = _mirror_project(project_dir, root, excludes, max_file_bytes)
        else:
            stage = _Stage(root, [], 0)
        resolved_spec = spec_path.resolve()
        relpath, moved = _spec_relpath(resolved_spec, project_dir, excludes)
        if moved:
            if (root / relpath).exists() or (root / relpath).is_symlink():
                raise JobsError(
                    f"{spec_path}: the project already has a file named {spec_path.name!r} at its "
                    "root; rename the spec or move it into the project"
                )
        target = root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        shutil.copyfile(resolved_spec, target)
        stage.spec_relpath, stage.spec_moved = relpath, moved
        yield stage


def _job_slug(raw: Mapping[str, Any], spec_path: Path) -> str:
    name = raw.get("name") if isinstance(raw.get("name"), str) else spec_path.stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "job"


def _default_entrypoint(spec_relpath: PurePosixPath, extra_args: Sequence[str]) -> str:
    return shlex.join(["python", "-m", CLI_MODULE, "run", spec_relpath.as_posix(), *extra_args])


# --------------------------------------------------------------------------------------------
# Public API


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
    raw = _load_spec_mapping(spec_path)
    if validate:
        _validate_spec_locally(spec_path, raw)
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
    with _staged_working_dir(spec_path, project_dir, all_excludes, UPLOAD_LIMIT_BYTES) as stage:
        _warn_relative_data_paths(raw, spec_path, stage.spec_moved)
        if entrypoint is None:
            _warn_relative_output_dir(raw, spec_path, extra_args)
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
        command = entrypoint or _default_entrypoint(stage.spec_relpath, extra_args)
        job_id = submission_id or f"medkd-{_job_slug(raw, spec_path)}-{secrets.token_hex(4)}"
        metadata = {"medkd_spec": stage.spec_relpath.as_posix(), "medkd_job": _job_slug(raw, spec_path)}
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


def _iso(milliseconds: int | None) -> str | None:
    if milliseconds is None:
        return None
    return datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc).isoformat(timespec="seconds")


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


def wait_for_job(
    job_id: str, address: str, *, timeout_s: float | None = None, poll_s: float = 1.0
) -> dict[str, Any]:
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
        help="the cluster's dashboard URL, e.g. http://HEAD:8265 "
        "(default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)",
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
    submit.add_argument("--project-dir", type=Path, default=None, help="project to upload (default: found from the current directory)")
    submit.add_argument("--no-project", action="store_true", help="upload only the spec (the cluster image has medkd installed)")
    submit.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="also leave out PATTERN: a name or glob at any depth (*.npz, data), or a path from the project root (/data/raw); repeatable")
    submit.add_argument("--submission-id", default=None, help="job id to use (default: medkd-<name>-<random>)")
    submit.add_argument("--env", action="append", type=_env_pair, default=[], metavar="NAME=VALUE", help="environment variable for the job (repeatable)")
    submit.add_argument("--pass-env", action="append", default=[], metavar="NAME", help="pass this machine's $NAME to the job if it is set (repeatable)")
    submit.add_argument("--entrypoint-num-cpus", type=_non_negative, default=None, help="CPUs reserved for the driver")
    submit.add_argument("--entrypoint-num-gpus", type=_non_negative, default=None, help="GPUs reserved for the driver")
    submit.add_argument("--entrypoint-resources", type=_resources, default=None, metavar="JSON", help='custom resources for the driver, e.g. \'{"head": 1}\'')
    submit.add_argument("--no-validate", action="store_true", help="do not check the spec's fields before uploading")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it succeeded")
    submit.add_argument("--run-args", nargs=argparse.REMAINDER, default=[], help="everything after this is passed to `medkd run` on the cluster (put it last)")
    submit.set_defaults(handler=run_jobs_command, jobs_command="submit")

    status = subparsers.add_parser("status", parents=[connection], help="status of a cluster job")
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=run_jobs_command, jobs_command="status")

    logs = subparsers.add_parser("logs", parents=[connection], help="logs of a cluster job")
    logs.add_argument("job_id", metavar="JOB_ID")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit 0 only if it succeeded")
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


_STATUS_FIELDS = ("job_id", "status", "message", "error_type", "entrypoint", "start_time", "end_time", "duration_s", "driver_exit_code")


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
        rows.append((
            job["job_id"] or "-",
            job["status"],
            job["metadata"].get("medkd_job", "-"),
            (job["start_time"] or "-").replace("+00:00", ""),
            "-" if job["duration_s"] is None else f"{job['duration_s']:.1f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _quiet_ray_client_logs() -> None:
    """Ray's client logs every upload step at INFO; on the command line only warnings matter."""
    import logging

    import ray.job_submission  # noqa: F401  (its modules set their loggers to INFO on import)

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
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
