"""Upload staging for ``medkd submit``: the job's working directory, mirroring the project.

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

Examples:
    >>> with staged_working_dir(Path("examples/quickstart.yaml"), find_project_dir(),
    ...                         DEFAULT_EXCLUDES, UPLOAD_LIMIT_BYTES) as stage:   # doctest: +SKIP
    ...     print(stage.root, stage.spec_relpath)
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shlex
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

import medkd
from medkd.cli.jobs_errors import JobsError, JobsSubmitWarning, first_line
from medkd.spec.job import SpecError, parse_spec

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


def find_project_dir(start: Path | None = None) -> Path | None:
    """The medkd project to upload: the first folder from ``start`` (default: the current
    directory) upwards that holds ``pyproject.toml`` and ``medkd/__init__.py``; else the checkout
    the running ``medkd`` package was imported from (an editable install); else None."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "medkd" / "__init__.py").is_file():
            return folder
    checkout = Path(medkd.__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return checkout
    return None


def matches_pattern(relative: PurePosixPath, patterns: Sequence[str]) -> bool:
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
class Stage:
    root: Path
    too_large: list[tuple[str, int]]
    total_bytes: int
    spec_relpath: PurePosixPath = PurePosixPath()
    spec_moved: bool = False  # not at its own place in the project (outside it, or excluded)


def mirror_project(project_dir: Path, stage: Path, excludes: Sequence[str], max_file_bytes: int) -> Stage:
    too_large: list[tuple[str, int]] = []
    total = 0
    for folder, dirnames, filenames in os.walk(project_dir):
        here = Path(folder)
        rel_folder = PurePosixPath(here.relative_to(project_dir).as_posix())
        dirnames[:] = [d for d in sorted(dirnames) if not matches_pattern(rel_folder / d, excludes)]
        for name in dirnames:
            source = here / name
            if source.is_symlink():  # os.walk does not descend into it; Ray will follow it
                (stage / rel_folder / name).symlink_to(source.resolve())
            else:
                (stage / rel_folder / name).mkdir()
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
        for name in sorted(filenames):
            rel = rel_folder / name
            if matches_pattern(rel, excludes):
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
    return Stage(stage, too_large, total)


def load_spec_mapping(spec_path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(spec_path.read_text())
    except yaml.YAMLError as error:
        raise JobsError(f"{spec_path}: not valid YAML: {first_line(error)}") from None
    if not isinstance(raw, dict):
        raise JobsError(f"{spec_path}: a job spec must be a YAML mapping, got {type(raw).__name__}")
    return raw


def validate_spec_locally(spec_path: Path, raw: dict[str, Any]) -> None:
    """Reject a spec with unknown keys or bad values before anything is uploaded.

    Data paths are not resolved or checked here: they are read on the cluster.
    """
    try:
        parse_spec(raw, source=str(spec_path))
    except SpecError as error:
        raise JobsError(f"{error} (fix the spec, or pass --no-validate if it is only valid on the cluster)") from None


def warn_relative_data_paths(raw: dict[str, Any], spec_path: Path, moved: bool) -> None:
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


def spec_relpath_in_upload(
    spec_path: Path, project_dir: Path | None, excludes: Sequence[str]
) -> tuple[PurePosixPath, bool]:
    """Where the spec goes in the upload, and whether that moves it: its own place in the
    project (relative paths in it keep working), or the root when it is outside the project or
    in an excluded folder."""
    if project_dir is not None and spec_path.is_relative_to(project_dir):
        relpath = PurePosixPath(spec_path.relative_to(project_dir).as_posix())
        if not matches_pattern(relpath, excludes):
            return relpath, False
    return PurePosixPath(spec_path.name), True


def warn_relative_output_dir(raw: dict[str, Any], spec_path: Path, extra_args: Sequence[str]) -> None:
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
def staged_working_dir(
    spec_path: Path, project_dir: Path | None, excludes: Sequence[str], max_file_bytes: int
) -> Iterator[Stage]:
    with tempfile.TemporaryDirectory(prefix="medkd-submit-") as tmp:
        root = Path(tmp) / "working_dir"
        root.mkdir()
        if project_dir is not None:
            stage = mirror_project(project_dir, root, excludes, max_file_bytes)
        else:
            stage = Stage(root, [], 0)
        resolved_spec = spec_path.resolve()
        relpath, moved = spec_relpath_in_upload(resolved_spec, project_dir, excludes)
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


def job_slug(raw: Mapping[str, Any], spec_path: Path) -> str:
    name = raw.get("name") if isinstance(raw.get("name"), str) else spec_path.stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "job"


def default_entrypoint(spec_relpath: PurePosixPath, extra_args: Sequence[str]) -> str:
    return shlex.join(["python", "-m", CLI_MODULE, "run", spec_relpath.as_posix(), *extra_args])


# --------------------------------------------------------------------------------------------
# Public API
