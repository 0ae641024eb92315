"""The Serve application end to end: a real tiny ONNX model, real Ray Serve, real HTTP."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from starlette.requests import Request

from medkd.serve.app import ModelDirError, deploy, load_model_dir, serve_until_stopped, undeploy
from medkd.serve.client import MedkdClient, ServeRequestError
from medkd.serve.codecs import encode_npy
from medkd.serve.ingress import PROBE_TIMEOUT_S, MedkdServer
from medkd.serve.model_store import LoadedModel, ModelFiles, collect_models
from medkd.spec.serve import ServeConfig
from tests.conftest import free_port
from tests.serve.images import make_dicom, png_bytes
from tests.serve.students import call

CLASS_NAMES = ["malignant", "benign"]
TEACHER = {"name": "cnn", "model": "resnet18", "family": "cnn", "fingerprint": "abc", "params": 1000, "cache_keys": {}}
CLS_APP, SEG_APP = "medkd-test-cls", "medkd-test-seg"
RNG = np.random.default_rng(7)


def export_model(net: torch.nn.Module, example: torch.Tensor, directory: Path, metadata: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        net.eval(),
        (example,),
        str(directory / "model.onnx"),
        dynamo=True,
        external_data=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        verbose=False,
    )
    (directory / "metadata.json").write_text(json.dumps(metadata))
    return directory


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 2),
    )
    metadata = {
        "model_id": "tiny-cnn-test",
        "task": "classification",
        "multilabel": False,
        "class_names": CLASS_NAMES,
        "num_classes": 2,
        "input": {
            "in_channels": 1,
            "spatial_dims": 2,
            "image_size": [28, 28],
            "scale": 1 / 255,
            "mean": [0.5],
            "std": [0.5],
        },
        "teachers": [TEACHER],
        "trial": {"width": 4},
        "metrics": {"val": {"val_auc": 0.5}, "latency_ms": 1.0, "params": 86, "model_bytes": 2000},
    }
    return export_model(net, torch.randn(2, 1, 28, 28), tmp_path_factory.mktemp("classifier"), metadata)


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1))
    metadata = {
        "model_id": "tiny-seg-test",
        "task": "segmentation",
        "class_names": ["background", "organ", "lesion"],
        "num_classes": 3,
        "input": {
            "in_channels": 1,
            "spatial_dims": 2,
            "image_size": [16, 16],
            "scale": 1 / 255,
            "mean": [0.0],
            "std": [1.0],
        },
    }
    return export_model(net, torch.randn(2, 1, 16, 16), tmp_path_factory.mktemp("segmenter"), metadata)


@pytest.fixture(scope="module")
def served(ray_session, classifier_dir, segmenter_dir):
    config = ServeConfig(
        port=free_port(),
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=0.25,
        max_batch_size=8,
        max_ongoing_requests=32,
        batch_wait_timeout_s=0.05,
        max_body_bytes=256 * 1024,
    )
    urls = {}
    try:
        urls["cls"] = deploy(classifier_dir, config, app_name=CLS_APP)
        urls["seg"] = deploy(segmenter_dir, config.model_copy(update={"route_prefix": "/seg"}), app_name=SEG_APP)
        yield urls
    finally:
        undeploy(SEG_APP)
        undeploy(CLS_APP)


def local_logits(model_dir: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": batch.astype(np.float32)})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def post(url: str, body: bytes, content_type: str | None, accept: str = "application/json") -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, data=body, method="POST")
    if content_type:
        request.add_header("Content-Type", content_type)
    request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def assert_matches_local(answer: dict, model_dir: Path, model_input: np.ndarray) -> None:
    expected = softmax(local_logits(model_dir, model_input[np.newaxis]))[0]
    assert np.max(np.abs(np.array(answer["probabilities"]) - expected)) < 1e-5
    assert answer["predicted_class"] == int(expected.argmax())
    assert answer["predicted_label"] == CLASS_NAMES[int(expected.argmax())]
    assert answer["model_id"] == "tiny-cnn-test"
    assert answer["class_names"] == CLASS_NAMES
    assert len(answer["request_id"]) >= 8
    assert answer["latency_ms"] > 0


# ----------------------------------------------------------------------------- classification


def test_predict_png_matches_local_onnxruntime(served, classifier_dir):
    image = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
    status, body, _ = post(served["cls"] + "/predict", png_bytes(image), "image/png")
    assert status == 200, body
    expected_input = ((image / 255.0 - 0.5) / 0.5)[np.newaxis]
    assert_matches_local(json.loads(body), classifier_dir, expected_input)


def test_a_clients_timeout_header_does_not_set_the_python_proxys_timeout(served):
    """Serve's Python proxy (medkd's only proxy without haproxy, HAProxy's backup server with it) reads
    ``x-request-timeout-seconds`` as its caller's hint: from a client, 1 us was a 408 at once."""
    image = png_bytes(RNG.integers(0, 256, (28, 28), dtype=np.uint8))
    short = {"x-request-timeout-seconds": "0.000001"}
    status, body, _ = call(served["cls"] + "/predict", body=image, content_type="image/png", headers=short)
    assert status == 200 and json.loads(body)["model_id"] == "tiny-cnn-test", body


def test_predict_npy_float_image_is_resized(served, classifier_dir):
    image = RNG.random((20, 20)).astype(np.float32)
    answer = MedkdClient(served["cls"]).predict(image)
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(image)[None, None], size=(28, 28), mode="bilinear", align_corners=False
    )[0].numpy()
    assert_matches_local(answer, classifier_dir, (resized - 0.5) / 0.5)


def test_predict_dicom_and_files_through_the_client(served, classifier_dir, tmp_path):
    image = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
    expected_input = ((image / 255.0 - 0.5) / 0.5)[np.newaxis]
    client = MedkdClient(served["cls"])
    for name, data in {
        "scan.dcm": make_dicom(image),
        "scan.png": png_bytes(image),
        "scan.npy": encode_npy(image),
    }.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert_matches_local(client.predict(path), classifier_dir, expected_input)
    status, body, _ = post(served["cls"] + "/predict", make_dicom(image), None)  # sniffed
    assert status == 200
    assert_matches_local(json.loads(body), classifier_dir, expected_input)


def test_predict_json_body(served, classifier_dir):
    image = RNG.integers(0, 256, (28, 28))
    status, body, _ = post(
        served["cls"] + "/predict", json.dumps({"image": image.tolist()}).encode(), "application/json"
    )
    assert status == 200, body
    assert_matches_local(json.loads(body), classifier_dir, ((image / 255.0 - 0.5) / 0.5)[np.newaxis])


def test_predict_batch_larger_than_max_batch_size(served, classifier_dir):
    images = RNG.integers(0, 256, (11, 1, 28, 28), dtype=np.uint8)
    answer = MedkdClient(served["cls"]).predict_batch(images)
    assert answer["count"] == 11 and len(answer["predictions"]) == 11
    expected = softmax(local_logits(classifier_dir, (images / 255.0 - 0.5) / 0.5))
    got = np.array([p["probabilities"] for p in answer["predictions"]])
    assert np.max(np.abs(got - expected)) < 1e-5
    assert [p["predicted_class"] for p in answer["predictions"]] == expected.argmax(axis=1).tolist()


def test_concurrent_requests_are_batched(served, classifier_dir):
    client = MedkdClient(served["cls"])
    before = client.stats()
    images = RNG.integers(0, 256, (32, 28, 28), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(client.predict, images))
    expected = softmax(local_logits(classifier_dir, ((images / 255.0 - 0.5) / 0.5)[:, np.newaxis]))
    got = np.array([answer["probabilities"] for answer in answers])
    assert np.max(np.abs(got - expected)) < 1e-5  # every answer went back to its own request
    after = client.stats()
    assert after["images"] - before["images"] == 32
    assert after["largest_batch"] > 1, after
    assert after["largest_batch"] <= 8
    assert after["batches"] - before["batches"] < 32


def test_the_fast_lane_and_fastapi_give_the_same_answers(served):
    """Prediction requests skip FastAPI's routing (medkd.serve.fast_lane) only when their query
    string is plainly valid; FastAPI answers the rest (and validates it), with the same result."""
    body = encode_npy(RNG.integers(0, 256, (28, 28), dtype=np.uint8))
    url = served["cls"] + "/predict"
    status, plain, _ = post(url, body, "application/x-npy")
    assert status == 200
    expected = json.loads(plain)["probabilities"]
    for query in ("?model=tiny-cnn-test", "?mask=list", "?extra=1", "?model=tiny-cnn-test&model=tiny-cnn-test"):
        status, answer, _ = post(url + query, body, "application/x-npy")
        assert status == 200 and json.loads(answer)["probabilities"] == expected, (query, answer)
    status, answer, _ = post(url + "?mask=png", body, "application/x-npy")
    assert status == 422 and "query.mask" in json.loads(answer)["error"]
    status, answer, _ = post(url + "?model=" + "m" * 257, body, "application/x-npy")
    assert status == 422 and "query.model" in json.loads(answer)["error"]
    status, answer, _ = post(url + "?model=nope", body, "application/x-npy")
    assert status == 404 and "known models: tiny-cnn-test" in json.loads(answer)["error"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (
            b"definitely not an image",
            "application/octet-stream",
            400,
            "body is not a PNG, JPEG, NPY, DICOM or JSON image",
        ),
        (b"GIF89a\x01\x00", "image/gif", 415, "unsupported Content-Type 'image/gif'"),
        (b"", "image/png", 400, "empty"),
        (encode_npy(np.zeros((2, 1, 28, 28), np.float32)), "application/x-npy", 400, "image has 4 dims"),
        (encode_npy(np.zeros((5, 28, 28), np.uint8)), "application/x-npy", 400, "image has 5 channels"),
        (encode_npy(np.zeros((300, 300), np.float32)), "application/x-npy", 413, "larger than max_body_bytes=262144"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(served, body, content_type, status, message):
    got_status, payload, headers = post(served["cls"] + "/predict", body, content_type)
    assert got_status == status
    assert headers["content-type"].startswith("application/json")
    error = json.loads(payload)
    assert message in error["error"] and error["status"] == status
    assert error["request_id"] == headers["x-request-id"]


def test_client_raises_with_the_server_message_and_routes_are_checked(served):
    client = MedkdClient(served["cls"])
    with pytest.raises(ServeRequestError, match="image has 1 dims") as error:
        client.predict(np.zeros(28, np.uint8))
    assert error.value.status == 400
    with pytest.raises(ServeRequestError, match="no route GET /nope") as error:
        client._json("GET", "/nope", None, None, None)
    assert error.value.status == 404
    with pytest.raises(ServeRequestError, match="use POST") as error:
        client._json("GET", "/predict", None, None, None)
    assert error.value.status == 405
    with pytest.raises(ServeRequestError, match="cannot reach"):
        MedkdClient(f"http://127.0.0.1:{free_port()}").health(timeout=2)


def test_health_and_metadata(served):
    client = MedkdClient(served["cls"])
    assert client.health()["status"] == "ok"
    metadata = client.metadata()
    assert metadata["model_id"] == "tiny-cnn-test"
    assert metadata["class_names"] == CLASS_NAMES
    assert metadata["teachers"] == [TEACHER]
    assert metadata["serving"]["input_shape"] == [None, 1, 28, 28]
    assert metadata["serving"]["output_shape"] == [None, 2]
    assert metadata["serving"]["max_batch_size"] == 8


# ------------------------------------------------------------------------------- segmentation


def test_segmentation_masks_match_local_onnxruntime(served, segmenter_dir):
    image = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    expected = local_logits(segmenter_dir, (image / 255.0)[None, None]).argmax(axis=1)[0]
    url = served["seg"] + "/predict"

    status, body, _ = post(url, encode_npy(image), "application/x-npy")
    assert status == 200, body
    answer = json.loads(body)
    mask = np.load(io.BytesIO(base64.b64decode(answer["mask_npy_b64"])), allow_pickle=False)
    np.testing.assert_array_equal(mask, expected)
    assert answer["shape"] == [16, 16] and answer["model_id"] == "tiny-seg-test"
    assert answer["class_pixel_counts"] == np.bincount(expected.ravel(), minlength=3).tolist()

    status, body, headers = post(url, encode_npy(image), "application/x-npy", accept="application/x-npy")
    assert status == 200 and headers["content-type"] == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(body), allow_pickle=False), expected)

    status, body, _ = post(url + "?mask=list", png_bytes(image), "image/png")
    np.testing.assert_array_equal(np.array(json.loads(body)["mask"]), expected)

    status, body, _ = post(
        served["seg"] + "/predict/batch", encode_npy(np.stack([image, image])), None, accept="application/x-npy"
    )
    masks = np.load(io.BytesIO(body), allow_pickle=False)
    assert masks.shape == (2, 16, 16)
    np.testing.assert_array_equal(masks[1], expected)


# --------------------------------------------------------------------------- model dir / start-up


def test_model_dir_errors_name_the_file_and_field(tmp_path, classifier_dir):
    with pytest.raises(ModelDirError, match="is not a directory"):
        load_model_dir(tmp_path / "missing")
    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(ModelDirError, match="model.onnx does not exist"):
        load_model_dir(tmp_path)
    (tmp_path / "model.onnx").write_bytes((classifier_dir / "model.onnx").read_bytes())
    metadata = json.loads((classifier_dir / "metadata.json").read_text())
    metadata["input"]["std"] = [0.0]
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelDirError, match=r"metadata.json: input.std: every std must be > 0"):
        load_model_dir(tmp_path)
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        load_model_dir(tmp_path)


def test_model_that_disagrees_with_its_metadata_fails_at_start(classifier_dir):
    model_bytes, metadata = load_model_dir(classifier_dir)
    wrong = {**metadata, "num_classes": 3, "class_names": ["a", "b", "c"]}
    with pytest.raises(ValueError, match="num_classes is 3 but model.onnx outputs 2"):
        LoadedModel.load(ModelFiles(model_id="m", model_bytes=model_bytes, metadata=wrong))
    wrong_size = {**metadata, "input": {**metadata["input"], "in_channels": 3}}
    with pytest.raises(ValueError, match=r"does not accept input of shape \[1, 3, 28, 28\]"):
        LoadedModel.load(ModelFiles(model_id="m", model_bytes=model_bytes, metadata=wrong_size))


# ------------------------------------------------------------------------------------ undeploy


def test_sigterm_undeploys_one_app_and_keeps_the_other(served):
    """`medkd serve` and `medkd run --keep-serving` both block in serve_until_stopped: SIGTERM, like
    Ctrl-C, makes it drain and undeploy (here without ending Ray: this process owns it)."""
    from ray import serve

    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        serve_until_stopped(SEG_APP)
    finally:
        timer.cancel()
    assert signal.getsignal(signal.SIGTERM) == before  # its own handler is gone again
    applications = serve.status().applications
    assert SEG_APP not in applications and CLS_APP in applications
    status, _, _ = post(served["seg"] + "/predict", encode_npy(np.zeros((16, 16), np.uint8)), None)
    assert status == 404
    assert MedkdClient(served["cls"]).health()["status"] == "ok"


# ------------------------------------------------------------------------------- health check


class HungSession:
    """Stands in for an ONNX Runtime session whose call never returns (a wedged session); the one
    fault that cannot be produced cheaply for real."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.release.wait(timeout=60)
        return np.zeros((len(batch), 2), np.float32)


# Serve awaits the ingress wrapper's async __del__ when it stops a replica; here nobody does.
@pytest.mark.slow  # waits out the probe timeout (10 s)
@pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited:RuntimeWarning")
def test_check_health_fails_when_the_onnx_session_is_wedged(classifier_dir):
    """Serve calls check_health every health_check_period_s and replaces a replica whose check
    fails; here the replica object is built as Serve builds it (its async __init__), no Serve app."""
    server_class = MedkdServer.func_or_class
    server = object.__new__(server_class)
    bundle = collect_models(classifier_dir)
    config = ServeConfig(request_timeout_s=1.0)
    asyncio.run(server_class.__init__(server, bundle.model_dump(), config.model_dump(mode="json"), None))
    asyncio.run(server.check_health())  # a warm session answers the probe

    hung = HungSession()
    started = time.monotonic()
    call = server._runner.submit(server._run, hung, np.zeros((1, 1, 28, 28), np.float32))
    for _ in range(500):  # the model thread picks the call up (a probe queued behind it would time out)
        if server._busy_since is not None:
            break
        time.sleep(0.01)
    assert server._busy_since is not None
    try:
        asyncio.run(server.check_health())  # busy, but not for long yet: healthy
        time.sleep(max(PROBE_TIMEOUT_S, config.request_timeout_s) + 0.5 - (time.monotonic() - started))
        with pytest.raises(RuntimeError, match=r"ONNX Runtime call running for \d+ s > 10 s: wedged"):
            asyncio.run(server.check_health())
    finally:
        hung.release.set()
        call.result(timeout=30)
    asyncio.run(server.check_health())  # the call returned: healthy again
    del server
    gc.collect()


@pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited:RuntimeWarning")
def test_a_client_that_leaves_while_its_body_is_read_gets_499_and_no_error_log(classifier_dir, caplog):
    """With direct ingress medkd, not Serve, sees a client leave (medkd.serve.deadline): the
    request ends at once, recorded as 499, without an internal-error log."""
    server_class = MedkdServer.func_or_class
    server = object.__new__(server_class)
    config = ServeConfig()
    asyncio.run(server_class.__init__(server, collect_models(classifier_dir).model_dump(), config.model_dump(), None))
    messages = iter([{"type": "http.request", "body": b"\x93NUMPY", "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> dict:
        return next(messages)

    scope = {"type": "http", "method": "POST", "path": "/predict/batch", "headers": [], "query_string": b""}
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        response = asyncio.run(
            server.predict_route(Request(scope, receive), "/predict/batch", batch=True, model=None, mask=None)
        )
    assert response.status_code == 499
    assert server._metrics.requests[("/predict/batch", 499)] == 1
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    del server
    gc.collect()
