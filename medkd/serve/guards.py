"""Limits checked before a request body is decoded, and the optional bearer-token check.

The decoders in :mod:`medkd.serve.codecs` turn bytes into pixels; the checks here read only
headers (NPY header, PNG/JPEG header through Pillow's lazy open, DICOM tags before the pixel
data, bracket depth and value count of JSON) and refuse a request whose decoded and
preprocessed images would take more than ``serve.max_decoded_bytes`` or that holds more than
``serve.max_images_per_request`` images — before anything of that size is allocated. A 2 MB NPY
of 2,000,000 1x1 images is refused from its 128-byte header.

Examples:
    >>> limits = Limits(max_images=256, max_decoded_bytes=64 << 20)
    >>> meta = InputMeta(in_channels=1, spatial_dims=2, image_size=[28, 28])
    >>> check_before_decoding(encode_npy(np.zeros((2_000_000, 1, 1), np.uint8)), "application/x-npy",
    ...                       batch=True, input_meta=meta, limits=limits)
    Traceback (most recent call last):
    medkd.serve.codecs.PayloadTooLarge: batch holds 2000000 images, more than max_images_per_request=256
"""

from __future__ import annotations

import hmac
import io
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
from pydantic import SecretStr

from medkd.registry.metadata import InputMeta
from medkd.serve.codecs import (
    CONTENT_TYPES,
    PayloadTooLarge,
    RequestError,
    encode_npy,  # noqa: F401 - used by the module's example
    media_type,
    read_npy_header,
    sniff_format,
)

MAX_JSON_DEPTH = 8
"""Deepest JSON nesting accepted: ``{"instances": [{"image": [C][H][W][D]}]}`` needs 7."""


class Unauthorized(RequestError):
    status = 401


class UnknownModel(RequestError):
    status = 404


@dataclass(frozen=True)
class Limits:
    """Per-request limits (from ``ServeConfig``)."""

    max_images: int
    max_decoded_bytes: int


def _output_bytes(input_meta: InputMeta) -> int:
    return 4 * input_meta.in_channels * math.prod(input_meta.image_size)


def check_image_count(count: int, input_meta: InputMeta, limits: Limits) -> None:
    """Refuse more than ``max_images`` images, or preprocessed inputs above ``max_decoded_bytes``.

    Raises:
        PayloadTooLarge: with the limit's name and value in the message.
    """
    if count > limits.max_images:
        raise PayloadTooLarge(f"batch holds {count} images, more than max_images_per_request={limits.max_images}")
    needed = count * _output_bytes(input_meta)
    if needed > limits.max_decoded_bytes:
        raise PayloadTooLarge(
            f"{count} preprocessed images take {needed} bytes, more than max_decoded_bytes={limits.max_decoded_bytes}"
        )


def _check_decoded(values: int, bytes_per_value: int, what: str, limits: Limits) -> None:
    needed = values * bytes_per_value
    if needed > limits.max_decoded_bytes:
        raise PayloadTooLarge(
            f"{what} decodes to {needed} bytes, more than max_decoded_bytes={limits.max_decoded_bytes}"
        )


def check_before_decoding(
    body: bytes, content_type: str | None, *, batch: bool, input_meta: InputMeta, limits: Limits
) -> None:
    """Check what ``body`` would decode to from its headers alone.

    Bodies whose headers cannot be read are let through: the decoder then answers with its own
    400 that names the problem.

    Args:
        body: raw request body.
        content_type: the request's Content-Type (the format is sniffed when it is generic).
        batch: ``/predict/batch`` (a leading image axis) rather than ``/predict``.
        input_meta: the model's input section (sizes of the preprocessed images).
        limits: the request limits.

    Raises:
        PayloadTooLarge: too many images or too many decoded bytes (HTTP 413).
        RequestError: JSON nested deeper than :data:`MAX_JSON_DEPTH` (HTTP 400).
    """
    fmt = CONTENT_TYPES.get(media_type(content_type)) or sniff_format(body)
    if fmt == "npy":
        _check_npy(body, batch=batch, input_meta=input_meta, limits=limits)
    elif fmt in ("png", "jpeg"):
        _check_pil(body, limits)
    elif fmt == "dicom":
        _check_dicom(body, limits)
    elif fmt == "json":
        _check_json(body, limits)
    if not batch:
        check_image_count(1, input_meta, limits)


def _check_npy(body: bytes, *, batch: bool, input_meta: InputMeta, limits: Limits) -> None:
    try:
        shape, _, dtype, _ = read_npy_header(body)
    except (ValueError, KeyError, SyntaxError, TypeError, EOFError, OverflowError):
        return
    if batch and len(shape) >= 1:
        check_image_count(int(shape[0]), input_meta, limits)
    values = math.prod(shape)
    _check_decoded(values, max(dtype.itemsize, 4) * 2, f"NPY array of shape {tuple(shape)}", limits)


def _check_pil(body: bytes, limits: Limits) -> None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body)) as image:  # reads the header only
                width, height = image.size
                bands = len(image.getbands())
    except Image.DecompressionBombError:
        raise PayloadTooLarge(
            f"image is larger than Pillow's decompression-bomb limit; max_decoded_bytes={limits.max_decoded_bytes}"
        ) from None
    except Exception:  # noqa: BLE001 - unreadable header: the decoder answers 400 with details
        return
    # Pillow holds 4 bytes a pixel, then pixels become float32 per band.
    _check_decoded(width * height, 4 + 4 * bands, f"{width}x{height} image with {bands} band(s)", limits)


def _check_dicom(body: bytes, limits: Limits) -> None:
    import pydicom

    try:
        dataset = pydicom.dcmread(io.BytesIO(body), force=True, stop_before_pixels=True)
        rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    except Exception:  # noqa: BLE001 - unreadable header: the decoder answers 400 with details
        return
    values = max(rows, 0) * max(columns, 0) * max(frames, 1) * max(samples, 1)
    # pixel_array, float64 modality/VOI values, then float32.
    _check_decoded(values, 2 + 8 + 4, f"DICOM image {rows}x{columns}x{frames} frames x{samples} samples", limits)


def _check_json(body: bytes, limits: Limits) -> None:
    data = np.frombuffer(body, dtype=np.uint8)
    opening = (data == ord("[")) | (data == ord("{"))
    closing = (data == ord("]")) | (data == ord("}"))
    steps = opening.astype(np.int8)[opening | closing] - closing.astype(np.int8)[opening | closing]
    depth = int(np.cumsum(steps, dtype=np.int64).max(initial=0))
    if depth > MAX_JSON_DEPTH:
        raise RequestError(f"JSON is nested {depth} levels deep, more than the limit of {MAX_JSON_DEPTH}")
    # Every number becomes a Python object (~32 bytes with its list slot) before it is an array.
    _check_decoded(body.count(b",") + 1, 32, "JSON body", limits)


def bearer_token(env_name: str | None) -> SecretStr | None:
    """The token named by ``serve.auth_token_env``, read from the environment (None: no auth).

    Raises:
        ValueError: the variable is named but not set or empty (refusing to serve open).

    Examples:
        >>> bearer_token(None) is None
        True
    """
    if env_name is None:
        return None
    value = os.environ.get(env_name, "")
    if not value.strip():
        raise ValueError(
            f"serve.auth_token_env: environment variable {env_name} is not set or empty; "
            "set it to the bearer token, or remove auth_token_env to serve without authentication"
        )
    return SecretStr(value.strip())


def authorized(authorization: str | None, token: SecretStr) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (constant-time comparison).

    Examples:
        >>> authorized("Bearer s3cret", SecretStr("s3cret")), authorized(None, SecretStr("s3cret"))
        (True, False)
    """
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), token.get_secret_value().encode())
