"""Faults during the search of a whole pipeline run, on a local multi-node Ray cluster.

Starts ``ray.cluster_utils.Cluster`` (a head without CPUs and two 1-CPU worker nodes) and the
cluster's soft-label Redis (a ``ManagedRedisServer`` this script owns), runs the pipeline
(``medkd.pipeline.runner.Pipeline``: teachers, soft labels, search, export) in a thread, and
once the search has finished a trial, injects a fault (``--mode``):

- ``node``: SIGKILLs the Ray processes of a worker node that runs a trial (no replacement).
  Tune must retry the trials that were on it, on the node left, and the search must end
  with its full trial count.
- ``redis``: SIGKILLs the redis-server (nothing of the cache was saved to disk: every soft
  label is lost) and restarts it on the same port a few seconds later. Trials must
  reconnect, recompute the lost soft labels from the teacher checkpoints, and succeed.

Prints one line ``SCENARIO_RESULT {json}``::

    RAY_AUTH_MODE=disabled python -m tests.cluster.search_fault_scenario --output /tmp/sf --mode node
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MODES = ("node", "redis")
NUM_TRIALS = 4
REDIS_DOWN_S = 3.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_spec(output: Path, redis_url: str) -> dict[str, Any]:
    return {
        "name": "search-fault",
        "data": {"kind": "synthetic", "num_train": 96, "num_val": 32, "num_test": 32, "image_size": 16},
        "teachers": [{"name": "cnn", "model": "resnet10", "epochs": 1, "batch_size": 32, "cpus_per_worker": 1}],
        "cache": {"redis_url": redis_url, "namespace": "searchfault"},
        "search": {
            "num_trials": NUM_TRIALS,
            "max_concurrent": 2,
            "epochs": 3,
            "batch_size": 32,
            "cpus_per_trial": 1,
            "scheduler": "none",
            "space": {"student": ["resnet_tiny"], "width": {"low": 0.25, "high": 0.5}, "quantize": ["none"]},
        },
        "serve": {"enabled": False},
        "output_dir": str(output / "run"),
    }


def finished_trials(storage: Path) -> list[str]:
    return sorted(
        path.parent.name for path in storage.glob("search-*/*/checkpoint_*") if (path / "candidate.json").is_file()
    )


def run(output: Path, mode: str, timeout_s: float) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from medkd.core.progress import Progress
    from medkd.pipeline.runner import Pipeline
    from medkd.softlabels.redis_server import ManagedRedisServer
    from medkd.spec.job import JobSpec

    started = time.perf_counter()
    server = ManagedRedisServer(
        data_dir=output / "redis", port=free_port(), save_points=()
    ).start()  # no RDB snapshots: a kill loses every soft label
    port, password = server.port, server.password
    spec = JobSpec.model_validate(job_spec(output, server.url))
    storage = output / "run" / "ray"
    log = io.StringIO()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "gcs_server_port": free_port(),
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
        },
    )
    outcome: dict[str, Any] = {"mode": mode}
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        dashboard = f"http://{cluster.webui_url}"
        result: dict[str, Any] = {}

        def pipeline() -> None:
            try:
                result["results"] = Pipeline(spec, progress=Progress(log, live=False), serve=False).run()
            except BaseException as error:  # reported by the main thread
                result["error"] = f"{type(error).__name__}: {error}"

        thread = threading.Thread(target=pipeline, name="pipeline", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while thread.is_alive() and not finished_trials(storage):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no trial finished within {timeout_s:.0f}s:\n{log.getvalue()[-3000:]}")
            time.sleep(0.2)
        if not thread.is_alive():
            raise RuntimeError(f"the run ended before the fault: {result.get('error')}\n{log.getvalue()[-3000:]}")
        finished_before = finished_trials(storage)

        if mode == "node":
            victim, running_there = None, []
            while victim is None and thread.is_alive() and time.monotonic() < deadline:
                trials = [
                    a
                    for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True)
                    if "ImplicitFunc" in (a.class_name or "")
                ]
                for node in workers:
                    running_there = [a for a in trials if a.node_id == node.node_id]
                    if running_there:
                        victim = node
                        break
                else:
                    time.sleep(0.2)
            if victim is None:
                raise RuntimeError("no trial was running on a worker node to kill")
            cluster.remove_node(victim, allow_graceful=False)
            outcome.update(killed_node=victim.node_id, trials_on_killed_node=len(running_there))
        else:
            server.kill()
            time.sleep(REDIS_DOWN_S)
            server = ManagedRedisServer(data_dir=output / "redis", port=port, password=password, save_points=()).start()
            outcome["redis_restarted"] = True
        outcome["fault_at_s"] = round(time.perf_counter() - started, 1)

        thread.join(timeout=max(1.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise TimeoutError(f"the run did not finish within {timeout_s:.0f}s:\n{log.getvalue()[-3000:]}")
        if "error" in result:
            raise RuntimeError(f"{result['error']}\n{log.getvalue()[-3000:]}")
        results = result["results"]
        best = results["best"]
        outcome.update(
            ok=True,
            finished_before_fault=finished_before,
            trials=len(results["trials"]),
            final_trials=sum(1 for t in results["trials"] if t["final"]),
            errored_trials=sum(1 for t in results["trials"] if t["status"] == "error"),
            best_onnx=best["onnx_path"],
            best_onnx_exists=Path(best["onnx_path"]).is_file(),
            best_val_metrics=best["val_metrics"],
            best_student=best["config"].get("student"),
            recomputed=log.getvalue().count("lost from the cache: recomputing"),
            log_tail=log.getvalue()[-2000:],
            seconds=round(time.perf_counter() - started, 1),
        )
    except Exception as error:
        outcome.update(
            ok=False, error=f"{type(error).__name__}: {error}", seconds=round(time.perf_counter() - started, 1)
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
        server.stop()
    return outcome


def run_in_subprocess(output: Path, mode: str, timeout_s: float) -> dict[str, Any]:
    """Runs the scenario in a child process (its own multi-node cluster), output in a file, the
    child killed if it outlives ``timeout_s`` + 60 s."""
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
                "tests.cluster.search_fault_scenario",
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
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.search_fault_scenario")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--timeout", type=float, default=360.0, help="seconds before giving up")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    outcome = run(args.output.resolve(), args.mode, args.timeout)
    print("SCENARIO_RESULT " + json.dumps(outcome, default=str), flush=True)
    return 0 if outcome.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
