"""Training and serving turn the same file into the same model input, and the same prediction.

The same PNG (8-bit gray, RGB, smaller than the model's size), 16-bit PNG and DICOM files (CT
with rescale + window, MONOCHROME1 without a window) go through the folder adapter
(``load_dataset``: what a teacher and the student train on) and through the serving codecs
(in process, then over real HTTP to a deployed model on real Ray Serve, compared with ONNX
Runtime on the training tensor).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medkd.data import FolderDataSpec, load_dataset
from medkd.registry.metadata import InputMeta
from medkd.serve.app import deploy, undeploy
from medkd.serve.codecs import decode_image, preprocess
from medkd.spec.serve import ServeConfig
from tests.conftest import free_port

IMAGE_SIZE = 28
APP_NAME = "medkd-test-parity"
CONTENT_TYPES = {".png": "image/png", ".dcm": "application/dicom"}
RNG = np.random.default_rng(11)


def _png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, format="PNG")


def _dicom(path: Path, pixels: np.ndarray, *, photometric: str, bits_stored: int, **elements) -> None:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.set_pixel_data(pixels, photometric, bits_stored)
    for name, value in elements.items():
        setattr(dataset, name, value)
    dataset.save_as(path, enforce_file_format=True)


def _ct_stored_values() -> np.ndarray:
    """A 50x50 CT slice stored as HU + 1024: air (-1000 HU) on the left, soft tissue
    (40 +- 100 HU) on the right."""
    hounsfield = np.full((50, 50), -1000.0)
    hounsfield[:, 25:] = 40 + RNG.uniform(-100, 100, (50, 25))
    return np.rint(hounsfield + 1024).astype(np.uint16)


PROBES = {
    "p1_gray.png": lambda path: _png(path, RNG.integers(0, 256, (61, 47), dtype=np.uint8)),
    "p2_rgb.png": lambda path: _png(path, RNG.integers(0, 256, (40, 52, 3), dtype=np.uint8)),
    "p3_small.png": lambda path: _png(path, RNG.integers(0, 256, (19, 23), dtype=np.uint8)),
    "p4_16bit.png": lambda path: _png(path, RNG.integers(0, 65536, (64, 64)).astype(np.uint16)),
    "p5_ct.dcm": lambda path: _dicom(
        path,
        _ct_stored_values(),
        photometric="MONOCHROME2",
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
    ),
    "p6_mono1.dcm": lambda path: _dicom(
        path, RNG.integers(0, 1024, (33, 30)).astype(np.uint16), photometric="MONOCHROME1", bits_stored=10
    ),
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """``train|val|test/<class>/`` with every probe file in ``test/a``."""
    root = tmp_path_factory.mktemp("parity")
    for split, count in (("train", 6), ("val", 2), ("test", 1)):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                _png(folder / f"x{index}.png", RNG.integers(0, 256, (36, 36), dtype=np.uint8))
    for name, write in PROBES.items():
        write(root / "test" / "a" / name)
    return root


def _training_tensors(root: Path, in_channels: int) -> tuple[dict[str, np.ndarray], InputMeta]:
    """The folder adapter's model input for every probe, and the InputMeta an export writes."""
    dataset = load_dataset(FolderDataSpec(path=root, image_size=IMAGE_SIZE, in_channels=in_channels))
    files = sorted(p.name for p in (root / "test" / "a").iterdir())  # the adapter's order in test/a
    tensors = {name: dataset.splits["test"].images[files.index(name)] for name in PROBES}
    keys = ("scale", "offset", "clip", "mean", "std")
    meta = InputMeta(
        in_channels=in_channels,
        spatial_dims=2,
        image_size=[IMAGE_SIZE, IMAGE_SIZE],
        **{key: value for key, value in dataset.preprocessing.items() if key in keys},
    )
    return tensors, meta


@pytest.mark.parametrize("in_channels", [1, 3])
def test_training_adapter_and_serving_codec_give_the_same_model_input(image_folder, in_channels):
    tensors, meta = _training_tensors(image_folder, in_channels)
    for name, trained in tensors.items():
        body = (image_folder / "test" / "a" / name).read_bytes()
        served = preprocess(decode_image(body, CONTENT_TYPES[Path(name).suffix]), meta)
        assert served.shape == trained.shape == (in_channels, IMAGE_SIZE, IMAGE_SIZE)
        assert float(np.abs(served - trained).max()) <= 1e-6, name
        # Sniffed bodies (no Content-Type) take the same path.
        np.testing.assert_array_equal(preprocess(decode_image(body, None), meta), served)


def test_dicom_window_reaches_the_model_input(image_folder):
    """The CT probe is windowed (soft tissue, 40/400 HU), not stretched min->max: soft tissue
    sits mid-grey (min->max would put it near white, ~0.9) and air is black."""
    tensors, meta = _training_tensors(image_folder, 1)
    ct = tensors["p5_ct.dcm"][0] * np.float32(meta.std[0]) + np.float32(meta.mean[0])  # back to [0, 1]
    air, tissue = ct[:, :12], ct[:, 16:]
    assert float(np.abs(air).max()) < 1e-6
    assert 0.4 < float(tissue.mean()) < 0.6


# ------------------------------------------------------------------------- over real HTTP


def _tiny_onnx_classifier(path: Path, in_channels: int) -> Path:
    """Conv 3x3 -> ReLU -> global average pool -> linear (2 classes), random weights."""
    weights = np.random.default_rng(5)
    conv_w = weights.normal(0, 0.5, (4, in_channels, 3, 3)).astype(np.float32)
    conv_b = weights.normal(0, 0.1, (4,)).astype(np.float32)
    fc_w = weights.normal(0, 1.0, (2, 4)).astype(np.float32)
    fc_b = np.array([0.1, -0.1], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", in_channels, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [
            numpy_helper.from_array(array, name)
            for array, name in ((conv_w, "conv_w"), (conv_b, "conv_b"), (fc_w, "fc_w"), (fc_b, "fc_b"))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def served_parity_model(ray_session, image_folder, tmp_path_factory):
    tensors, meta = _training_tensors(image_folder, 1)
    model_dir = tmp_path_factory.mktemp("parity_model")
    _tiny_onnx_classifier(model_dir / "model.onnx", 1)
    metadata = {
        "model_id": "parity-tiny",
        "task": "classification",
        "num_classes": 2,
        "class_names": ["a", "b"],
        "input": meta.model_dump(),
    }
    (model_dir / "metadata.json").write_text(json.dumps(metadata))
    config = ServeConfig(
        port=free_port(),
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=0.25,
        max_batch_size=4,
        batch_wait_timeout_s=0.005,
    )
    try:
        url = deploy(model_dir, config, app_name=APP_NAME)
        yield url, model_dir, tensors
    finally:
        undeploy(APP_NAME)


def _post(url: str, body: bytes, content_type: str) -> dict:
    request = urllib.request.Request(f"{url}/predict", data=body, method="POST", headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_http_prediction_equals_onnx_runtime_on_the_training_tensor(served_parity_model, image_folder):
    url, model_dir, tensors = served_parity_model
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for name, trained in tensors.items():
        logits = session.run(None, {"image": trained[np.newaxis]})[0][0].astype(np.float64)
        expected = np.exp(logits - logits.max())
        expected /= expected.sum()
        answer = _post(url, (image_folder / "test" / "a" / name).read_bytes(), CONTENT_TYPES[Path(name).suffix])
        np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-6, err_msg=name)
        assert answer["predicted_class"] == int(expected.argmax()), name
    # The probes must not all look alike to the model, or the comparison would prove little.
    spread = [tensors[name].mean() for name in tensors]
    assert max(spread) - min(spread) > 0.1


def test_serving_codecs_share_the_contract_without_loading_torch():
    """The replicas import the shared module alone: importing medkd.data must stay lazy."""
    probe = "import sys, medkd.serve.codecs; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "[]"
