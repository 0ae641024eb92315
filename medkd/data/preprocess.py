"""One preprocessing contract for training and serving: file bytes -> the model's input.

The data adapters (``medkd.data.folder``, ``medkd.data.decathlon``, and the normalisation in
``medkd.data.dataset``) and the request codecs (``medkd.serve.codecs``) call these functions and
nothing else, so an image gives the same model input whether it was read from a training folder
or posted to the endpoint.

Why one module: it *is* the contract between training and serving; one file to read when a
clinician asks what happens to their DICOM, and one place to change it (a change here moves the
fingerprints of folder and Decathlon datasets, deliberately).

The steps, in this order:

1. **Decode** (:func:`decode_pil`, :func:`decode_dicom`) to one array in a *display* unit:
   ``uint8`` pixels for 8-bit images, ``float32`` in [0, 1] for everything else.
2. **Channels first** (:func:`channel_first`) and **channel adaptation** (:func:`adapt_channels`):
   RGB(A) to gray by ITU-R 601 luma (bit-exact with Pillow's ``convert("L")`` on 8-bit pixels),
   gray repeated for RGB models, alpha dropped.
3. **Resize** (:func:`resize`) to the model's ``image_size``.
4. **Rescale** (:func:`rescale_intensities`): integer pixels are multiplied by ``scale``
   (``1/255``: 8-bit pixels), float pixels are taken to be in [0, 1] already — unless the model
   was trained on raw intensities (``clip``/``offset`` set, e.g. CT in Hounsfield units), then
   every input becomes ``(clip(x) - offset) * scale``.
5. **Standardise** (:func:`standardise`) every channel: ``(x - mean[c]) / std[c]``.

Steps 4 and 5 are what ``InputMeta`` (``medkd.registry.metadata``) and ``Dataset.preprocessing``
describe; :func:`model_input` runs 2-5 for one decoded image.

The behaviour chosen, and why (what a clinician looking at the image would expect):

- **DICOM is shown as its file says**: the modality LUT (Rescale Slope/Intercept or a Modality
  LUT Sequence) and then the VOI LUT (Window Center/Width, or a VOI LUT Sequence) are applied
  with pydicom's own ``apply_modality_lut`` / ``apply_voi_lut``, exactly as a PACS viewer
  does, and the VOI output range is mapped to [0, 1]. The window is the radiologist's choice of
  what matters (lung vs. soft tissue); ignoring it, as training used to, gave the model a
  different picture from the one the reader saw.
- **Without a VOI window, intensities are fractions of the range the encoding can hold**:
  ``BitsStored``/``PixelRepresentation`` (through the modality LUT) for DICOM, ``65535`` for
  16-bit PNG/TIFF, ``255`` for 8-bit. Per-image min→max stretching (what training used to do) was
  rejected: it makes the same tissue a different value in every image (one bright implant dims
  everything else) and depends on what else is in the field of view. A fixed mapping keeps an
  intensity's meaning across patients; the dataset's mean/std standardisation restores the
  contrast linearly. An 8-bit DICOM without rescaling therefore equals the 8-bit PNG of the same
  pixels.
- **MONOCHROME1 is inverted** so that bright means high attenuation everywhere.
- **Resizing is linear with antialiasing** (a triangle filter widened by the downscale factor:
  Pillow's ``BILINEAR``, the same as ``torch.nn.functional.interpolate(mode="bilinear",
  antialias=True)``), applied separably, so 3D volumes get the same filter along depth. Shrinking
  a 512 px radiograph to 64 px without antialiasing samples 1 pixel in 64 and can drop a thin
  line or calcification altogether; an area-weighted reduction is what a viewer shows when zoomed
  out. Enlarging is plain bilinear interpolation (half-pixel centres, edges clamped).

Examples:
    >>> import numpy as np
    >>> gray = np.full((40, 40), 255, dtype=np.uint8)
    >>> x = model_input(gray, in_channels=3, spatial_dims=2, image_size=(28, 28),
    ...                 scale=1 / 255, mean=[0.5], std=[0.5])
    >>> x.shape, float(x.max())
    ((3, 28, 28), 1.0)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

EIGHT_BIT_SCALE = 1.0 / 255.0
"""``scale`` of 8-bit pixels: what ``RawData.scale`` / ``InputMeta.scale`` default to."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})
_NUMERIC_KINDS = "biuf"


class ImageError(ValueError):
    """An image that cannot become a model input.

    The message is ``f"{source} {problem}"``: ``source`` names the file or request body
    (``"body"``, ``"file"``), ``problem`` is a predicate (``"is not a valid PNG image: ..."``).
    """

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source} {problem}")
        self.source = source
        self.problem = problem


class ImageDecodeError(ImageError):
    """The bytes are not a decodable image (truncated, wrong format, no pixel data, ...)."""


class ImageTooLarge(ImageDecodeError):
    """The decoded image would hold more values than allowed (a decompression bomb)."""


class ImageShapeError(ImageError):
    """The decoded image does not fit the model: dims, channels, empty or non-finite."""


# ------------------------------------------------------------------------------------- decode


def decode_pil(
    data: bytes,
    *,
    source: str = "image",
    expected_format: str | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Decode a PNG, JPEG, BMP or TIFF image (8- or 16-bit) with Pillow.

    Args:
        data: the file's bytes.
        source: what the bytes are (a path, ``"body"``), named in errors.
        expected_format: Pillow's format name (``"PNG"``, ``"JPEG"``) the bytes must have, or
            ``None`` for any format Pillow reads.
        max_pixels: refuse images of more values (width x height x bands) than this.

    Returns:
        ``uint8`` pixels for 8-bit images, ``float32`` in [0, 1] for 16-bit ones (value / 65535)
        and as stored for float (``F``) images; ``(H, W)`` for gray, ``(3, H, W)`` for colour.

    Raises:
        ImageDecodeError: not an image, another format than expected, truncated or corrupt.
        ImageTooLarge: more values than ``max_pixels``.

    Examples:
        >>> import io, numpy as np
        >>> from PIL import Image
        >>> buffer = io.BytesIO()
        >>> Image.fromarray(np.full((2, 3), 65535, np.uint16)).save(buffer, format="PNG")
        >>> decode_pil(buffer.getvalue(), expected_format="PNG").tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    label = f"a {expected_format} image" if expected_format else "an image"
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as error:
        kind = f"{expected_format} image" if expected_format else "image"
        raise ImageDecodeError(source, f"is not a valid {kind}: {error}") from None
    with image:
        if expected_format is not None and image.format != expected_format:
            raise ImageDecodeError(source, f"is a {image.format} image, not {expected_format}")
        width, height = image.size
        bands = len(image.getbands())
        if max_pixels is not None and width * height * bands > max_pixels:
            raise ImageTooLarge(
                source, f"is an image of {width}x{height}x{bands} values, more than the limit of {max_pixels}"
            )
        try:
            return pil_to_array(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            problem = f"is {label} that cannot be decoded (truncated or corrupt?): {error}"
            raise ImageDecodeError(source, problem) from None


def pil_to_array(image: Image.Image) -> np.ndarray:
    """A Pillow image as ``uint8`` pixels (8-bit) or ``float32`` in [0, 1] (16-bit), channel first.

    Args:
        image: any Pillow image; palette, CMYK and YCbCr images become RGB, ``LA`` becomes gray,
            the alpha of RGBA is dropped.

    Examples:
        >>> from PIL import Image
        >>> pil_to_array(Image.new("RGB", (4, 2))).shape
        (3, 2, 4)
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return scale_16bit(np.asarray(image))
    if mode == "F":
        return np.asarray(image, dtype=np.float32)
    if mode in _GRAY_MODES:
        return np.asarray(image.convert("L"), dtype=np.uint8)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))


def scale_16bit(pixels: np.ndarray) -> np.ndarray:
    """16-bit pixels as ``float32`` fractions of the full 16-bit range, ``value / 65535``.

    Examples:
        >>> scale_16bit(np.array([0, 65535], np.uint16)).tolist()
        [0.0, 1.0]
    """
    return (np.asarray(pixels, dtype=np.float32) / np.float32(65535.0)).clip(0.0, 1.0)


def decode_dicom(
    data: bytes,
    *,
    source: str = "image",
    max_pixels: int | None = None,
    allow_volumes: bool = True,
) -> np.ndarray:
    """Decode a DICOM file as a viewer shows it: modality LUT, VOI LUT, MONOCHROME1 inverted.

    Args:
        data: the file's bytes (with or without the 128-byte preamble).
        source: what the bytes are (a path, ``"body"``), named in errors.
        max_pixels: refuse images of more values (rows x columns x frames x samples).
        allow_volumes: accept multi-frame data (returned as a volume ``(H, W, frames)``).

    Returns:
        ``uint8`` pixels when the file holds 8-bit data the LUTs leave unchanged (as an 8-bit
        PNG would), else ``float32`` in [0, 1]: the VOI output range when the file has a VOI
        window or LUT, else the range its stored bits can hold after the modality LUT. Gray
        ``(H, W)``, colour ``(C, H, W)``, multi-frame ``(H, W, frames)`` / ``(C, H, W, frames)``.

    Raises:
        ImageDecodeError: not DICOM, no PixelData, undecodable transfer syntax, bad VOI window.
        ImageTooLarge: more values than ``max_pixels``.

    Examples:
        >>> decode_dicom(open("scan.dcm", "rb").read(), source="scan.dcm")  # doctest: +SKIP
    """
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as error:
        raise ImageDecodeError(source, f"is not a valid DICOM file: {error}") from None
    if "PixelData" not in dataset:
        raise ImageDecodeError(source, "is a DICOM file with no PixelData element (is it an image?)")
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if max_pixels is not None and rows * columns * frames * samples > max_pixels:
        raise ImageTooLarge(
            source,
            f"is a DICOM image of {rows}x{columns}x{frames} frames x{samples} samples, more than the "
            f"limit of {max_pixels} values",
        )
    if frames > 1 and not allow_volumes:
        raise ImageDecodeError(source, f"is a DICOM file of {frames} frames; expected one 2D image")
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises many types for unsupported transfer syntaxes
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ImageDecodeError(
            source, f"has DICOM pixel data that cannot be decoded (transfer syntax {syntax}): {error}"
        ) from None
    if pixels.dtype.kind == "f":
        raise ImageDecodeError(source, "has DICOM float pixel data (Float Pixel Data), which is not supported")
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        raise ImageDecodeError(source, "is a PALETTE COLOR DICOM image, which is not supported: send it as RGB")
    try:
        image = _dicom_display_values(pixels, dataset, samples)
    except (ValueError, TypeError, AttributeError, IndexError, NotImplementedError) as error:
        raise ImageDecodeError(source, f"has DICOM LUTs that cannot be applied: {error}") from None
    if samples > 1:  # pydicom gives (..., rows, cols, samples): move samples to the front
        image = np.moveaxis(image, -1, 0)
    if frames > 1:  # (..., frames, rows, cols) -> (..., rows, cols, frames)
        image = np.moveaxis(image, -3, -1)
    return np.ascontiguousarray(image)


def _dicom_display_values(pixels: np.ndarray, dataset: Any, samples: int) -> np.ndarray:
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    inverted = photometric == "MONOCHROME1"
    if samples == 1:
        values = apply_modality_lut(pixels, dataset)
        if _has_voi(dataset):
            low, high = _voi_output_range(dataset)
            values = apply_voi_lut(values, dataset)
        else:
            low, high = _stored_range_after_modality_lut(dataset)
    else:  # colour: no LUTs apply
        values = pixels
        low, high = _stored_range(dataset)
    if values.dtype == np.uint8 and (low, high) == (0.0, 255.0):
        return 255 - values if inverted else values  # 8-bit data, unchanged: exact, like a PNG
    unit = np.clip((values.astype(np.float64) - low) / max(high - low, np.finfo(np.float64).tiny), 0.0, 1.0)
    if inverted:
        unit = 1.0 - unit
    return unit.astype(np.float32)


def _has_voi(dataset: Any) -> bool:
    return _has_voi_lut_sequence(dataset) or ("WindowCenter" in dataset and "WindowWidth" in dataset)


def _has_voi_lut_sequence(dataset: Any) -> bool:
    """The same test pydicom's ``apply_voi_lut`` makes before it prefers the LUT to the window."""
    sequence = dataset.get("VOILUTSequence")
    return bool(sequence) and None not in (sequence[0].get("LUTDescriptor"), sequence[0].get("LUTData"))


def _voi_output_range(dataset: Any) -> tuple[float, float]:
    """The values ``apply_voi_lut`` maps the darkest and brightest display values to."""
    if _has_voi_lut_sequence(dataset):
        bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    # A window sends everything below it to its output minimum and above it to its maximum;
    # asking pydicom for -inf and +inf gives both without restating its formula.
    low, high = apply_voi_lut(np.array([-np.inf, np.inf]), dataset)
    return float(low), float(high)


def _stored_range(dataset: Any) -> tuple[float, float]:
    bits = int(dataset.get("BitsStored") or dataset.get("BitsAllocated") or 8)
    if int(dataset.get("PixelRepresentation", 0) or 0) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _stored_range_after_modality_lut(dataset: Any) -> tuple[float, float]:
    low, high = _stored_range(dataset)
    dtype = np.int32 if low < 0 else np.uint32
    ends = np.asarray(apply_modality_lut(np.array([low, high], dtype=dtype), dataset), dtype=np.float64)
    return float(ends.min()), float(ends.max())


# ----------------------------------------------------------------------------- to the model


def channel_first(image: np.ndarray, spatial_dims: int) -> np.ndarray:
    """``(H, W)`` -> ``(1, H, W)``, ``(C, H, W)`` kept (and likewise for 3D volumes).

    Raises:
        ImageShapeError: a dtype that is not numeric, a wrong number of dims, or an empty image.
    """
    image = np.asarray(image)
    if image.dtype.kind not in _NUMERIC_KINDS:
        raise ImageShapeError("image", f"dtype {image.dtype} is not numeric")
    if image.ndim == spatial_dims:
        image = image[np.newaxis]
    elif image.ndim != spatial_dims + 1:
        layouts = "2 (H, W) or 3 (C, H, W)" if spatial_dims == 2 else "3 (H, W, D) or 4 (C, H, W, D)"
        raise ImageShapeError(
            "image",
            f"has {image.ndim} dims (shape {tuple(image.shape)}), expected {layouts} for this {spatial_dims}D model",
        )
    if 0 in image.shape:
        raise ImageShapeError("image", f"is empty (shape {tuple(image.shape)})")
    return image


def adapt_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Give a channel-first image ``channels`` channels.

    Gray is repeated; RGB and RGBA become gray by ITU-R 601-2 luma; RGBA drops its alpha.

    Raises:
        ImageShapeError: any other combination.

    Examples:
        >>> adapt_channels(np.zeros((1, 2, 2), np.uint8), 3).shape
        (3, 2, 2)
    """
    have = image.shape[0]
    if have == channels:
        return image
    if have == 1:
        return np.repeat(image, channels, axis=0)
    if channels == 1 and have in (3, 4):
        return luma(image[:3])
    if channels == 3 and have == 4:
        return image[:3]
    raise ImageShapeError(
        "image",
        f"has {have} channels, the model expects {channels} "
        "(1-channel images are repeated, RGB/RGBA converted to gray for 1-channel models)",
    )


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of ``(3, ...)``, bit-exact with Pillow's ``convert("L")`` for uint8."""
    if rgb.dtype == np.uint8:
        r, g, b = (rgb[i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[np.newaxis]
    r, g, b = (rgb[i].astype(np.float64) for i in range(3))
    gray = 0.299 * r + 0.587 * g + 0.114 * b
    if rgb.dtype.kind == "f":
        return gray.astype(np.float32)[np.newaxis]
    return np.rint(gray).astype(rgb.dtype)[np.newaxis]  # integers stay raw pixels


def resize(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize the trailing spatial axes of ``(C, *spatial)`` (2D or 3D), linear, antialiased.

    Pillow's ``BILINEAR`` filter on float32 data, each (height, width) plane and then depth
    (Pillow's separable filter, one more pass): a triangle filter widened by the downscale factor
    when shrinking, plain bilinear when enlarging (half-pixel centres, edges clamped). The same as
    ``torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)``
    in 2D.

    Args:
        image: ``(C, H, W)`` or ``(C, H, W, D)``, any numeric dtype.
        size: ``(H', W')`` or ``(H', W', D')``.

    Returns:
        float32 ``(C, *size)`` (a new array even when the size is unchanged).

    Examples:
        >>> resize(np.zeros((3, 512, 512), np.uint8), (64, 64)).shape
        (3, 64, 64)
        >>> resize(np.array([[[0.0, 0.0, 1.0, 1.0]]]), (1, 2)).astype(float).round(3).tolist()
        [[[0.143, 0.857]]]
    """
    size = tuple(int(s) for s in size)
    out = np.array(image, dtype=np.float32, order="C", copy=True)
    if len(size) not in (2, 3) or out.ndim != len(size) + 1:
        raise ValueError(f"resize: expected (C, *spatial) with {len(size)} spatial axes, got shape {out.shape}")
    if out.shape[1:] == size:
        return out
    if out.shape[1:3] != size[:2]:
        out = _resize_planes(out, size[:2])
    if len(size) == 3 and out.shape[3] != size[2]:
        channels, height, width, depth = out.shape
        rows = out.reshape(channels, height * width, depth)  # each row: one voxel column along depth
        out = _resize_planes(rows, (height * width, size[2])).reshape(channels, height, width, size[2])
    return out


def _resize_planes(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the two axes after the first of ``(N, H, W)`` or ``(N, H, W, D)`` with Pillow."""
    height, width = size
    out = np.empty(array.shape[:1] + size + array.shape[3:], dtype=np.float32)
    for index in np.ndindex(array.shape[:1] + array.shape[3:]):
        plane_index = (index[0], slice(None), slice(None), *index[1:])
        plane = Image.fromarray(np.ascontiguousarray(array[plane_index]))
        out[plane_index] = np.asarray(plane.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return out


def rescale_intensities(
    image: np.ndarray,
    *,
    scale: float = EIGHT_BIT_SCALE,
    offset: float = 0.0,
    clip: Sequence[float] | None = None,
    integer_pixels: bool | None = None,
) -> np.ndarray:
    """Pixels to the model's intensity unit (``InputMeta``'s ``scale``/``offset``/``clip``).

    Integer pixels are multiplied by ``scale``; float pixels are taken to be in [0, 1] already —
    unless ``clip`` or ``offset`` is set (a model trained on raw intensities), then every image
    becomes ``(clip(x) - offset) * scale``.

    Args:
        image: pixels (any shape).
        scale, offset, clip: as in ``InputMeta`` / ``Dataset.preprocessing``.
        integer_pixels: whether the pixels were integers before an earlier step (such as
            :func:`resize`) made them float; ``None``: read it from ``image.dtype``.

    Returns:
        A new C-contiguous float32 array.

    Examples:
        >>> rescale_intensities(np.array([0, 255], np.uint8)).tolist()
        [0.0, 1.0]
        >>> rescale_intensities(np.array([-2000.0, 40.0]), scale=0.5, offset=-1000, clip=(-1000, 1000)).tolist()
        [0.0, 520.0]
    """
    if integer_pixels is None:
        integer_pixels = np.asarray(image).dtype.kind in "iu"
    out = np.array(image, dtype=np.float32, order="C", copy=True)
    if clip is not None:
        np.clip(out, np.float32(clip[0]), np.float32(clip[1]), out=out)
    if clip is not None or offset != 0.0:
        if offset:
            out -= np.float32(offset)
        out *= np.float32(scale)
    elif integer_pixels:
        out *= np.float32(scale)
    return out


def standardise(images: np.ndarray, mean: Sequence[float], std: Sequence[float], channel_axis: int = 0) -> np.ndarray:
    """``(x - mean[c]) / std[c]`` per channel, in place on a float32 array (which is returned).

    Args:
        images: float32, e.g. ``(C, *spatial)`` (``channel_axis=0``) or a batch
            ``(N, C, *spatial)`` (``channel_axis=1``).
        mean, std: one value per channel.
        channel_axis: the channel axis.

    Examples:
        >>> standardise(np.ones((1, 2), np.float32), [0.5], [0.25]).tolist()
        [[2.0, 2.0]]
    """
    channels = images.shape[channel_axis]
    mean_array = np.asarray(mean, dtype=np.float32)
    std_array = np.asarray(std, dtype=np.float32)
    if channels != len(mean_array) or channels != len(std_array):
        raise ValueError(
            f"images have {channels} channel(s) on axis {channel_axis}, preprocessing has {len(mean_array)}"
        )
    shape = [1] * images.ndim
    shape[channel_axis] = channels
    images -= mean_array.reshape(shape)
    images /= std_array.reshape(shape)
    return images


def scaled_image(
    image: np.ndarray,
    *,
    in_channels: int,
    spatial_dims: int,
    image_size: Sequence[int],
    scale: float = EIGHT_BIT_SCALE,
    offset: float = 0.0,
    clip: Sequence[float] | None = None,
) -> np.ndarray:
    """One decoded image -> float32 ``(in_channels, *image_size)`` in the model's intensity unit.

    Channels first and adapted, resized, rescaled (steps 2-4): what the folder adapter stores and
    what serving standardises.

    Raises:
        ImageShapeError: wrong dims, channels, empty or non-finite image.
    """
    image = adapt_channels(channel_first(image, spatial_dims), in_channels)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ImageShapeError("image", "contains NaN or infinite values")
    integer_pixels = image.dtype.kind in "iu"
    resized = resize(image, image_size)
    return rescale_intensities(resized, scale=scale, offset=offset, clip=clip, integer_pixels=integer_pixels)


def model_input(
    image: np.ndarray,
    *,
    in_channels: int,
    spatial_dims: int,
    image_size: Sequence[int],
    scale: float = EIGHT_BIT_SCALE,
    offset: float = 0.0,
    clip: Sequence[float] | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
) -> np.ndarray:
    """One decoded image -> the model's float32 input ``(in_channels, *image_size)``.

    The keyword arguments are the fields of ``InputMeta`` (``medkd.registry.metadata``):
    ``model_input(image, **meta.model_dump(include=MODEL_INPUT_FIELDS))``.

    Raises:
        ImageShapeError: wrong dims, channels, empty or non-finite image.

    Examples:
        >>> model_input(np.zeros((4, 4), np.uint8), in_channels=1, spatial_dims=2,
        ...             image_size=(2, 2), mean=[0.5], std=[0.5]).tolist()
        [[[-1.0, -1.0], [-1.0, -1.0]]]
    """
    scaled = scaled_image(
        image,
        in_channels=in_channels,
        spatial_dims=spatial_dims,
        image_size=image_size,
        scale=scale,
        offset=offset,
        clip=clip,
    )
    return standardise(scaled, _per_channel(mean, in_channels), _per_channel(std, in_channels))


def model_inputs(
    images: np.ndarray,
    *,
    in_channels: int,
    spatial_dims: int,
    image_size: Sequence[int],
    scale: float = EIGHT_BIT_SCALE,
    offset: float = 0.0,
    clip: Sequence[float] | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
) -> np.ndarray:
    """A stack of same-shape decoded images ``(N, ...)`` -> float32 ``(N, in_channels, *image_size)``.

    Equal, value for value, to stacking :func:`model_input` of each image (the same steps on the
    same float32 values; resizing is per plane either way), in a few array operations instead of
    N passes of each step: what a batch request of many small images needs.

    Raises:
        ImageShapeError: as :func:`model_input` (every image has the first one's shape), or an
            empty stack.

    Examples:
        >>> stack = np.zeros((5, 4, 4), np.uint8)
        >>> model_inputs(stack, in_channels=1, spatial_dims=2, image_size=(2, 2), mean=[0.5], std=[0.5]).shape
        (5, 1, 2, 2)
    """
    images = np.asarray(images)
    if images.ndim == 0 or len(images) == 0:
        raise ImageShapeError("batch", f"holds no images (shape {tuple(images.shape)})")
    first = channel_first(images[0], spatial_dims)  # dtype, dims and emptiness, checked on one image
    stack = images if images.ndim == first.ndim + 1 else images[:, np.newaxis]
    # adapt_channels works on the leading axis: give it the channel axis there.
    stack = np.moveaxis(adapt_channels(np.moveaxis(stack, 1, 0), in_channels), 0, 1)
    if stack.dtype.kind == "f" and not np.isfinite(stack).all():
        raise ImageShapeError("image", "contains NaN or infinite values")
    integer_pixels = stack.dtype.kind in "iu"
    count = len(stack)
    planes = stack.reshape(count * in_channels, *stack.shape[2:])  # resize treats each channel alike
    resized = resize(planes, image_size).reshape(count, in_channels, *(int(s) for s in image_size))
    scaled = rescale_intensities(resized, scale=scale, offset=offset, clip=clip, integer_pixels=integer_pixels)
    return standardise(scaled, _per_channel(mean, in_channels), _per_channel(std, in_channels), channel_axis=1)


def _per_channel(values: Sequence[float] | float, channels: int) -> Sequence[float]:
    """One value per channel (``InputMeta`` allows one mean/std for all channels); the same values
    ``np.broadcast_to(values, (channels,))`` gives, without its cost (a third of a small image's
    preprocessing)."""
    if np.ndim(values) == 0:
        return [values] * channels  # type: ignore[list-item]
    return list(values) * channels if len(values) == 1 and channels != 1 else values  # type: ignore[arg-type]


MODEL_INPUT_FIELDS = frozenset({"in_channels", "spatial_dims", "image_size", "scale", "offset", "clip", "mean", "std"})
"""The ``InputMeta`` fields :func:`model_input` takes."""
