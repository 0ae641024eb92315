"""Every Pareto student of a run in one application, over real Serve and HTTP: each request
reaches the model it names, the default is the selected one, unknown ids are 404s; plus the
routes, OpenAPI docs, bearer-token auth and the guards that answer before decoding."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from medkd.serve.app import deploy, undeploy
from medkd.serve.codecs import encode_npy
from medkd.spec.serve import ServeConfig
from tests.conftest import free_port
from tests.serve.images import png_bytes
from tests.serve.students import call, expected_probabilities, make_run

pytestmark = pytest.mark.slow

APP, AUTH_APP, TOKEN_ENV, TOKEN = "medkd-test-mux", "medkd-test-auth", "MEDKD_TEST_SERVE_TOKEN", "s3cret-Token.42"
RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[str]]:
    return make_run(tmp_path_factory.mktemp("run"), 3)


@pytest.fixture(scope="module")
def urls(ray_session, run, monkeypatch_module):
    run_dir, _ = run
    config = ServeConfig(
        port=free_port(),
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=0.25,
        max_batch_size=8,
        batch_wait_timeout_s=0.002,
        max_images_per_request=64,
        max_decoded_bytes=4 * 1024 * 1024,
        max_body_bytes=8 * 1024 * 1024,
    )
    monkeypatch_module.setenv(TOKEN_ENV, TOKEN)
    try:
        yield {
            "open": deploy(run_dir, config, app_name=APP),
            "auth": deploy(
                run_dir,
                config.model_copy(update={"route_prefix": "/secure", "auth_token_env": TOKEN_ENV}),
                app_name=AUTH_APP,
            ),
        }
    finally:
        undeploy(AUTH_APP)
        undeploy(APP)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def predict(url: str, images: np.ndarray, **headers) -> tuple[int, dict]:
    route = "/predict/batch" if images.ndim == 3 else "/predict"
    status, body, _ = call(url + route, body=encode_npy(images), content_type="application/x-npy", headers=headers)
    return status, json.loads(body)


def test_each_request_reaches_the_model_it_names(urls, run):
    run_dir, ids = run
    images = RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    answers = {}
    for model_id in ids:
        expected = expected_probabilities(run_dir / "models" / model_id, images)
        status, by_header = predict(urls["open"], images, serve_multiplexed_model_id=model_id)
        assert status == 200, by_header
        got = np.array([p["probabilities"] for p in by_header["predictions"]])
        assert np.max(np.abs(got - expected)) < 1e-5, model_id
        assert by_header["model_id"] == model_id and by_header["class_names"] == ["malignant", "benign"]
        status, body, _ = call(
            f"{urls['open']}/predict?model={model_id}", body=encode_npy(images[0]), content_type="application/x-npy"
        )
        single = json.loads(body)
        assert status == 200 and single["model_id"] == model_id
        assert np.max(np.abs(np.array(single["probabilities"]) - expected[0])) < 1e-5
        answers[model_id] = got
    # The students differ, so answering from the wrong one could not pass the checks above.
    assert np.max(np.abs(answers[ids[0]] - answers[ids[1]])) > 1e-3


def test_default_is_the_selected_model_and_unknown_ids_are_404(urls, run):
    run_dir, ids = run
    image = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
    status, answer = predict(urls["open"], image)
    assert status == 200 and answer["model_id"] == ids[0]
    for headers, url in (
        ({"serve_multiplexed_model_id": "nope"}, urls["open"] + "/predict"),
        ({}, urls["open"] + "/predict?model=old-search"),
    ):
        status, body, response_headers = call(
            url, body=encode_npy(image), content_type="application/x-npy", headers=headers
        )
        error = json.loads(body)
        assert status == 404, error
        assert all(model_id in error["error"] for model_id in ids), error  # names the known ids
        assert error["request_id"] == response_headers["x-request-id"]
    status, body, _ = call(
        urls["open"] + "/predict?model=student-1",
        body=encode_npy(image),
        content_type="application/x-npy",
        headers={"serve_multiplexed_model_id": "student-2"},
    )
    assert status == 400 and "disagree" in json.loads(body)["error"]


def test_models_lists_every_student_with_registry_figures(urls, run):
    _, ids = run
    status, body, _ = call(urls["open"] + "/models")
    listing = json.loads(body)
    assert status == 200 and listing["default"] == ids[0]
    assert [m["model_id"] for m in listing["models"]] == ids  # the other search's entry is not served
    for rank, model in enumerate(listing["models"]):
        assert model["default"] == (rank == 0) and model["pareto_rank"] == rank
        assert model["size_bytes"] > 1000 and model["latency_ms"] == pytest.approx(0.1 + rank)
        assert model["metrics"]["val"]["val_auc"] == pytest.approx(0.8 - rank / 10)


def test_health_ready_metadata_and_openapi_docs(urls, run):
    _, ids = run
    status, body, _ = call(urls["open"] + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body, _ = call(urls["open"] + "/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"] and ready["default_model"] == ids[0] and ready["warm_inference_ms"] > 0
    status, body, _ = call(urls["open"] + "/metadata?model=student-2")
    metadata = json.loads(body)
    assert status == 200 and metadata["model_id"] == "student-2"
    assert metadata["serving"]["max_images_per_request"] == 64 and metadata["serving"]["output_shape"] == [None, 2]
    status, body, _ = call(urls["open"] + "/openapi.json")
    paths = json.loads(body)["paths"]
    assert status == 200
    assert {"/predict", "/predict/batch", "/healthz", "/readyz", "/models", "/metadata"} <= set(paths)
    assert "image/png" in paths["/predict"]["post"]["requestBody"]["content"]
    status, body, headers = call(urls["open"] + "/docs")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"swagger" in body.lower()


def test_bearer_token_guards_every_route_but_healthz(urls):
    secure, image = urls["auth"], encode_npy(RNG.integers(0, 256, (28, 28), dtype=np.uint8))
    assert call(secure + "/healthz")[0] == 200
    for route, body in (("/readyz", None), ("/models", None), ("/metadata", None), ("/predict", image)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            status, payload, response_headers = call(
                secure + route, body=body, content_type="application/x-npy", headers=headers
            )
            assert status == 401, (route, headers)
            assert response_headers["www-authenticate"] == "Bearer"
            assert TOKEN.encode() not in payload
        status, payload, _ = call(
            secure + route, body=body, content_type="application/x-npy", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert status == 200, (route, payload)


def test_hostile_bodies_are_refused_from_their_headers(urls):
    url = urls["open"]
    started = time.monotonic()
    # The reported attack: a 2 MB NPY of 2,000,000 1x1 images.
    status, body, _ = call(
        url + "/predict/batch", body=encode_npy(np.zeros((2_000_000, 1, 1), np.uint8)), content_type="application/x-npy"
    )
    assert status == 413 and "max_images_per_request=64" in json.loads(body)["error"]
    status, body, _ = call(
        url + "/predict/batch", body=encode_npy(np.zeros((60, 200, 200), np.uint8)), content_type="application/x-npy"
    )
    assert status == 413 and "max_decoded_bytes=4194304" in json.loads(body)["error"]
    bomb = png_bytes(np.zeros((6000, 6000), np.uint8))  # ~35 kB compressed, 36 M pixels
    status, body, _ = call(url + "/predict", body=bomb, content_type="image/png")
    assert status == 413 and "max_decoded_bytes" in json.loads(body)["error"]
    nested = b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, body, _ = call(url + "/predict", body=nested, content_type="application/json")
    assert status == 400 and "nested" in json.loads(body)["error"]
    many = json.dumps({"instances": [[[0]]] * 200}).encode()
    status, body, _ = call(url + "/predict/batch", body=many, content_type="application/json")
    assert status == 413 and "max_images_per_request=64" in json.loads(body)["error"]
    assert time.monotonic() - started < 20
    status, answer = predict(url, RNG.integers(0, 256, (28, 28), dtype=np.uint8))
    assert status == 200 and answer["model_id"] == "student-0"


def test_timeout_is_a_504_and_a_full_queue_a_503_with_retry_after(ray_session, run):
    run_dir, _ = run
    config = ServeConfig(
        port=free_port(),
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=0.25,
        route_prefix="/slow",
        request_timeout_s=0.001,
        max_ongoing_requests=1,
        max_batch_size=1,
        max_queued_requests=1,
        retry_after_s=2,
    )
    url = deploy(run_dir, config, app_name="medkd-test-timeout")
    body = encode_npy(RNG.integers(0, 256, (64, 28, 28), np.uint8))
    try:
        status, payload, _ = call(url + "/predict/batch", body=body, content_type="application/x-npy")
        error = json.loads(payload)
        assert status == 504 and "request_timeout_s=0.001" in error["error"] and "Traceback" not in error["error"]
        with ThreadPoolExecutor(max_workers=24) as pool:
            answers = list(
                pool.map(lambda _: call(url + "/predict/batch", body=body, content_type="application/x-npy"), range(24))
            )
        statuses = Counter(status for status, _, _ in answers)
        assert set(statuses) <= {503, 504} and statuses[503] > 0, statuses
        assert all(headers.get("retry-after") == "2" for status, _, headers in answers if status == 503)
    finally:
        undeploy("medkd-test-timeout")


def test_request_metrics_reach_rays_prometheus_endpoint(urls):
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port  # the node's Prometheus exporter
    predict(urls["open"], RNG.integers(0, 256, (28, 28), dtype=np.uint8), serve_multiplexed_model_id="student-1")
    wanted = (
        "medkd_serve_requests_total",
        "medkd_serve_latency_ms",
        "medkd_serve_batch_images",
        "medkd_serve_queue_length",
    )
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        status, body, _ = call(f"http://127.0.0.1:{port}/metrics", timeout=10)
        text = body.decode(errors="replace")
        if status == 200 and all(name in text for name in wanted) and 'model="student-1"' in text:
            break
        time.sleep(2)
    requests_lines = [line for line in text.splitlines() if "medkd_serve_requests_total{" in line]
    assert any(
        'route="/predict"' in line and 'status="200"' in line and 'model="student-1"' in line for line in requests_lines
    ), requests_lines[:10]
    assert all(name in text for name in wanted)
