"""Request decoding and preprocessing (no Ray): every format, bad bodies, and the math."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medkd.data.preprocess import resize
from medkd.serve import codecs
from medkd.serve.codecs import (
    PayloadTooLarge,
    RequestError,
    UnsupportedMediaType,
    decode_batch,
    decode_image,
    encode_npy,
    preprocess,
    preprocess_batch,
    read_npy_header,
    sniff_format,
)

META_2D = {"in_channels": 1, "spatial_dims": 2, "image_size": [28, 28], "scale": 1 / 255, "mean": [0.5], "std": [0.5]}
RNG = np.random.default_rng(0)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def make_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 8,
    preamble: bool = True,
    **elements,
) -> bytes:
    """A small, valid DICOM file (explicit VR little endian) holding ``pixels``."""
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
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=preamble)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- PNG


def test_png_grayscale_decodes_to_raw_uint8_pixels():
    image = RNG.integers(0, 256, (20, 24), dtype=np.uint8)
    decoded = decode_image(png_bytes(image), "image/png")
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, image)


def test_png_rgb_and_rgba_decode_channel_first():
    rgb = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(png_bytes(rgb), "image/png"), rgb.transpose(2, 0, 1))
    rgba = RNG.integers(0, 256, (10, 12, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(png_bytes(rgba), None), rgba[..., :3].transpose(2, 0, 1))


def test_rgb_png_for_a_gray_model_matches_pillow_gray_conversion():
    rgb = RNG.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32)
    expected = ((gray / 255.0) - 0.5) / 0.5
    result = preprocess(decode_image(png_bytes(rgb), "image/png"), META_2D)
    assert result.shape == (1, 28, 28)
    np.testing.assert_allclose(result[0], expected, atol=1e-6)


def test_16bit_png_becomes_unit_range_floats():
    image = RNG.integers(0, 65536, (8, 9)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), "image/png")
    assert decoded.dtype.kind == "f"
    np.testing.assert_allclose(decoded, image / 65535.0, atol=1e-6)


def test_jpeg_decodes():
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    decoded = decode_image(buffer.getvalue(), "image/jpeg")
    assert decoded.shape == (3, 16, 16)
    assert abs(float(decoded.mean()) - 128) < 2


def test_png_content_type_with_other_body_names_the_problem():
    with pytest.raises(RequestError, match="not a valid PNG"):
        decode_image(encode_npy(np.zeros((4, 4))), "image/png")
    with pytest.raises(RequestError, match="not a valid PNG"):
        decode_image(png_bytes(np.zeros((8, 8), np.uint8))[:30], "image/png")


def test_image_over_the_pixel_limit_is_413(monkeypatch):
    monkeypatch.setattr(codecs, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(PayloadTooLarge, match="more than the limit") as error:
        decode_image(png_bytes(np.zeros((64, 64), np.uint8)), "image/png")
    assert error.value.status == 413


# ------------------------------------------------------------------------------------- NPY


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, ">f8", np.bool_])
def test_npy_roundtrip_keeps_dtype_and_values(dtype):
    array = (RNG.random((3, 5, 7)) * 200).astype(dtype)
    decoded = decode_image(encode_npy(array), "application/x-npy")
    assert decoded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded, array)


def test_npy_fortran_order_and_octet_stream_sniffing():
    array = np.asfortranarray(RNG.random((6, 5)).astype(np.float32))
    buffer = io.BytesIO()
    np.save(buffer, array)
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), "application/octet-stream"), array)
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), None), array)


class _SideEffect:
    """Unpickling this writes a file: proof that a body was (wrongly) unpickled."""

    marker: Path

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_npy_with_pickled_objects_is_refused_and_never_unpickled(tmp_path):
    evil = _SideEffect()
    evil.marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    np.save(buffer, np.array([evil, 1], dtype=object), allow_pickle=True)
    with pytest.raises(RequestError, match="Python objects"):
        decode_image(buffer.getvalue(), "application/x-npy")
    assert not evil.marker.exists()


def test_npy_truncated_or_padded_bodies_are_refused():
    body = encode_npy(np.zeros((4, 4), np.float32))
    with pytest.raises(RequestError, match="truncated"):
        decode_image(body[:-10], "application/x-npy")
    with pytest.raises(RequestError, match="longer than its header"):
        decode_image(body + b"\0" * 8, "application/x-npy")
    with pytest.raises(RequestError, match="not a valid NPY"):
        decode_image(b"\x93NUMPY\x01\x00garbage", "application/x-npy")


def test_npy_header_claiming_a_huge_shape_is_refused_without_allocating():
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    with pytest.raises(RequestError, match=r"declares shape \(1000000, 1000000\)"):
        decode_image(header.getvalue() + b"\0" * 64, "application/x-npy")


def test_npy_of_strings_is_refused():
    with pytest.raises(RequestError, match="dtype <U3 is not supported"):
        decode_image(encode_npy_unchecked(np.array(["abc"])), "application/x-npy")


def encode_npy_unchecked(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_encode_npy_refuses_object_arrays():
    with pytest.raises(ValueError, match="dtype object"):
        encode_npy(np.array([{}, 1], dtype=object))


# ----------------------------------------------------------------------------------- DICOM


def test_dicom_8bit_stays_raw_pixels_and_is_sniffed():
    pixels = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    body = make_dicom(pixels)
    assert sniff_format(body) == "dicom"
    decoded = decode_image(body, None)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, pixels)


def test_dicom_rescale_and_window_map_to_unit_range():
    stored = RNG.integers(0, 4096, (12, 10)).astype(np.uint16)
    body = make_dicom(stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    hounsfield = stored.astype(np.float64) * 2 - 1024
    expected = np.clip((hounsfield - 39.5) / 399.0 + 0.5, 0, 1)
    decoded = decode_image(body, "application/dicom")
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, expected, atol=1e-6)


def test_dicom_without_window_uses_its_stored_range_and_monochrome1_is_inverted():
    stored = np.arange(100, dtype=np.uint16).reshape(10, 10) * 10
    decoded = decode_image(make_dicom(stored, bits_stored=12, photometric="MONOCHROME1"), "application/dicom")
    np.testing.assert_allclose(decoded, 1.0 - stored / 4095.0, atol=1e-6)


def test_dicom_without_preamble_decodes_when_declared():
    pixels = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    body = make_dicom(pixels, preamble=False)
    assert sniff_format(body) is None
    np.testing.assert_array_equal(decode_image(body, "application/dicom"), pixels)


def test_dicom_multiframe_is_a_volume_and_rgb_is_channel_first():
    frames = RNG.integers(0, 256, (3, 8, 9), dtype=np.uint8)
    volume = decode_image(make_dicom(frames, NumberOfFrames=3), "application/dicom")
    np.testing.assert_array_equal(volume, frames.transpose(1, 2, 0))
    rgb = RNG.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(make_dicom(rgb, photometric="RGB"), None), rgb.transpose(2, 0, 1))


def test_bad_dicom_bodies():
    with pytest.raises(RequestError, match="DICOM"):
        decode_image(b"\0" * 128 + b"DICM" + b"\x02\x00", "application/dicom")
    dataset_without_pixels = make_dicom(np.zeros((4, 4), np.uint8))
    index = dataset_without_pixels.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData
    with pytest.raises(RequestError, match="no PixelData"):
        decode_image(dataset_without_pixels[:index], "application/dicom")


# ------------------------------------------------------------------------------------ JSON


def test_json_image_and_instances():
    image = RNG.integers(0, 256, (4, 5)).tolist()
    decoded = decode_image(json.dumps({"image": image}).encode(), "application/json; charset=utf-8")
    assert decoded.dtype.kind == "i"
    np.testing.assert_array_equal(decoded, image)
    floats = RNG.random((2, 4, 5)).tolist()
    body = json.dumps({"instances": [floats[0], {"image": floats[1]}]}).encode()
    batch = decode_batch(body, "application/json")
    assert len(batch) == 2 and batch[0].dtype.kind == "f"
    np.testing.assert_allclose(batch[1], floats[1])
    single = json.dumps({"instances": [floats[0]]}).encode()
    np.testing.assert_allclose(decode_image(single, None), floats[0])  # format sniffed
    with pytest.raises(RequestError, match="holds 2 instances"):
        decode_image(body, None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"image": [[1, 2], [3]]}', "ragged"),
        (b'{"image": [["a", "b"]]}', "only numbers"),
        (b'{"image": 3}', "nested list"),
        (b'{"pixels": [[1]]}', '"image"'),
        (b'{"image": [[1, 2]', "not valid JSON"),
        (b'{"instances": 5}', "list of images"),
    ],
)
def test_bad_json_bodies(body, message):
    with pytest.raises(RequestError, match=message):
        decode_image(body, "application/json")


# ---------------------------------------------------------------------- content type / size


def test_unknown_body_and_content_types():
    with pytest.raises(RequestError, match="body is not a PNG, JPEG, NPY, DICOM or JSON image") as error:
        decode_image(b"hello world", "application/octet-stream")
    assert error.value.status == 400
    with pytest.raises(UnsupportedMediaType, match="image/gif") as error:
        decode_image(b"GIF89a....", "image/gif")
    assert error.value.status == 415
    # An unknown type with a recognisable body is decoded (clients mislabel bodies).
    np.testing.assert_array_equal(decode_image(encode_npy(np.ones((2, 2))), "text/x-weird"), np.ones((2, 2)))


def test_empty_and_oversized_bodies():
    with pytest.raises(RequestError, match="empty"):
        decode_image(b"", None)
    with pytest.raises(PayloadTooLarge, match="larger than the limit of 100") as error:
        decode_image(encode_npy(np.zeros(100)), None, max_bytes=100)
    assert error.value.status == 413


def test_decode_batch_needs_a_stack():
    stack = RNG.random((3, 1, 6, 6)).astype(np.float32)
    images = decode_batch(encode_npy(stack), "application/x-npy")
    assert len(images) == 3
    np.testing.assert_array_equal(images[2], stack[2])
    with pytest.raises(RequestError, match=r"\(N, H, W\)"):
        decode_batch(encode_npy(np.zeros((6, 6))), None)
    with pytest.raises(UnsupportedMediaType, match="got a PNG body"):
        decode_batch(png_bytes(np.zeros((6, 6), np.uint8)), None)


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_scales_raw_pixels_and_normalises_per_channel():
    meta = {
        "in_channels": 3,
        "spatial_dims": 2,
        "image_size": [4, 5],
        "scale": 0.01,
        "mean": [0.1, 0.2, 0.3],
        "std": [1.0, 2.0, 4.0],
    }
    image = RNG.integers(0, 100, (3, 4, 5)).astype(np.int32)
    result = preprocess(image, meta)
    assert result.dtype == np.float32 and result.shape == (3, 4, 5)
    for c, (mean, std) in enumerate(zip(meta["mean"], meta["std"], strict=True)):
        np.testing.assert_allclose(result[c], (image[c] * 0.01 - mean) / std, rtol=1e-6, atol=1e-6)


def test_preprocess_takes_floats_as_unit_range_and_repeats_gray_channels():
    meta = {**META_2D, "in_channels": 3, "image_size": [6, 6]}
    image = RNG.random((6, 6)).astype(np.float64)
    result = preprocess(image, meta)
    assert result.shape == (3, 6, 6)
    for c in range(3):
        np.testing.assert_allclose(result[c], (image - 0.5) / 0.5, atol=1e-6)


def test_preprocess_resizes_like_torch_bilinear_antialiased_and_trilinear():
    image = RNG.random((1, 20, 13)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(image)[None], size=(28, 28), mode="bilinear", align_corners=False
    )[0].numpy()
    np.testing.assert_allclose(preprocess(image[0], META_2D), (expected - 0.5) / 0.5, atol=1e-5)

    large = RNG.random((1, 90, 61)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(large)[None], size=(28, 28), mode="bilinear", align_corners=False, antialias=True
    )[0].numpy()
    np.testing.assert_allclose(preprocess(large[0], META_2D), (expected - 0.5) / 0.5, atol=1e-5)

    volume = RNG.random((2, 3, 7, 5)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(volume)[None], size=(4, 8, 6), mode="trilinear", align_corners=False
    )[0].numpy()
    np.testing.assert_allclose(resize(volume, (4, 8, 6)), expected, atol=1e-5)


def test_preprocess_volume_for_a_3d_model():
    meta = {"in_channels": 1, "spatial_dims": 3, "image_size": [8, 8, 4], "scale": 1 / 255, "mean": [0.0], "std": [1.0]}
    volume = RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    result = preprocess(volume, meta)
    assert result.shape == (1, 8, 8, 4)
    np.testing.assert_allclose(result[0], volume / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((2, 1, 28, 28)), r"image has 4 dims .* expected 2 \(H, W\) or 3 \(C, H, W\)"),
        (np.zeros(28), "image has 1 dims"),
        (np.zeros((5, 28, 28)), "image has 5 channels, the model expects 1"),
        (np.zeros((0, 28)), "empty"),
        (np.full((28, 28), np.nan), "NaN"),
    ],
)
def test_preprocess_rejects_bad_images(image, message):
    with pytest.raises(RequestError, match=message):
        preprocess(image, META_2D)


def test_preprocess_validates_its_metadata():
    with pytest.raises(ValueError, match="mean"):
        preprocess(np.zeros((28, 28)), {**META_2D, "mean": [0.1, 0.2]})


@pytest.mark.parametrize(
    ("stack", "meta"),
    [
        (RNG.integers(0, 256, (9, 28, 28), dtype=np.uint8), META_2D),
        (RNG.integers(0, 256, (5, 3, 40, 33), dtype=np.uint8), META_2D),  # RGB to gray, resized
        (RNG.integers(0, 256, (4, 4, 20, 17), dtype=np.uint8), {**META_2D, "in_channels": 3, "mean": [0.1, 0.2, 0.3]}),
        (RNG.random((6, 30, 26)), {**META_2D, "in_channels": 3}),  # float, gray repeated
        (
            RNG.integers(0, 65535, (3, 12, 10, 9), dtype=np.uint16),
            {"in_channels": 1, "spatial_dims": 3, "image_size": [8, 8, 6], "scale": 1 / 65535},
        ),
    ],
)
def test_preprocess_batch_equals_one_image_at_a_time(stack, meta):
    """The vectorised batch path gives, bit for bit, what preprocessing each image gives."""
    one_by_one = np.stack([preprocess(image, meta) for image in stack])
    np.testing.assert_array_equal(preprocess_batch(stack, meta), one_by_one)
    np.testing.assert_array_equal(preprocess_batch(list(stack), meta), one_by_one)  # JSON instances
    assert preprocess_batch(stack, meta).dtype == np.float32


def test_preprocess_batch_errors_name_the_problem():
    with pytest.raises(RequestError, match="image has 5 channels"):
        preprocess_batch(np.zeros((2, 5, 28, 28), np.uint8), META_2D)
    with pytest.raises(RequestError, match="NaN or infinite"):
        preprocess_batch(np.full((2, 28, 28), np.nan), META_2D)
    with pytest.raises(RequestError, match="no images"):
        preprocess_batch([], META_2D)
    mixed = [np.zeros((28, 28), np.uint8), np.zeros((30, 30), np.uint8)]  # shapes differ: one at a time
    assert preprocess_batch(mixed, META_2D).shape == (2, 1, 28, 28)


def test_npy_headers_are_parsed_once_and_checked():
    body = encode_npy(np.zeros((2, 28, 28), np.uint8))
    assert read_npy_header(body) == ((2, 28, 28), False, np.dtype(np.uint8), len(body) - 2 * 28 * 28)
    assert read_npy_header(body) is read_npy_header(bytes(body))  # the same parsed header, from the cache
    with pytest.raises(ValueError, match="truncated"):
        read_npy_header(body[:40])
    with pytest.raises(ValueError, match="version 9"):
        read_npy_header(body[:6] + b"\x09\x00" + body[8:])
