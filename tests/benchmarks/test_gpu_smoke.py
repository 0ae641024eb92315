"""benchmarks.gpu_smoke without a CUDA device: it stops at once with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import REPO_ROOT


def test_gpu_smoke_without_a_cuda_device_exits_at_once_with_a_message():
    # CUDA_VISIBLE_DEVICES="" hides any device, so this holds on a GPU machine too.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    started = time.monotonic()
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_smoke"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert process.returncode == 2, process.stderr
    assert "gpu_smoke: no CUDA device" in process.stderr and "CUDA_VISIBLE_DEVICES=)" in process.stderr
    assert "needs a machine with a CUDA device; nothing was run" in process.stderr
    assert "RESULT" not in process.stdout
    assert "ray" not in process.stdout.lower()  # stopped before starting Ray or loading data
    assert elapsed < 90, f"took {elapsed:.0f}s to refuse"


def test_gpu_smoke_rejects_bad_arguments_by_name():
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_smoke", "--image-size", "big"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2 and "--image-size" in process.stderr
