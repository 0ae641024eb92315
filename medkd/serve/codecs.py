"""Request bodies to model inputs: decoding (PNG, JPEG, NPY, DICOM, JSON) and preprocessing.

Decoding and preprocessing are two steps:

1. :func:`decode_image` turns a body into one array **in its native dtype**, channel first:
   ``(H, W)`` / ``(C, H, W)`` for 2D images, ``(H, W, D)`` / ``(C, H, W, D)`` for volumes.
   Integer arrays are raw pixels; float arrays are taken to be in [0, 1] already.
2. :func:`preprocess` applies the training convention from the model's ``metadata.json``
   (``input``): integers are multiplied by ``scale``, channels are adapted (RGB to gray, gray
   repeated to C), the image is resized (bilinear / trilinear) to ``image_size``, and every
   channel is normalised ``(x - mean) / std``. The result is float32 ``(C, *image_size)``.

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

import io
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

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


def decode_image(
    body: bytes, content_type: str | None, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> np.ndarray:
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
                f'JSON body holds {len(images)} instances; POST /predict takes one image '
                "(use /predict/batch for several)"
            )
        return images[0]
    return _DECODERS[fmt](body)


def decode_batch(
    body: bytes, content_type: str | None, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> list[np.ndarray]:
    """Decode several images: an NPY array of shape ``(N, ...)`` or JSON ``{"instances": [...]}``.

    Returns:
        The N images, each as :func:`decode_image` would return it.
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
        images = list(stack)
    else:
        raise UnsupportedMediaType(
            f"a batch must be an NPY array of shape (N, ...) or JSON {{\"instances\": [...]}}, "
            f"got a {_FORMAT_NAMES[fmt]} body"
        )
    if not images:
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
    from PIL import Image, UnidentifiedImageError

    label = "PNG" if expected_format == "PNG" else "JPEG"
    try:
        image = Image.open(io.BytesIO(body))
    except (UnidentifiedImageError, OSError) as error:
        raise RequestError(f"body is not a valid {label} image: {error}") from None
    with image:
        if image.format != expected_format:
            raise RequestError(f"body is a {image.format} image, not {label} as its Content-Type says")
        width, height = image.size
        bands = len(image.getbands())
        if width * height * bands > MAX_IMAGE_PIXELS:
            raise PayloadTooLarge(
                f"image is {width}x{height}x{bands} values, more than the limit of {MAX_IMAGE_PIXELS}"
            )
        try:
            return _pil_to_array(image)
        except (OSError, ValueError, SyntaxError) as error:
            raise RequestError(f"{label} image cannot be decoded: {error}") from None


def _pil_to_array(image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale: scale the full 16-bit range to [0, 1].
        return (np.asarray(image, dtype=np.float32) / 65535.0).clip(0.0, 1.0)
    if mode == "F":
        return np.asarray(image, dtype=np.float32)
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(image.convert("L"), dtype=np.uint8)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))


@_register("png", lambda body: body.startswith(_PNG_MAGIC))
def _decode_png(body: bytes) -> np.ndarray:
    return _decode_pil(body, "PNG")


@_register("jpeg", lambda body: body.startswith(_JPEG_MAGIC))
def _decode_jpeg(body: bytes) -> np.ndarray:
    return _decode_pil(body, "JPEG")


# ---------------------------------------------------------------------------------- NPY


@_register("npy", lambda body: body.startswith(_NPY_MAGIC))
def _decode_npy(body: bytes) -> np.ndarray:
    # Equivalent to np.load(..., allow_pickle=False), but the declared shape is checked against
    # the body's length before anything is allocated, so a 100-byte body cannot claim 1 TB.
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"NPY format version {version[0]}.{version[1]} is not supported")
    except ValueError as error:
        raise RequestError(f"body is not a valid NPY array: {error}") from None
    if dtype.hasobject:
        raise RequestError(
            "NPY array holds Python objects (dtype object), which would need unpickling; "
            "refused: send a numeric array"
        )
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
        raise RequestError(f"NPY dtype {dtype} is not supported: send bool, integer or float pixels")
    count = math.prod(shape)
    expected = count * dtype.itemsize
    offset = stream.tell()
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
    """DICOM pixels after the modality LUT (rescale slope / intercept).

    8-bit unsigned images without rescaling stay raw ``uint8`` pixels. Anything else (12/16-bit,
    CT in Hounsfield units) is mapped to [0, 1] with the file's VOI window (WindowCenter /
    WindowWidth) when it has one, else by its own min / max. MONOCHROME1 is inverted so that
    bright means high everywhere. Multi-frame data becomes a volume ``(H, W, frames)``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(body), force=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as error:
        raise RequestError(f"body is not a valid DICOM file: {error}") from None
    if "PixelData" not in dataset:
        raise RequestError("DICOM file has no PixelData element (is it an image?)")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if rows * columns * frames * samples > MAX_IMAGE_PIXELS:
        raise PayloadTooLarge(
            f"DICOM image is {rows}x{columns}x{frames} frames x{samples} samples, more than the "
            f"limit of {MAX_IMAGE_PIXELS} values"
        )
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises many types for unsupported transfer syntaxes
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise RequestError(f"DICOM pixel data cannot be decoded (transfer syntax {syntax}): {error}") from None

    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    raw_uint8 = pixels.dtype == np.uint8 and slope == 1 and intercept == 0
    if raw_uint8 and photometric != "MONOCHROME1":
        image = pixels
    else:
        values = pixels.astype(np.float64) * slope + intercept
        window = _dicom_window(dataset) if samples == 1 else None
        if window is not None:
            center, width = window
            values = np.clip((values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)
        elif raw_uint8:
            values = values / 255.0
        else:
            low, high = float(values.min()), float(values.max())
            values = (values - low) / (high - low) if high > low else np.zeros_like(values)
        if photometric == "MONOCHROME1":
            values = 1.0 - values
        image = values.astype(np.float32)

    if samples > 1:  # pydicom gives (..., rows, cols, samples): move samples to the front
        image = np.moveaxis(image, -1, 0)
    if frames > 1:  # (..., frames, rows, cols) -> (..., rows, cols, frames)
        image = np.moveaxis(image, -3, -1)
    return np.ascontiguousarray(image)


def _dicom_window(dataset) -> tuple[float, float] | None:
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center_value, width_value = _first_float(center), _first_float(width)
    except (TypeError, ValueError, IndexError):
        return None
    return (center_value, width_value) if width_value > 0 else None


def _first_float(value: Any) -> float:
    """DICOM multi-valued elements (several windows) use their first value."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0]
    return float(value)


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
    raise RequestError('JSON body must be an object with "image" (a nested list of pixels) or "instances" (a list of them)')


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
    image = np.asarray(image)
    if image.dtype.kind not in _NUMERIC_KINDS:
        raise RequestError(f"image dtype {image.dtype} is not numeric")
    if image.dtype.kind == "b":
        image = image.astype(np.float32)

    spatial_dims = meta.spatial_dims
    if image.ndim == spatial_dims:
        image = image[np.newaxis]
    elif image.ndim != spatial_dims + 1:
        layouts = "2 (H, W) or 3 (C, H, W)" if spatial_dims == 2 else "3 (H, W, D) or 4 (C, H, W, D)"
        raise RequestError(
            f"image has {image.ndim} dims (shape {tuple(image.shape)}), expected {layouts} "
            f"for this {spatial_dims}D model"
        )
    if 0 in image.shape:
        raise RequestError(f"image is empty (shape {tuple(image.shape)})")

    image = _adapt_channels(image, meta.in_channels)
    raw_intensities = meta.clip is not None or meta.offset != 0.0
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise RequestError("image contains NaN or infinite values")
    if raw_intensities:
        pixels = image.astype(np.float32)
        if meta.clip is not None:
            np.clip(pixels, np.float32(meta.clip[0]), np.float32(meta.clip[1]), out=pixels)
        pixels = (pixels - np.float32(meta.offset)) * np.float32(meta.scale)
    elif image.dtype.kind == "f":
        pixels = image.astype(np.float32, copy=False)
    else:
        pixels = image.astype(np.float32) * np.float32(meta.scale)

    target = tuple(meta.image_size)
    if pixels.shape[1:] != target:
        pixels = resize_linear(pixels, target)

    channels = meta.in_channels
    broadcast = (channels,) + (1,) * spatial_dims
    mean = np.broadcast_to(np.asarray(meta.mean, dtype=np.float32), (channels,)).reshape(broadcast)
    std = np.broadcast_to(np.asarray(meta.std, dtype=np.float32), (channels,)).reshape(broadcast)
    return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)


def _adapt_channels(image: np.ndarray, channels: int) -> np.ndarray:
    have = image.shape[0]
    if have == channels:
        return image
    if have == 1:
        return np.repeat(image, channels, axis=0)
    if channels == 1 and have in (3, 4):
        return _luma(image[:3])
    if channels == 3 and have == 4:
        return image[:3]
    raise RequestError(
        f"image has {have} channels, the model expects {channels} "
        "(1-channel images are repeated, RGB/RGBA converted to gray for 1-channel models)"
    )


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, bit-exact with Pillow's ``convert("L")`` for uint8 pixels."""
    if rgb.dtype == np.uint8:
        r, g, b = (rgb[i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[np.newaxis]
    r, g, b = (rgb[i].astype(np.float64) for i in range(3))
    gray = 0.299 * r + 0.587 * g + 0.114 * b
    if rgb.dtype.kind == "f":
        return gray.astype(np.float32)[np.newaxis]
    return np.rint(gray).astype(rgb.dtype)[np.newaxis]  # integers stay raw pixels


def resize_linear(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize the trailing spatial axes of ``(C, *spatial)`` with (bi/tri)linear interpolation.

    Same sampling as ``torch.nn.functional.interpolate(mode="bilinear" | "trilinear",
    align_corners=False)`` without antialiasing: half-pixel centres, edges clamped.
    """
    out = np.asarray(array, dtype=np.float32)
    spatial = len(size)
    for axis_offset, new_size in enumerate(size):
        axis = out.ndim - spatial + axis_offset
        old_size = out.shape[axis]
        if old_size == new_size:
            continue
        source = (np.arange(new_size, dtype=np.float64) + 0.5) * (old_size / new_size) - 0.5
        source = np.clip(source, 0.0, None)
        lower = np.minimum(np.floor(source).astype(np.int64), old_size - 1)
        upper = np.minimum(lower + 1, old_size - 1)
        weight_shape = [1] * out.ndim
        weight_shape[axis] = new_size
        upper_weight = (source - lower).astype(np.float32).reshape(weight_shape)
        out = np.take(out, lower, axis=axis) * (1.0 - upper_weight) + np.take(out, upper, axis=axis) * upper_weight
    return out
