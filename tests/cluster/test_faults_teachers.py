"""Issue 14, item 2: a worker node killed during teacher training, no replacement.

Two teacher workers on two 1-CPU worker nodes (a head without CPUs); one worker node is
killed (SIGKILL of its Ray processes) after two epochs are checkpointed, and no node replaces
it. Elastic (``min_workers=1``): the teacher finishes on the node left, from its last
checkpoint. Fixed (``num_workers=2`` only): it cannot, so it must fail within a bounded time
with a message naming the lost node and the checkpoint to resume from.

Runs on ``ray.cluster_utils.Cluster`` (all nodes on this host's address, each with its own
raylet), in a subprocess: see ``tests/teachers/fault_scenario.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.teachers.fault_scenario import run_in_subprocess

SCENARIO_TIMEOUT_S = 420  # bounded; ~90 s on a quiet 2-CPU machine, several minutes when it is shared


@pytest.mark.slow
@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 120)
def test_elastic_teacher_finishes_on_the_node_left(tmp_path):
    outcome = run_in_subprocess(tmp_path / "elastic", "elastic", SCENARIO_TIMEOUT_S)
    assert outcome["ok"], outcome.get("error")
    assert outcome["train_worker_was_on_removed_node"]
    assert outcome["replacement_node"] is None

    # Resumed from the checkpoint registered before the kill, not from scratch...
    assert outcome["resumed_from"] and outcome["resumed_from"][0] >= outcome["registered_epoch_at_kill"] >= 1
    # ...with one worker (on the node left) where it had two, and every epoch trained once.
    workers = outcome["history_workers"]
    assert workers[0] == 2 and workers[-1] == 1, workers
    assert outcome["history_epochs"] == list(range(1, outcome["epochs"] + 1))
    assert outcome["artifact_found"] and Path(outcome["checkpoint"]).is_file()
    assert outcome["logits_finite"]


@pytest.mark.slow
@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 120)
def test_fixed_teacher_fails_in_bounded_time_naming_the_node_and_checkpoint(tmp_path):
    outcome = run_in_subprocess(tmp_path / "fixed", "fixed", SCENARIO_TIMEOUT_S)
    assert outcome["ok"], outcome.get("error")  # ok: it failed, as it must
    error = outcome["error"]
    assert "TeacherTrainingError" in error
    assert outcome["killed_node_id"][:12] in error, error  # names the lost node...
    assert outcome["killed_node_address"] in error
    assert "min_workers" in error  # ...how to go on without it...
    checkpoint = error.split("its last checkpoint (epoch ")[1].split(") is ")[1].split(";")[0]
    assert Path(checkpoint).is_dir() and checkpoint.startswith(outcome["run_dir"])  # ...and where it resumes
    assert "resumes from there" in error
    # Bounded: MEDKD_LOST_NODE_WAIT_S (20 s) + a worker-group start timeout (10 s) + detection.
    assert outcome["ended_after_kill_s"] < 120, outcome["ended_after_kill_s"]
