"""The Serve config medkd writes (`medkd serve MODEL_DIR --config-out FILE`): what the RayService
embeds, and what Ray's own `serve deploy` deploys on a real local cluster that answers over HTTP."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from medkd.cli.main import main
from medkd.registry.metadata import ModelMetadata
from medkd.serve.serve_config import APP_BUILDER, ServeConfigError, serve_config, serve_config_yaml
from medkd.spec.serve import ServeConfig
from tests.conftest import REPO_ROOT, free_ports
from tests.serve.images import png_bytes

RAYSERVICE = REPO_ROOT / "cluster" / "kuberay" / "rayservice.yaml"
CLASS_NAMES = ["malignant", "benign"]
SERVE_CLI = str(Path(sys.executable).with_name("serve"))


def _rayservice() -> dict:
    (doc,) = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d and d["kind"] == "RayService"]
    return doc


def _documented_command() -> list[str]:
    """The `medkd serve ... --config-out` line the RayService's header tells users to run."""
    (line,) = [
        line.removeprefix("#").strip()
        for line in RAYSERVICE.read_text().splitlines()
        if line.startswith("#") and "--config-out" in line
    ]
    argv = shlex.split(line)
    assert argv[:2] == ["medkd", "serve"], line
    return argv[1:]


def test_rayservice_embeds_exactly_what_medkd_generates(tmp_path, capsys):
    argv = _documented_command()
    out = tmp_path / "serve_config.yaml"
    argv[argv.index("--config-out") + 1] = str(out)
    assert main(argv) == 0
    assert "serve deploy" in capsys.readouterr().out
    assert _rayservice()["spec"]["serveConfigV2"] == out.read_text()


def test_generated_config_is_one_builder_application_with_the_serve_settings():
    config = ServeConfig(
        host="0.0.0.0", port=8123, route_prefix="/medkd", max_replicas=4, gpus_per_replica=1, max_batch_size=8
    )
    doc = serve_config("/shared/runs/r1", config, app_name="scans")
    assert doc["http_options"] == {"host": "0.0.0.0", "port": 8123}
    (app,) = doc["applications"]
    assert app["name"] == "scans" and app["route_prefix"] == "/medkd" and app["import_path"] == APP_BUILDER
    assert "deployments" not in app  # the builder names and configures its deployments
    assert app["args"] == {
        "model_dir": "/shared/runs/r1",
        "serve": {"max_replicas": 4, "max_batch_size": 8, "gpus_per_replica": 1.0},
    }
    # The builder gets back exactly this ServeConfig (address fields are the config's own).
    rebuilt = ServeConfig(**app["args"]["serve"], host=config.host, port=config.port, route_prefix=config.route_prefix)
    assert rebuilt == config
    assert yaml.safe_load(serve_config_yaml("/shared/runs/r1", config, app_name="scans")) == doc


def test_relative_model_dir_and_bad_settings_are_refused_with_the_field_named(tmp_path, capsys):
    with pytest.raises(ServeConfigError, match="model_dir 'runs/x' must be an absolute path"):
        serve_config("runs/x")
    out = tmp_path / "c.yaml"
    assert main(["serve", "runs/does-not-exist", "--config-out", str(out)]) == 1
    assert "model_dir 'runs/does-not-exist' must be an absolute path" in capsys.readouterr().err
    assert main(["serve", "/m", "--set", "max_batch_size=0", "--config-out", str(out)]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert main(["serve", "/m", "--set", "replicas=3", "--config-out", str(out)]) == 2
    assert "replicas" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------- deployed with `serve deploy`


def _tiny_run_dir(root: Path) -> Path:
    """A run's output_dir holding one exported classifier (models/SELECTED names it)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 2),
    ).eval()
    export = root / "models" / "tiny"
    export.mkdir(parents=True)
    torch.onnx.export(
        net,
        (torch.randn(2, 1, 28, 28),),
        str(export / "model.onnx"),
        dynamo=True,
        external_data=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
        verbose=False,
    )
    metadata = ModelMetadata(  # the export's own model: what a served metadata.json must hold
        model_id="tiny-serve-config",
        task="classification",
        multilabel=False,
        class_names=CLASS_NAMES,
        num_classes=2,
        input={
            "in_channels": 1,
            "spatial_dims": 2,
            "image_size": [28, 28],
            "scale": 1 / 255,
            "mean": [0.5],
            "std": [0.5],
        },
    )
    (export / "metadata.json").write_text(metadata.model_dump_json(exclude_none=True))
    (root / "models" / "SELECTED").write_text("tiny\n")
    return root


def _post_png(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.slow
@pytest.mark.integration
def test_serve_deploy_of_the_generated_file_answers_a_prediction(tmp_path):
    from ray.cluster_utils import Cluster

    run_dir = _tiny_run_dir(tmp_path / "run")
    dashboard_port, http_port = free_ports(2)
    config_file = tmp_path / "serve_config.yaml"
    assert (
        main(
            [
                "serve",
                str(run_dir),
                "--port",
                str(http_port),
                "--max-replicas",
                "1",
                "--set",
                "cpus_per_replica=0.25",
                "--config-out",
                str(config_file),
            ]
        )
        == 0
    )

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
        },
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    try:
        deployed = subprocess.run(
            [SERVE_CLI, "deploy", str(config_file), "--address", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert deployed.returncode == 0, deployed.stderr
        image = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
        deadline, status, body = time.monotonic() + 180, 0, b""
        while time.monotonic() < deadline:
            try:
                status, body = _post_png(f"http://127.0.0.1:{http_port}/predict", png_bytes(image))
            except (urllib.error.URLError, OSError):
                status = 0
            if status == 200:
                break
            time.sleep(1)
        assert status == 200, f"no prediction within 180 s: {status} {body[:300]!r}"
        answer = json.loads(body)
        session = ort.InferenceSession(
            str(run_dir / "models" / "tiny" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        logits = session.run(None, {"image": (((image / 255.0 - 0.5) / 0.5)[None, None]).astype(np.float32)})[0][0]
        assert answer["predicted_label"] == CLASS_NAMES[int(logits.argmax())]
        status_out = subprocess.run(
            [SERVE_CLI, "status", "--address", address], env=env, capture_output=True, text=True, timeout=60
        )
        apps = yaml.safe_load(status_out.stdout)["applications"]
        assert apps["medkd"]["status"] == "RUNNING"
        assert apps["medkd"]["deployments"], "the builder's deployments are listed"
    finally:
        subprocess.run([SERVE_CLI, "shutdown", "--address", address, "--yes"], env=env, capture_output=True, timeout=60)
        cluster.shutdown()
