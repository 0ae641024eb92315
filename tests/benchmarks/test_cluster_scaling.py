"""benchmarks.cluster_scaling refuses bad arguments before it starts a cluster, naming the flag."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("flag", ["--trials", "--trial-epochs", "--num-train", "--cache-samples", "--read-rounds"])
def test_non_positive_counts_are_refused_naming_the_flag(flag):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster_scaling", flag, "0"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"{flag} must be >= 1, got 0" in done.stderr
    assert "load average" not in done.stdout  # nothing was started
