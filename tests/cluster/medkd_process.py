"""``medkd`` CLI runs in child processes for fault tests: isolated, drained, and never leaked.

A run gets its own session (so every process it starts — Ray's raylet, GCS, workers — can be
found by session id once the driver is dead), an environment without the caller's cluster
(``RAY_ADDRESS`` and friends are dropped: it must start its own local Ray), its own Ray temp
dir and ``MEDKD_HOME``, and its output written to a file (a pipe nobody reads fills up and
stalls the child). ``close()`` SIGKILLs whatever is left of the run's session, by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Variables that would point a child at the caller's cluster, job or token instead of its own.
INHERITED_CLUSTER_VARS = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_JOB_ID",
    "RAY_RUNTIME_ENV",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "MEDKD_HOME",
    "RAY_TMPDIR",
)


def isolated_env(home: Path, ray_tmp: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without its cluster, with auth off, medkd's state under ``home``
    and Ray's under ``ray_tmp`` (short: Ray's unix socket paths must fit in 107 bytes)."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED_CLUSTER_VARS}
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "PYTHONWARNINGS": "ignore",
            "MEDKD_HOME": str(home / "medkd-home"),
            "RAY_TMPDIR": str(ray_tmp),
        }
    )
    env.update(extra)
    return env


def session_pids(session_id: int) -> list[int]:
    """Pids of the live (not zombie) processes of a session, read from ``/proc``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ..." — comm may contain spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == session_id:
            pids.append(int(entry.name))
    return sorted(pids)


def describe(pids: list[int]) -> str:
    lines = []
    for pid in pids:
        try:
            lines.append(f"{pid}: " + (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]))
        except OSError:
            lines.append(f"{pid}: (gone)")
    return "\n".join(lines)


def wait_until_gone(session_id: int, timeout_s: float) -> list[int]:
    """Waits (bounded) for a session's processes to exit; returns those still alive."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = session_pids(session_id)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


class MedkdProcess:
    """``python -m medkd.cli.main ARGS`` in its own session with output in ``log_path``.

    Args:
        args: the CLI arguments, e.g. ``["run", "job.yaml", "--resume"]``.
        home: the directory holding this run's ``MEDKD_HOME`` and Ray temp dir.
        log_path: stdout and stderr go here.

    Examples:
        >>> # with MedkdProcess(["run", "job.yaml"], home=tmp, log_path=tmp / "run.log") as run:
        >>> #     assert run.wait(600) == 0, run.output()
    """

    def __init__(self, args: list[str], *, home: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args, self.home, self.log_path = args, home, log_path
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="mkrt", dir="/tmp"))
        self.env = isolated_env(home, self.ray_tmp, **(env or {}))
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> MedkdProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> MedkdProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "medkd.cli.main", *self.args],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def poll(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def wait(self, timeout_s: float) -> int:
        """The exit code; raises ``subprocess.TimeoutExpired`` after ``timeout_s`` (the run is left to ``close``)."""
        assert self.process is not None, "not started"
        return self.process.wait(timeout=timeout_s)

    def kill_driver(self) -> None:
        """SIGKILL the driver alone (its children are left to fend for themselves, as after a crash)."""
        assert self.process is not None, "not started"
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def close(self) -> None:
        """SIGKILL every process still in the run's session (by pid), reap the driver, remove Ray's temp dir."""
        if self.process is None:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
            return
        for pid in session_pids(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
