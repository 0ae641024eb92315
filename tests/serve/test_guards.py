"""Request limits checked from headers, bearer-token auth, GPU refusal, model collection and the
one classification post-processing — without Ray (fast)."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnxruntime as ort
import pytest
from pydantic import SecretStr

from medkd.core.onnx_session import X64_QUANT_PRECISION
from medkd.registry.metadata import InputMeta, ModelMetadata
from medkd.serve import model_store
from medkd.serve.codecs import PayloadTooLarge, RequestError, encode_npy
from medkd.serve.guards import Limits, authorized, bearer_token, check_before_decoding, check_image_count
from medkd.serve.model_store import GpuUnavailableError, ModelDirError, collect_models, create_session
from medkd.students.compression import quantize
from tests.serve.images import make_dicom, png_bytes
from tests.serve.students import export_student, make_run
from tests.serve.test_fuzz import png_bomb

META = InputMeta(in_channels=1, spatial_dims=2, image_size=[28, 28])
LIMITS = Limits(max_images=64, max_decoded_bytes=4 * 1024 * 1024)


def check(body: bytes, content_type: str | None, *, batch: bool = False) -> None:
    check_before_decoding(body, content_type, batch=batch, input_meta=META, limits=LIMITS)


def test_npy_batch_of_two_million_tiny_images_is_refused_from_its_header():
    with pytest.raises(PayloadTooLarge, match="batch holds 2000000 images, more than max_images_per_request=64"):
        check(encode_npy(np.zeros((2_000_000, 1, 1), np.uint8)), "application/x-npy", batch=True)
    with pytest.raises(PayloadTooLarge, match="max_decoded_bytes=4194304"):
        check(encode_npy(np.zeros((1, 1000, 1000), np.float32)), None)  # sniffed as NPY
    check(encode_npy(np.zeros((64, 28, 28), np.uint8)), "application/x-npy", batch=True)  # at the limit: fine


def test_image_bombs_are_refused_before_decoding():
    with pytest.raises(PayloadTooLarge, match="max_decoded_bytes"):
        check(png_bomb(9_000), "image/png")  # 81 M pixels claimed by a ~1 kB file
    with pytest.raises(PayloadTooLarge, match="9000x9000 image"):
        check(png_bomb(9_000)[:-12], "application/octet-stream")
    with pytest.raises(PayloadTooLarge, match="decompression-bomb"):
        check(png_bomb(60_000), "image/png")  # beyond Pillow's own bomb limit
    with pytest.raises(PayloadTooLarge, match="DICOM image 5000x5000"):
        check(make_dicom(np.zeros((4, 4), np.uint8), Rows=5000, Columns=5000), "application/dicom")
    check(png_bytes(np.zeros((28, 28), np.uint8)), "image/png")
    check(b"\x89PNG\r\n\x1a\n garbage", "image/png")  # unreadable header: left to the decoder's 400


def test_deep_or_huge_json_is_refused_before_parsing():
    with pytest.raises(RequestError, match="nested 100000 levels deep, more than the limit of 8"):
        check(b"[" * 100_000 + b"]" * 100_000, "application/json")
    with pytest.raises(PayloadTooLarge, match="JSON body decodes to"):
        check(b"[" + b"0," * 200_000 + b"0]", "application/json")
    check(json.dumps({"instances": [{"image": [[[1, 2], [3, 4]]]}]}).encode(), "application/json")
    with pytest.raises(PayloadTooLarge, match="100 images"):
        check_image_count(100, META, LIMITS)


def test_bearer_token_from_the_environment_and_constant_time_check(monkeypatch):
    assert bearer_token(None) is None
    monkeypatch.delenv("MEDKD_TOKEN_TEST", raising=False)
    with pytest.raises(ValueError, match="MEDKD_TOKEN_TEST is not set"):
        bearer_token("MEDKD_TOKEN_TEST")
    monkeypatch.setenv("MEDKD_TOKEN_TEST", "abc123")
    token = bearer_token("MEDKD_TOKEN_TEST")
    assert "abc123" not in repr(token) and "abc123" not in str(token)
    assert authorized("Bearer abc123", token) and authorized("bearer  abc123 ", token)
    for header in (None, "", "abc123", "Basic abc123", "Bearer abc12", "Bearer abc1234"):
        assert not authorized(header, SecretStr("abc123")), header


def test_gpu_replicas_use_cuda_or_refuse_to_start(tmp_path):
    model_bytes = (export_student(tmp_path / "m", seed=1, model_id="m") / "model.onnx").read_bytes()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert create_session(model_bytes, use_gpu=True).get_providers()[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(GpuUnavailableError, match=r"gpus_per_replica > 0 .*medkd\[gpu\]"):
            create_session(model_bytes, use_gpu=True)
    cpu = create_session(model_bytes)
    assert cpu.get_providers() == ["CPUExecutionProvider"]
    # medkd.core.onnx_session: INT8 products do not saturate on x86 CPUs without VNNI
    assert cpu.get_session_options().get_session_config_entry(X64_QUANT_PRECISION) == "1"


def test_cpu_replicas_run_seven_bit_int8_on_the_fast_kernels(tmp_path, monkeypatch, caplog):
    fp32 = export_student(tmp_path / "m", seed=1, model_id="m") / "model.onnx"
    calibration = np.random.default_rng(0).normal(size=(16, 1, 28, 28)).astype(np.float32)
    eight = quantize(fp32, tmp_path / "int8.onnx", mode="int8_static", calibration=calibration)
    seven = quantize(fp32, tmp_path / "int8_7bit.onnx", mode="int8_static_7bit", calibration=calibration)
    monkeypatch.setattr(model_store, "cpu_int8_products_saturate", lambda: True)  # an AVX2-only CPU
    with caplog.at_level(logging.WARNING, logger=model_store.__name__):
        exact = create_session(eight.read_bytes())
        assert "no VNNI" in caplog.text and "int8_static_7bit" in caplog.text  # says why and what to do
        caplog.clear()
        fast = create_session(seven.read_bytes())
        assert not caplog.text
    assert exact.get_session_options().get_session_config_entry(X64_QUANT_PRECISION) == "1"
    with pytest.raises(RuntimeError, match="x64quantprecision"):  # not set: the fast kernels
        fast.get_session_options().get_session_config_entry(X64_QUANT_PRECISION)
    monkeypatch.setattr(model_store, "cpu_int8_products_saturate", lambda: False)  # a CPU with VNNI
    with caplog.at_level(logging.WARNING, logger=model_store.__name__):
        create_session(eight.read_bytes())
    assert not caplog.text


def test_collect_models_serves_the_pareto_students_of_the_selected_search(tmp_path):
    run_dir, ids = make_run(tmp_path / "run", 3)
    for path in (run_dir, run_dir / "models" / ids[0]):
        bundle = collect_models(path)
        assert bundle.default_id == ids[0] and sorted(bundle.models) == ids  # not the other search's entry
    lone = export_student(tmp_path / "lone", seed=3, model_id="lone")
    assert list(collect_models(lone).models) == ["lone"]
    duplicate = export_student(run_dir / "models" / "copy", seed=4, model_id=ids[1])
    with pytest.raises(ModelDirError, match=f"model_id '{ids[1]}' appears twice"):
        collect_models(run_dir)
    assert duplicate.is_dir()


def test_classify_is_the_one_post_processing():
    def meta(**fields) -> ModelMetadata:
        base = {
            "model_id": "m",
            "task": "classification",
            "num_classes": 2,
            "class_names": ["a", "b"],
            "input": {"in_channels": 1, "spatial_dims": 2, "image_size": [4, 4]},
        }
        return ModelMetadata.model_validate({**base, **fields})

    softmax = meta().classify(np.array([[0.0, np.log(3.0)]]))[0]
    assert softmax["probabilities"] == pytest.approx([0.25, 0.75]) and softmax["predicted_label"] == "b"
    single = meta().classify(np.array([[0.0]]))[0]
    assert single["probabilities"] == pytest.approx([0.5, 0.5]) and single["predicted_class"] == 0
    multi = meta(multilabel=True, num_classes=3, class_names=["x", "y", "z"]).classify(np.array([[5.0, -5.0, 0.1]]))[0]
    assert multi["predicted_labels"] == ["x", "z"] and multi["predicted_label"] == "x"
