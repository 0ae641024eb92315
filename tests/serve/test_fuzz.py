"""Fuzzing the endpoint over real Serve and HTTP: schemathesis against its OpenAPI schema and
hypothesis-mutated PNG/NPY/DICOM/JSON bodies, bombs and oversized batches — at least 1,000
requests, not one 5xx, the replica's memory bounded, and a valid request still answered right."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from medkd.serve.app import deploy, undeploy
from medkd.serve.codecs import encode_npy
from medkd.spec.serve import ServeConfig
from tests.conftest import free_port
from tests.serve.images import make_dicom, png_bytes
from tests.serve.students import call, expected_probabilities, make_run, process_rss_bytes, replica_pids

pytestmark = pytest.mark.slow

APP = "medkd-test-fuzz"
BINARY_TYPES = ("image/png", "image/jpeg", "application/x-npy", "application/dicom", "application/octet-stream")


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


RSS_GROWTH_LIMIT = 400 * 1024 * 1024

for _media in BINARY_TYPES:
    schemathesis.openapi.media_type(_media, st.binary(max_size=4096))


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    run_dir, ids = make_run(tmp_path_factory.mktemp("run"), 2)
    config = ServeConfig(
        port=free_port(),
        route_prefix="/fuzz",
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=0.25,
        max_batch_size=8,
        batch_wait_timeout_s=0.001,
        max_images_per_request=32,
        max_decoded_bytes=8 * 1024 * 1024,
        max_body_bytes=4 * 1024 * 1024,
    )
    url = deploy(run_dir, config, app_name=APP)
    try:
        yield url, run_dir, ids
    finally:
        undeploy(APP)


def png_bomb(side: int) -> bytes:
    """A valid PNG header claiming ``side`` x ``side`` pixels over a small zlib stream of zeros."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    rows = zlib.compress(b"\x00" * (side + 1) * 64, 9)  # only the first rows: the decoder must never get there
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def seed_bodies() -> list[tuple[str, str, bytes]]:
    """(route, content type, body) of valid requests, mutated by the fuzzer."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    return [
        ("/predict", "image/png", png_bytes(image)),
        ("/predict", "application/x-npy", encode_npy(image)),
        ("/predict", "application/dicom", make_dicom(image)),
        ("/predict", "application/json", json.dumps({"image": image.tolist()}).encode()),
        ("/predict/batch", "application/x-npy", encode_npy(np.stack([image] * 4))),
        ("/predict/batch", "application/json", json.dumps({"instances": [image.tolist()] * 2}).encode()),
    ]


HOSTILE = [
    ("/predict/batch", "application/x-npy", encode_npy(np.zeros((2_000_000, 1, 1), np.uint8))),
    ("/predict/batch", "application/x-npy", encode_npy(np.zeros((33, 28, 28), np.uint8))),
    ("/predict/batch", "application/json", json.dumps({"instances": [[[1]]] * 1000}).encode()),
    ("/predict", "image/png", png_bomb(60_000)),
    ("/predict", "application/octet-stream", png_bomb(30_000)),
    ("/predict", "image/png", png_bytes(np.zeros((4000, 4000), np.uint8))),
    ("/predict", "application/json", b"[" * 200_000 + b"]" * 200_000),
    ("/predict", "application/json", b'{"image": ' + b"[" * 50 + b"1" + b"]" * 50 + b"}"),
    ("/predict", "application/json", b'{"image": "' + b"A" * 100_000 + b'"}'),
    (
        "/predict",
        "application/x-npy",
        b"\x93NUMPY\x01\x00\x76\x00{'descr': '|O', 'fortran_order': False, 'shape': (3,), }" + b" " * 60 + b"\n",
    ),
    ("/predict", "application/dicom", b"\x00" * 128 + b"DICM" + b"\xff" * 500),
    ("/predict", "image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
]


SEEDS = seed_bodies() + HOSTILE


@st.composite
def mutated_requests(draw):
    route, content_type, body = draw(st.sampled_from(SEEDS))
    data = bytearray(body)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 64))]
    content_type = draw(
        st.sampled_from(
            [
                content_type,
                content_type,
                "application/octet-stream",
                "text/plain",
                "",
                "image/gif",
                "application/json; charset=utf-8",
            ]
        )
    )
    return route, content_type, bytes(data)


def test_fuzzing_never_gets_a_5xx_and_memory_stays_bounded(served):
    url, run_dir, ids = served
    (pid,) = replica_pids(APP)
    rss_before = process_rss_bytes(pid)
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    session = requests.Session()

    def record(status: int, what: str, text: str) -> None:
        statuses[status] += 1
        if status >= 500:
            failures.append(f"{status} {what}: {text[:300]}")
        assert "Traceback" not in text

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    for operation in schema.get_all_operations():
        operation = operation.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @fuzz_settings(40)
            @given(case=operation.as_strategy(generation_mode=mode))
            def schemathesis_case(case):
                response = case.call(base_url=url, session=session, timeout=60)
                record(response.status_code, f"{case.method} {case.formatted_path} {case.media_type}", response.text)

            try:
                schemathesis_case()
            except Unsatisfiable:  # no invalid input exists for a route without parameters or body
                assert mode is GenerationMode.NEGATIVE

    @fuzz_settings(700)
    @given(request=mutated_requests())
    def mutated_case(request):
        route, content_type, body = request
        headers = {"Content-Type": content_type} if content_type else {}
        response = session.post(url + route, data=body, headers=headers, timeout=60)
        record(response.status_code, f"POST {route} {content_type} {len(body)} B", response.text)

    mutated_case()

    assert not failures, failures[:5]
    assert sum(statuses.values()) >= 1000, statuses
    assert statuses[413] > 0 and statuses[400] > 0 and statuses[200] > 0, statuses
    assert process_rss_bytes(pid) - rss_before < RSS_GROWTH_LIMIT, (rss_before, process_rss_bytes(pid))
    assert replica_pids(APP) == [pid]  # the same replica survived all of it

    image = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    status, body, _ = call(url + "/predict", body=encode_npy(image), content_type="application/x-npy")
    expected = expected_probabilities(Path(run_dir) / "models" / ids[0], image[np.newaxis])[0]
    assert status == 200 and np.max(np.abs(np.array(json.loads(body)["probabilities"]) - expected)) < 1e-5
