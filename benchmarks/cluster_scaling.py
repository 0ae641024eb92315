"""Search scaling and remote cache reads on the network-namespace cluster.

    python -m benchmarks.cluster_scaling [--trials 8] [--trial-epochs 10] [--num-train 1024]
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

  The trial size is a realistic one by default (10 epochs of 1024 images; a real search trains
  for tens of epochs): every trial also pays a fixed cost that does not shrink with its size (a
  new actor process and its imports, the soft-label read, the cost estimate's ONNX export, the
  final compression, export and latency measurement; ~20-30 CPU-s here). At 4 epochs of 512
  images that fixed cost is most of a trial and the figure says more about it than about
  spreading trials over nodes.

  **8 trials by default** (4 until stop 20): 4 trials of 20-65 s split over 2 slots so unevenly
  that the split alone capped the figure at 1.75-1.79 with no slowdown at all, so the figure said
  more about one draw of 4 configurations than about the platform. 8 trials (started longest
  first, as every search does) split to within 1 % (best split 148.6 / 148.3 s and 159.2 /
  159.1 s on the two quiet runs of 2026-12-05, RESULTS.md).

  **Where the time goes.** While each search stage runs (from its ``== stage 3/7: search ==``
  log line to the next stage's), :class:`benchmarks._cpu_census.CpuCensus` samples ``/proc``:
  CPU seconds per node (network namespace) and kind of process (trial actors, head, raylets,
  agents, driver, Redis), the busiest processes, each trial process's busiest thread vs all its
  other threads (a 1-CPU trial must compute on one thread), and what ran *outside* the cluster
  meanwhile. Each trial's time line (set-up, epochs, compression/export, the gap before it on
  its node) comes from its Tune ``result.json``, and so does each node's account (trials per
  process, the wait before its first trial, the gaps between its trials, its idle time after
  its last one: the cost of an uneven split). A search during which processes outside the
  cluster used more than 0.2 cores is marked void: the machine was not quiet.

  **What limits the figure** (the ``scaling:`` line). The two searches run the same trial
  configurations (Optuna's seeded sampler); paired by configuration, the sum of their trainable
  seconds on 2 nodes over that on 1 node is how much slower a trial ran beside another one (on
  this 2-core machine: the head's processes now compete with the trials, and the two cores share
  caches and memory). The best split of the 1-node trial times over two nodes gives the most
  the figure could be for these trials' sizes: with 4 trials it depends on their sizes' draw.
* **Cache bulk read, remote vs local.** A driver on the head publishes one split of logits
  (``--cache-samples`` x 10 classes, float16) into the cluster's Redis; then a reader on the head
  and a reader on worker 1 (another namespace: over veth + bridge) each time
  ``SoftLabelCache.fetch`` of the whole split with the in-process LRU off (the pipelined MGET
  path), alternating, ``--read-rounds`` rounds each. The figure is remote throughput / local
  throughput (medians).

Ends with ``RESULT search_speedup_2_nodes=<x> remote_cache_vs_local=<y>`` (targets >= 1.6 and
>= 0.7). Timing on a shared 2-core machine is noisy: record the load (printed with each search's
census) next to the figures.
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

from benchmarks._cpu_census import OUTSIDE, CensusReport, CpuCensus
from medkd.cli.cluster import REDIS_PASSWORD_ENV, LocalCluster, NetnsCluster

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC = REPO_ROOT / "examples" / "quickstart.yaml"
TEACHER_FP, DATASET_FP, NAMESPACE = "benchteacher", "benchdata", "bench-scaling"
JOB_TIMEOUT_S = 1800
#: Above this many cores used by processes outside the cluster during a search, its time is void.
QUIET_OUTSIDE_CORES = 0.2


def _medkd(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medkd.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        timeout=timeout,
    )


def _census_nodes(cluster: LocalCluster) -> dict[str, str]:
    return {node.role: node.namespace for node in cluster.state.nodes if node.namespace}


def follow_job(
    cluster: LocalCluster, job_id: str, env: dict[str, str], log_path: Path | None = None
) -> CensusReport | None:
    """Follow the job's log to its end; sample the CPU use of every process while the search
    stage runs (from its ``== stage 3/…: search ==`` line to the next stage's). With ``log_path``,
    the whole log is written there, each line prefixed with the wall-clock time it arrived."""
    census: CpuCensus | None = None
    report: CensusReport | None = None
    process = subprocess.Popen(
        [sys.executable, "-m", "medkd.cli.main", "logs", job_id, "--follow", "--address", cluster.dashboard_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
        cwd=REPO_ROOT,
    )
    tail: list[str] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    log = log_path.open("w") if log_path is not None else None
    try:
        for line in process.stdout:
            tail = [*tail[-80:], line]
            if log is not None:
                log.write(f"{time.time():.2f} {line}")
            if "== stage" in line and ": search ==" in line and census is None:
                census = CpuCensus(_census_nodes(cluster)).start()
            elif "== stage" in line and census is not None and report is None:
                report = census.stop()
            if time.monotonic() > deadline:
                raise SystemExit(f"job {job_id} did not end within {JOB_TIMEOUT_S} s")
        process.wait(timeout=60)
    finally:
        if log is not None:
            log.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    if census is not None and report is None:
        report = census.stop()
    if process.returncode != 0:
        raise SystemExit(f"job {job_id} did not succeed:\n{''.join(tail)[-4000:]}")
    return report


def run_job(cluster: LocalCluster, output_dir: Path, args: argparse.Namespace) -> tuple[dict, CensusReport | None]:
    """Submit the quickstart job, follow it to its end; return its results.json and the CPU census
    of its search stage."""
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
    keep = Path(args.keep) / output_dir.name if args.keep else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    census = follow_job(cluster, job_id, env, keep / "driver.log" if keep is not None else None)
    results = json.loads((output_dir / "results.json").read_text())
    if keep is not None:
        (keep / "results.json").write_text(json.dumps(results, indent=1, default=str))
        for trial in results["trials"]:
            if trial.get("checkpoint"):
                shutil.copy(Path(trial["checkpoint"]).parent / "result.json", keep / f"{trial['trial_id']}.result.json")
        if census is not None:
            (keep / "census.txt").write_text(
                f"started_at {census.started_at}\nseconds {census.seconds}\n{census.table()}\n"
            )
    return results, census


def _trial_nodes(results: dict) -> list[str]:
    return [trial["metrics"].get("node_ip", "?") for trial in results["trials"]]


def trial_timeline(results: dict, origin: float | None = None) -> list[dict]:
    """Each trial's timing from its Tune ``result.json``: when its trainable started and ended (epoch
    seconds), its set-up before the first epoch (data, soft labels, the cost estimate's ONNX export),
    its epochs, its end (last epoch + compression + export), and the gap on its node before it
    (the previous trial's teardown, a new actor process, its imports). Times are relative to
    ``origin`` (``time.time()`` when the search stage started; default: the first trainable's start)."""
    rows = []
    for trial in results["trials"]:
        if not trial.get("checkpoint"):
            continue
        lines = (Path(trial["checkpoint"]).parent / "result.json").read_text().splitlines()
        reports = [json.loads(line) for line in lines if line.strip()]
        epochs = [r["epoch_seconds"] for r in reports if "epoch_seconds" in r]
        first, last = reports[0], reports[-1]
        rows.append(
            {
                "trial": trial["trial_id"],
                "node": first.get("node_ip", "?"),
                "pid": first.get("pid"),
                "start": first["timestamp"] - first["time_this_iter_s"],
                "end": last["timestamp"],
                "trainable_s": last["time_total_s"],
                "setup_s": first["time_this_iter_s"] - (epochs[0] if epochs else 0.0),
                "epochs_s": sum(epochs),
                "end_s": last["time_this_iter_s"],  # the last epoch, pruning, export, quantization, latency
            }
        )
    rows.sort(key=lambda row: row["start"])
    if origin is None:
        origin = min((row["start"] for row in rows), default=0.0)
    previous: dict[str, dict] = {}
    for row in rows:
        before = previous.get(row["node"])
        row["gap_s"] = row["start"] - (before["end"] if before else origin)
        # A trial in its node's previous trial's process reused that actor (Tune's reuse_actors);
        # otherwise its gap held a new process's start and imports.
        row["new_process"] = before is None or row["pid"] is None or row["pid"] != before["pid"]
        previous[row["node"]] = dict(row)
        row["start"] -= origin
        row["end"] -= origin
    return rows


def node_accounts(rows: list[dict], stage_seconds: float) -> dict[str, dict]:
    """Where each node's time went during a search stage of ``stage_seconds``, from
    :func:`trial_timeline`'s rows (times relative to the stage's start): trainable seconds, the gap
    before its first trial (stage start to first work: Tune's start, placement, a new process),
    the gaps between its trials (split by whether the next trial reused the process), and the idle
    time after its last trial until the stage ended (waiting for the other node, then the stage's tail).

    Examples:
        >>> rows = [{"node": "a", "start": 5.0, "end": 50.0, "trainable_s": 45.0, "gap_s": 5.0, "new_process": True},
        ...         {"node": "a", "start": 51.0, "end": 90.0, "trainable_s": 39.0, "gap_s": 1.0, "new_process": False}]
        >>> node_accounts(rows, 100.0)["a"]["gaps_reused_s"], node_accounts(rows, 100.0)["a"]["idle_after_s"]
        (1.0, 10.0)
    """
    accounts: dict[str, dict] = {}
    for row in rows:
        account = accounts.setdefault(
            row["node"],
            {
                "trials": 0,
                "trainable_s": 0.0,
                "before_first_s": row["gap_s"],
                "gaps_reused_s": 0.0,
                "gaps_new_process_s": 0.0,
                "new_processes": 0,
                "last_end": 0.0,
            },
        )
        if account["trials"]:
            key = "gaps_new_process_s" if row["new_process"] else "gaps_reused_s"
            account[key] += row["gap_s"]
        account["new_processes"] += int(row["new_process"])
        account["trials"] += 1
        account["trainable_s"] += row["trainable_s"]
        account["last_end"] = max(account["last_end"], row["end"])
    for account in accounts.values():
        account["idle_after_s"] = stage_seconds - account.pop("last_end")
    return accounts


def describe_search(label: str, results: dict, census: CensusReport | None) -> None:
    """Print the search's seconds, each trial's time line, and where the CPU went meanwhile."""
    seconds = results["stages"]["search"]["seconds"]
    print(f"search on {label}: {seconds:.1f} s, trials on {sorted(set(_trial_nodes(results)))}", flush=True)
    rows = trial_timeline(results, census.started_at if census is not None else None)
    for row in rows:
        print(
            f"  trial {row['trial']} on {row['node']}: trainable {row['start']:.0f}-{row['end']:.0f} s "
            f"({row['trainable_s']:.1f} s: set-up {row['setup_s']:.1f}, epochs before the last "
            f"{row['epochs_s']:.1f}, last epoch + compression/export {row['end_s']:.1f}); "
            f"{row['gap_s']:.1f} s on its node before it ({'new process' if row['new_process'] else 'same process'})",
            flush=True,
        )
    if rows and census is not None:
        for node, account in sorted(node_accounts(rows, census.seconds).items()):
            print(
                f"  node {node}: {account['trials']} trials in {account['new_processes']} process(es), "
                f"trainable {account['trainable_s']:.1f} s; before its first trial {account['before_first_s']:.1f} s, "
                f"between trials {account['gaps_reused_s']:.1f} s (process reused) + "
                f"{account['gaps_new_process_s']:.1f} s (new process), idle after its last "
                f"{account['idle_after_s']:.1f} s (of the census's {census.seconds:.1f} s)",
                flush=True,
            )
    if rows:
        fixed = sum(row["setup_s"] + row["gap_s"] for row in rows) / len(rows)
        training = sum(row["epochs_s"] for row in rows) / len(rows)
        finishing = sum(row["end_s"] for row in rows) / len(rows)
        print(
            f"  per trial: {fixed:.1f} s before its first epoch (actor start, imports, set-up), {training:.1f} s "
            f"of epochs (all but the last), {finishing:.1f} s for the last epoch and compression/export; "
            f"the stage's last {seconds - max(row['end'] for row in rows):.1f} s came after the last trial",
            flush=True,
        )
    if census is None:
        print("  (no CPU census: the search stage line was not seen in the log)", flush=True)
        return
    print(census.table(), flush=True)
    trial_cpu = census.kind_total("trial")
    cluster_cpu = sum(census.node_total(node) for node in {n for n, _ in census.cpu} - {OUTSIDE})
    outside = census.node_total(OUTSIDE)
    print(
        f"  cluster CPU during the search: {cluster_cpu:.0f} CPU-s, of which trial processes {trial_cpu:.0f} "
        f"({trial_cpu / max(cluster_cpu, 1e-9):.0%}), the rest (head, raylets, agents, driver) "
        f"{(cluster_cpu - trial_cpu) / max(census.seconds, 1e-9):.2f} cores on average; outside the cluster "
        f"{outside:.0f} CPU-s = {outside / max(census.seconds, 1e-9):.2f} cores"
        + (" (NOT quiet: the timing is void)" if outside / max(census.seconds, 1e-9) > QUIET_OUTSIDE_CORES else ""),
        flush=True,
    )


def best_split(seconds: list[float]) -> float:
    """The busiest node's share of ``seconds`` (trial times) in the best split over two nodes: exhaustive
    up to 20 trials, longest-first greedy above.

    Examples:
        >>> best_split([66.5, 36.1, 35.0, 22.1])
        88.6
    """
    total = sum(seconds)
    if len(seconds) > 20:
        loads = [0.0, 0.0]
        for value in sorted(seconds, reverse=True):
            loads[loads.index(min(loads))] += value
        return max(loads)
    best = total
    for mask in range(1 << len(seconds)):
        part = sum(value for index, value in enumerate(seconds) if mask >> index & 1)
        best = min(best, max(part, total - part))
    return round(best, 6)


def describe_scaling(one: dict, two: dict) -> None:
    """What limits the figure: how much slower each trial ran beside another (the same configurations
    are paired across the two searches), and the best the figure could be for these trials' sizes."""
    key = {trial["trial_id"]: json.dumps(trial["config"], sort_keys=True, default=str) for trial in one["trials"]}
    key.update({trial["trial_id"]: json.dumps(trial["config"], sort_keys=True, default=str) for trial in two["trials"]})
    alone = {key[row["trial"]]: row["trainable_s"] for row in trial_timeline(one)}
    beside = {key[row["trial"]]: row["trainable_s"] for row in trial_timeline(two)}
    paired = [(alone[config], beside[config]) for config in alone if config in beside]
    if not paired:
        print("  (no trial configuration ran in both searches: no per-trial comparison)", flush=True)
        return
    slowdown = sum(b for _, b in paired) / sum(a for a, _ in paired)
    one_s = one["stages"]["search"]["seconds"]
    serial = one_s - sum(alone.values())  # the 1-node search's time outside its trials: start, gaps, tail
    best = best_split(list(alone.values()))
    print(
        f"scaling: each trial ran {slowdown:.2f}x its time alone while another ran (trainable seconds, "
        f"same configurations: " + ", ".join(f"{a:.1f}->{b:.1f}" for a, b in paired) + "); "
        f"the best split of the 1-node trial times over 2 nodes is {best:.1f} / {sum(alone.values()) - best:.1f} s, "
        f"so with the 1-node search's {serial:.1f} s outside its trials the figure is at most "
        f"{one_s / (serial + best):.2f} with no slowdown and {one_s / (serial + best * slowdown):.2f} with this one",
        flush=True,
    )


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
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--trial-epochs", type=int, default=10)
    parser.add_argument("--num-train", type=int, default=1024)
    parser.add_argument("--cache-samples", type=int, default=200_000)
    parser.add_argument("--read-rounds", type=int, default=7)
    parser.add_argument("--cache-only", action="store_true", help="measure only the cache reads (quick check)")
    parser.add_argument(
        "--keep", metavar="DIR", help="copy each search's driver log, results.json and trial results here"
    )
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
        two, two_census = run_job(cluster, cluster.shared_dir / "runs" / "two_nodes", args)
        two_s = two["stages"]["search"]["seconds"]
        describe_search("2 worker nodes", two, two_census)

        cluster.kill_node(2)
        _wait_alive(cluster, 2)
        # The same teachers (found, not retrained; their soft labels are in the cluster's Redis):
        # only the search has to run again, now on one worker node.
        shutil.copytree(
            cluster.shared_dir / "runs" / "two_nodes" / "teachers",
            cluster.shared_dir / "runs" / "one_node" / "teachers",
        )
        one, one_census = run_job(cluster, cluster.shared_dir / "runs" / "one_node", args)
        one_s = one["stages"]["search"]["seconds"]
        describe_search("1 worker node", one, one_census)
        if set(_trial_nodes(one)) != {cluster.node_addresses[1]}:
            raise SystemExit(f"the 1-node search ran trials on {set(_trial_nodes(one))}")
        describe_scaling(one, two)
    finally:
        cluster.down()
        shutil.rmtree(state_dir, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()}", flush=True)
    print(f"RESULT search_speedup_2_nodes={one_s / two_s:.2f} remote_cache_vs_local={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
