"""The shared preprocessing contract (medkd.data.preprocess): decoding, 16-bit scaling, DICOM
LUTs, channel adaptation, resize, rescale/standardise, and bad files named in errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medkd.data import DataValidationError, FolderDataSpec, load_dataset
from medkd.data.preprocess import (
    ImageDecodeError,
    ImageShapeError,
    ImageTooLarge,
    adapt_channels,
    decode_dicom,
    decode_pil,
    model_input,
    rescale_intensities,
    resize,
    scale_16bit,
    scaled_image,
    standardise,
)

RNG = np.random.default_rng(3)


def png(array: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def dicom(
    pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 8, pixel_data: bool = True, **elements
) -> bytes:
    """A small valid DICOM file (explicit VR little endian) holding ``pixels``."""
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
    if not pixel_data:
        del dataset.PixelData
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_dataset(body: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(body))


# ------------------------------------------------------------------------------ PNG / JPEG


def test_8bit_png_stays_raw_pixels_and_16bit_png_is_a_fraction_of_65535():
    gray = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
    decoded = decode_pil(png(gray), expected_format="PNG")
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, gray)

    deep = RNG.integers(0, 65536, (9, 11)).astype(np.uint16)
    decoded = decode_pil(png(deep))
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, deep / 65535.0, atol=1e-7)
    # A fixed mapping, not a per-image stretch: a dark 16-bit image stays dark.
    dark = np.full((4, 4), 1000, np.uint16)
    dark[0, 0] = 2000
    assert float(decode_pil(png(dark)).max()) == pytest.approx(2000 / 65535, abs=1e-7)
    np.testing.assert_allclose(scale_16bit(np.array([0, 32768, 65535], np.uint16)), [0, 32768 / 65535, 1], atol=1e-7)


def test_colour_images_are_channel_first_and_jpeg_decodes():
    rgba = RNG.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode_pil(png(rgba)), rgba[..., :3].transpose(2, 0, 1))
    jpeg = decode_pil(png(np.full((8, 8, 3), 100, np.uint8), "JPEG"), expected_format="JPEG")
    assert jpeg.shape == (3, 8, 8) and abs(float(jpeg.mean()) - 100) < 2


def test_bad_pil_bytes_name_their_source():
    whole = png(RNG.integers(0, 256, (64, 64), dtype=np.uint8))
    with pytest.raises(ImageDecodeError, match=r"^scan\.png is a PNG image that cannot be decoded \(truncated"):
        decode_pil(whole[: len(whole) // 2], source="scan.png", expected_format="PNG")
    with pytest.raises(ImageDecodeError, match=r"^notes\.png is not a valid PNG image"):
        decode_pil(b"hello", source="notes.png", expected_format="PNG")
    with pytest.raises(ImageDecodeError, match=r"^body is a JPEG image, not PNG"):
        decode_pil(png(np.zeros((4, 4, 3), np.uint8), "JPEG"), source="body", expected_format="PNG")
    with pytest.raises(ImageTooLarge, match=r"64x64x1 values, more than the limit of 100"):
        decode_pil(whole, max_pixels=100)


# ------------------------------------------------------------------------------------ DICOM


def test_dicom_8bit_without_luts_equals_the_png_of_its_pixels():
    pixels = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    decoded = decode_dicom(dicom(pixels))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, decode_pil(png(pixels)))
    inverted = decode_dicom(dicom(pixels, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted, 255 - pixels)


def test_dicom_without_window_is_a_fraction_of_its_stored_range():
    stored = RNG.integers(0, 4096, (8, 8)).astype(np.uint16)
    np.testing.assert_allclose(decode_dicom(dicom(stored, bits_stored=12)), stored / 4095.0, atol=1e-6)
    # Rescale slope/intercept (the modality LUT) moves the range with the values: same fractions.
    body = dicom(stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024)
    np.testing.assert_allclose(decode_dicom(body), stored / 4095.0, atol=1e-6)
    # A negative slope flips the range: the brightest stored value becomes the darkest.
    body = dicom(stored, bits_stored=12, RescaleSlope=-1, RescaleIntercept=0)
    np.testing.assert_allclose(decode_dicom(body), 1.0 - stored / 4095.0, atol=1e-6)


def test_dicom_window_is_applied_by_pydicom_and_mapped_to_unit_range():
    stored = RNG.integers(0, 4096, (12, 10)).astype(np.uint16)
    body = dicom(stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    hounsfield = stored * 2.0 - 1024
    expected = np.clip((hounsfield - 39.5) / 399.0 + 0.5, 0.0, 1.0)  # DICOM PS3.3 C.11.2.1.2 LINEAR
    decoded = decode_dicom(body)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, expected, atol=1e-6)
    assert 0.0 < decoded.mean() < 1.0 and decoded.min() == 0.0 and decoded.max() == 1.0

    dataset = read_dataset(body)
    windowed = apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset)
    low, high = -1024.0, 4095 * 2.0 - 1024  # the window's output range for 12 stored bits
    np.testing.assert_allclose(decoded, (windowed - low) / (high - low), atol=1e-6)

    inverted = dicom(stored, bits_stored=12, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096)
    flipped = decode_dicom(inverted)
    np.testing.assert_allclose(flipped, 1.0 - np.clip((stored - 2047.5) / 4095.0 + 0.5, 0, 1), atol=1e-6)


def test_dicom_voi_lut_sequence_is_applied_over_its_bit_depth():
    stored = RNG.integers(0, 256, (6, 6)).astype(np.uint16)
    lut = Dataset()
    lut.add_new(0x00283002, "US", [256, 0, 12])  # LUT Descriptor: entries, first mapped value, bits
    lut.add_new(0x00283006, "US", [min(4095, v * 20) for v in range(256)])  # LUT Data
    body = dicom(stored, bits_stored=12, VOILUTSequence=Sequence([lut]))
    expected = np.minimum(4095, stored * 20) / 4095.0
    np.testing.assert_allclose(decode_dicom(body), expected, atol=1e-6)


def test_bad_dicom_files_name_their_source():
    with pytest.raises(ImageDecodeError, match=r"^ct/1\.dcm is a DICOM file with no PixelData element"):
        decode_dicom(dicom(np.zeros((4, 4), np.uint8), pixel_data=False), source="ct/1.dcm")
    whole = dicom(np.zeros((64, 64), np.uint16), bits_stored=12)
    with pytest.raises(ImageDecodeError, match=r"^ct/2\.dcm has DICOM pixel data that cannot be decoded .*less than"):
        decode_dicom(whole[: len(whole) // 2], source="ct/2.dcm")
    with pytest.raises(ImageDecodeError, match=r"^cine\.dcm is a DICOM file of 3 frames; expected one 2D image"):
        decode_dicom(dicom(np.zeros((3, 4, 4), np.uint8), NumberOfFrames=3), source="cine.dcm", allow_volumes=False)
    with pytest.raises(ImageDecodeError, match=r"has DICOM LUTs that cannot be applied: .*Window Width"):
        decode_dicom(dicom(np.zeros((4, 4), np.uint16), bits_stored=12, WindowCenter=40, WindowWidth=0.5))
    with pytest.raises(ImageTooLarge, match="more than the limit of 10 values"):
        decode_dicom(dicom(np.zeros((4, 4), np.uint8)), max_pixels=10)
    with pytest.raises(ImageDecodeError, match=r"^us\.dcm is a PALETTE COLOR DICOM image, which is not supported"):
        decode_dicom(dicom(np.zeros((4, 4), np.uint8), photometric="PALETTE COLOR"), source="us.dcm")


# ------------------------------------------------------------------------------- channels


def test_rgb_to_gray_is_pillows_luma_and_gray_to_rgb_repeats():
    rgb = RNG.integers(0, 256, (3, 9, 8), dtype=np.uint8)
    pillow_gray = np.asarray(Image.fromarray(rgb.transpose(1, 2, 0)).convert("L"))
    np.testing.assert_array_equal(adapt_channels(rgb, 1)[0], pillow_gray)
    rgba = np.concatenate([rgb, np.full((1, 9, 8), 7, np.uint8)])
    np.testing.assert_array_equal(adapt_channels(rgba, 3), rgb)
    gray = RNG.random((1, 5, 5)).astype(np.float32)
    repeated = adapt_channels(gray, 3)
    assert repeated.shape == (3, 5, 5)
    assert all(np.array_equal(repeated[c], gray[0]) for c in range(3))
    unit_rgb = rgb.astype(np.float32) / 255
    np.testing.assert_allclose(adapt_channels(unit_rgb, 1)[0], pillow_gray / 255, atol=0.5 / 255)
    with pytest.raises(ImageShapeError, match="image has 2 channels, the model expects 3"):
        adapt_channels(np.zeros((2, 4, 4)), 3)


# ----------------------------------------------------------------------------------- resize


def test_resize_is_linear_and_antialiased_like_torch_and_pillow():
    image = RNG.random((2, 97, 64)).astype(np.float32)
    shrunk = resize(image, (28, 20))
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(image)[None], size=(28, 20), mode="bilinear", align_corners=False, antialias=True
    )[0].numpy()
    np.testing.assert_allclose(shrunk, expected, atol=2e-6)
    pillow = np.asarray(Image.fromarray(image[1]).resize((20, 28), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(shrunk[1], pillow, atol=1e-7)  # Pillow's 2D resize, to float rounding
    # Antialiasing: a one-pixel line survives a 4x reduction (plain bilinear can miss it).
    line = np.zeros((1, 64, 64), np.float32)
    line[0, :, 33] = 1.0
    assert resize(line, (16, 16))[0].max() > 0.1

    small = RNG.random((1, 7, 9)).astype(np.float32)
    enlarged = torch.nn.functional.interpolate(
        torch.from_numpy(small)[None], size=(16, 21), mode="bilinear", align_corners=False
    )[0].numpy()
    np.testing.assert_allclose(resize(small, (16, 21)), enlarged, atol=2e-6)


def test_resize_of_a_volume_uses_the_same_filter_along_depth():
    volume = RNG.random((1, 12, 10, 30)).astype(np.float32)
    resized = resize(volume, (6, 10, 8))
    assert resized.shape == (1, 6, 10, 8) and resized.dtype == np.float32
    # Separable: the same 1-D filter along height and along depth.
    along_height = resize(volume[:, :, 0, :], (6, 8))
    np.testing.assert_allclose(resized[:, :, 0, :], along_height, atol=2e-6)
    constant = np.full((1, 5, 6, 7), 0.25, np.float32)
    np.testing.assert_allclose(resize(constant, (3, 9, 2)), 0.25, atol=1e-7)


def test_resize_to_the_same_size_is_an_exact_float_copy():
    image = RNG.integers(0, 256, (1, 6, 6), dtype=np.uint8)
    same = resize(image, (6, 6))
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, image)


# ---------------------------------------------------------------------- rescale / standardise


def test_rescale_follows_input_meta():
    pixels = np.array([0, 51, 255], np.uint8)
    np.testing.assert_array_equal(rescale_intensities(pixels), pixels.astype(np.float32) * np.float32(1 / 255))
    unit = np.array([0.0, 0.5, 1.0], np.float32)
    np.testing.assert_array_equal(rescale_intensities(unit), unit)  # floats are already in [0, 1]
    resized_from_pixels = np.array([0.0, 127.5], np.float32)
    np.testing.assert_allclose(rescale_intensities(resized_from_pixels, integer_pixels=True), [0.0, 0.5])
    hounsfield = np.array([-3000.0, -1000.0, 0.0, 2000.0], np.float32)
    out = rescale_intensities(hounsfield, scale=1 / 2000, offset=-1000, clip=(-1000, 1000))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0])


def test_standardise_per_channel_and_refuses_a_channel_mismatch():
    images = np.ones((2, 3, 2, 2), np.float32)
    out = standardise(images, [0.0, 0.5, 1.0], [1.0, 0.5, 2.0], channel_axis=1)
    np.testing.assert_allclose(out[:, :, 0, 0], [[1.0, 1.0, 0.0]] * 2)
    with pytest.raises(ValueError, match="3 channel"):
        standardise(np.ones((3, 2), np.float32), [0.0], [1.0])


def test_model_input_runs_every_step_in_order():
    rgb = RNG.integers(0, 256, (40, 30, 3), dtype=np.uint8).transpose(2, 0, 1)
    result = model_input(rgb, in_channels=1, spatial_dims=2, image_size=(20, 15), mean=[0.4], std=[0.2])
    gray = adapt_channels(rgb, 1)
    expected = (resize(gray, (20, 15)) * np.float32(1 / 255) - np.float32(0.4)) / np.float32(0.2)
    np.testing.assert_array_equal(result, expected)
    scaled = scaled_image(rgb, in_channels=1, spatial_dims=2, image_size=(20, 15))
    np.testing.assert_array_equal(scaled, resize(gray, (20, 15)) * np.float32(1 / 255))
    for bad, message in [
        (np.zeros((2, 1, 8, 8)), r"image has 4 dims"),
        (np.zeros((0, 8)), "image is empty"),
        (np.full((8, 8), np.inf), "NaN or infinite"),
        (np.array([["a"]]), "not numeric"),
    ]:
        with pytest.raises(ImageShapeError, match=message):
            model_input(bad, in_channels=1, spatial_dims=2, image_size=(8, 8))


# ------------------------------------------------------------ the folder adapter's bad files


def _two_class_folder(root: Path) -> None:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(4):
            Image.fromarray(RNG.integers(0, 256, (12, 12), dtype=np.uint8)).save(root / name / f"{index}.png")


def test_folder_names_a_truncated_png(tmp_path):
    _two_class_folder(tmp_path)
    victim = tmp_path / "b" / "2.png"
    whole = png(RNG.integers(0, 256, (64, 64), dtype=np.uint8))
    victim.write_bytes(whole[: len(whole) // 2])
    message = r"b/2\.png: unreadable image: file is an image that cannot be decoded \(truncated"
    with pytest.raises(DataValidationError, match=message):
        load_dataset(FolderDataSpec(path=tmp_path, image_size=8))


def test_folder_names_a_dicom_without_pixel_data(tmp_path):
    _two_class_folder(tmp_path)
    (tmp_path / "a" / "empty.dcm").write_bytes(dicom(np.zeros((4, 4), np.uint8), pixel_data=False))
    with pytest.raises(DataValidationError, match=r"a/empty\.dcm: unreadable image: .*no PixelData element"):
        load_dataset(FolderDataSpec(path=tmp_path, image_size=8))
