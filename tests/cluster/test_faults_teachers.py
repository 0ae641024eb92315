"""Issue 14, item 2: a worker node killed during teacher training, no replacement, on the
namespace cluster.

The cluster of ``tests/cluster`` (``netns_cluster``: a head without CPUs and two 1-CPU worker nodes,
each its own host on a private bridge). The driver (``tests/cluster/teacher_fault_driver.py``:
medkd's teacher stage for one teacher with two Ray Train workers, one per worker node) runs on the
head's namespace; once Train has registered a checkpoint, the test SIGKILLs worker node 2's
processes by their recorded pids, and no node replaces it.

- Elastic (``min_workers=1``): the teacher finishes on the node left, from its last checkpoint.
- Fixed (``num_workers=2`` only): it cannot; it fails within a bounded time with a message naming
  the lost node and the checkpoint to resume from. The node is then restarted and the same run
  started again: it resumes from exactly that checkpoint and completes.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from medkd.cli.cluster import LocalCluster
from medkd.teachers.faults import LOST_NODE_WAIT_ENV, latest_checkpoint
from tests.cluster.netns_faults import (
    TRAIN_WORKER_PROCESS,
    HeadProcess,
    assert_no_job_processes,
    make_whole,
    node_processes,
    scenario_result,
    wait_until,
)
from tests.cluster.teacher_fault_driver import run_dir

pytestmark = pytest.mark.slow

EPOCHS = 6
KILL_AFTER_EPOCH = 1  # kill once Train has registered this epoch's checkpoint
VICTIM = 2  # worker node 2; worker node 1 is left
RUN_TIMEOUT_S = 600  # bounded; ~1-2 min on a quiet 2-core machine, several when it is shared
LOST_NODE_WAIT_S = 10
# A run that cannot go on must end within: the lost-node wait + a worker-group start timeout (10 s)
# + Ray noticing the node's death + the driver's exit, with room for a loaded machine.
FAILURE_BOUND_S = 150


def _teacher(cluster: LocalCluster, output: Path, log: str, *, min_workers: int | None) -> HeadProcess:
    argv = ["-m", "tests.cluster.teacher_fault_driver", "--output", str(output), "--epochs", str(EPOCHS)]
    argv += ["--workers", "2"] + (["--min-workers", str(min_workers)] if min_workers else [])
    # Fixed workers: a short wait bounds the failure. Elastic: medkd's default, as a user has it
    # (the restart on fewer workers takes longer than a short wait on a loaded machine).
    env = {} if min_workers else {LOST_NODE_WAIT_ENV: str(LOST_NODE_WAIT_S)}
    return HeadProcess(cluster, argv, log_path=output / log, env=env)


def _registered_epoch(output: Path) -> int:
    checkpoint = latest_checkpoint(run_dir(output, "fault"))
    return checkpoint[1] if checkpoint is not None else 0


def _kill_worker_node_mid_training(cluster: LocalCluster, driver: HeadProcess, output: Path) -> int:
    """Kill worker node 2 once a checkpoint is registered; returns that checkpoint's epoch."""
    wait_until(
        lambda: _registered_epoch(output) >= KILL_AFTER_EPOCH, RUN_TIMEOUT_S, "registered checkpoint", driver, 0.1
    )
    assert node_processes(cluster, VICTIM, TRAIN_WORKER_PROCESS), "no training worker on the node to kill"
    registered = _registered_epoch(output)
    assert registered < EPOCHS, "training ended before the node could be killed"
    cluster.kill_node(VICTIM)
    return registered


@pytest.mark.timeout(RUN_TIMEOUT_S + 600)
def test_elastic_teacher_finishes_on_the_node_left(netns_cluster):
    output = netns_cluster.shared_dir / "faults" / "elastic"
    with _teacher(netns_cluster, output, "elastic.log", min_workers=1) as driver:
        registered = _kill_worker_node_mid_training(netns_cluster, driver, output)
        code = driver.wait(RUN_TIMEOUT_S)
        outcome = scenario_result(driver.output())
    assert code == 0 and outcome["ok"], outcome

    history = outcome["history"]
    # Every epoch trained once, resumed from the checkpoint registered before the kill (not from scratch)...
    assert [record["epoch"] for record in history] == list(range(1, EPOCHS + 1))
    resumed = outcome["resumed_from"]
    assert resumed and resumed[0] >= registered >= KILL_AFTER_EPOCH, (resumed, registered)
    # ...with one worker on the node left where it had two.
    assert history[0]["workers"] == 2 and history[-1]["workers"] == 1, history
    left = netns_cluster.node_addresses[3 - VICTIM]
    assert all(record["node"] == left for record in history if record["epoch"] > resumed[-1]), history
    assert Path(outcome["checkpoint"]).is_file()
    assert_no_job_processes(netns_cluster, "the teacher's processes outlived its run")


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 600)
def test_fixed_teacher_fails_in_bounded_time_naming_the_node_and_checkpoint_then_resumes(netns_cluster):
    output = netns_cluster.shared_dir / "faults" / "fixed"
    with _teacher(netns_cluster, output, "fixed.log", min_workers=None) as driver:
        registered = _kill_worker_node_mid_training(netns_cluster, driver, output)
        killed_at = time.monotonic()
        code = driver.wait(RUN_TIMEOUT_S)
        ended_after_kill_s = time.monotonic() - killed_at
        outcome = scenario_result(driver.output())
    assert code == 1 and not outcome["ok"], outcome
    assert ended_after_kill_s < FAILURE_BOUND_S, ended_after_kill_s

    error = outcome["error"]
    lost = netns_cluster.node_addresses[VICTIM]
    assert error.startswith("teacher 'fault' failed: "), error
    assert f"{lost} (node " in error, error  # names the lost node...
    assert "add a node, or set min_workers below num_workers" in error  # ...how to go on without it...
    found = re.search(r"its last checkpoint \(epoch (\d+)\) is (\S+); run the job again", error)
    assert found, error  # ...and where it resumes from
    epoch, checkpoint = int(found[1]), Path(found[2])
    assert checkpoint.is_dir() and checkpoint.parent == run_dir(output, "fault")
    assert epoch >= registered
    assert "(`medkd run JOB.yaml`, or re-submit it) and this teacher resumes from there" in error

    # As the message says: with the node back, the same run resumes from that checkpoint.
    make_whole(netns_cluster)
    with _teacher(netns_cluster, output, "fixed-again.log", min_workers=None) as driver:
        code = driver.wait(RUN_TIMEOUT_S)
        outcome = scenario_result(driver.output())
    assert code == 0 and outcome["ok"], outcome
    assert outcome["resumed_from"] == [epoch], outcome["resumed_from"]
    assert [record["epoch"] for record in outcome["history"]] == list(range(1, EPOCHS + 1))
    assert {record["workers"] for record in outcome["history"]} == {2}
    assert_no_job_processes(netns_cluster, "the teacher's processes outlived its run")
