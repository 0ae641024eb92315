"""``medkd submit`` runs the real job on the namespace cluster: no monkeypatching, the real
``medkd run`` through the Jobs API, with the cluster's Redis as the soft-label cache.

The head (0 CPUs) runs the driver; teachers and trials can only run on the two 1-CPU worker
nodes, each in its own network namespace. The soft labels are published by the driver on the
head and read by trials on the workers, over the bridge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

#: The quickstart at its smallest: every stage runs, each as briefly as it can.
TINY = [
    "data.num_train=256",
    "data.num_val=96",
    "data.num_test=96",
    "teachers.0.epochs=1",
    "teachers.1.epochs=1",
    "search.num_trials=2",
    "search.max_concurrent=2",
    "search.epochs=1",
    "search.scheduler=none",
]
JOB_TIMEOUT_S = 1500


def _medkd(cluster, *args: str, timeout: float) -> subprocess.CompletedProcess:
    # Only what a user exports after `medkd cluster local up`: the token file (RAY_AUTH_TOKEN_PATH).
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env["RAY_AUTH_TOKEN_PATH"] = str(cluster.token_file)
    return subprocess.run(
        [sys.executable, "-m", "medkd.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=timeout,
    )


@pytest.mark.timeout(JOB_TIMEOUT_S + 900)  # cluster start-up + the whole job on a loaded 2-core machine
def test_submit_runs_the_whole_job_across_nodes(netns_cluster):
    output_dir = netns_cluster.shared_dir / "runs" / "submit"
    overrides = [f"output_dir={output_dir}", *netns_cluster.job_overrides(), *TINY]
    submit = _medkd(
        netns_cluster,
        "submit",
        "examples/quickstart.yaml",
        "--address",
        netns_cluster.dashboard_url,
        "--run-args",
        *[part for item in overrides for part in ("--set", item)],
        timeout=300,
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.split()[0]

    logs = _medkd(
        netns_cluster, "logs", job_id, "--follow", "--address", netns_cluster.dashboard_url, timeout=JOB_TIMEOUT_S
    )
    assert logs.returncode == 0, logs.stdout[-5000:] + logs.stderr[-2000:]
    for stage in ("teachers", "soft_labels", "search", "final", "export", "serve", "report"):
        assert f"   {stage}: " in logs.stdout, f"stage {stage} missing from the job's log"
    status = _medkd(netns_cluster, "status", job_id, "--json", "--address", netns_cluster.dashboard_url, timeout=60)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED", status.stdout

    results = json.loads((output_dir / "results.json").read_text())
    assert {name: stage["status"] for name, stage in results["stages"].items()} == {
        "teachers": "ran",
        "soft_labels": "ran",
        "search": "ran",
        "final": results["stages"]["final"]["status"],
        "export": "ran",
        "serve": "ran",
        "report": "ran",
    }
    head, workers = netns_cluster.head_address, set(netns_cluster.node_addresses[1:])
    teacher_nodes = {teacher["name"]: teacher["history"][-1]["node"] for teacher in results["teachers"]}
    trial_nodes = [trial["metrics"]["node_ip"] for trial in results["trials"]]
    assert len(trial_nodes) == 2
    # Work ran on both worker nodes (never on the 0-CPU head), each its own host.
    assert set(teacher_nodes.values()) <= workers and set(trial_nodes) <= workers
    assert set(teacher_nodes.values()) | set(trial_nodes) == workers
    # Soft labels were published from the head (the driver) and read by trials on other nodes,
    # through the cluster's Redis (the only cache: there is no managed redis-server on any node).
    writers = {entry["written_from"] for entry in results["soft_labels"]["teachers"].values()}
    assert writers == {head}
    assert all(node != head for node in trial_nodes)
    assert all(trial["status"] == "completed" for trial in results["trials"])
    client = redis.Redis.from_url(netns_cluster.redis_url, password=netns_cluster.redis_password)
    for teacher in results["teachers"]:
        assert client.keys(f"medkd:sl:{teacher['fingerprint']}:*:train:v-:manifest"), teacher["name"]
    assert (output_dir / "report.html").is_file()
