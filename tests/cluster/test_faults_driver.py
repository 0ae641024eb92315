"""Issue 14, item 5: the driver killed hard (SIGKILL) mid-search; `medkd run --resume` completes.

The first `medkd run` starts its own local Ray cluster and its own managed redis-server (the
soft-label cache), finishes its teachers and soft labels and part of the search, and is then
SIGKILLed — the driver process alone, as a crash or the OOM killer would. Ray's raylet, GCS
and workers die with it; what lingers (Ray's per-node agents) must be ended by the next run of
the job, and the orphaned redis-server must be adopted and stopped by it. `medkd run --resume`
must reuse the finished stages and trials and end with the full trial count, leaving no
process of either run behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medkd.pipeline.leftovers import (
    DRIVER_FILE,
    DriverRecord,
    end_leftovers_of_dead_driver,
    record_driver,
    session_processes,
)
from tests.cluster.medkd_process import MedkdProcess, describe, session_pids, wait_until_gone

NUM_TRIALS = 3
KILL_AFTER_TRIALS = 1
ORPHAN_GRACE_S = 20  # Ray's raylet, GCS and workers notice the dead driver within seconds
# Bounded; a few minutes on a quiet 2-CPU machine, far more when it is shared (measured: a
# 1-epoch toy teacher took 112 s at load 54).
FIRST_RUN_TIMEOUT_S = 900
RESUME_TIMEOUT_S = 900


def finished_trials(experiment_root: Path) -> set[str]:
    """Names of the trials that reported their final (exported) checkpoint."""
    return {
        path.parent.name
        for path in experiment_root.glob("search-*/*/checkpoint_*")
        if (path / "candidate.json").is_file()
    }


def redis_pid(home: Path) -> int | None:
    state = home / "medkd-home" / "redis" / "medkd-redis.json"
    return json.loads(state.read_text())["pid"] if state.is_file() else None


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.slow
@pytest.mark.timeout(FIRST_RUN_TIMEOUT_S + RESUME_TIMEOUT_S + 2 * ORPHAN_GRACE_S + 120)
def test_driver_killed_mid_search_resumes_without_orphans(tmp_path):
    output_dir = tmp_path / "run"
    spec = {
        "name": "driver-kill",
        "data": {"kind": "synthetic", "num_train": 64, "num_val": 32, "num_test": 32, "image_size": 16},
        "teachers": [{"name": "cnn", "model": "resnet10", "epochs": 1, "batch_size": 32, "cpus_per_worker": 0.5}],
        "search": {
            "num_trials": NUM_TRIALS,
            "max_concurrent": 1,
            "epochs": 2,
            "batch_size": 32,
            "cpus_per_trial": 0.5,
            "scheduler": "none",
            "space": {"student": ["resnet_tiny"], "width": {"low": 0.25, "high": 0.5}, "quantize": ["none"]},
        },
        "serve": {"enabled": False},
        "ray": {"num_cpus": 2},
        "output_dir": str(output_dir),
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    run_kill_and_resume(job, output_dir, tmp_path / "home", tmp_path)


def run_kill_and_resume(job: Path, output_dir: Path, home: Path, tmp_path: Path) -> None:
    # The first run's context ends (SIGKILLing what is left of its session, by pid) only after
    # the resumed run: what the killed driver leaves must be ended by medkd, not by the test.
    with MedkdProcess(["run", str(job)], home=home, log_path=tmp_path / "first.log") as first:
        deadline = time.monotonic() + FIRST_RUN_TIMEOUT_S
        while len(finished_trials(output_dir / "ray")) < KILL_AFTER_TRIALS:
            assert first.poll() is None, "the run ended before it could be killed:\n" + first.output()
            assert time.monotonic() < deadline, f"no trial finished within {FIRST_RUN_TIMEOUT_S} s:\n" + first.output()
            time.sleep(0.25)
        before_kill = finished_trials(output_dir / "ray")
        server = redis_pid(home)
        first.kill_driver()
        # Ray's raylet, GCS and workers share the driver's fate; its per-node agents linger.
        lingering = wait_until_gone(first.pid, ORPHAN_GRACE_S)
        assert server is not None and pid_alive(server), (
            "the managed redis-server (the cache) did not outlive the driver"
        )
        assert len(before_kill) < NUM_TRIALS

        with MedkdProcess(["run", str(job), "--resume"], home=home, log_path=tmp_path / "second.log") as second:
            code = second.wait(RESUME_TIMEOUT_S)
            out = second.output()
            assert code == 0, out
            assert not wait_until_gone(second.pid, ORPHAN_GRACE_S), describe(session_pids(second.pid))

        # Whatever lingered was ended by the resumed run (or ended by itself meanwhile).
        left = wait_until_gone(first.pid, ORPHAN_GRACE_S)
        assert not left, f"the killed driver's processes outlived the resumed run:\n{describe(left)}"
        print(f"lingering {ORPHAN_GRACE_S}s after the kill: {lingering}")

    assert "resuming search" in out
    assert not pid_alive(server), "the resumed run did not stop the redis-server it adopted"
    results = json.loads((output_dir / "results.json").read_text())
    assert results["stages"]["teachers"]["status"] == "skipped"
    assert results["stages"]["soft_labels"]["status"] == "skipped"
    assert len(results["trials"]) == NUM_TRIALS
    assert sum(t["final"] for t in results["trials"]) == NUM_TRIALS
    # Trials finished before the kill were reused, not re-run: same checkpoints, still there.
    assert before_kill <= finished_trials(output_dir / "ray")
    assert results["best"]["onnx_path"] and Path(results["best"]["onnx_path"]).is_file()


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
