"""Tiny ONNX students in a run's registry layout, and helpers to call and check the endpoint.

``make_run(directory, count)`` writes ``<directory>/models/<id>/{model.onnx,metadata.json}`` for
``count`` students of one search (different weights, so each answers differently) plus a
``SELECTED`` file naming the first — the layout :mod:`medkd.registry.export` writes.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

CLASS_NAMES = ["malignant", "benign"]
IMAGE_SIZE = 28


def export_student(directory: Path, *, seed: int, model_id: str, rank: int = 0, search: str = "search-fp") -> Path:
    """A linear student (Flatten -> Gemm) built with onnx.helper: milliseconds, no exporter run."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((IMAGE_SIZE * IMAGE_SIZE, 2)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(2).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"]),
        ],
        "student",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / "model.onnx"))
    metadata = {
        "model_id": model_id,
        "task": "classification",
        "multilabel": False,
        "num_classes": 2,
        "class_names": CLASS_NAMES,
        "input": {
            "in_channels": 1,
            "spatial_dims": 2,
            "image_size": [IMAGE_SIZE, IMAGE_SIZE],
            "scale": 1 / 255,
            "mean": [0.5],
            "std": [0.5],
        },
        "search": {"fingerprint": search, "trial_id": f"trial-{seed}", "pareto_rank": rank},
        "metrics": {
            "val": {"val_auc": 0.8 - rank / 10},
            "test": {"auc": 0.7},
            "latency_ms": 0.1 + rank,
            "params": 100 + seed,
            "model_bytes": (directory / "model.onnx").stat().st_size,
        },
    }
    (directory / "metadata.json").write_text(json.dumps(metadata))
    return directory


def make_run(directory: Path, count: int) -> tuple[Path, list[str]]:
    """A run directory with ``count`` Pareto students; returns it and the model ids (first = SELECTED)."""
    registry = directory / "models"
    ids = [f"student-{index}" for index in range(count)]
    for rank, model_id in enumerate(ids):
        export_student(registry / model_id, seed=rank + 10, model_id=model_id, rank=rank)
    export_student(registry / "old-search", seed=99, model_id="old-search", search="another-search")
    (registry / "SELECTED").write_text(ids[0] + "\n")
    return directory, ids


def expected_probabilities(model_dir: Path, images: np.ndarray) -> np.ndarray:
    """Softmax of local ONNX Runtime logits for raw uint8 images ``(N, H, W)``."""
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = ((images.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, np.newaxis]
    logits = session.run(None, {"image": inputs})[0].astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def call(
    url: str,
    *,
    body: bytes | None = None,
    content_type: str | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
    timeout: float = 30,
) -> tuple[int, bytes, dict]:
    """One HTTP request; returns status, body and lower-cased headers (errors included)."""
    request = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"))
    if content_type:
        request.add_header("Content-Type", content_type)
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, error.read(), {k.lower(): v for k, v in error.headers.items()}


def process_rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ProcessLookupError(pid)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def replica_pids(app_name: str) -> list[int]:
    """Pids of the live replicas of an application, from Ray's state API."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("state", "=", "ALIVE")],
        limit=1000,
        raise_on_missing_output=False,
    )
    return [actor.pid for actor in actors if actor.class_name.startswith(f"ServeReplica:{app_name}:") and actor.pid]


def running_replicas(app_name: str, deployment: str) -> int:
    from ray import serve

    application = serve.status().applications.get(app_name)
    if application is None or deployment not in application.deployments:
        return 0
    return int(application.deployments[deployment].replica_states.get("RUNNING", 0))
