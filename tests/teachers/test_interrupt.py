"""Ctrl-C during teacher training stops ``medkd run`` at once, leaving the teacher's checkpoint.

A Ray Train run started off the main thread (medkd trains its teachers concurrently, one thread
each) does not hear SIGINT; before the fix, leaving the thread pool waited for every teacher to
finish all its epochs, so Ctrl-C on a 40-minute teacher stage did nothing for 40 minutes.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import yaml

from medkd.teachers.faults import latest_checkpoint
from tests.cluster.medkd_process import MedkdProcess, describe, wait_until_gone

EPOCHS = 40
# Bounded: Ray's shutdown of the driver's local cluster takes seconds, not the teacher's epochs.
EXIT_WITHIN_S = 60


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_during_teacher_training_exits_promptly_and_keeps_the_checkpoint(redis_url, tmp_path):
    output_dir = tmp_path / "run"
    spec = {
        "name": "interrupt",
        "data": {"kind": "synthetic", "num_train": 128, "num_val": 32, "num_test": 32, "image_size": 16},
        "teachers": [
            {"name": "cnn", "model": "resnet10", "epochs": EPOCHS, "batch_size": 32, "cpus_per_worker": 0.5},
            {"name": "vit", "model": "vit", "epochs": EPOCHS, "batch_size": 32, "cpus_per_worker": 0.5},
        ],
        "cache": {"redis_url": redis_url, "namespace": f"interrupt-{tmp_path.name}"},
        "search": {"num_trials": 1, "epochs": 1, "scheduler": "none"},
        "serve": {"enabled": False},
        "ray": {"num_cpus": 2},
        "output_dir": str(output_dir),
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))

    with MedkdProcess(["run", str(job)], home=tmp_path / "home", log_path=tmp_path / "run.log") as run:
        deadline = time.monotonic() + 600  # bounded; minutes on a machine shared with other work
        while "teacher cnn: epoch 1/" not in run.output():
            assert run.poll() is None, run.output()
            assert time.monotonic() < deadline, "no teacher epoch in time:\n" + run.output()
            time.sleep(0.5)
        run.process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        code = run.wait(EXIT_WITHIN_S)
        took = time.monotonic() - interrupted
        output = run.output()
        left = wait_until_gone(run.pid, 30)
    assert code == 130, output[-3000:]
    assert "interrupted" in output
    assert f"epoch {EPOCHS}/{EPOCHS}" not in output, "the teachers ran to the end before the run stopped"
    assert not left, f"{took:.0f}s after Ctrl-C, the run's processes are still alive:\n{describe(left)}"
    # What a re-run resumes from (``tests/cluster/test_faults_teachers.py`` resumes from it).
    checkpoints = [latest_checkpoint(run_dir) for run_dir in Path(output_dir, "ray").glob("teacher-cnn-*")]
    assert any(found is not None and found[1] >= 1 for found in checkpoints), (checkpoints, output[-3000:])
