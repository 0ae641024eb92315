"""Numpy arrays to self-describing bytes and back, without pickle.

Used wherever an array crosses a process boundary: the soft-label cache in Redis, the
serving API, checkpoints. An encoded array is a fixed little-endian header, the dtype
string, the shape, then the payload::

    offset size  field
    0      4     magic  b"MKDA"
    4      1     format version (1)
    5      1     codec id (0 none, 1 zlib, 2 lzma)
    6      1     flags (bit 0: byte-shuffled before compression)
    7      1     ndim (0..32)
    8      1     length of the dtype string
    9      1     checksum id (1 xxh3-64, 2 CRC-32)
    10     2     reserved (zero)
    12     8     payload length as stored (after compression)
    20     8     raw payload length (= prod(shape) * itemsize)
    28     8     checksum of header bytes 0..27, the dtype string, the shape and the payload
    36     d     dtype string, ``np.dtype.str`` (e.g. ``<f2``), ASCII
    36+d   8*n   shape, uint64 each
    ...          payload

The checksum covers the header as well, so a flipped bit in the shape or dtype is caught,
not only in the payload. It guards against accidental corruption and truncation, not a
malicious writer (who could recompute it): the cache is a trusted store behind a password.
The default is xxh3-64 (the ``xxhash`` package): on the reference 2-core box it hashes
~8 GB/s against ~1 GB/s for ``zlib.crc32``, and at 1 GB/s the checksum alone took 40% of a
cache read. CRC-32 (stdlib) is used when ``xxhash`` is not installed, and both are always
readable (except xxh3 values without ``xxhash``, which fail with a message saying so).

Byte shuffle: with a codec, multi-byte items are stored byte-plane by byte-plane (all first
bytes, then all second bytes, ...), as Blosc and HDF5 do. Measured on float16 segmentation
logits, zlib's ratio goes from 1.08-1.11x to 1.23-1.40x (1.15x vs 1.08x for classification).

Decoding is zero-copy for uncompressed payloads (``np.frombuffer``): the result is a
read-only view of the input bytes; pass ``copy=True`` for a writable array.

Examples:
    >>> a = np.arange(6, dtype=np.float16).reshape(2, 3)
    >>> b = encode_array(a, compression="zlib")
    >>> decode_array(b).tolist() == a.tolist()
    True
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from medkd.core.registry import Registry

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a medkd dependency; CRC-32 still works
    xxhash = None

MAGIC = b"MKDA"
FORMAT_VERSION = 1
MAX_NDIM = 32
# magic, version, codec, flags, ndim, dtype_len, checksum id, stored length, raw length
_FIXED = struct.Struct("<4sBBBBBB2xQQ")
_SUM = struct.Struct("<Q")
HEADER_FIXED_SIZE = _FIXED.size + _SUM.size  # 36
_FLAG_SHUFFLE = 0x01
_FORBIDDEN_KINDS = {"O": "object", "V": "structured/void"}


class ArrayFormatError(ValueError):
    """Bytes that are not a valid encoded array (truncated, corrupt or unsupported)."""


@dataclass(frozen=True)
class Checksum:
    """A 64-bit (or narrower, zero-extended) digest of a sequence of buffers."""

    name: str
    checksum_id: int
    digest: Callable[[Sequence[bytes | memoryview]], int]
    available: bool = True


def _xxh3(parts: Sequence[bytes | memoryview]) -> int:
    hasher = xxhash.xxh3_64()
    for part in parts:
        hasher.update(part)
    return hasher.intdigest()


def _crc32(parts: Sequence[bytes | memoryview]) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


CHECKSUMS: dict[int, Checksum] = {
    1: Checksum("xxh3-64", 1, _xxh3, available=xxhash is not None),
    2: Checksum("crc32", 2, _crc32),
}
DEFAULT_CHECKSUM = 1 if xxhash is not None else 2


@dataclass(frozen=True)
class Codec:
    """A lossless byte compressor. ``decompress(data, max_length)`` must not return more
    than ``max_length`` bytes (a corrupt or hostile payload cannot exhaust memory)."""

    name: str
    codec_id: int
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes, int], bytes]


def _zlib_decompress(data: bytes, max_length: int) -> bytes:
    decompressor = zlib.decompressobj()
    out = decompressor.decompress(data, max_length + 1)
    if not decompressor.eof:
        raise ArrayFormatError("zlib stream is truncated or longer than the declared size")
    return out


def _lzma_decompress(data: bytes, max_length: int) -> bytes:
    decompressor = lzma.LZMADecompressor()
    out = decompressor.decompress(data, max_length + 1)
    if not decompressor.eof:
        raise ArrayFormatError("lzma stream is truncated or longer than the declared size")
    return out


CODECS: Registry[Codec] = Registry("codec")


def register_codec(codec: Codec) -> Codec:
    """Add a codec to the registry (ids are part of the format: never reuse one)."""
    for existing in CODECS.entries():
        if existing.obj.codec_id == codec.codec_id and existing.name != codec.name:
            raise ValueError(f"codec id {codec.codec_id} already used by {existing.name!r}")
    return CODECS.add(codec.name, codec)


register_codec(Codec("zlib", 1, lambda data: zlib.compress(data, 6), _zlib_decompress))
register_codec(Codec("lzma", 2, lambda data: lzma.compress(data, preset=6), _lzma_decompress))
_CODECS_BY_ID = {entry.obj.codec_id: entry.obj for entry in CODECS.entries()}


def _codec_by_name(name: str | None) -> Codec | None:
    if name is None or name == "none":
        return None
    if name not in CODECS:
        raise ValueError(f"compression must be one of {['none', *CODECS]} or None, got {name!r}")
    return CODECS.get(name).obj


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind in _FORBIDDEN_KINDS:
        raise ValueError(f"cannot encode arrays of {_FORBIDDEN_KINDS[dtype.kind]} dtype {dtype}")


def _shuffle(raw: memoryview, itemsize: int) -> bytes:
    return np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(data: bytes, itemsize: int) -> bytes:
    return np.frombuffer(data, np.uint8).reshape(itemsize, -1).T.tobytes()


def _checksum_by_name(name: str | None) -> Checksum:
    if name is None:
        return CHECKSUMS[DEFAULT_CHECKSUM]
    for checksum in CHECKSUMS.values():
        if checksum.name == name and checksum.available:
            return checksum
    available = [c.name for c in CHECKSUMS.values() if c.available]
    raise ValueError(f"checksum must be one of {available} or None, got {name!r}")


def encode_array(array: np.ndarray, *, compression: str | None = None, checksum: str | None = None) -> bytes:
    """Encode ``array`` (any shape, numeric/bool/str/datetime dtype) to bytes.

    Args:
        array: the array; non-contiguous arrays are copied to C order first.
        compression: None/"none", "zlib" or "lzma" (see ``CODECS``), lossless.
        checksum: "xxh3-64" or "crc32"; default xxh3-64 when ``xxhash`` is installed.

    Raises:
        ValueError: object or structured dtype, too many dimensions, unknown compression
            or checksum.
    """
    array = np.asarray(array)
    _check_dtype(array.dtype)
    if array.ndim > MAX_NDIM:
        raise ValueError(f"array has {array.ndim} dimensions; at most {MAX_NDIM} are supported")
    codec = _codec_by_name(compression)
    summer = _checksum_by_name(checksum)
    contiguous = array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d arrays 0-d
    raw = memoryview(contiguous.reshape(-1).view(np.uint8)) if contiguous.size else memoryview(b"")
    flags = 0
    if codec is None:
        payload: bytes | memoryview = raw
    else:
        itemsize = contiguous.dtype.itemsize
        if itemsize > 1 and contiguous.size:
            raw = memoryview(_shuffle(raw, itemsize))
            flags |= _FLAG_SHUFFLE
        payload = codec.compress(raw)
    dtype_str = contiguous.dtype.str.encode("ascii")
    fixed = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION,
        codec.codec_id if codec else 0,
        flags,
        contiguous.ndim,
        len(dtype_str),
        summer.checksum_id,
        len(payload),
        contiguous.nbytes,
    )
    shape = struct.pack(f"<{contiguous.ndim}Q", *contiguous.shape)
    digest = summer.digest((fixed, dtype_str, shape, payload))
    return b"".join((fixed, _SUM.pack(digest), dtype_str, shape, payload))


def _decode_at(data: memoryview, offset: int, copy: bool) -> tuple[np.ndarray, int]:
    end_fixed = offset + HEADER_FIXED_SIZE
    if len(data) < end_fixed:
        raise ArrayFormatError(f"truncated array header: {len(data) - offset} bytes, need at least {HEADER_FIXED_SIZE}")
    magic, version, codec_id, flags, ndim, dtype_len, checksum_id, stored, raw_len = _FIXED.unpack_from(data, offset)
    if magic != MAGIC:
        raise ArrayFormatError(f"not an encoded array (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ArrayFormatError(f"unsupported array format version {version} (this medkd reads {FORMAT_VERSION})")
    if ndim > MAX_NDIM:
        raise ArrayFormatError(f"corrupt array header: ndim={ndim} > {MAX_NDIM}")
    checksum = CHECKSUMS.get(checksum_id)
    if checksum is None:
        raise ArrayFormatError(f"unknown checksum id {checksum_id} in array header")
    if not checksum.available:
        raise ArrayFormatError(f"array is checksummed with {checksum.name}: install the xxhash package to read it")
    (expected,) = _SUM.unpack_from(data, offset + _FIXED.size)
    dtype_start = end_fixed
    shape_start = dtype_start + dtype_len
    payload_start = shape_start + 8 * ndim
    payload_end = payload_start + stored
    if len(data) < payload_end:
        raise ArrayFormatError(f"truncated array: {len(data) - offset} bytes, header declares {payload_end - offset}")
    dtype_bytes = data[dtype_start:shape_start]
    shape_bytes = data[shape_start:payload_start]
    payload = data[payload_start:payload_end]
    actual = checksum.digest((data[offset : offset + _FIXED.size], dtype_bytes, shape_bytes, payload))
    if actual != expected:
        raise ArrayFormatError(
            f"array checksum mismatch ({checksum.name} {actual:#018x}, expected {expected:#018x}): corrupt data"
        )
    try:
        dtype = np.dtype(bytes(dtype_bytes).decode("ascii"))
    except (UnicodeDecodeError, TypeError, ValueError) as error:
        raise ArrayFormatError(f"invalid dtype string {bytes(dtype_bytes)!r} in array header") from error
    if dtype.kind in _FORBIDDEN_KINDS:
        raise ArrayFormatError(f"refusing to decode {_FORBIDDEN_KINDS[dtype.kind]} dtype {dtype}")
    shape = struct.unpack(f"<{ndim}Q", shape_bytes)
    if int(np.prod(shape, dtype=np.uint64)) * dtype.itemsize != raw_len:
        raise ArrayFormatError(f"array header inconsistent: shape {shape} x {dtype} != {raw_len} bytes")
    if codec_id == 0:
        if stored != raw_len:
            raise ArrayFormatError(f"uncompressed payload is {stored} bytes, expected {raw_len}")
        raw: bytes | memoryview = payload
    else:
        codec = _CODECS_BY_ID.get(codec_id)
        if codec is None:
            raise ArrayFormatError(f"unknown codec id {codec_id} in array header")
        try:
            raw = codec.decompress(bytes(payload), raw_len)
        except (zlib.error, lzma.LZMAError) as error:
            raise ArrayFormatError(f"{codec.name} payload cannot be decompressed: {error}") from error
        if len(raw) != raw_len:
            raise ArrayFormatError(f"{codec.name} payload decompressed to {len(raw)} bytes, expected {raw_len}")
        if flags & _FLAG_SHUFFLE and raw_len:
            raw = _unshuffle(raw, dtype.itemsize)
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if copy:
        array = array.copy()
    return array, payload_end


def _as_view(data: bytes | bytearray | memoryview) -> memoryview:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    return memoryview(data).cast("B")


def decode_array(data: bytes | bytearray | memoryview, *, copy: bool = False) -> np.ndarray:
    """Decode bytes produced by :func:`encode_array`.

    Args:
        data: the encoded bytes (exactly one array; trailing bytes are an error).
        copy: return a writable copy instead of a (read-only, zero-copy) view when possible.

    Raises:
        ArrayFormatError: truncated, corrupt (checksum), unknown version/codec, trailing data.
    """
    view = _as_view(data)
    array, end = _decode_at(view, 0, copy)
    if end != len(view):
        raise ArrayFormatError(f"{len(view) - end} unexpected trailing bytes after the encoded array")
    return array


def encode_arrays(
    arrays: Sequence[np.ndarray], *, compression: str | None = None, checksum: str | None = None
) -> bytes:
    """Several arrays in one value (concatenated encodings; each carries its own length)."""
    return b"".join(encode_array(a, compression=compression, checksum=checksum) for a in arrays)


def decode_arrays(data: bytes | bytearray | memoryview, *, copy: bool = False) -> list[np.ndarray]:
    """Inverse of :func:`encode_arrays`."""
    view = _as_view(data)
    arrays: list[np.ndarray] = []
    offset = 0
    while offset < len(view):
        array, offset = _decode_at(view, offset, copy)
        arrays.append(array)
    if not arrays:
        raise ArrayFormatError("empty value: no encoded array")
    return arrays


def stored_checksums(data: bytes | bytearray | memoryview) -> list[int]:
    """The checksum recorded in the header of each encoded array in ``data``, without hashing.

    Only reads headers: call after a successful :func:`decode_arrays` (which verifies the
    checksums) to compare a value against checksums recorded elsewhere, e.g. a manifest.
    """
    view = _as_view(data)
    out: list[int] = []
    offset = 0
    while offset + HEADER_FIXED_SIZE <= len(view):
        fields = _FIXED.unpack_from(view, offset)
        ndim, dtype_len, stored = fields[4], fields[5], fields[7]
        out.append(_SUM.unpack_from(view, offset + _FIXED.size)[0])
        offset += HEADER_FIXED_SIZE + dtype_len + 8 * ndim + stored
    if offset != len(view):
        raise ArrayFormatError("value does not end at an array boundary")
    return out


def encoded_nbytes(arrays: Iterable[np.ndarray]) -> int:
    """Size of the uncompressed encoding (header + payload) of ``arrays``."""
    total = 0
    for a in arrays:
        a = np.asarray(a)
        total += HEADER_FIXED_SIZE + len(a.dtype.str) + 8 * a.ndim + a.nbytes
    return total
