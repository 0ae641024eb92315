"""A teacher survives the loss of the node training it (two-node local Ray cluster).

The scenario (``tests/teachers/fault_scenario.py``) runs in a subprocess because it starts its
own multi-node cluster, which cannot share a process with the session's ``ray_session``.
Scenarios without a replacement node are in ``tests/cluster/test_faults_teachers.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medkd.spec.teachers import TeacherSpec
from medkd.teachers.faults import LOST_NODE_WAIT_ENV, lost_node_wait_s
from tests.teachers.fault_scenario import run_in_subprocess

SCENARIO_TIMEOUT_S = 240


def test_min_workers_above_num_workers_is_refused():
    with pytest.raises(ValueError, match=r"min_workers \(3\) must not exceed num_workers \(2\)"):
        TeacherSpec(name="t", model="resnet10", num_workers=2, min_workers=3)


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_lost_node_wait_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(LOST_NODE_WAIT_ENV, value)
    with pytest.raises(ValueError, match=LOST_NODE_WAIT_ENV):
        lost_node_wait_s()


@pytest.mark.slow
def test_teacher_resumes_from_its_last_checkpoint_after_its_node_is_removed(tmp_path):
    outcome = run_in_subprocess(tmp_path / "fault", "replace", SCENARIO_TIMEOUT_S)
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


def test_the_cli_prints_a_teacher_failure_as_its_message_not_a_traceback(capsys, monkeypatch):
    from medkd.cli import main as cli
    from medkd.teachers.faults import TeacherTrainingError

    message = "teacher 'vit' failed: NodeLostError: lost node(s) 10.0.0.3; its last checkpoint (epoch 2) is /x"

    def failing_run(args):
        raise TeacherTrainingError(message)

    from medkd.cli import run as run_command

    monkeypatch.setattr(run_command, "run", failing_run)  # main() loads the run command by name
    assert cli.main(["run", "job.yaml"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {message}"
