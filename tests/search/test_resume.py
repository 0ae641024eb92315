"""An interrupted search resumes with `medkd run --resume` and ends with every trial.

Runs `medkd run` in subprocesses (each with its own local Ray cluster), interrupts the first
one with SIGINT (Ctrl-C) once half of the trials have finished, then resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NUM_TRIALS = 4


def finished_trials(experiment_root: Path) -> int:
    return len(list(experiment_root.glob("search-*/*/checkpoint_*")))


@pytest.mark.slow
def test_interrupted_search_resumes_to_the_same_trial_count(redis_url, tmp_path):
    output_dir = tmp_path / "run"
    spec = {
        "name": "resume",
        "data": {"kind": "synthetic", "num_train": 64, "num_val": 32, "num_test": 32, "image_size": 16},
        "teachers": [{"name": "cnn", "model": "resnet10", "epochs": 1, "batch_size": 32, "cpus_per_worker": 0.5}],
        "cache": {"redis_url": redis_url, "namespace": f"resume-{tmp_path.name}"},
        "search": {"num_trials": NUM_TRIALS, "max_concurrent": 1, "epochs": 2, "batch_size": 32, "cpus_per_trial": 0.5,
                   "scheduler": "none",
                   "space": {"student": ["resnet_tiny"], "width": {"low": 0.25, "high": 0.5}, "quantize": ["none"]}},
        "serve": {"enabled": False},
        "ray": {"num_cpus": 2},
        "output_dir": str(output_dir),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "medkd.cli.main", "run", str(path)]

    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while finished_trials(output_dir / "ray") < NUM_TRIALS // 2:
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "search did not reach half of its trials in time"
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=180)
    assert first.returncode != 0, out
    assert "--resume" in out
    interrupted_at = finished_trials(output_dir / "ray")
    assert NUM_TRIALS // 2 <= interrupted_at < NUM_TRIALS

    second = subprocess.run(command + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming search" in second.stdout
    results = json.loads((output_dir / "results.json").read_text())
    assert len(results["trials"]) == NUM_TRIALS
    assert sum(t["final"] for t in results["trials"]) == NUM_TRIALS
    assert results["stages"]["teachers"]["status"] == "skipped"
    assert results["stages"]["soft_labels"]["status"] == "skipped"
    assert results["best"]["onnx_path"]
    assert "Pareto front" in (output_dir / "report.html").read_text()
