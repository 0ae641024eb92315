"""Search scaling and remote cache reads on the network-namespace cluster.

    python -m benchmarks.cluster_scaling [--trials 4] [--trial-epochs 6] [--num-train 768]
                                         [--cache-samples 200000] [--read-rounds 7]

Needs root (network namespaces). One :class:`medkd.cli.cluster.NetnsCluster` is started: a head
(0 CPUs, runs the drivers) and two 1-CPU worker nodes, each in its own network namespace with its
own address on a private bridge, and the cluster's Redis beside the head.

* **Search on 2 nodes vs 1 node.** The quickstart job (synthetic data, teachers at 1 epoch) is
  submitted through the Jobs API (``medkd submit``) with a fixed trial count, ASHA off
  (``search.scheduler=none``), ``max_concurrent=2`` and 1 CPU per trial, ``--no-serve``. First
  on the two worker nodes; then worker 2 is killed (SIGKILL by its recorded pids) and the same
  job is submitted again with a fresh output directory holding a copy of the trained teachers
  (so teachers and soft labels are reused), and every trial must run on worker 1.
  The figure is the ratio of the search stage's seconds (``results.json``,
  ``stages.search.seconds``): 1 node / 2 nodes.
* **Cache bulk read, remote vs local.** A driver on the head publishes one split of logits
  (``--cache-samples`` x 10 classes, float16) into the cluster's Redis; then a reader on the head
  and a reader on worker 1 (another namespace: over veth + bridge) each time
  ``SoftLabelCache.fetch`` of the whole split with the in-process LRU off (the pipelined MGET
  path), alternating, ``--read-rounds`` rounds each. The figure is remote throughput / local
  throughput (medians).

Ends with ``RESULT search_speedup_2_nodes=<x> remote_cache_vs_local=<y>`` (targets >= 1.6 and
>= 0.7). Timing on a shared 2-core machine is noisy: record the load next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medkd.cli.cluster import REDIS_PASSWORD_ENV, LocalCluster, NetnsCluster

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC = REPO_ROOT / "examples" / "quickstart.yaml"
TEACHER_FP, DATASET_FP, NAMESPACE = "benchteacher", "benchdata", "bench-scaling"
JOB_TIMEOUT_S = 1800


def _medkd(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medkd.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        timeout=timeout,
    )


def run_job(cluster: LocalCluster, output_dir: Path, args: argparse.Namespace) -> dict:
    """Submit the quickstart job, follow it to its end, return its results.json."""
    overrides = [
        f"output_dir={output_dir}",
        *cluster.job_overrides(),
        f"data.num_train={args.num_train}",
        "data.num_val=192",
        "data.num_test=192",
        "teachers.0.epochs=1",
        "teachers.1.epochs=1",
        f"search.num_trials={args.trials}",
        "search.max_concurrent=2",
        "search.cpus_per_trial=1",
        f"search.epochs={args.trial_epochs}",
        "search.scheduler=none",
    ]
    env = cluster.client_env()
    submit = _medkd(
        "submit",
        str(SPEC),
        "--address",
        cluster.dashboard_url,
        "--run-args",
        "--no-serve",
        *[part for item in overrides for part in ("--set", item)],
        env=env,
        timeout=300,
    )
    if submit.returncode != 0:
        raise SystemExit(f"medkd submit failed:\n{submit.stderr}")
    job_id = submit.stdout.split()[0]
    logs = _medkd("logs", job_id, "--follow", "--address", cluster.dashboard_url, env=env, timeout=JOB_TIMEOUT_S)
    if logs.returncode != 0:
        raise SystemExit(f"job {job_id} did not succeed:\n{logs.stdout[-4000:]}\n{logs.stderr[-2000:]}")
    return json.loads((output_dir / "results.json").read_text())


def _trial_nodes(results: dict) -> list[str]:
    return [trial["metrics"].get("node_ip", "?") for trial in results["trials"]]


def _wait_alive(cluster: LocalCluster, wanted: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(cluster.alive_nodes()) != wanted:
        if time.monotonic() > deadline:
            raise SystemExit(f"Ray still sees {len(cluster.alive_nodes())} nodes, not {wanted}")
        time.sleep(2)


# ------------------------------------------------------------------------------ cache reads


def publish_split(url: str, samples: int) -> None:
    """(on the head) Publish one split of classification logits into the cluster's Redis."""
    from medkd.softlabels.store import SoftLabelCache

    cache = SoftLabelCache(url, namespace=NAMESPACE, password_env=REDIS_PASSWORD_ENV, lru_bytes=0)
    logits = np.random.default_rng(0).normal(size=(samples, 10)).astype(np.float32)
    cache.publish(
        TEACHER_FP, DATASET_FP, "train", logits, teacher_spec={"model": "benchmark"}, encoding="float16", overwrite=True
    )


def read_split(url: str, repeats: int) -> None:
    """(on any node) Time whole-split fetches with the LRU off; print one JSON line."""
    from medkd.softlabels.store import SoftLabelCache

    cache = SoftLabelCache(url, namespace=NAMESPACE, password_env=REDIS_PASSWORD_ENV, lru_bytes=0)
    nbytes = cache.manifest(TEACHER_FP, DATASET_FP, "train").nbytes
    cache.fetch(TEACHER_FP, DATASET_FP, "train")  # connect, manifest
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        cache.fetch(TEACHER_FP, DATASET_FP, "train")
        times.append(time.perf_counter() - started)
    print(json.dumps({"seconds": statistics.median(times), "bytes": nbytes}))


def cache_ratio(cluster: LocalCluster, args: argparse.Namespace) -> tuple[float, float, float]:
    me = [sys.executable, "-m", "benchmarks.cluster_scaling"]
    published = cluster.run_on_node(
        0,
        [*me, "--publish", cluster.redis_url, str(args.cache_samples)],
        timeout=300,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    if published.returncode != 0:
        raise SystemExit(f"publishing on the head failed:\n{published.stderr[-3000:]}")
    speeds: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(args.read_rounds):
        for node in (0, 1):
            done = cluster.run_on_node(
                node,
                [*me, "--read", cluster.redis_url, "5"],
                timeout=300,
                capture_output=True,
                text=True,
                cwd=REPO_ROOT,
            )
            if done.returncode != 0:
                raise SystemExit(f"reading on node {node} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            speeds[node].append(row["bytes"] / row["seconds"] / 1e6)
    local, remote = statistics.median(speeds[0]), statistics.median(speeds[1])
    return local, remote, remote / local


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--trial-epochs", type=int, default=6)
    parser.add_argument("--num-train", type=int, default=768)
    parser.add_argument("--cache-samples", type=int, default=200_000)
    parser.add_argument("--read-rounds", type=int, default=7)
    parser.add_argument("--cache-only", action="store_true", help="measure only the cache reads (quick check)")
    parser.add_argument("--publish", nargs=2, metavar=("URL", "SAMPLES"), help=argparse.SUPPRESS)
    parser.add_argument("--read", nargs=2, metavar=("URL", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publish:
        publish_split(args.publish[0], int(args.publish[1]))
        return 0
    if args.read:
        read_split(args.read[0], int(args.read[1]))
        return 0
    for name in ("trials", "trial_epochs", "num_train", "cache_samples", "read_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    print(f"load average at start: {os.getloadavg()}", flush=True)
    state_dir = Path(tempfile.mkdtemp(prefix="mkdb", dir="/tmp"))
    try:
        cluster = NetnsCluster.up(workers=1 if args.cache_only else 2, cpus_per_worker=1, state_dir=state_dir)
    except BaseException:
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
    try:
        print(
            f"cluster: head {cluster.head_address}, workers {cluster.node_addresses[1:]}, redis {cluster.redis_url}",
            flush=True,
        )
        local, remote, ratio = cache_ratio(cluster, args)
        print(
            f"cache bulk read (MGET path, LRU off): head {local:.0f} MB/s, worker 1 (remote) {remote:.0f} MB/s",
            flush=True,
        )

        if args.cache_only:
            print(f"RESULT remote_cache_vs_local={ratio:.2f}")
            return 0
        two = run_job(cluster, cluster.shared_dir / "runs" / "two_nodes", args)
        two_s = two["stages"]["search"]["seconds"]
        print(f"search on 2 worker nodes: {two_s:.1f} s, trials on {sorted(set(_trial_nodes(two)))}", flush=True)

        cluster.kill_node(2)
        _wait_alive(cluster, 2)
        # The same teachers (found, not retrained; their soft labels are in the cluster's Redis):
        # only the search has to run again, now on one worker node.
        shutil.copytree(
            cluster.shared_dir / "runs" / "two_nodes" / "teachers",
            cluster.shared_dir / "runs" / "one_node" / "teachers",
        )
        one = run_job(cluster, cluster.shared_dir / "runs" / "one_node", args)
        one_s = one["stages"]["search"]["seconds"]
        print(f"search on 1 worker node:  {one_s:.1f} s, trials on {sorted(set(_trial_nodes(one)))}", flush=True)
        if set(_trial_nodes(one)) != {cluster.node_addresses[1]}:
            raise SystemExit(f"the 1-node search ran trials on {set(_trial_nodes(one))}")
    finally:
        cluster.down()
        shutil.rmtree(state_dir, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()}", flush=True)
    print(f"RESULT search_speedup_2_nodes={one_s / two_s:.2f} remote_cache_vs_local={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
