"""Chunks of a soft-label entry: encode, decode and validate, and gather rows as float32.

Encodings (``encoding`` × ``topk`` × ``compression``)
    Logits are stored raw (never probabilities: the temperature is applied at distillation
    time) as ``float16`` (default) or ``float32``. ``float16`` keeps 11 significant bits: the
    error is at most ``|z| * 2**-11`` (≤ 0.0039 for ``|z| < 8``); logits beyond ±65504 are
    refused. Measured (``python -m benchmarks.cache_throughput``, and asserted in
    ``tests/softlabels/test_store.py``): mean KL(softmax(z/T) ‖ softmax(ẑ/T)) ≈ 8e-8 at
    T=1 and 2e-8 at T=4 for 10-class classification logits, ≈ 6e-8 / 3e-8 for 14-class
    segmentation logits; the argmax changes only on exact float16 ties (1 pixel in 10^4).

    ``topk=k`` (over the class axis, meant for per-pixel segmentation logits with many
    classes) keeps the k largest logits and their class indices (uint8, or uint16 above 256
    classes) plus, per pixel, the mean of the dropped logits, which fills the other classes
    on decode. The argmax and the kept logits are exact up to float16; the spread of the
    dropped classes is lost, which matters more at high temperature. Measured on confident
    14-class 64×64 logits (true class +8 over N(0, 2), ``test_topk_error_is_bounded``):
    k=3: mean KL 2.2e-2 (T=1) and 3.3e-2 (T=4); k=5: 6e-3 and 1.7e-2. Storage falls from
    28 to 11 bytes per pixel for k=3 (2.5×; 4.2× with zlib). Off by default: use it when the
    memory matters more than the teacher's tail.

    ``compression`` ("zlib" / "lzma", stdlib, lossless, byte-shuffled first) saves 18-22% on
    noisy float16 segmentation logits, 40% on top-k values+indices, ~6% on classification
    logits, and costs decode time on every read (whole-split reads of float32 output on the
    loaded 2-core reference box: zlib 50-240 MB/s, lzma 16-37 MB/s, uncompressed float16
    350-1400 MB/s), so it is off by default.

Examples:
    >>> block = np.zeros((4, 3), np.float32)
    >>> value = encode_chunk(block, "float16", None, None)          # doctest: +SKIP
    >>> decode_chunk(value, manifest, 0).dtype                       # doctest: +SKIP
    dtype('float16')
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from medkd.softlabels.codec import ArrayFormatError, decode_arrays, encode_array, stored_checksums
from medkd.softlabels.manifest import ENCODINGS, CacheIntegrityError, Manifest


def encode_chunk(block: np.ndarray, encoding: str, topk: int | None, compression: str | None) -> bytes:
    dtype = ENCODINGS[encoding]
    if topk is None:
        return encode_array(block.astype(dtype, copy=False), compression=compression)
    num_classes = block.shape[1]
    top = np.argpartition(block, num_classes - topk, axis=1)[:, num_classes - topk :]
    values = np.take_along_axis(block, top, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")  # descending: deterministic layout
    top = np.take_along_axis(top, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    rest = (block.sum(axis=1, dtype=np.float64) - values.sum(axis=1, dtype=np.float64)) / (num_classes - topk)
    index_dtype = np.uint8 if num_classes <= 256 else np.uint16
    return b"".join(
        (
            encode_array(values.astype(dtype), compression=compression),
            encode_array(top.astype(index_dtype), compression=compression),
            encode_array(rest.astype(dtype), compression=compression),
        )
    )


def decode_chunk(value: bytes, manifest: Manifest, chunk: int) -> np.ndarray:
    """Decode and validate one chunk against its manifest: (samples, *sample_shape).

    Plain encodings come back in their stored precision as a zero-copy view of ``value``
    (float16 by default; the float32 cast happens once, in the gather, and only for the rows
    a batch needs); top-k chunks come back reconstructed, in float32.
    """
    start, stop = manifest.chunk_bounds(chunk)
    expected_shape = (stop - start, *manifest.sample_shape)
    try:
        arrays = decode_arrays(value)
    except ArrayFormatError as error:
        raise CacheIntegrityError(f"chunk {chunk}: {error}") from error
    stored = stored_checksums(value)
    if stored != manifest.checksums[chunk]:
        raise CacheIntegrityError(
            f"chunk {chunk}: checksums {stored} do not match the manifest {manifest.checksums[chunk]}"
        )
    dtype = np.dtype(ENCODINGS[manifest.encoding])
    if manifest.topk is None:
        (data,) = arrays if len(arrays) == 1 else (None,)
        if data is None or data.shape != expected_shape or data.dtype != dtype:
            raise CacheIntegrityError(
                f"chunk {chunk}: got {[(a.shape, a.dtype.str) for a in arrays]}, expected {expected_shape} {dtype}"
            )
        return data
    if len(arrays) != 3:
        raise CacheIntegrityError(f"chunk {chunk}: top-k chunk holds {len(arrays)} arrays, expected 3")
    values, top, rest = arrays
    k_shape = (expected_shape[0], manifest.topk, *expected_shape[2:])
    if values.shape != k_shape or top.shape != k_shape or rest.shape != (expected_shape[0], *expected_shape[2:]):
        raise CacheIntegrityError(
            f"chunk {chunk}: top-k arrays have shapes {[a.shape for a in arrays]}, expected {k_shape}"
        )
    if top.size and int(top.max()) >= expected_shape[1]:
        raise CacheIntegrityError(f"chunk {chunk}: class index {int(top.max())} out of range")
    out = np.empty(expected_shape, np.float32)
    out[...] = np.expand_dims(rest, 1)
    np.put_along_axis(out, top.astype(np.intp), values, axis=1)
    return out


# ---------------------------------------------------------------------- float16 -> float32
# numpy casts float16 element by element, several times slower than memory bandwidth; torch's
# cast is vectorised (F16C). torch is a medkd dependency, imported lazily so the cache CLI stays
# light; without it numpy is used. Copies go in slices of at most 32768 elements (torch's
# parallel grain), so they stay on the calling thread: trials run many readers on few cores,
# and an oversubscribed intra-op pool is slower than one thread.


_torch_module: Any = None
_CAST_SLICE = 1 << 15
_ROW_COPY_MIN = 1 << 12  # rows of >= 4096 values are cast row by row straight into the output


def _torch() -> Any:
    global _torch_module
    if _torch_module is None:
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a medkd dependency
            _torch_module = False
        else:
            # Decoded chunks are read-only views of the bytes Redis returned; torch only reads them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            _torch_module = torch
    return _torch_module or None


def _cast_copy(target: Any, source: Any) -> None:
    """``target[:] = source`` for 1-D torch tensors, in single-threaded slices."""
    size = source.shape[0]
    if size <= _CAST_SLICE:
        target.copy_(source)
        return
    for start in range(0, size, _CAST_SLICE):
        target[start : start + _CAST_SLICE].copy_(source[start : start + _CAST_SLICE])


def _as_float32(array: np.ndarray) -> np.ndarray:
    """``array`` as float32 (a vectorised cast for large float16 arrays)."""
    if array.dtype == np.float32:
        return array
    torch = _torch() if array.dtype == np.float16 and array.size >= _CAST_SLICE else None
    if torch is None or not array.flags.c_contiguous:
        return array.astype(np.float32)
    out = np.empty(array.shape, np.float32)
    _cast_copy(torch.from_numpy(out.reshape(-1)), torch.from_numpy(array.reshape(-1)))
    return out


def _assemble_float16_rows(
    manifest: Manifest, idx: np.ndarray | None, chunks: dict[int, np.ndarray], torch: Any
) -> np.ndarray:
    """Cast float16 chunk rows straight into the float32 output (no staging copy).

    One vectorised copy per chunk for whole splits; one per requested row otherwise, used
    only for rows of >= 4096 values, where the per-call overhead is a few percent of the copy.
    """
    count = manifest.num_samples if idx is None else idx.size
    out = np.empty((count, *manifest.sample_shape), np.float32)
    target = torch.from_numpy(out.reshape(count, -1))
    sources = {chunk: torch.from_numpy(data.reshape(data.shape[0], -1)) for chunk, data in chunks.items()}
    if idx is None:
        for chunk, source in sources.items():
            start, stop = manifest.chunk_bounds(chunk)
            _cast_copy(target[start:stop].reshape(-1), source.reshape(-1))
        return out
    for row, (chunk, local) in enumerate(
        zip((idx // manifest.chunk_size).tolist(), (idx % manifest.chunk_size).tolist(), strict=True)
    ):
        _cast_copy(target[row], sources[chunk][local])
    return out


def assemble_rows(manifest: Manifest, idx: np.ndarray | None, chunks: dict[int, np.ndarray]) -> np.ndarray:
    """The requested rows as float32: gathered in the chunks' precision and cast once, or
    for large float16 rows cast straight into the output."""
    shape = manifest.sample_shape
    dtype = next(iter(chunks.values())).dtype if chunks else np.dtype(np.float32)
    count = manifest.num_samples if idx is None else idx.size
    if count and dtype == np.float16 and int(np.prod(shape)) >= _ROW_COPY_MIN:
        torch = _torch()
        if torch is not None:
            return _assemble_float16_rows(manifest, idx, chunks, torch)
    if idx is None:
        gathered = np.empty((manifest.num_samples, *shape), dtype)
        for chunk, data in chunks.items():
            start, stop = manifest.chunk_bounds(chunk)
            gathered[start:stop] = data
    else:
        gathered = np.empty((idx.size, *shape), dtype)
        if idx.size:
            chunk_of = idx // manifest.chunk_size
            order = np.argsort(chunk_of, kind="stable")
            bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
            for group in np.split(order, bounds):  # one step per chunk, not per sample
                chunk = int(chunk_of[group[0]])
                gathered[group] = chunks[chunk][idx[group] - chunk * manifest.chunk_size]
    return _as_float32(gathered)
