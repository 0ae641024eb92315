"""medkd.cli.jobs against a real Ray head node with token authentication on.

The module starts its own head (``ray start --head --block``) on 127.0.0.1 with every port chosen
explicitly, its own --temp-dir (so no ``ray_current_cluster`` file lands in /tmp/ray: a stale one makes a plain ray.init() try to join a dead cluster)
and ``RAY_AUTH_MODE=token`` with a random token in its environment only. At the end it kills
exactly the processes of that head: the session ``ray start`` leads plus their descendants (job
drivers run in sessions of their own). Never ``ray stop``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

import pytest
import yaml

from medkd.cli import auth_token, jobs_client, staging
from medkd.cli.auth_token import find_auth_token
from medkd.cli.jobs import add_jobs_parsers, run_jobs_command
from medkd.cli.jobs_client import (
    iter_job_logs,
    job_status,
    list_jobs,
    resolve_address,
    stop_job,
    submit_job,
    wait_for_job,
)
from medkd.cli.jobs_errors import (
    JobsAuthError,
    JobsConnectionError,
    JobsError,
    JobsNotFoundError,
    JobsSubmitWarning,
)
from tests.conftest import REPO_ROOT, free_port, free_ports

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------
# A head node of our own


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session id) for every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def _head_processes(leader: int) -> set[int]:
    """The session ``leader`` started (raylet, GCS, dashboard, workers) and all descendants."""
    table = _proc_table()
    found = {pid for pid, (_, sid) in table.items() if sid == leader}
    found.add(leader)
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    found.discard(os.getpid())
    return found


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_head(process: subprocess.Popen) -> None:
    pids = _head_processes(process.pid)
    _signal_all(pids, signal.SIGTERM)
    try:
        process.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass
    for _ in range(3):  # a worker may fork while we look
        pids = (pids | _head_processes(process.pid)) & set(_proc_table())
        if not pids:
            break
        _signal_all(pids, signal.SIGKILL)
        time.sleep(0.5)
    if process.poll() is None:
        process.wait(timeout=10)


def _wait_until_ready(process: subprocess.Popen, url: str, token: str, log: Path, timeout_s: float = 90) -> None:
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"head node not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def head():
    """A token-authenticated head node: yields (dashboard URL, token)."""
    # Short path: Ray's unix sockets live under the temp dir and have a ~107-byte limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="medkd-jobs-", dir="/tmp"))
    token = secrets.token_hex(16)
    flags = [
        "--port",
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--ray-client-server-port",
        "--runtime-env-agent-port",
    ]
    ports = dict(
        zip(flags, free_ports(len(flags)))
    )  # all explicit and distinct, outside 10002-19999 (the range Ray keeps for its workers)
    dashboard_port = ports["--dashboard-port"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_") and key not in ("HOME",)}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        HOME=str(temp_dir),  # nothing of this head goes to the user's ~/.ray
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs' `python` is the venv's
        PYTHONWARNINGS="ignore::DeprecationWarning,ignore::FutureWarning",
    )
    assert all(not 10002 <= port <= 19999 for port in ports.values())
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        f"--object-store-memory={100 * 2**20}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    log = temp_dir / "ray-start.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its session id names every process of this head
        )
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_until_ready(process, url, token, log)
        yield url, token
    finally:
        _kill_head(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No token and no address from this machine: HOME is empty, RAY_AUTH_TOKEN* unset."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def authed(head, clean_env, monkeypatch):
    """The head's URL, with its token in RAY_AUTH_TOKEN."""
    url, token = head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    return url


@pytest.fixture
def project(tmp_path) -> Path:
    """A small project: code, a spec in a sub-folder, and things that must not be uploaded."""
    root = tmp_path / "project"
    (root / "pkg").mkdir(parents=True)
    (root / "configs").mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'probe'\n")
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "data.txt").write_text("payload\n")
    (root / "pkg" / "runs").mkdir()
    (root / "pkg" / "runs" / "keep.txt").write_text("only the top-level runs/ is excluded\n")
    (root / "configs" / "job.yaml").write_text("name: probe-job\ndata: {path: ../pkg/data.txt}\n")
    (root / "probe.py").write_text(
        "import json, os, sys, yaml\n"
        "files = sorted(os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk('.') for f in fs)\n"
        "spec = yaml.safe_load(open(sys.argv[1]))\n"
        "data = os.path.join(os.path.dirname(sys.argv[1]), spec['data']['path'])\n"
        "print('PROBE ' + json.dumps({'files': files, 'spec': spec, 'data': open(data).read(),\n"
        "      'env': os.environ.get('MEDKD_PROBE'), 'args': sys.argv[2:]}), flush=True)\n"
    )
    for excluded in ("runs/old/results.json", ".venv/bin/python", "pkg/__pycache__/x.pyc", "model.onnx", ".git/HEAD"):
        (root / excluded).parent.mkdir(parents=True, exist_ok=True)
        (root / excluded).write_text("x")
    return root


EXPECTED_UPLOAD = {
    "pyproject.toml",
    "probe.py",
    "pkg/__init__.py",
    "pkg/data.txt",
    "pkg/runs/keep.txt",
    "configs/job.yaml",
}


def _probe_output(text: str) -> dict:
    line = next(line for line in text.splitlines() if line.startswith("PROBE "))
    return json.loads(line[len("PROBE ") :])


# ------------------------------------------------------------------------------------------
# Token lookup and address resolution (no cluster needed)


def test_find_auth_token_follows_rays_order(clean_env, monkeypatch, tmp_path):
    assert find_auth_token() is None
    (clean_env / ".ray").mkdir()
    (clean_env / ".ray" / "auth_token").write_text("from-home-file\n")
    assert find_auth_token() == "from-home-file"
    token_file = tmp_path / "token"
    token_file.write_text("  from-token-path  ")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert find_auth_token() == "from-token-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_auth_token() == "from-env"
    # The pure-Python fallback agrees with Ray's loader on every step above.
    assert auth_token._find_auth_token_python() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert auth_token._find_auth_token_python() == "from-token-path"


def test_find_auth_token_rejects_a_missing_token_path(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "nope"))
    with pytest.raises(JobsAuthError, match="RAY_AUTH_TOKEN_PATH"):
        find_auth_token()
    with pytest.raises(JobsAuthError, match="RAY_AUTH_TOKEN_PATH"):
        auth_token._find_auth_token_python()


def test_resolve_address_precedence_and_bad_values(clean_env, monkeypatch):
    with pytest.raises(JobsError, match="--address"):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://from-ray-address:8265")
    assert resolve_address(None) == "http://from-ray-address:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://from-api-server:8265/")
    assert resolve_address(None) == "http://from-api-server:8265"
    assert resolve_address("https://explicit:443") == "https://explicit:443"
    with pytest.raises(JobsError, match=r"--address='head:6379' is not the HTTP address"):
        resolve_address("head:6379")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "auto")
    with pytest.raises(JobsError, match="RAY_API_SERVER_ADDRESS='auto'"):
        resolve_address(None)


# ------------------------------------------------------------------------------------------
# Staging of the upload (no cluster needed)


def _staged_files(stage_root: Path) -> set[str]:
    return {path.relative_to(stage_root).as_posix() for path in stage_root.rglob("*") if path.is_file()}


def test_upload_limit_is_the_dashboards():
    from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE

    assert staging.UPLOAD_LIMIT_BYTES == DASHBOARD_CLIENT_MAX_SIZE


def test_stage_mirrors_project_without_excluded_and_oversized_files(project):
    (project / "pkg" / "big.npz").write_bytes(b"\0" * 2048)
    excludes = [*staging.DEFAULT_EXCLUDES, "*.tmp"]
    (project / "pkg" / "scratch.tmp").write_text("x")
    spec = project / "configs" / "job.yaml"
    with staging.staged_working_dir(spec, project, excludes, max_file_bytes=1024) as stage:
        files = _staged_files(stage.root)
        assert files == EXPECTED_UPLOAD
        assert stage.spec_relpath == PurePosixPath("configs/job.yaml") and not stage.spec_moved
        assert stage.too_large == [("pkg/big.npz", 2048)]
        assert not (stage.root / "configs" / "job.yaml").is_symlink()  # a real copy of the spec
        assert (stage.root / "probe.py").resolve() == (project / "probe.py").resolve()
        staged_root = stage.root
    assert not staged_root.exists()  # cleaned up


def test_stage_moves_specs_outside_the_project_or_in_excluded_folders(project, tmp_path):
    outside = tmp_path / "elsewhere" / "job.yaml"
    outside.parent.mkdir()
    outside.write_text("name: outside\n")
    with staging.staged_working_dir(outside, project, staging.DEFAULT_EXCLUDES, 2**20) as stage:
        assert stage.spec_relpath == PurePosixPath("job.yaml") and stage.spec_moved
        assert (stage.root / "job.yaml").read_text() == "name: outside\n"
    in_runs = project / "runs" / "again.yaml"
    in_runs.write_text("name: again\n")
    with staging.staged_working_dir(in_runs, project, staging.DEFAULT_EXCLUDES, 2**20) as stage:
        assert stage.spec_relpath == PurePosixPath("again.yaml") and stage.spec_moved
        assert not (stage.root / "runs").exists()
    clash = tmp_path / "elsewhere" / "probe.py"
    clash.write_text("name: clash\n")
    with pytest.raises(JobsError, match="already has a file named 'probe.py'"):
        with staging.staged_working_dir(clash, project, staging.DEFAULT_EXCLUDES, 2**20):
            pass


def test_find_project_dir(project, tmp_path):
    (project / "medkd").mkdir()
    (project / "medkd" / "__init__.py").write_text("")
    assert staging.find_project_dir(project / "pkg" / "runs") == project.resolve()
    # Outside any project: the checkout the running medkd comes from (an editable install).
    assert staging.find_project_dir(tmp_path) == REPO_ROOT.resolve()


def test_submit_rejects_bad_specs_before_contacting_the_cluster(tmp_path, clean_env):
    unreachable = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(JobsError, match="job spec file not found"):
        submit_job(tmp_path / "missing.yaml", unreachable)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    with pytest.raises(JobsError, match="not valid YAML"):
        submit_job(bad_yaml, unreachable)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(JobsError, match="must be a YAML mapping"):
        submit_job(not_mapping, unreachable)
    unknown_key = tmp_path / "typo.yaml"
    unknown_key.write_text("name: x\ntask: classification\nteachrs: []\n")
    with pytest.raises(JobsError, match=r"teachrs: unknown field.*--no-validate"):
        submit_job(unknown_key, unreachable)
    with pytest.raises(JobsError, match="env"):
        submit_job(unknown_key, unreachable, validate=False, env={"A=B": "1"})


# ------------------------------------------------------------------------------------------
# Against the head node


def test_unreachable_address_is_a_connection_error(clean_env):
    address = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(JobsConnectionError, match=f"cannot reach the Ray dashboard at {address}"):
        job_status("raysubmit_x", address)
    with pytest.raises(JobsConnectionError):
        list(iter_job_logs("raysubmit_x", address, follow=True))


def test_missing_token_is_a_clear_auth_error(head, clean_env, capsys, project):
    url, _ = head
    with pytest.raises(JobsAuthError) as error:
        list_jobs(url)
    message = str(error.value)
    assert message.startswith(f"the Ray cluster at {url} requires an authentication token")
    assert "RAY_AUTH_TOKEN" in message and "\n" not in message
    with pytest.raises(JobsAuthError, match="requires an authentication token"):
        submit_job(project / "configs" / "job.yaml", url, project_dir=project, validate=False)

    parser = argparse.ArgumentParser()
    add_jobs_parsers(parser.add_subparsers())
    args = parser.parse_args(["jobs", "--address", url])
    assert args.handler(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("medkd: error: the Ray cluster at") and err.count("\n") == 1
    assert "Traceback" not in err


def test_wrong_token_is_a_clear_auth_error(head, clean_env, monkeypatch):
    url, token = head
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * len(token))
    with pytest.raises(
        JobsAuthError, match=f"the Ray cluster at {url} rejected the authentication token from RAY_AUTH_TOKEN"
    ):
        job_status("raysubmit_x", url)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    token_file = clean_env / "wrong-token"
    token_file.write_text("not-the-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    with pytest.raises(JobsAuthError, match="rejected the authentication token from RAY_AUTH_TOKEN_PATH"):
        stop_job("raysubmit_x", url)


def test_token_from_the_default_file_is_used(head, clean_env, monkeypatch):
    url, token = head
    (clean_env / ".ray").mkdir()
    (clean_env / ".ray" / "auth_token").write_text(token + "\n")
    jobs_with_file_token = list_jobs(url)  # the cluster refuses a request without a token (JobsAuthError)
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    assert [job["job_id"] for job in jobs_with_file_token] == [job["job_id"] for job in list_jobs(url)]


def test_submit_uploads_project_and_spec_runs_and_streams_logs(authed, project, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the upload must not depend on the current directory
    spec = project / "configs" / "job.yaml"
    job_id = submit_job(
        spec,
        authed,
        project_dir=project,
        validate=False,
        env={"MEDKD_PROBE": "42"},
        entrypoint="python probe.py configs/job.yaml --flag",
    )
    assert job_id.startswith("medkd-probe-job-")
    followed = "".join(iter_job_logs(job_id, authed, follow=True))
    info = wait_for_job(job_id, authed, timeout_s=60, poll_s=0.5)
    assert info["status"] == "SUCCEEDED", (info, followed)
    assert info["job_id"] == job_id and info["entrypoint"] == "python probe.py configs/job.yaml --flag"
    assert info["metadata"] == {"medkd_spec": "configs/job.yaml", "medkd_job": "probe-job"}
    assert info["start_time"] and info["end_time"] and info["duration_s"] >= 0

    probe = _probe_output(followed)
    assert set(probe["files"]) == EXPECTED_UPLOAD
    assert probe["spec"]["name"] == "probe-job"
    assert probe["data"] == "payload\n"  # the spec's relative data path still works
    assert probe["env"] == "42" and probe["args"] == ["--flag"]
    assert _probe_output("".join(iter_job_logs(job_id, authed))) == probe
    assert job_id in [job["job_id"] for job in list_jobs(authed)]

    with pytest.raises(JobsError, match="refused the request"):  # ids are single-use
        submit_job(spec, authed, project_dir=project, validate=False, submission_id=job_id, entrypoint="true")


def test_stop_a_sleeping_job(authed, project, capsys, tmp_path):
    outside = tmp_path / "elsewhere" / "sleep.yaml"
    outside.parent.mkdir()
    outside.write_text("name: sleeper\ndata: {path: ../data/x.npz}\n")
    with pytest.warns(JobsSubmitWarning, match=r"data.path='../data/x.npz' is relative"):
        job_id = submit_job(
            outside,
            authed,
            project_dir=project,
            validate=False,
            entrypoint="python -c \"import time; print('sleeping', flush=True); time.sleep(120)\"",
        )
    assert job_status(job_id, authed)["metadata"]["medkd_spec"] == "sleep.yaml"
    deadline = time.monotonic() + 60
    while job_status(job_id, authed)["status"] != "RUNNING":
        assert time.monotonic() < deadline, job_status(job_id, authed)
        time.sleep(0.3)

    parser = argparse.ArgumentParser()
    add_jobs_parsers(parser.add_subparsers())
    args = parser.parse_args(["stop", job_id, "--wait", "--address", authed])
    assert run_jobs_command(args) == 0
    assert f"job {job_id} STOPPED" in capsys.readouterr().out
    assert job_status(job_id, authed)["status"] == "STOPPED"
    assert stop_job(job_id, authed) is False  # already ended

    args = parser.parse_args(["status", job_id, "--json", "--address", authed])
    assert run_jobs_command(args) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "STOPPED"
    args = parser.parse_args(["jobs", "--address", authed])
    assert run_jobs_command(args) == 0
    assert any(line.startswith(job_id) and "STOPPED" in line for line in capsys.readouterr().out.splitlines())


def test_unknown_job_id_is_not_found(authed):
    with pytest.raises(JobsNotFoundError, match="no job 'medkd-nope'"):
        job_status("medkd-nope", authed)
    with pytest.raises(JobsNotFoundError):
        stop_job("medkd-nope", authed)
    with pytest.raises(JobsNotFoundError):
        list(iter_job_logs("medkd-nope", authed, follow=True))


@pytest.fixture
def minimal_spec(tmp_path) -> Path:
    path = tmp_path / "jobs-validate.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "jobs-validate",
                "task": "classification",
                "data": {
                    "kind": "synthetic",
                    "task": "classification",
                    "image_size": 16,
                    "num_classes": 2,
                    "num_train": 32,
                    "num_val": 16,
                    "num_test": 16,
                },
                "teachers": [{"name": "cnn", "model": "resnet18", "epochs": 1}],
                "output_dir": "runs/jobs-validate",  # relative: `submit` warns (not written by validate)
            }
        )
    )
    return path


def test_cli_submit_runs_medkd_validate_on_the_cluster(authed, minimal_spec, capsys, monkeypatch):
    """The real project goes up and `medkd validate` runs from it on the cluster."""
    from medkd.cli.main import build_parser

    args = build_parser().parse_args(
        [
            "submit",
            str(minimal_spec),
            "--address",
            authed,
            "--project-dir",
            str(REPO_ROOT),
            "--submission-id",
            f"medkd-validate-{secrets.token_hex(3)}",
        ]
    )
    # `medkd submit` runs `medkd run`; only the command string is swapped for `validate` (fast).
    monkeypatch.setattr(
        jobs_client, "default_entrypoint", lambda relpath, extra: f"python -m medkd.cli.main validate {relpath}"
    )
    assert args.handler(args) == 0
    captured = capsys.readouterr()
    job_id = captured.out.strip()
    assert job_id == args.submission_id
    assert "medkd: warning:" in captured.err and "output_dir='runs/jobs-validate' is relative" in captured.err
    info = wait_for_job(job_id, authed, timeout_s=90, poll_s=1)
    logs = "".join(iter_job_logs(job_id, authed))
    assert info["status"] == "SUCCEEDED", logs
    assert "valid job spec 'jobs-validate'" in logs

    args = build_parser().parse_args(["logs", job_id, "--address", authed])
    assert args.handler(args) == 0
    assert "valid job spec 'jobs-validate'" in capsys.readouterr().out
    args = build_parser().parse_args(["logs", job_id, "--follow", "--address", authed])
    assert args.handler(args) == 0  # the exit code of a followed job is its outcome
    captured = capsys.readouterr()
    assert "valid job spec 'jobs-validate'" in captured.out
    assert f"job {job_id} SUCCEEDED" in captured.err
