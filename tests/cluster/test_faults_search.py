"""Issue 14, items 3-5: faults during the search of a whole ``medkd run``, on the namespace cluster.

The cluster of ``tests/cluster`` (``netns_cluster``: a head without CPUs and two 1-CPU worker nodes,
each its own host on a private bridge, the cluster's Redis on the head's address with its password
from a file). The driver runs as a user's would, ``medkd run`` on the head's namespace, with the
cluster's Redis as the soft-label cache and its outputs in the cluster's shared directory. Once
the search is under way, the test injects its fault from outside, by recorded pids:

3. a worker node SIGKILLed (no replacement): Tune retries its trials on the node left;
4. the cluster's Redis SIGKILLed, its snapshot gone, and restarted: trials reconnect and
   recompute the lost soft labels from the teacher checkpoint;
5. the driver SIGKILLed: ``medkd run --resume`` reuses the finished stages and trials, and no
   process of either run is left on any node.

Each scenario gets the cluster whole (``netns_cluster`` restarts what the one before killed). The scenarios
run the same job with their own ``search.seed`` in one output directory and cache namespace: the
first to run trains the teacher and caches its soft labels, the others find them (a fault in the
teacher stage is ``test_faults_teachers``); each runs, and is checked on, its own search. The Redis
scenario, which wipes the cache, runs last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from medkd.cli.cluster import LocalCluster
from tests.cluster.netns_faults import (
    TRIAL_PROCESS,
    HeadProcess,
    assert_no_job_processes,
    finished_trials,
    node_processes,
    search_dirs,
    search_job,
    wait_until,
)

pytestmark = pytest.mark.slow

NUM_TRIALS = 4
# Bounded; a run takes a few minutes on a quiet 2-core machine, several times that when shared.
RUN_TIMEOUT_S = 900
REDIS_DOWN_S = 3.0


#: The scenarios' own searches of one job (see the module's docstring).
SEARCH_SEEDS = {"node": 1, "driver": 2, "redis": 3}


def _job(cluster: LocalCluster, name: str) -> tuple[Path, Path, set[Path]]:
    """The scenario's job file, the shared output directory, and the searches already in it."""
    output_dir = cluster.shared_dir / "faults" / "search"
    job = cluster.shared_dir / "faults" / f"{name}.yaml"
    job.parent.mkdir(parents=True, exist_ok=True)
    spec = search_job(cluster, output_dir, namespace="faults", num_trials=NUM_TRIALS, search_seed=SEARCH_SEEDS[name])
    job.write_text(yaml.safe_dump(spec))
    return job, output_dir, search_dirs(output_dir / "ray")


def _medkd_run(cluster: LocalCluster, job: Path, log: str, *extra: str) -> HeadProcess:
    argv = ["-m", "medkd.cli.main", "run", str(job), "--no-serve", *extra]
    return HeadProcess(cluster, argv, log_path=job.parent / log)


def _first_trial_finished(driver: HeadProcess, output_dir: Path, earlier: set[Path]) -> list[str]:
    return wait_until(lambda: finished_trials(output_dir / "ray", earlier), RUN_TIMEOUT_S, "finished trial", driver)


def _trial_errors(output_dir: Path) -> str:
    return "\n".join(
        f"{path.parent.name}:\n{path.read_text()[-3000:]}" for path in output_dir.glob("ray/*/*/error.txt")
    )


def _assert_full_search(results: dict[str, Any], output_dir: Path) -> None:
    """The full trial count, every trial completed and exported, and the selected student the
    same kind of result as without a fault."""
    trials = results["trials"]
    assert len(trials) == NUM_TRIALS
    statuses = {t["trial_id"]: t["status"] for t in trials}
    assert list(statuses.values()) == ["completed"] * NUM_TRIALS, f"{statuses}\n{_trial_errors(output_dir)}"
    best = results["best"]
    assert best["config"]["student"] == "resnet_tiny"
    assert Path(best["onnx_path"]).is_file()
    assert 0.0 <= best["val_metrics"]["val_auc"] <= 1.0


def _epoch_reported(output_dir: Path, earlier: set[Path]) -> bool:
    """Whether a trial of this scenario's search has reported an epoch."""
    return any(
        result.stat().st_size > 0
        for search in search_dirs(output_dir / "ray") - earlier
        for result in search.glob("*/result.json")
    )


def _trial_past_its_first_epoch(output_dir: Path, earlier: set[Path]) -> tuple[str, str] | None:
    """``(trial id, node address)`` of a trial whose last report is epoch 1 of 2 (it runs on)."""
    for result in (r for search in search_dirs(output_dir / "ray") - earlier for r in search.glob("*/result.json")):
        lines = result.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
        if last.get("epoch") == 1 and not last.get("final") and not (result.parent / "error.txt").exists():
            return last["trial_id"], last["node_ip"]
    return None


@pytest.mark.timeout(RUN_TIMEOUT_S + 600)
def test_worker_node_killed_mid_search_retries_its_trials(netns_cluster):
    job, output_dir, earlier = _job(netns_cluster, "node")
    with _medkd_run(netns_cluster, job, "node.log") as driver:
        trial, address = wait_until(
            lambda: _trial_past_its_first_epoch(output_dir, earlier),
            RUN_TIMEOUT_S,
            "trial past its first epoch",
            driver,
            0.1,
        )
        victim = netns_cluster.node_addresses.index(address)
        before = finished_trials(output_dir / "ray", earlier)
        trial_pids = node_processes(netns_cluster, victim, TRIAL_PROCESS)
        killed = netns_cluster.kill_node(victim)
        code = driver.wait(RUN_TIMEOUT_S)
        output = driver.output()
    assert code == 0, output[-5000:]
    assert trial_pids and set(trial_pids) <= killed  # the kill did hit a running trial
    assert len(before) < NUM_TRIALS
    results = json.loads((output_dir / "results.json").read_text())
    _assert_full_search(results, output_dir)
    # Tune recorded the trial's failure and ran it again, on the node left, from the checkpoint of
    # its first epoch (a trial checkpoints every epoch).
    (retried,) = [t for t in results["trials"] if t["trial_id"] == trial]
    assert list((output_dir / "ray").glob(f"search-*/*_{trial}_*/error.txt"))
    lost, left = address, netns_cluster.node_addresses[3 - victim]
    assert retried["metrics"]["node_ip"] == left
    assert retried["metrics"]["resumed_from_epoch"] == 1, retried["metrics"]
    # No trial ended on the lost node after it was killed.
    nodes = [t["metrics"]["node_ip"] for t in results["trials"]]
    assert nodes.count(lost) <= len(before), nodes


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 600)
def test_driver_killed_mid_search_resumes_without_orphans(netns_cluster):
    job, output_dir, earlier = _job(netns_cluster, "driver")
    with _medkd_run(netns_cluster, job, "driver-first.log") as first:
        _first_trial_finished(first, output_dir, earlier)
        before = finished_trials(output_dir / "ray", earlier)
        first.kill()
    assert len(before) < NUM_TRIALS
    # Ray ends the dead driver's job: none of its trials (or anything else of it) lingers on a node.
    assert_no_job_processes(netns_cluster, "the killed driver's job left processes on the cluster")

    with _medkd_run(netns_cluster, job, "driver-resume.log", "--resume") as second:
        code = second.wait(RUN_TIMEOUT_S)
        output = second.output()
    assert code == 0, output[-5000:]
    assert "resuming search" in output
    results = json.loads((output_dir / "results.json").read_text())
    assert results["stages"]["teachers"]["status"] == "skipped"
    assert results["stages"]["soft_labels"]["status"] == "skipped"
    _assert_full_search(results, output_dir)
    # The trials finished before the kill were reused, not run again: their checkpoints are still there.
    assert set(before) <= set(finished_trials(output_dir / "ray", earlier))
    assert_no_job_processes(netns_cluster, "processes of the runs outlived them")


@pytest.mark.timeout(RUN_TIMEOUT_S + 600)
def test_redis_killed_and_restarted_mid_search_recomputes_what_was_lost(netns_cluster):
    job, output_dir, earlier = _job(netns_cluster, "redis")
    with _medkd_run(netns_cluster, job, "redis.log") as driver:
        # Killed while the first trials train, after they read their soft labels: the trials that
        # start next (when one of these finishes, seconds later) find the cache gone. Killing only
        # once a trial had finished raced the next trials, which start at once and read first.
        wait_until(lambda: _epoch_reported(output_dir, earlier), RUN_TIMEOUT_S, "trial epoch", driver, 0.1)
        before = finished_trials(output_dir / "ray", earlier)
        netns_cluster.kill_redis()
        # The snapshot goes too (as with a server that had not saved yet): every soft label is lost.
        (Path(netns_cluster.state.redis.data_dir) / "dump.rdb").unlink(missing_ok=True)
        time.sleep(REDIS_DOWN_S)
        netns_cluster.restart_redis()
        code = driver.wait(RUN_TIMEOUT_S)
        output = driver.output()
    assert code == 0, output[-5000:]
    assert len(before) < NUM_TRIALS
    # Trials after the restart found the labels gone and recomputed them from the teacher checkpoint.
    assert "soft labels of teacher cnn (train) lost from the cache: recomputing" in output, output[-5000:]
    _assert_full_search(json.loads((output_dir / "results.json").read_text()), output_dir)
