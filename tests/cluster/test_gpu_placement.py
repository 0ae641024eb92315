"""Resources from the spec reach Ray, and a GPU that is declared but unusable stops the work.

A real multi-node cluster (``ray.cluster_utils.Cluster``, in its own process): a head node and
a worker node started with ``num_gpus=1`` and no real device. GPU work from the spec goes
through medkd's own code paths — a teacher with ``use_gpu: true`` (Ray Train), a search trial
with ``search.gpus_per_trial: 1`` (Ray Tune, medkd's trial function and resources), the final
training of the selected student (``train_final``, same field), the soft-label inference task
(which asks for a GPU when the cluster has one) — and each must be placed on the GPU node (its
node id is asserted) and stop there with a clear error naming that node and the spec field,
instead of silently running on the CPU. A Serve replica with ``serve.gpus_per_replica: 1`` (a
config from ``medkd serve --config-out``, deployed with ``serve deploy``) must be placed there
too, and fail to start with the same kind of error. CPU work from the same spec goes on running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, free_port

RESULT_MARK = "GPU_SCENARIO_RESULT "


def scenario(output: Path) -> dict[str, Any]:
    """Run the three GPU requests on a head + fake-GPU node cluster; return what happened."""
    import ray
    from ray import tune
    from ray.cluster_utils import Cluster

    from medkd.core.devices import GpuUnavailableError
    from medkd.core.progress import Progress
    from medkd.data import SyntheticDataSpec, load_dataset
    from medkd.data.meta import DatasetMeta
    from medkd.search.final import train_final
    from medkd.search.outcome import SearchOutcome, TrialRecord
    from medkd.search.run import distill_trial
    from medkd.softlabels.compute import teacher_logits_task
    from medkd.spec.job import load_spec
    from medkd.spec.search import SearchSpec
    from medkd.spec.serve import ServeConfig
    from medkd.spec.teachers import TeacherSpec
    from medkd.teachers.train import TeacherArtifact, train_one_teacher

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 0,
            "gcs_server_port": free_port(),
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
        },
    )
    out: dict[str, Any] = {"seconds": {}}
    clock = [time.monotonic()]

    def done(step: str) -> None:
        """Record the step's seconds (and say it on stderr: a timeout's message shows how far it got)."""
        now = time.monotonic()
        out["seconds"][step] = round(now - clock[0], 1)
        clock[0] = now
        print(f"[gpu scenario] {step} done in {out['seconds'][step]} s", file=sys.stderr, flush=True)

    try:
        gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        out["gpu_node_id"] = gpu_node.node_id
        out["head_node_id"] = cluster.head_node.node_id
        out["cluster_gpus"] = ray.cluster_resources().get("GPU", 0)
        done("cluster")

        dataset = load_dataset(SyntheticDataSpec(image_size=16, num_train=64, num_val=16, num_test=16, num_classes=2))
        meta = DatasetMeta.of(dataset)
        data_ref = ray.put(dataset.arrays())

        # 1. A search trial with search.gpus_per_trial: 1, through medkd's trial function.
        search = SearchSpec(cpus_per_trial=1, gpus_per_trial=1)
        out["trial_resources"] = search.trial_resources()
        # The GPU check is the trial's first statement: on a node without CUDA it stops before
        # the context (data, cache, teachers) is read, so none is given here.
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(distill_trial, context=None), search.trial_resources()),
            tune_config=tune.TuneConfig(num_samples=1),
            run_config=tune.RunConfig(storage_path=str(output / "tune"), name="gpu-trial", verbose=0),
        )
        (trial,) = tuner.fit()
        out["trial"] = f"{type(trial.error).__name__}: {trial.error}" if trial.error else "finished on the CPU"
        done("trial")

        # 2. Soft-label inference: a GPU task whenever the cluster declares a GPU.
        artifact = TeacherArtifact(
            name="t",
            model="vit",
            family="vit",
            model_kwargs={},
            fingerprint="f",
            params=1,
            checkpoint=str(output / "none.pt"),
            epochs_run=1,
            best_epoch=1,
            best_val=0.5,
            history=[],
            train_seconds=1.0,
        )
        try:
            ray.get(teacher_logits_task(artifact, meta, data_ref, ["train"]))
            out["softlabels"] = "finished on the CPU"
        except Exception as error:  # noqa: BLE001
            out["softlabels"] = f"{type(error).__name__}: {error}"
        out["softlabels_is_gpu_error"] = GpuUnavailableError.__name__ in out["softlabels"]
        done("softlabels")

        # 2b. The final training of the selected student, from a spec with search.gpus_per_trial: 1.
        #     Like the trial, it checks its device first: no context or data is needed to stop.
        spec = load_spec(
            REPO_ROOT / "examples" / "quickstart.yaml",
            {"search.gpus_per_trial": 1, "search.max_concurrent": 1, "search.final_epochs": 1},
        )
        selected = TrialRecord(
            trial_id="t0",
            status="completed",
            config={"student": "resnet_tiny"},
            metrics={},
            checkpoint=None,
            final=True,
        )
        outcome = SearchOutcome(fingerprint="s", experiment_path="", objectives=[], trials=[selected], pareto=["t0"])
        try:
            train_final(
                spec, outcome, selected, context=None, output_dir=output / "final", progress=Progress(quiet=True)
            )
            out["final"] = "finished on the CPU"
        except Exception as error:  # noqa: BLE001 - the message is the result
            out["final"] = f"{type(error).__name__}: {error}"
        done("final")

        # 3. A Serve replica with serve.gpus_per_replica: 1, from a config medkd generates,
        #    deployed with Ray's own CLI: where does Ray put the replica?
        out["replica_node_id"], out["replica"] = replica_node(output, cluster.webui_url)
        done("replica")

        # 4. A teacher worker (Ray Train) that asked for a GPU. Last: Ray Train releases a failed
        #    worker group's placement group lazily, and the job has failed anyway.
        teacher = TeacherSpec(
            name="gpu-teacher",
            model="vit",
            epochs=1,
            batch_size=32,
            cpus_per_worker=1,
            model_kwargs={"hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2},
            use_gpu=True,
            max_failures=0,
        )
        started = time.monotonic()
        try:
            train_one_teacher(
                teacher,
                teacher_fp="gpuscenario",
                seed=0,
                meta=meta,
                data_ref=data_ref,
                output_dir=output,
                storage_path=str(output / "ray"),
            )
            out["teacher"] = "finished on the CPU"
        except Exception as error:  # noqa: BLE001 - the message is the result
            out["teacher"] = f"{type(error).__name__}: {error}"
        out["teacher_seconds"] = round(time.monotonic() - started, 1)
        done("teacher")

        # The replica resources a RayService / `medkd serve` asks for.
        out["replica_options"] = ServeConfig(gpus_per_replica=1, cpus_per_replica=0.5).ray_actor_options()

        # CPU work of the same job still runs, and not on the GPU node's GPU slot.
        @ray.remote(num_cpus=1)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        out["cpu_task_ran"] = bool(ray.get(where.remote(), timeout=60))
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def replica_node(output: Path, dashboard: str) -> tuple[str | None, str]:
    """Deploy a tiny model with ``serve.gpus_per_replica: 1`` (``medkd serve --config-out`` +
    ``serve deploy``); return the node id of its replica actor (None: none within 120 s) and the
    deployment's status message once a replica failed to start (bounded by 120 s too)."""
    from ray import serve
    from ray.util.state import list_actors

    from medkd.cli.main import main
    from tests.cluster.test_serve_config import SERVE_CLI, _tiny_run_dir

    config = output / "serve_config.yaml"
    assert (
        main(
            [
                "serve",
                str(_tiny_run_dir(output / "run")),
                "--port",
                str(free_port()),
                "--max-replicas",
                "1",
                "--set",
                "gpus_per_replica=1",
                "--set",
                "cpus_per_replica=0.5",
                "--config-out",
                str(config),
            ]
        )
        == 0
    )
    address = f"http://{dashboard}"
    subprocess.run(
        [SERVE_CLI, "deploy", str(config), "--address", address], check=True, capture_output=True, timeout=120
    )
    try:
        node_id, message = None, ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and node_id is None:
            replicas = [
                actor
                for actor in list_actors(address=address, detail=True)
                if (actor.class_name or "").startswith("ServeReplica:") and actor.node_id
            ]
            node_id = replicas[0].node_id if replicas else None
            time.sleep(1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "failed to start" not in message:
            message = " | ".join(
                f"{deployment.status}: {deployment.message}"
                for application in serve.status().applications.values()
                for deployment in application.deployments.values()
            )
            time.sleep(1)
        return node_id, message
    finally:
        subprocess.run([SERVE_CLI, "shutdown", "--address", address, "--yes"], capture_output=True, timeout=120)


def _one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
@pytest.mark.integration
def test_gpu_work_lands_on_the_gpu_node_and_stops_there_without_a_cuda_device(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"}
    code = (
        f"import json, sys; from pathlib import Path; from tests.cluster.test_gpu_placement import scenario; "
        f"print({RESULT_MARK!r} + json.dumps(scenario(Path(sys.argv[1]))), flush=True)"
    )
    # Its own session: on a timeout the whole group (the cluster's processes too) is ended.
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the GPU scenario did not end within 600 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    finally:
        try:  # whatever the scenario left behind (e.g. the agents of a node that failed to start)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    assert process.returncode == 0 and lines, f"scenario failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    result = json.loads(lines[-1].removeprefix(RESULT_MARK))
    print(f"GPU scenario step seconds: {result['seconds']}")
    gpu_node = result["gpu_node_id"]
    assert result["cluster_gpus"] == 1

    for what, field, cause in [
        ("teacher", "teachers[gpu-teacher].use_gpu", "finds no CUDA device"),
        ("trial", "search.gpus_per_trial", "finds no CUDA device"),
        ("final", "search.gpus_per_trial", "finds no CUDA device"),
        ("softlabels", "soft-label inference", "finds no CUDA device"),
        ("replica", "serve.gpus_per_replica", "CUDAExecutionProvider"),
    ]:
        message = _one_line(result[what])
        assert "finished on the CPU" not in message, what
        assert f"{field}" in message and "asked for a GPU" in message, f"{what}: {message[:800]}"
        assert f"node id {gpu_node}" in message, f"{what} did not run on the GPU node {gpu_node}: {message[:800]}"
        assert cause in message and "GpuUnavailableError" in message, f"{what}: {message[:800]}"
    assert result["softlabels_is_gpu_error"]
    assert result["teacher_seconds"] < 300  # fails fast: no retries of a node that cannot train
    assert result["trial_resources"] == {"cpu": 1.0, "gpu": 1.0}
    assert result["replica_options"] == {"num_cpus": 0.5, "num_gpus": 1.0}
    assert result["replica_node_id"] == gpu_node, "the GPU replica was not placed on the GPU node"
    assert result["cpu_task_ran"]


def test_outside_gpu_work_the_device_is_the_cpu(ray_session):
    """Work that holds no GPU gets the CPU and no error (this machine has no CUDA device)."""
    import ray

    from medkd.core.devices import reserved_gpu_device

    @ray.remote(num_cpus=0.01)
    def device() -> str:
        return str(reserved_gpu_device("search.gpus_per_trial"))

    assert ray.get(device.remote(), timeout=60) == "cpu"
