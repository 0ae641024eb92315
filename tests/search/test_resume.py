"""An interrupted search resumes with `medkd run --resume` and ends with every trial.

Runs `medkd run` in child processes (each with its own local Ray cluster, its environment
isolated from the caller's cluster, output drained to a file), interrupts the first one with
SIGINT (Ctrl-C) once half of the trials have finished, then resumes it. Whatever is left of a
child's session is killed (by pid) when the test ends, pass or fail.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.medkd_process import MedkdProcess

NUM_TRIALS = 4


def finished_trials(experiment_root: Path) -> int:
    # A running trial has checkpoints too (its training state after each epoch); a finished one's
    # checkpoint is its exported candidate.
    return len(list(experiment_root.glob("search-*/*/checkpoint_*/candidate.json")))


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
        while finished_trials(output_dir / "ray") < NUM_TRIALS // 2:
            assert first.poll() is None, first.output()
            assert time.monotonic() < deadline, "search did not reach half of its trials in time:\n" + first.output()
            time.sleep(0.5)
        first.process.send_signal(signal.SIGINT)
        code = first.wait(180)
        out = first.output()
    assert code != 0, out
    assert "--resume" in out
    interrupted_at = finished_trials(output_dir / "ray")
    assert NUM_TRIALS // 2 <= interrupted_at < NUM_TRIALS

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
