"""What the fault tests on the namespace cluster share: a driver on the head's namespace, tiny job
specs, bounded waits, and which node runs what.

A fault test runs its driver the way a user on the head would (``cluster.popen_on_node(0, …)``:
the head's network namespace, ``RAY_ADDRESS`` of the cluster, the token and the Redis password in
the environment), writes every output under the cluster's shared directory, and injects its fault
from this (the root) namespace by the cluster's recorded pids: :meth:`LocalCluster.kill_node`,
:meth:`LocalCluster.kill_redis`. :func:`make_whole` restarts what an earlier scenario killed, so
one cluster serves every scenario of a module.

Examples:
    >>> # with HeadProcess(cluster, ["-m", "medkd.cli.main", "run", "job.yaml"], log_path=log) as run:
    >>> #     wait_until(lambda: finished_trials(storage), 600, "a finished trial", run)
    >>> #     assert run.wait(900) == 0, run.output()
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from medkd.cli.cluster import LocalCluster
from tests.cluster.medkd_process import describe, session_pids

REPO = Path(__file__).resolve().parents[2]
#: In the title of a Tune function trial's actor process (``ray::ImplicitFunc.train``).
TRIAL_PROCESS = "ray::ImplicitFunc"
#: In the title of a Ray Train worker's process (``ray::RayTrainWorker…``).
TRAIN_WORKER_PROCESS = "ray::RayTrainWorker"
#: Processes of a job's work, never of the cluster itself: none may outlive their job.
JOB_PROCESSES = (TRIAL_PROCESS, TRAIN_WORKER_PROCESS, "ray::TrainController", "medkd.cli.main")

T = TypeVar("T")


class HeadProcess:
    """``python ARGV`` on the head's namespace as a user there would run it, in its own session,
    output in ``log_path``; :meth:`close` SIGKILLs what is left of its session, by pid.

    Args:
        cluster: the namespace cluster.
        argv: the interpreter's arguments, e.g. ``["-m", "medkd.cli.main", "run", "job.yaml"]``.
        log_path: stdout and stderr go here (a pipe nobody reads would stall the child).
        env: extra environment (on top of the node's, which has ``RAY_ADDRESS``, the token path and
            ``MEDKD_REDIS_PASSWORD``).
    """

    def __init__(
        self, cluster: LocalCluster, argv: list[str], *, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            # `ip netns exec` execs the command: the pid is the driver's own.
            self.process = cluster.popen_on_node(
                0,
                [sys.executable, *argv],
                env={"PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", **(env or {})},
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def __enter__(self) -> HeadProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout_s: float) -> int:
        """The exit code; after ``timeout_s`` an AssertionError with the output's tail."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the driver did not end within {timeout_s:g} s:\n{self.output()[-4000:]}") from None

    def kill(self) -> None:
        """SIGKILL the driver alone, as a crash or the OOM killer would."""
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def close(self) -> None:
        for pid in session_pids(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.alive():
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def wait_until(
    condition: Callable[[], T], timeout_s: float, what: str, driver: HeadProcess | None = None, poll_s: float = 0.25
) -> T:
    """Poll ``condition`` until it returns something true (returned) — bounded by ``timeout_s``; fails
    early, with the driver's output, when ``driver`` ended first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if driver is not None and not driver.alive():
            raise AssertionError(f"the driver ended before {what}:\n{driver.output()[-4000:]}")
        if time.monotonic() > deadline:
            tail = f":\n{driver.output()[-4000:]}" if driver is not None else ""
            raise AssertionError(f"no {what} within {timeout_s:g} s{tail}")
        time.sleep(poll_s)


def node_processes(cluster: LocalCluster, index: int, marker: str) -> list[int]:
    """Pids on node ``index`` whose command line (Ray's process title) contains ``marker``."""
    found = []
    for pid in cluster.node_pids(index):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return sorted(found)


def job_processes_left(cluster: LocalCluster) -> str:
    """Every process of a job's work still on any node, described ('' when there is none)."""
    left = []
    for node in cluster.state.nodes:
        for marker in JOB_PROCESSES:
            left += node_processes(cluster, node.index, marker)
    return describe(sorted(set(left)))


def assert_no_job_processes(cluster: LocalCluster, what: str, grace_s: float = 60.0) -> None:
    """Fail with ``what`` and the processes when a job's processes are still on a node ``grace_s``
    from now (Ray ends a finished or dead job's actors within seconds)."""
    deadline = time.monotonic() + grace_s
    while (left := job_processes_left(cluster)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"{what}:\n{left}"


def make_whole(cluster: LocalCluster) -> None:
    """Restart every worker node and the Redis that an earlier scenario killed (bounded waits)."""
    for node in cluster.state.nodes[1:]:
        if not cluster.node_pids(node.index):
            cluster.restart_node(node.index)
    if not cluster.redis_alive():
        cluster.restart_redis()
    expected = sorted(cluster.node_addresses)
    wait_until(lambda: sorted(cluster.alive_node_addresses()) == expected, 120, f"all of {expected} alive in Ray")


def search_dirs(storage: Path) -> set[Path]:
    """The search experiments (``search-<fingerprint>``) under a job's Ray storage."""
    return set(storage.glob("search-*"))


def finished_trials(storage: Path, exclude: set[Path] = frozenset()) -> list[str]:
    """Names of the search trials that reported their final (exported) checkpoint, in the searches
    under ``storage`` but not in ``exclude`` (searches of earlier scenarios in the same output)."""
    return sorted(
        path.parent.name
        for search in search_dirs(storage) - set(exclude)
        for path in search.glob("*/checkpoint_*")
        if (path / "candidate.json").is_file()
    )


def scenario_result(output: str) -> dict[str, Any]:
    """The ``SCENARIO_RESULT {json}`` line a scenario driver printed last."""
    lines = [line for line in output.splitlines() if line.startswith("SCENARIO_RESULT ")]
    assert lines, f"the driver printed no SCENARIO_RESULT:\n{output[-5000:]}"
    return json.loads(lines[-1].removeprefix("SCENARIO_RESULT "))


def search_job(
    cluster: LocalCluster, output_dir: Path, *, namespace: str, num_trials: int, search_seed: int | None = None
) -> dict[str, Any]:
    """The quickstart's shape at its smallest: one 1-epoch teacher, ``num_trials`` 2-epoch trials two
    at a time (one per 1-CPU worker node), the cluster's Redis as the cache, no serving.

    Jobs that differ only in ``search_seed`` share ``output_dir`` and ``namespace``: the teacher is
    trained and its soft labels cached by the first, found by the others; each runs its own search."""
    return {
        "name": f"fault-{namespace}",
        "data": {"kind": "synthetic", "num_train": 96, "num_val": 32, "num_test": 32, "image_size": 16},
        "teachers": [{"name": "cnn", "model": "resnet10", "epochs": 1, "batch_size": 32, "cpus_per_worker": 1}],
        "cache": {"redis_url": cluster.redis_url, "password_env": cluster.redis_password_env, "namespace": namespace},
        "search": {
            "num_trials": num_trials,
            "max_concurrent": 2,
            "epochs": 2,
            "batch_size": 32,
            "cpus_per_trial": 1,
            "scheduler": "none",
            "seed": search_seed,
            "space": {"student": ["resnet_tiny"], "width": {"low": 0.25, "high": 0.5}, "quantize": ["none"]},
        },
        "serve": {"enabled": False},
        "output_dir": str(output_dir),
    }
