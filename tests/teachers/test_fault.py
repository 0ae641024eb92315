"""A teacher survives the loss of the node training it (two-node local Ray cluster).

The scenario (``tests/teachers/fault_scenario.py``) runs in a subprocess because it starts its
own multi-node cluster, which cannot share a process with the session's ``ray_session``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIO_TIMEOUT_S = 240


def run_scenario(output: Path) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(
        [sys.executable, "-m", "tests.teachers.fault_scenario", "--output", str(output), "--timeout", str(SCENARIO_TIMEOUT_S)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCENARIO_TIMEOUT_S + 60,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("SCENARIO_RESULT ")]
    assert lines, f"scenario printed no result (exit {completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("SCENARIO_RESULT "))


def test_teacher_resumes_from_its_last_checkpoint_after_its_node_is_removed(tmp_path):
    outcome = run_scenario(tmp_path / "fault")
    assert outcome["ok"], outcome.get("error")
    assert outcome["train_worker_was_on_removed_node"], "the training worker was not on the removed node"

    # It resumed from its last checkpoint before the node was lost — not from scratch.
    assert len(outcome["resumed_from"]) >= 1
    resumed = outcome["resumed_from"][0]
    assert resumed >= outcome["registered_epoch_at_kill"] >= 1
    assert resumed < outcome["epochs"]

    # The job completed: every epoch trained exactly once, in order, across both attempts.
    assert outcome["epochs_run"] == outcome["epochs"]
    assert outcome["history_epochs"] == list(range(1, outcome["epochs"] + 1))
    assert 1 <= outcome["best_epoch"] <= outcome["epochs"]

    # The published artifact is valid: found by fingerprint, loads, and predicts.
    assert outcome["artifact_found"]
    assert Path(outcome["checkpoint"]).is_file()
    assert outcome["logits_shape"] == [32, 2]
    assert outcome["logits_finite"]
