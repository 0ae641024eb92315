"""The settings and the message of a teacher's node-loss handling.

The node-loss scenarios themselves run on the namespace cluster, where every node is its own host:
``tests/cluster/test_faults_teachers.py`` (elastic: finishes on the node left; fixed: fails in
bounded time naming the node and the checkpoint, then resumes from it once the node is back).
"""

from __future__ import annotations

import pytest

from medkd.spec.teachers import TeacherSpec
from medkd.teachers.faults import LOST_NODE_WAIT_ENV, lost_node_wait_s


def test_min_workers_above_num_workers_is_refused():
    with pytest.raises(ValueError, match=r"min_workers \(3\) must not exceed num_workers \(2\)"):
        TeacherSpec(name="t", model="resnet10", num_workers=2, min_workers=3)


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_lost_node_wait_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(LOST_NODE_WAIT_ENV, value)
    with pytest.raises(ValueError, match=LOST_NODE_WAIT_ENV):
        lost_node_wait_s()


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
