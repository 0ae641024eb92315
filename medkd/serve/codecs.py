"""Request bodies to model inputs: decoding (PNG, JPEG, NPY, DICOM, JSON) and preprocessing.

Decoding and preprocessing are two steps:

1. :func:`decode_image` turns a body into one array **in its native dtype**, channel first:
   ``(H, W)`` / ``(C, H, W)`` for 2D images, ``(H, W, D)`` / ``(C, H, W, D)`` for volumes.
   Integer arrays are raw pixels; float arrays are taken to be in [0, 1] already.
2. :func:`preprocess` applies the training convention from the model's ``metadata.json``
   (``input``): channels are adapted (RGB to gray, gray repeated to C), the image is resized
   (linear, antialiased) to ``image_size``, integers are multiplied by ``scale``, and every
   channel is normalised ``(x - mean) / std``. The result is float32 ``(C, *image_size)``.

PNG/JPEG/DICOM decoding and all of step 2 are :mod:`medkd.data.preprocess`'s functions, the
ones the training data adapters call, so a file gives the same model input in training and
serving (16-bit images / 65535, DICOM through its modality and VOI LUTs).

Everything a client can get wrong raises :class:`RequestError` (HTTP 400), or one of its
subclasses :class:`UnsupportedMediaType` (415) and :class:`PayloadTooLarge` (413), with a
message that names the problem. Nothing is ever unpickled: NPY bodies are parsed from their
header, checked against the body's length, and refused when they hold Python objects.

Examples:
    >>> import io, numpy as np
    >>> body = encode_npy(np.zeros((28, 28), dtype=np.uint8))
    >>> image = decode_image(body, "application/x-npy")
    >>> meta = {"in_channels": 1, "spatial_dims": 2, "image_size": [32, 32],
    ...         "scale": 1 / 255, "mean": [0.5], "std": [0.5]}
    >>> preprocess(image, meta).shape
    (1, 32, 32)
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from medkd.data.preprocess import (
    MODEL_INPUT_FIELDS,
    ImageError,
    ImageTooLarge,
    decode_dicom,
    decode_pil,
    model_input,
    model_inputs,
)
from medkd.registry.metadata import InputMeta
from medkd.spec.serve import DEFAULT_MAX_BODY_BYTES

MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Largest decoded image (pixels x channels x frames) accepted, against decompression bombs."""

_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_MAGIC_OFFSET = 128
_NUMERIC_KINDS = "biuf"


class RequestError(ValueError):
    """A request that cannot be served as sent; ``status`` is the HTTP status to answer with."""

    status: int = 400

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


class UnsupportedMediaType(RequestError):
    status = 415


class PayloadTooLarge(RequestError):
    status = 413


# --------------------------------------------------------------------------------------------
# Formats: a registry of decoders, the content types that name them, and their magic bytes.
# --------------------------------------------------------------------------------------------

_DECODERS: dict[str, Callable[[bytes], np.ndarray]] = {}
"""Single-image decoders by format name (JSON, which may hold several, is decoded apart)."""
_SNIFFERS: dict[str, Callable[[bytes], bool]] = {}
_FORMAT_NAMES = {"png": "PNG", "jpeg": "JPEG", "npy": "NPY", "dicom": "DICOM", "json": "JSON"}

CONTENT_TYPES: dict[str, str] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "application/x-npy": "npy",
    "application/npy": "npy",
    "application/dicom": "dicom",
    "application/json": "json",
}
"""Content types decoded as the format they name (the body must then be that format)."""

GENERIC_CONTENT_TYPES = frozenset(
    {
        "",
        "application/octet-stream",
        "application/x-www-form-urlencoded",  # what `curl --data-binary` sends by default
        "*/*",
        "text/plain",
    }
)
"""Content types that say nothing about the body: its format is sniffed from magic bytes."""


def _register(name: str, sniff: Callable[[bytes], bool]):
    def decorator(decode: Callable[[bytes], np.ndarray]):
        _DECODERS[name] = decode
        _SNIFFERS[name] = sniff
        return decode

    return decorator


def media_type(content_type: str | None) -> str:
    """``'Image/PNG; charset=x'`` -> ``'image/png'``; ``None`` -> ``''``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def sniff_format(body: bytes) -> str | None:
    """The format whose magic bytes start ``body`` (``png``, ``jpeg``, ``npy``, ``dicom``,
    ``json``), or ``None``."""
    for name, sniff in _SNIFFERS.items():
        if sniff(body):
            return name
    return None


def _supported_list() -> str:
    names = [_FORMAT_NAMES[name] for name in _SNIFFERS]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _resolve_format(body: bytes, content_type: str | None, max_bytes: int) -> str:
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body is {len(body)} bytes, larger than the limit of {max_bytes}")
    if not body:
        raise RequestError("request body is empty; send one image")
    media = media_type(content_type)
    if media in CONTENT_TYPES:
        return CONTENT_TYPES[media]
    sniffed = sniff_format(body)
    if sniffed is not None:
        return sniffed
    if media in GENERIC_CONTENT_TYPES:
        raise RequestError(f"body is not a {_supported_list()} image (Content-Type: {media or 'none'})")
    raise UnsupportedMediaType(
        f"unsupported Content-Type {media!r}: send one of {', '.join(sorted(CONTENT_TYPES))} "
        "(or application/octet-stream to have the format detected)"
    )


def decode_image(body: bytes, content_type: str | None, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> np.ndarray:
    """Decode one image from a request body.

    Args:
        body: the raw request body.
        content_type: the request's Content-Type; when missing or generic
            (``application/octet-stream``) the format is detected from magic bytes.
        max_bytes: bodies larger than this are refused with HTTP 413.

    Returns:
        The image in its native dtype (integers: raw pixels; floats: [0, 1]), channel first:
        ``(H, W)``, ``(C, H, W)``, ``(H, W, D)`` or ``(C, H, W, D)``.

    Raises:
        RequestError: the body is empty, malformed, or not an image (HTTP 400).
        UnsupportedMediaType: the Content-Type names a format that is not supported (415).
        PayloadTooLarge: the body or the decoded image is too large (413).
    """
    fmt = _resolve_format(body, content_type, max_bytes)
    if fmt == "json":
        images = _decode_json(body)
        if len(images) != 1:
            raise RequestError(
                f"JSON body holds {len(images)} instances; POST /predict takes one image "
                "(use /predict/batch for several)"
            )
        return images[0]
    return _DECODERS[fmt](body)


def decode_batch(
    body: bytes, content_type: str | None, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> np.ndarray | list[np.ndarray]:
    """Decode several images: an NPY array of shape ``(N, ...)`` or JSON ``{"instances": [...]}``.

    Returns:
        The N images, each as :func:`decode_image` would return it: the NPY array itself (its
        first axis runs over the images), or a list of the JSON instances.
    """
    fmt = _resolve_format(body, content_type, max_bytes)
    if fmt == "json":
        images = _decode_json(body)
    elif fmt == "npy":
        stack = _decode_npy(body)
        if stack.ndim < 3:
            raise RequestError(
                f"batch array has shape {tuple(stack.shape)}; expected (N, H, W), (N, C, H, W) "
                "or (N, C, H, W, D) with the batch first"
            )
        images = stack
    else:
        raise UnsupportedMediaType(
            f'a batch must be an NPY array of shape (N, ...) or JSON {{"instances": [...]}}, '
            f"got a {_FORMAT_NAMES[fmt]} body"
        )
    if len(images) == 0:
        raise RequestError("batch holds no images")
    return images


def encode_npy(array: np.ndarray) -> bytes:
    """NPY bytes of a numeric array (never pickled)."""
    array = np.asarray(array)
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"array: only bool, integer and float arrays are encoded, got dtype {array.dtype}")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# ------------------------------------------------------------------------------- PNG / JPEG


def _decode_pil(body: bytes, expected_format: str) -> np.ndarray:
    with _as_request_errors():
        return decode_pil(body, source="body", expected_format=expected_format, max_pixels=MAX_IMAGE_PIXELS)


@contextmanager
def _as_request_errors() -> Iterator[None]:
    """The shared preprocessing's errors as HTTP errors: too large 413, anything else 400."""
    try:
        yield
    except ImageTooLarge as error:
        raise PayloadTooLarge(str(error)) from None
    except ImageError as error:
        raise RequestError(str(error)) from None


@_register("png", lambda body: body.startswith(_PNG_MAGIC))
def _decode_png(body: bytes) -> np.ndarray:
    return _decode_pil(body, "PNG")


@_register("jpeg", lambda body: body.startswith(_JPEG_MAGIC))
def _decode_jpeg(body: bytes) -> np.ndarray:
    return _decode_pil(body, "JPEG")


# ---------------------------------------------------------------------------------- NPY


def read_npy_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and data offset of an NPY body, from its header alone.

    Headers are parsed by numpy (``ast.literal_eval`` of a dict literal, which costs more than
    decoding a small image); a service sees the same few headers again and again, so parsed
    headers are kept by their bytes (:func:`_parse_npy_header`).

    Raises:
        ValueError: not an NPY header (the message says why).

    Examples:
        >>> read_npy_header(encode_npy(np.zeros((2, 3), np.uint8)))[:3]
        ((2, 3), False, dtype('uint8'))
    """
    if not body.startswith(_NPY_MAGIC) or len(body) < 10:
        raise ValueError("no NPY magic string")
    major = body[6]
    if major == 1:
        end = 10 + int.from_bytes(body[8:10], "little")
    elif major in (2, 3):
        end = 12 + int.from_bytes(body[8:12], "little") if len(body) >= 12 else 0
    else:
        raise ValueError(f"NPY format version {major}.{body[7]} is not supported")
    if end > min(len(body), _NPY_HEADER_LIMIT):
        raise ValueError("NPY header is truncated or too long")
    return _parse_npy_header(body[:end])


_NPY_HEADER_LIMIT = 64 * 1024
"""Longest NPY header read (numpy's own reader refuses more than 10,000 bytes by default)."""


@functools.lru_cache(maxsize=256)
def _parse_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"NPY format version {version[0]}.{version[1]} is not supported")
    if stream.tell() != len(header):
        raise ValueError("NPY header length does not match its contents")
    return tuple(shape), bool(fortran_order), dtype, len(header)


@_register("npy", lambda body: body.startswith(_NPY_MAGIC))
def _decode_npy(body: bytes) -> np.ndarray:
    # Equivalent to np.load(..., allow_pickle=False), but the declared shape is checked against
    # the body's length before anything is allocated, so a 100-byte body cannot claim 1 TB.
    try:
        shape, fortran_order, dtype, offset = read_npy_header(body)
    except (ValueError, SyntaxError, TypeError, OverflowError) as error:
        raise RequestError(f"body is not a valid NPY array: {error}") from None
    if dtype.hasobject:
        raise RequestError(
            "NPY array holds Python objects (dtype object), which would need unpickling; refused: send a numeric array"
        )
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
        raise RequestError(f"NPY dtype {dtype} is not supported: send bool, integer or float pixels")
    count = math.prod(shape)
    expected = count * dtype.itemsize
    actual = len(body) - offset
    if actual != expected:
        problem = "truncated" if actual < expected else "longer than its header says"
        raise RequestError(
            f"NPY body is {problem}: header declares shape {tuple(shape)} of {dtype} "
            f"({expected} bytes of data), body has {actual}"
        )
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")


# ------------------------------------------------------------------------------------ DICOM


@_register(
    "dicom",
    lambda body: body[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM",
)
def _decode_dicom(body: bytes) -> np.ndarray:
    """DICOM as :func:`medkd.data.preprocess.decode_dicom` reads it (modality LUT, VOI LUT,
    MONOCHROME1 inverted); multi-frame data becomes a volume ``(H, W, frames)``."""
    with _as_request_errors():
        return decode_dicom(body, source="body", max_pixels=MAX_IMAGE_PIXELS)


# ------------------------------------------------------------------------------------- JSON


_SNIFFERS["json"] = lambda body: body.lstrip()[:1] in (b"{", b"[")


def _decode_json(body: bytes) -> list[np.ndarray]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"body is not valid JSON: {error}") from None
    if isinstance(document, dict) and "image" in document:
        return [_json_array(document["image"], '"image"')]
    if isinstance(document, dict) and "instances" in document:
        instances = document["instances"]
        if not isinstance(instances, list):
            raise RequestError('JSON "instances" must be a list of images (nested lists)')
        return [
            _json_array(item["image"] if isinstance(item, dict) and "image" in item else item, f'"instances"[{i}]')
            for i, item in enumerate(instances)
        ]
    raise RequestError(
        'JSON body must be an object with "image" (a nested list of pixels) or "instances" (a list of them)'
    )


def _json_array(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list):
        raise RequestError(f"JSON {where} must be a nested list of numbers, got {type(value).__name__}")
    try:
        array = np.asarray(value)
    except ValueError:
        raise RequestError(f"JSON {where} is a ragged nested list; every row must have the same length") from None
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise RequestError(f"JSON {where} must contain only numbers")
    return array


# ------------------------------------------------------------------------------ preprocessing


def preprocess(image: np.ndarray, input_meta: InputMeta | dict[str, Any]) -> np.ndarray:
    """Turn a decoded image into the model's input, as in training.

    :func:`medkd.data.preprocess.model_input`, the function the data adapters use: channels
    adapted, resized (linear, antialiased), rescaled and standardised as ``input_meta`` says.

    Args:
        image: ``(H, W)`` / ``(C, H, W)`` (2D models) or ``(H, W, D)`` / ``(C, H, W, D)``
            (3D models). Integer dtypes are raw pixels and get multiplied by ``scale``; float
            dtypes are taken to be in [0, 1].
        input_meta: the ``input`` section of the model's metadata (``in_channels``,
            ``spatial_dims``, ``image_size``, ``scale``, ``mean``, ``std``).

    Returns:
        float32 array ``(in_channels, *image_size)``.

    Raises:
        RequestError: wrong number of dims or channels, empty or non-finite image.
    """
    meta = input_meta if isinstance(input_meta, InputMeta) else InputMeta.model_validate(input_meta)
    with _as_request_errors():
        return model_input(image, **{name: getattr(meta, name) for name in MODEL_INPUT_FIELDS})


def preprocess_batch(images: np.ndarray | list[np.ndarray], input_meta: InputMeta | dict[str, Any]) -> np.ndarray:
    """:func:`preprocess` of each image, stacked: ``(N, in_channels, *image_size)``.

    A stack of same-shape images (an NPY batch, or JSON instances of one shape and dtype) is
    preprocessed at once by :func:`medkd.data.preprocess.model_inputs` (value for value the same
    as one image at a time); images of different shapes one by one.

    Raises:
        RequestError: as :func:`preprocess`.

    Examples:
        >>> meta = {"in_channels": 1, "spatial_dims": 2, "image_size": [32, 32]}
        >>> preprocess_batch(np.zeros((3, 28, 28), np.uint8), meta).shape
        (3, 1, 32, 32)
    """
    meta = input_meta if isinstance(input_meta, InputMeta) else InputMeta.model_validate(input_meta)
    if len(images) == 0:
        raise RequestError("batch holds no images")
    if not isinstance(images, np.ndarray):
        first = images[0]
        if any(image.shape != first.shape or image.dtype != first.dtype for image in images):
            return np.stack([preprocess(image, meta) for image in images])
        images = np.stack(images)
    with _as_request_errors():
        return model_inputs(images, **{name: getattr(meta, name) for name in MODEL_INPUT_FIELDS})
