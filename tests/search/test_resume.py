"""An interrupted search resumes with `medkd run --resume` and ends with every trial.

Runs `medkd run` in child processes (each with its own local Ray cluster, its environment
isolated from the caller's cluster, output drained to a file), interrupts the first one with
SIGINT (Ctrl-C) once two of its three trials have finished, then resumes it. Whatever is left of
a child's session is killed (by pid) when the test ends, pass or fail.

Trials run one at a time, so it also shows that a trial runs in the process of the one before
(Tune's ``reuse_actors``: a trial's process costs seconds to start). The driver SIGKILLed on a
cluster, and its resume, is ``tests/cluster/test_faults_search.py``.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import yaml
from ray.tune import Result

from medkd.search.run import _trial_done
from tests.cluster.medkd_process import MedkdProcess

NUM_TRIALS = 3
INTERRUPT_AFTER = 2


def finished_trials(experiment_root: Path) -> int:
    # A running trial has checkpoints too (its training state after each epoch); a finished one's
    # checkpoint is its exported candidate.
    return len(list(experiment_root.glob("search-*/*/checkpoint_*/candidate.json")))


def trial_pids(experiment_root: Path) -> list[int]:
    """The process of each trial that reported, from Tune's result files, in order of start."""
    pids = []
    for result in sorted(experiment_root.glob("search-*/*/result.json"), key=lambda p: p.stat().st_ctime):
        lines = result.read_text().splitlines()
        if lines:
            pids.append(json.loads(lines[0])["pid"])
    return pids


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_interrupted_search_resumes_to_the_same_trial_count(redis_url, tmp_path):
    output_dir = tmp_path / "run"
    spec = {
        "name": "resume",
        "data": {"kind": "synthetic", "num_train": 64, "num_val": 32, "num_test": 32, "image_size": 16},
        "teachers": [{"name": "cnn", "model": "resnet10", "epochs": 1, "batch_size": 32, "cpus_per_worker": 0.5}],
        "cache": {"redis_url": redis_url, "namespace": f"resume-{tmp_path.name}"},
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
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    home = tmp_path / "home"

    with MedkdProcess(["run", str(path)], home=home, log_path=tmp_path / "first.log") as first:
        deadline = time.monotonic() + 900  # bounded; minutes on a machine shared with other work
        while finished_trials(output_dir / "ray") < INTERRUPT_AFTER:
            assert first.poll() is None, first.output()
            assert time.monotonic() < deadline, "search did not reach half of its trials in time:\n" + first.output()
            time.sleep(0.5)
        first.process.send_signal(signal.SIGINT)
        code = first.wait(180)
        out = first.output()
    assert code != 0, out
    assert "--resume" in out
    interrupted_at = finished_trials(output_dir / "ray")
    assert INTERRUPT_AFTER <= interrupted_at < NUM_TRIALS
    # One trial at a time: the second ran in the first one's process.
    first_pids = trial_pids(output_dir / "ray")
    assert len(first_pids) >= INTERRUPT_AFTER and len(set(first_pids)) == 1, first_pids

    with MedkdProcess(["run", str(path), "--resume"], home=home, log_path=tmp_path / "second.log") as second:
        code = second.wait(900)
        out = second.output()
    assert code == 0, out
    assert "resuming search" in out
    results = json.loads((output_dir / "results.json").read_text())
    assert len(results["trials"]) == NUM_TRIALS
    assert sum(t["final"] for t in results["trials"]) == NUM_TRIALS
    assert results["stages"]["teachers"]["status"] == "skipped"
    assert results["stages"]["soft_labels"]["status"] == "skipped"
    assert results["best"]["onnx_path"]
    assert "Pareto front" in (output_dir / "report.html").read_text()


def test_a_trial_still_running_when_the_search_is_interrupted_is_not_done():
    """Tune marks every trial it stops at Ctrl-C TERMINATED; only one whose last result says done
    (finished, or stopped by the scheduler) or that failed counts, so the search is not taken as complete."""

    def result(error: Exception | None = None, **metrics) -> Result:
        return Result(metrics=metrics, checkpoint=None, error=error, path="/tmp/trial")

    assert _trial_done(result(done=True, final=True))
    assert _trial_done(result(done=True, epoch=1))  # stopped early by ASHA
    assert _trial_done(result(RuntimeError("lost"), done=False))
    assert not _trial_done(result(done=False, epoch=1))  # running at Ctrl-C
    assert not _trial_done(result())  # never started
