"""How the next run of a job ends what a killed (SIGKILLed) driver left of its local Ray session.

The driver killed mid-search on the namespace cluster, and `medkd run --resume` completing without
orphans, is ``tests/cluster/test_faults_search.py::test_driver_killed_mid_search_resumes_without_orphans``.
Here: the mechanism a local run (its own Ray, its own managed redis-server) relies on, on real processes.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from medkd.pipeline.leftovers import (
    DRIVER_FILE,
    DriverRecord,
    end_leftovers_of_dead_driver,
    record_driver,
    session_processes,
)


def test_the_next_run_ends_what_a_dead_driver_left_of_its_ray_session(tmp_path):
    """The mechanism behind the resumed run's clean-up, on real processes: one holds a log file of
    the dead driver's session open (as Ray's agents do), another holds an unrelated file."""
    session = tmp_path / "session_2026-01-01_00-00-00_1"
    (session / "logs").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = subprocess.Popen(["sleep", "120"], stdout=open(session / "logs" / "dashboard_agent.out", "wb"))
    bystander = subprocess.Popen(["sleep", "120"], stdout=open(tmp_path / "other.log", "wb"))
    try:
        (tmp_path / DRIVER_FILE).write_text(
            DriverRecord(pid=dead.pid, start_ticks=1, ray_session_dir=str(session)).model_dump_json()
        )
        ended = end_leftovers_of_dead_driver(tmp_path)
        assert ended is not None and ended[1] == [holder.pid]
        assert holder.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None  # nothing outside the session is touched

        # A live driver's session is left alone.
        (tmp_path / DRIVER_FILE).write_text(record_driver(tmp_path, str(session)).model_dump_json())
        assert end_leftovers_of_dead_driver(tmp_path) is None
    finally:
        for process in (holder, bystander):
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


@pytest.mark.parametrize("path", ["", "/", "/tmp"])
def test_leftover_search_refuses_a_directory_that_is_not_a_session(path):
    with pytest.raises(ValueError, match="not a Ray session directory"):
        session_processes(path)
