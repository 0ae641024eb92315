"""Node-failure scenarios for one teacher, run in their own process by ``test_fault.py`` and
``tests/cluster/test_faults_teachers.py``.

Starts a local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head node without CPUs,
so the teacher's Ray Train workers land on the worker nodes of 1 CPU each), trains a tiny
teacher with medkd's teacher stage (``train_one_teacher``) in a thread, kills a worker node
that holds a training worker (SIGKILL of its Ray processes) after the teacher has checkpointed
at least two epochs, and waits — bounded — for the outcome. ``--mode``:

- ``replace``: one worker, one worker node; a replacement node is added (as an autoscaler
  would; ``add_node`` must run on the main thread). The run resumes there.
- ``elastic``: two workers (``min_workers=1``) on two worker nodes; no replacement. The run
  resumes on the node that is left with one worker.
- ``fixed``: two workers (no ``min_workers``) on two worker nodes; no replacement. The run
  cannot go on: it must fail within a bounded time naming the lost node and the checkpoint.

Prints one line ``SCENARIO_RESULT {json}`` with what happened and what the artifact holds::

    RAY_AUTH_MODE=disabled python -m tests.teachers.fault_scenario --output /tmp/fault --mode elastic

It needs its own process: the cluster cannot share a process with an already initialised Ray
(the pytest session's ``ray_session``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from medkd.data.meta import DatasetMeta

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

KILL_AFTER_EPOCH = 2  # remove the node once Train has registered this epoch's checkpoint
EPOCHS = 8
MODES = ("replace", "elastic", "fixed")
# A worker group that cannot be placed fails its start after this long (Ray's default 60 s) and
# is retried; medkd gives up LOST_NODE_WAIT_S after a node loss (default 120 s): together the
# ``fixed`` scenario's bound.
WORKER_GROUP_START_TIMEOUT_S = "10"
LOST_NODE_WAIT_ENV = "MEDKD_LOST_NODE_WAIT_S"
LOST_NODE_WAIT_S = "20"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def registered_epoch(run_dir: Path) -> int:
    """The epoch of the latest checkpoint Ray Train's controller has registered (0: none yet).

    A checkpoint directory in storage is not enough: the controller registers a reported
    checkpoint only when it next polls the worker, and a restarted worker group resumes from
    the registered one. The controller persists its registry in this snapshot file.
    """
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def run(output: Path, timeout_s: float, mode: str = "replace") -> dict[str, Any]:
    import numpy as np
    import ray
    import torch
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from medkd.data import SyntheticDataSpec, load_dataset
    from medkd.spec.teachers import TeacherSpec
    from medkd.teachers.loop import predict
    from medkd.teachers.train import find_artifact, load_teacher_model, train_one_teacher

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", WORKER_GROUP_START_TIMEOUT_S)
    if mode == "fixed":
        os.environ.setdefault(LOST_NODE_WAIT_ENV, LOST_NODE_WAIT_S)
    workers = 1 if mode == "replace" else 2

    started = time.perf_counter()
    dataset = load_dataset(SyntheticDataSpec(image_size=16, num_train=512, num_val=64, num_test=32, num_classes=2))
    meta = DatasetMeta.of(dataset)
    teacher = TeacherSpec(
        name="fault",
        model="vit",
        model_kwargs={"hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2},
        epochs=EPOCHS,
        batch_size=32,
        cpus_per_worker=1,
        num_workers=workers,
        min_workers=1 if mode == "elastic" else None,
        use_gpu=False,
        max_failures=3,
        ema_epochs=1.0,  # the resumed run must also restore the weight average
    )
    teacher_fp = "faultscenario"
    storage = output / "ray"
    run_dir = storage / f"teacher-{teacher.name}-{teacher_fp}"

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,  # the driver and Train's controller only: training must run elsewhere
            "gcs_server_port": free_port(),
            "include_dashboard": True,  # Train's cleanup uses the state API: without it an early-stopped trial never frees its CPU
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
        },
    )
    outcome: dict[str, Any] = {}
    try:
        worker_nodes = [cluster.add_node(num_cpus=1) for _ in range(workers)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        data_ref = ray.put(dataset.arrays())
        first_worker = worker_nodes[-1]
        first_node_id = first_worker.node_id
        dashboard = f"http://{cluster.webui_url}"  # explicit: other Ray clusters may run on this machine

        result: dict[str, Any] = {}

        def fit() -> None:
            try:
                result["artifact"] = train_one_teacher(
                    teacher,
                    teacher_fp=teacher_fp,
                    seed=0,
                    meta=meta,
                    data_ref=data_ref,
                    output_dir=output,
                    storage_path=str(storage),
                )
            except BaseException as error:  # reported by the main thread
                result["error"] = f"{type(error).__name__}: {error}"

        thread = threading.Thread(target=fit, name="fault-fit", daemon=True)
        thread.start()
        print(f"cluster session: {cluster.head_node.get_session_dir_path()}", file=sys.stderr, flush=True)

        deadline = time.monotonic() + timeout_s
        while thread.is_alive() and registered_epoch(run_dir) < KILL_AFTER_EPOCH:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no checkpoint of epoch {KILL_AFTER_EPOCH} within {timeout_s:.0f}s")
            time.sleep(0.1)
        if not thread.is_alive():
            raise RuntimeError(f"training ended before the node could be removed: {result}")
        on_first_node = [
            a
            for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True)
            if a.node_id == first_node_id and "RayTrainWorker" in (a.class_name or "")
        ]
        registered_at_kill = registered_epoch(run_dir)
        killed_address = first_worker.node_ip_address
        cluster.remove_node(first_worker, allow_graceful=False)
        removed_at = time.perf_counter() - started
        replacement = cluster.add_node(num_cpus=1) if mode == "replace" else None

        thread.join(timeout=max(1.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise TimeoutError(f"teacher did not finish within {timeout_s:.0f}s after the node was removed")
        ended_after_kill_s = round(time.perf_counter() - started - removed_at, 1)
        if mode == "fixed":
            return {
                "ok": "error" in result,
                "mode": mode,
                "error": result.get("error", "training finished although its workers could not be placed"),
                "train_worker_was_on_removed_node": bool(on_first_node),
                "registered_epoch_at_kill": registered_at_kill,
                "killed_node_id": first_node_id,
                "killed_node_address": killed_address,
                "ended_after_kill_s": ended_after_kill_s,
                "run_dir": str(run_dir),
                "seconds": round(time.perf_counter() - started, 1),
            }
        if "error" in result:
            raise RuntimeError(result["error"])

        artifact = result["artifact"]
        found = find_artifact(output, teacher.name, teacher_fp)
        model = load_teacher_model(artifact, meta)
        logits = predict(model, dataset.splits["test"].images, 64, torch.device("cpu"))
        outcome = {
            "ok": True,
            "mode": mode,
            "train_worker_was_on_removed_node": bool(on_first_node),
            "ended_after_kill_s": ended_after_kill_s,
            "history_workers": [int(r.get("workers", 1)) for r in artifact.history],
            "registered_epoch_at_kill": registered_at_kill,
            "node_removed_at_s": round(removed_at, 1),
            "replacement_node": replacement.node_id if replacement is not None else None,
            "epochs": EPOCHS,
            "epochs_run": artifact.epochs_run,
            "history_epochs": [int(r["epoch"]) for r in artifact.history],
            "resumed_from": artifact.resumed_from,
            "best_epoch": artifact.best_epoch,
            "best_val": artifact.best_val,
            "artifact_found": found is not None and found.checkpoint == artifact.checkpoint,
            "checkpoint": artifact.checkpoint,
            "logits_shape": list(logits.shape),
            "logits_finite": bool(np.isfinite(logits).all()),
            "seconds": round(time.perf_counter() - started, 1),
        }
    except Exception as error:
        outcome = {
            "ok": False,
            "error": f"{type(error).__name__}: {error}",
            "seconds": round(time.perf_counter() - started, 1),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    if outcome.get("best_val") is not None and not math.isfinite(outcome["best_val"]):
        outcome["best_val"] = None
    return outcome


def run_in_subprocess(output: Path, mode: str, timeout_s: float) -> dict[str, Any]:
    """Runs the scenario in a child process (a multi-node cluster cannot share the test session's
    Ray); its output goes to a file, and the child is killed if it outlives ``timeout_s`` + 60 s."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / "scenario.log"
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_ID")  # it starts its own cluster
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore"})
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.teachers.fault_scenario",
                "--output",
                str(output),
                "--timeout",
                str(timeout_s),
                "--mode",
                mode,
            ],
            cwd=repo,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            child.wait(timeout=timeout_s + 60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)
    text = log_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("SCENARIO_RESULT ")]
    assert lines, f"scenario printed no result (exit {child.returncode}):\n{text[-5000:]}"
    return json.loads(lines[-1].removeprefix("SCENARIO_RESULT "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.teachers.fault_scenario")
    parser.add_argument("--output", type=Path, required=True, help="artifacts and Ray Train storage go here")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds before giving up")
    parser.add_argument("--mode", choices=MODES, default="replace", help="what happens after the node is killed")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    outcome = run(args.output.resolve(), args.timeout, args.mode)
    print("SCENARIO_RESULT " + json.dumps(outcome), flush=True)
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
