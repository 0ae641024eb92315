"""Encoded arrays: round trips, and every kind of damaged input rejected with ArrayFormatError."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from medkd.softlabels.codec import (
    CHECKSUMS,
    CODECS,
    HEADER_FIXED_SIZE,
    ArrayFormatError,
    decode_array,
    decode_arrays,
    encode_array,
    encode_arrays,
    stored_checksums,
)

COMPRESSIONS = [None, "zlib", "lzma"]
rng = np.random.default_rng(0)
ARRAYS = {
    "float16_4d": rng.normal(size=(3, 4, 5, 6)).astype(np.float16),
    "float32_2d": rng.normal(size=(7, 10)).astype(np.float32),
    "float64_1d": rng.normal(size=11),
    "int64_bigendian": np.arange(12, dtype=">i8").reshape(3, 4),
    "uint8": rng.integers(0, 255, size=(2, 3, 4), dtype=np.uint8),
    "bool": rng.random(17) > 0.5,
    "complex": (rng.normal(size=5) + 1j * rng.normal(size=5)).astype(np.complex64),
    "unicode": np.array(["ab", "cde", ""]),
    "datetime": np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[D]"),
    "scalar": np.array(3.25),
    "empty": np.zeros((0, 4), np.float32),
    "non_contiguous": np.arange(60.0).reshape(3, 4, 5)[:, ::2, 1:],
    "fortran": np.asfortranarray(rng.normal(size=(4, 3))),
}


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_round_trip_keeps_dtype_shape_and_values(name: str, compression: str | None) -> None:
    array = ARRAYS[name]
    decoded = decode_array(encode_array(array, compression=compression))
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_uncompressed_decode_is_a_read_only_view_unless_copied() -> None:
    data = encode_array(np.arange(4, dtype=np.float32))
    view = decode_array(data)
    assert not view.flags.writeable
    copy = decode_array(data, copy=True)
    copy[0] = 9
    assert copy.flags.writeable and view[0] == 0


def test_accepts_bytearray_and_memoryview() -> None:
    data = encode_array(np.arange(5, dtype=np.int16))
    for buffer in (bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(decode_array(buffer), np.arange(5, dtype=np.int16))


def test_several_arrays_in_one_value() -> None:
    parts = [np.ones((2, 3), np.float16), np.arange(4, dtype=np.uint8), np.array(1.5)]
    data = encode_arrays(parts, compression="zlib")
    decoded = decode_arrays(data)
    assert [a.dtype for a in decoded] == [a.dtype for a in parts]
    for got, want in zip(decoded, parts):
        np.testing.assert_array_equal(got, want)
    assert len(stored_checksums(data)) == 3
    with pytest.raises(ArrayFormatError, match="trailing"):
        decode_array(data)


def test_stored_checksums_reflect_content() -> None:
    a = encode_array(np.zeros(8, np.float32))
    b = encode_array(np.ones(8, np.float32))
    assert stored_checksums(a) != stored_checksums(b)
    assert stored_checksums(a) == stored_checksums(encode_array(np.zeros(8, np.float32)))


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_truncation_is_rejected(compression: str | None) -> None:
    data = encode_array(rng.normal(size=(4, 5)).astype(np.float32), compression=compression)
    for length in sorted(
        {0, 1, 3, HEADER_FIXED_SIZE - 1, HEADER_FIXED_SIZE, HEADER_FIXED_SIZE + 3, len(data) // 2, len(data) - 1}
    ):
        with pytest.raises(ArrayFormatError):
            decode_array(data[:length])


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_flipped_bits_anywhere_are_detected(compression: str | None) -> None:
    data = encode_array(rng.normal(size=(6, 7)).astype(np.float16), compression=compression)
    for position in range(0, len(data), max(1, len(data) // 40)):
        corrupt = bytearray(data)
        corrupt[position] ^= 0x10
        with pytest.raises(ArrayFormatError):
            decode_array(bytes(corrupt))


def test_bad_magic_and_version_are_named() -> None:
    data = bytearray(encode_array(np.zeros(3)))
    with pytest.raises(ArrayFormatError, match="magic"):
        decode_array(b"XXXX" + bytes(data[4:]))
    data[4] = 99
    with pytest.raises(ArrayFormatError, match="version 99"):
        decode_array(bytes(data))


def _reseal(data: bytearray) -> bytes:
    """Recompute the checksum after deliberately editing header fields (a consistent but hostile value)."""
    dtype_len, ndim, checksum_id = data[8], data[7], data[9]
    end_dtype = HEADER_FIXED_SIZE + dtype_len
    end_shape = end_dtype + 8 * ndim
    parts = (
        bytes(data[:28]),
        bytes(data[HEADER_FIXED_SIZE:end_dtype]),
        bytes(data[end_dtype:end_shape]),
        bytes(data[end_shape:]),
    )
    data[28:36] = struct.pack("<Q", CHECKSUMS[checksum_id].digest(parts))
    return bytes(data)


def test_decompression_bomb_is_refused() -> None:
    big = np.zeros(1 << 16, np.uint8)  # compresses to a few hundred bytes
    data = bytearray(encode_array(big, compression="zlib"))
    # Declare a tiny array (shape (16,), 16 raw bytes) but keep the big compressed payload.
    data[20:28] = struct.pack("<Q", 16)
    dtype_len = data[8]
    data[HEADER_FIXED_SIZE + dtype_len : HEADER_FIXED_SIZE + dtype_len + 8] = struct.pack("<Q", 16)
    with pytest.raises(ArrayFormatError, match="zlib"):
        decode_array(_reseal(data))


def test_inconsistent_shape_is_refused_even_with_valid_checksum() -> None:
    data = bytearray(encode_array(np.zeros((2, 3), np.float32)))
    dtype_len = data[8]
    data[HEADER_FIXED_SIZE + dtype_len : HEADER_FIXED_SIZE + dtype_len + 8] = struct.pack("<Q", 5)
    with pytest.raises(ArrayFormatError, match="inconsistent"):
        decode_array(_reseal(data))


def test_object_dtype_is_refused_in_both_directions() -> None:
    with pytest.raises(ValueError, match="object"):
        encode_array(np.array([{"a": 1}], dtype=object))
    data = bytearray(encode_array(np.zeros(1, np.int64)))
    data[HEADER_FIXED_SIZE : HEADER_FIXED_SIZE + 3] = b"|O8"[:3]
    with pytest.raises(ArrayFormatError):
        decode_array(_reseal(data))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="compression must be one of"):
        encode_array(np.zeros(2), compression="snappy")
    with pytest.raises(TypeError, match="expected bytes"):
        decode_array("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="structured"):
        encode_array(np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]))


def test_byte_shuffle_makes_smooth_float16_compress_better_than_plain_zlib() -> None:
    y, x = np.mgrid[0:64, 0:64] / 64.0
    smooth = np.stack([np.sin(3 * x + c) * np.cos(2 * y - c) * 6 for c in range(8)]).astype(np.float16)
    encoded = encode_array(smooth, compression="zlib")
    assert len(encoded) < len(zlib.compress(smooth.tobytes(), 6))
    np.testing.assert_array_equal(decode_array(encoded), smooth)


def test_codec_registry_names() -> None:
    assert {"zlib", "lzma"} <= set(CODECS)


@pytest.mark.parametrize("checksum", ["xxh3-64", "crc32"])
def test_both_checksums_round_trip_and_detect_corruption(checksum: str) -> None:
    array = rng.normal(size=(5, 6)).astype(np.float32)
    data = encode_array(array, checksum=checksum)
    assert data[9] == next(c.checksum_id for c in CHECKSUMS.values() if c.name == checksum)
    np.testing.assert_array_equal(decode_array(data), array)
    corrupt = bytearray(data)
    corrupt[-1] ^= 0x80
    with pytest.raises(ArrayFormatError, match=f"{checksum} .*corrupt"):
        decode_array(bytes(corrupt))
    with pytest.raises(ValueError, match="checksum must be one of"):
        encode_array(array, checksum="md5")


def test_unknown_checksum_id_is_refused() -> None:
    data = bytearray(encode_array(np.zeros(3)))
    data[9] = 77
    with pytest.raises(ArrayFormatError, match="unknown checksum id 77"):
        decode_array(bytes(data))
