"""The soft-label cache: teacher logits in Redis, content-addressed, chunked, checksummed.

Teachers run once; every distillation trial on every node reads their logits from here.

Keys
    Every entry is addressed by content: ``(teacher fingerprint, dataset fingerprint, split,
    augmentation view)``. Under the prefix ``{namespace}:sl:{teacher}:{dataset}:{split}:v{view|-}``:

    * ``…:manifest`` — a hash: ``json`` (the :class:`Manifest`), ``generation``, ``view_params``.
      Never has a TTL.
    * ``…:g{generation}:c{i}`` — chunk ``i``: samples ``[i*chunk_size, (i+1)*chunk_size)``
      encoded with :mod:`medkd.softlabels.codec` (dtype/shape header, checksum). Chunks carry a
      TTL (``chunk_ttl_s``, refreshed on every :meth:`SoftLabelCache.fetch_or_compute` hit).
    * ``…:lock`` — the writer lease (``SET NX PX``, renewed while the writer is alive).
    * ``{namespace}:sl:index`` (set of prefixes) and ``{namespace}:sl:stats`` (hit/miss counters).

Publishing is atomic
    A writer takes the lease, writes all chunks under a fresh generation id, then a Lua script
    checks it still holds the lease and swaps the manifest in one step. Readers resolve chunk
    keys through the manifest's generation, so they never see a half-written set; chunks of a
    replaced generation are unlinked after the swap (a reader caught in between notices the
    generation change and re-reads). Two writers of the same entry: the second waits for the
    lease holder's manifest and returns it, so nothing is written twice.
    :meth:`SoftLabelCache.fetch_or_compute` takes the lease *before* running the teacher, so
    concurrent trials do not even compute twice. A writer that dies loses its lease after
    ``lock_ttl_s`` and the next one takes over.

Eviction
    The managed server runs ``maxmemory-policy volatile-lru``: only keys with a TTL (chunks)
    are evictable, manifests never are. A manifest whose chunks were evicted or lost is
    detected on read (:class:`CacheIntegrityError`), reported by ``verify`` and recomputed by
    ``fetch_or_compute``. The index and counters carry no TTL either. Writer leases do (they
    must expire when a writer dies); a writer whose lease expired or was evicted does not
    commit: it drops its chunks and waits for (or retakes) the entry, so there is still one
    set of entries and readers never see a mixed one.

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

Reads
    :meth:`SoftLabelCache.fetch` maps a batch of indices to chunks and reads the chunks not in
    the in-process LRU with one pipelined ``MGET`` + ``HGET generation`` round trip per 64 MB.
    Every chunk's checksum (xxh3-64) is verified and matched with the manifest's; chunks
    are decoded zero-copy (``np.frombuffer``) and the rows gathered per chunk, then cast to
    float32 once (vectorised via torch for float16). Large samples get smaller chunks (at most
    ``max_chunk_bytes`` raw bytes each) so a shuffled batch does not read whole splits. The
    LRU keeps chunks in their stored precision (float16: twice the samples per byte), keyed by
    generation, so a republished entry is never served from stale chunks. Connection loss and
    restarts are retried with exponential backoff (and by redis-py's own retry policy).

Examples:
    >>> cache = SoftLabelCache(server.url)                                  # doctest: +SKIP
    >>> cache.publish("t1", "d1", "train", logits, teacher_spec={"model": "resnet18"})  # doctest: +SKIP
    >>> cache.fetch("t1", "d1", "train", indices=np.array([3, 1, 4]))       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import numpy as np
import redis
from pydantic import BaseModel, ConfigDict, Field

from medkd.softlabels.codec import CODECS, ArrayFormatError, decode_arrays, encode_array, stored_checksums
from medkd.softlabels.redis_server import connect, is_retryable, redact_url, with_retry

logger = logging.getLogger(__name__)

SOFTLABEL_FORMAT_VERSION = 1
ENCODINGS: dict[str, type[np.floating]] = {"float16": np.float16, "float32": np.float32}
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_PIPELINE_BYTES = 64 << 20  # bytes per MGET/SET round trip (bounds client and server buffers)
_PIPELINE_KEYS = 1024


@dataclass(frozen=True)
class PublishOptions:
    """How an entry is encoded and chunked (the keyword arguments of ``publish``)."""

    encoding: str = "float16"
    compression: str | None = None
    topk: int | None = None
    view: int | None = None
    view_params: list[dict[str, Any]] | None = None
    chunk_size: int = 256
    max_chunk_bytes: int = 1 << 20


class CacheIntegrityError(Exception):
    """A cached entry is corrupt, truncated, inconsistent with its manifest, or missing chunks."""

    def __init__(self, message: str, *, prefix: str | None = None, generation: str | None = None) -> None:
        super().__init__(message)
        self.prefix = prefix
        self.generation = generation


class CacheMissError(LookupError):
    """No manifest for the requested (teacher, dataset, split, view)."""


class Manifest(BaseModel):
    """What a published entry contains and how to read it back."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format_version: int = SOFTLABEL_FORMAT_VERSION
    teacher_fp: str
    dataset_fp: str
    split: str
    view: int | None = None
    num_samples: int = Field(ge=0)
    sample_shape: tuple[int, ...]
    dtype: str = Field(description="dtype of the logits given to publish()")
    encoding: Literal["float16", "float32"]
    compression: str | None = None
    topk: int | None = None
    chunk_size: int = Field(gt=0)
    num_chunks: int = Field(ge=0)
    checksums: list[list[int]] = Field(description="per chunk: the checksum of each encoded array in it")
    chunk_nbytes: list[int]
    nbytes: int = Field(ge=0, description="bytes stored in Redis for the chunks")
    created_at: float
    generation: str
    teacher_spec: dict[str, Any] = Field(default_factory=dict)
    view_params: list[dict[str, Any]] | None = None
    checksum: str = Field("", description="blake2b of every other field")

    def compute_checksum(self) -> str:
        body = self.model_dump(mode="json", exclude={"checksum"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)


class Problem(BaseModel):
    """One finding of :meth:`SoftLabelCache.verify`."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["corrupt_manifest", "missing_chunk", "corrupt_chunk", "orphan_chunks"]
    prefix: str
    message: str
    teacher_fp: str | None = None
    split: str | None = None
    chunk: int | None = None


# ---------------------------------------------------------------------- Lua (atomic steps)

_COMMIT = """
-- KEYS: lock, manifest, index; ARGV: token, json, generation, view_params, prefix
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'json', ARGV[2], 'generation', ARGV[3], 'view_params', ARGV[4])
redis.call('SADD', KEYS[3], ARGV[5])
redis.call('DEL', KEYS[1])
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _Lease:
    """A writer lease on one entry: ``SET NX PX``, renewed by a daemon thread until released."""

    def __init__(self, cache: "SoftLabelCache", prefix: str) -> None:
        self.cache, self.key = cache, f"{prefix}:lock"
        self.token = secrets.token_hex(16)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self) -> bool:
        ttl_ms = int(self.cache.lock_ttl_s * 1000)
        acquired = self.cache._call(lambda: self.cache.client.set(self.key, self.token, nx=True, px=ttl_ms))
        if acquired:
            self._thread = threading.Thread(target=self._renew_loop, name=f"lease:{self.key}", daemon=True)
            self._thread.start()
        return bool(acquired)

    def _renew_loop(self) -> None:
        ttl_ms = int(self.cache.lock_ttl_s * 1000)
        while not self._stop.wait(self.cache.lock_ttl_s / 3):
            try:
                if not self.cache._renew(keys=[self.key], args=[self.token, ttl_ms]):
                    logger.warning("lost the writer lease %s", self.key)
                    return
            except redis.RedisError as error:
                logger.warning("could not renew writer lease %s: %s", self.key, error)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.cache._release(keys=[self.key], args=[self.token])
        except redis.RedisError as error:  # it expires on its own
            logger.warning("could not release writer lease %s: %s", self.key, error)


class _ChunkLRU:
    """Decoded chunks by (prefix, generation, chunk), bounded by bytes; thread-safe.

    Chunks are kept as :func:`_decode_chunk` returns them (float16 for the default encoding,
    so twice as many samples fit as in float32).
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.nbytes = 0
        self._items: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, int]) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, str, int], value: np.ndarray) -> None:
        if value.nbytes > self.capacity:
            return
        value.setflags(write=False)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self.nbytes -= evicted.nbytes

    def drop_prefix(self, prefix: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == prefix]:
                self.nbytes -= self._items.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


def _check_name(argument: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{argument} must be 1-128 characters of [A-Za-z0-9_.-], got {value!r}")
    return value


def _check_view(view: int | None) -> int | None:
    if view is None:
        return None
    if isinstance(view, bool) or not isinstance(view, (int, np.integer)) or view < 0:
        raise ValueError(f"view must be a non-negative int or None, got {view!r}")
    return int(view)


# ---------------------------------------------------------------------- chunk codecs

def _encode_chunk(block: np.ndarray, encoding: str, topk: int | None, compression: str | None) -> bytes:
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


def _decode_chunk(value: bytes, manifest: Manifest, chunk: int) -> np.ndarray:
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
        raise CacheIntegrityError(f"chunk {chunk}: checksums {stored} do not match the manifest {manifest.checksums[chunk]}")
    dtype = np.dtype(ENCODINGS[manifest.encoding])
    if manifest.topk is None:
        (data,) = arrays if len(arrays) == 1 else (None,)
        if data is None or data.shape != expected_shape or data.dtype != dtype:
            raise CacheIntegrityError(f"chunk {chunk}: got {[(a.shape, a.dtype.str) for a in arrays]}, expected {expected_shape} {dtype}")
        return data
    if len(arrays) != 3:
        raise CacheIntegrityError(f"chunk {chunk}: top-k chunk holds {len(arrays)} arrays, expected 3")
    values, top, rest = arrays
    k_shape = (expected_shape[0], manifest.topk, *expected_shape[2:])
    if values.shape != k_shape or top.shape != k_shape or rest.shape != (expected_shape[0], *expected_shape[2:]):
        raise CacheIntegrityError(f"chunk {chunk}: top-k arrays have shapes {[a.shape for a in arrays]}, expected {k_shape}")
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


def _assemble_float16_rows(manifest: Manifest, idx: np.ndarray | None, chunks: dict[int, np.ndarray], torch: Any) -> np.ndarray:
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
    for row, (chunk, local) in enumerate(zip((idx // manifest.chunk_size).tolist(), (idx % manifest.chunk_size).tolist())):
        _cast_copy(target[row], sources[chunk][local])
    return out


# ---------------------------------------------------------------------- the cache

class SoftLabelCache:
    """Teacher logits in Redis (see the module docstring for keys, atomicity and encodings).

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL.
        namespace: key namespace, so several deployments can share one server.
        lru_bytes: budget of the in-process LRU of decoded chunks (kept in stored precision);
            0 disables it.
        password_env: environment variable with the password (overrides the URL's).
        retries: connection errors are retried this many times with exponential backoff.
        chunk_ttl_s: TTL of chunk keys (makes them, and only them, evictable under
            ``volatile-lru``); refreshed by every ``fetch_or_compute`` hit.
        lock_ttl_s: writer lease duration; renewed while the writer lives.
        manifest_ttl_s: how long a reader trusts its cached manifest before rechecking the
            generation when all chunks come from the LRU.

    Thread-safe; for several processes or nodes create one instance per process (pickling an
    instance reconnects on the other side; the pickle carries the URL, so give clusters the
    password through ``password_env`` rather than in the URL).
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "medkd",
        lru_bytes: int = 256 << 20,
        password_env: str | None = None,
        retries: int = 5,
        chunk_ttl_s: int = 30 * 24 * 3600,
        lock_ttl_s: float = 30.0,
        manifest_ttl_s: float = 5.0,
    ) -> None:
        _check_name("namespace", namespace)
        if lru_bytes < 0:
            raise ValueError(f"lru_bytes must be >= 0, got {lru_bytes}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if chunk_ttl_s <= 0 or lock_ttl_s <= 0:
            raise ValueError("chunk_ttl_s and lock_ttl_s must be > 0")
        self.url, self.namespace, self.password_env = url, namespace, password_env
        self.retries, self.chunk_ttl_s, self.lock_ttl_s = retries, int(chunk_ttl_s), float(lock_ttl_s)
        self.manifest_ttl_s = float(manifest_ttl_s)
        self.lru_bytes = lru_bytes
        self.client = connect(url, password_env=password_env, retries=retries)
        self._commit = self.client.register_script(_COMMIT)
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)
        self._lru = _ChunkLRU(lru_bytes)
        self._manifests: dict[str, tuple[Manifest, float]] = {}
        self._manifest_lock = threading.Lock()
        self._counters_lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("lru_hits", "chunk_reads", "bytes_read", "integrity_errors", "hits", "misses"), 0
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.url, self._init_kwargs()))

    def _init_kwargs(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace, "lru_bytes": self.lru_bytes, "password_env": self.password_env,
            "retries": self.retries, "chunk_ttl_s": self.chunk_ttl_s, "lock_ttl_s": self.lock_ttl_s,
            "manifest_ttl_s": self.manifest_ttl_s,
        }

    def __repr__(self) -> str:
        return f"SoftLabelCache({redact_url(self.url)!r}, namespace={self.namespace!r})"

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ keys
    def key_prefix(self, teacher_fp: str, dataset_fp: str, split: str, view: int | None = None) -> str:
        """``{namespace}:sl:{teacher_fp}:{dataset_fp}:{split}:v{view or -}``."""
        _check_name("teacher_fp", teacher_fp)
        _check_name("dataset_fp", dataset_fp)
        _check_name("split", split)
        view = _check_view(view)
        return f"{self.namespace}:sl:{teacher_fp}:{dataset_fp}:{split}:v{'-' if view is None else view}"

    @property
    def _index_key(self) -> str:
        return f"{self.namespace}:sl:index"

    @property
    def _stats_key(self) -> str:
        return f"{self.namespace}:sl:stats"

    @staticmethod
    def _chunk_key(prefix: str, generation: str, chunk: int) -> str:
        return f"{prefix}:g{generation}:c{chunk}"

    def _call(self, operation: Callable[[], Any], what: str = "redis") -> Any:
        return with_retry(operation, retries=self.retries, what=what)

    def _count(self, **deltas: int) -> None:
        with self._counters_lock:
            for name, delta in deltas.items():
                self.counters[name] += delta

    # ------------------------------------------------------------------ manifests
    def _load_manifest(self, prefix: str) -> Manifest | None:
        fields = self._call(lambda: self.client.hmget(f"{prefix}:manifest", ["json", "generation", "view_params"]),
                            f"read manifest {prefix}")
        raw, generation, view_params = fields
        if raw is None:
            with self._manifest_lock:
                self._manifests.pop(prefix, None)
            return None
        try:
            data = json.loads(raw)
            if view_params is not None:
                data["view_params"] = json.loads(view_params)
            manifest = Manifest.model_validate(data)
        except (ValueError, TypeError) as error:
            raise CacheIntegrityError(f"{prefix}: manifest is unreadable: {error}", prefix=prefix) from error
        if manifest.format_version != SOFTLABEL_FORMAT_VERSION:
            raise CacheIntegrityError(
                f"{prefix}: manifest format {manifest.format_version}, this medkd reads {SOFTLABEL_FORMAT_VERSION}",
                prefix=prefix, generation=manifest.generation,
            )
        if manifest.checksum != manifest.compute_checksum():
            raise CacheIntegrityError(f"{prefix}: manifest checksum mismatch", prefix=prefix, generation=manifest.generation)
        if generation is None or generation.decode() != manifest.generation or len(manifest.checksums) != manifest.num_chunks:
            raise CacheIntegrityError(f"{prefix}: manifest is inconsistent", prefix=prefix, generation=manifest.generation)
        with self._manifest_lock:
            self._manifests[prefix] = (manifest, time.monotonic())
        return manifest

    def _cached_manifest(self, prefix: str) -> tuple[Manifest | None, bool]:
        """(manifest, fresh): from the in-process cache when recent, else from Redis."""
        with self._manifest_lock:
            entry = self._manifests.get(prefix)
        if entry is not None and time.monotonic() - entry[1] < self.manifest_ttl_s:
            return entry[0], False
        return self._load_manifest(prefix), True

    def manifest(self, teacher_fp: str, dataset_fp: str, split: str, view: int | None = None) -> Manifest | None:
        """The entry's manifest, or None. Raises CacheIntegrityError if it is corrupt."""
        return self._load_manifest(self.key_prefix(teacher_fp, dataset_fp, split, view))

    def exists(self, teacher_fp: str, dataset_fp: str, split: str, view: int | None = None) -> bool:
        """Whether a manifest is published (chunks are checked by fetch/verify, not here)."""
        prefix = self.key_prefix(teacher_fp, dataset_fp, split, view)
        return bool(self._call(lambda: self.client.hexists(f"{prefix}:manifest", "generation")))

    def list_manifests(self) -> list[Manifest]:
        """Every readable manifest in the namespace (corrupt ones are skipped; see verify)."""
        manifests = []
        for prefix in self._prefixes():
            try:
                manifest = self._load_manifest(prefix)
            except CacheIntegrityError as error:
                logger.warning("%s", error)
                continue
            if manifest is not None:
                manifests.append(manifest)
        return sorted(manifests, key=lambda m: (m.teacher_fp, m.dataset_fp, m.split, m.view or -1))

    def _prefixes(self) -> list[str]:
        return sorted(p.decode() for p in self._call(lambda: self.client.smembers(self._index_key)))

    # ------------------------------------------------------------------ publish
    def publish(
        self,
        teacher_fp: str,
        dataset_fp: str,
        split: str,
        logits: np.ndarray,
        *,
        teacher_spec: dict[str, Any],
        encoding: str = "float16",
        compression: str | None = None,
        topk: int | None = None,
        view: int | None = None,
        view_params: list[dict[str, Any]] | None = None,
        chunk_size: int = 256,
        max_chunk_bytes: int = 1 << 20,
        overwrite: bool = False,
    ) -> Manifest:
        """Store ``logits`` (shape ``(N, C, ...)``, raw logits) and return the manifest.

        If the entry is already published (by anyone), nothing is written and the existing
        manifest is returned, unless ``overwrite``. Concurrent publishers of one entry write one
        set of chunks: the others wait for the winner's manifest.

        Args:
            logits: raw logits, ``(N, C)`` for classification, ``(N, C, H, W[, D])`` per pixel.
            teacher_spec: JSON-serialisable description of the teacher (kept in the manifest).
            encoding: "float16" (default) or "float32".
            compression: None, "zlib" or "lzma" (lossless).
            topk: keep the k largest logits per sample/pixel over axis 1 (1 <= k < C).
            view, view_params: FKD augmented view index and, per sample, the augmentation
                parameters that reproduce it (``len(view_params) == N``).
            chunk_size: at most this many samples per chunk ...
            max_chunk_bytes: ... and at most this many raw bytes per chunk (but >= 1 sample).
            overwrite: replace an existing entry.

        Raises:
            ValueError: bad logits or options (the message names the argument).
        """
        options = PublishOptions(encoding=encoding, compression=compression, topk=topk, view=view,
                                 view_params=view_params, chunk_size=chunk_size, max_chunk_bytes=max_chunk_bytes)
        prefix = self.key_prefix(teacher_fp, dataset_fp, split, view)
        self._validate_publish(logits, teacher_spec, options)
        existing = self._existing_for_publish(prefix, overwrite)
        if existing is not None:
            self._warn_if_different(existing, options)
            return existing
        stale = self._current_generation(prefix) if overwrite else None
        return self._publish_validated(prefix, teacher_fp, dataset_fp, split, logits, teacher_spec, options, stale)

    def _publish_validated(self, prefix: str, teacher_fp: str, dataset_fp: str, split: str, logits: np.ndarray,
                           teacher_spec: dict[str, Any], options: PublishOptions, stale: str | None,
                           lease: _Lease | None = None) -> Manifest:
        """Write under ``lease`` (or one taken here), or return the manifest another writer
        published meanwhile. A writer whose lease expired (a stall longer than ``lock_ttl_s``)
        or was evicted does not commit: it drops its chunks and starts over."""
        for _ in range(3):
            if lease is None:
                manifest, lease = self._acquire_or_wait(prefix, stale_generation=stale)
                if lease is None:
                    assert manifest is not None
                    return manifest
            try:
                return self._write_locked(lease, prefix, teacher_fp, dataset_fp, split, logits, teacher_spec, options)
            except _LeaseLost:
                logger.warning("%s: lost the writer lease before committing; retrying", prefix)
            finally:
                lease.release()
                lease = None
        raise RuntimeError(f"{prefix}: lost the writer lease three times (writes slower than lock_ttl_s={self.lock_ttl_s}s?)")

    @staticmethod
    def _validate_publish(logits: Any, teacher_spec: Any, options: PublishOptions) -> None:
        encoding, compression, topk = options.encoding, options.compression, options.topk
        view, view_params, chunk_size = options.view, options.view_params, options.chunk_size
        if not isinstance(logits, np.ndarray):
            raise ValueError(f"logits must be a numpy array, got {type(logits).__name__}")
        if logits.dtype.kind != "f":
            raise ValueError(f"logits must be floating point (raw logits), got dtype {logits.dtype}")
        if logits.ndim < 2:
            raise ValueError(f"logits must have shape (N, C, ...), got {logits.shape}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
        if compression is not None and compression not in CODECS:
            raise ValueError(f"compression must be None or one of {sorted(CODECS)}, got {compression!r}")
        if not np.isfinite(logits).all():
            raise ValueError("logits contain NaN or inf (did the teacher diverge?)")
        if encoding == "float16" and logits.size and float(np.abs(logits).max()) > _FLOAT16_MAX:
            raise ValueError(f"logits exceed the float16 range (max |z| = {float(np.abs(logits).max()):.4g}); "
                             "use encoding='float32'")
        if topk is not None:
            if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or not 1 <= topk < logits.shape[1]:
                raise ValueError(f"topk must be an int in [1, {logits.shape[1] - 1}] (C={logits.shape[1]}), got {topk!r}")
            if logits.shape[1] > 65536:
                raise ValueError(f"topk supports at most 65536 classes, got {logits.shape[1]}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if not isinstance(options.max_chunk_bytes, (int, np.integer)) or options.max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be a positive int, got {options.max_chunk_bytes!r}")
        if not isinstance(teacher_spec, dict):
            raise ValueError(f"teacher_spec must be a dict, got {type(teacher_spec).__name__}")
        try:
            json.dumps(teacher_spec)
        except (TypeError, ValueError) as error:
            raise ValueError(f"teacher_spec must be JSON-serialisable: {error}") from error
        if view is None and view_params is not None:
            raise ValueError("view_params given without view: pass the view index they belong to")
        if view is not None:
            if view_params is None:
                raise ValueError(f"view={view}: view_params (one dict of augmentation parameters per sample) is required")
            if not isinstance(view_params, list) or len(view_params) != logits.shape[0]:
                length = len(view_params) if isinstance(view_params, list) else "?"
                raise ValueError(f"view_params must be a list of {logits.shape[0]} dicts (one per sample), "
                                 f"got {type(view_params).__name__} of length {length}")
            if not all(isinstance(p, dict) for p in view_params):
                raise ValueError("view_params must contain one dict per sample")
            try:
                json.dumps(view_params)
            except (TypeError, ValueError) as error:
                raise ValueError(f"view_params must be JSON-serialisable: {error}") from error

    def _existing_for_publish(self, prefix: str, overwrite: bool) -> Manifest | None:
        if overwrite:
            return None
        try:
            return self._load_manifest(prefix)
        except CacheIntegrityError as error:
            logger.warning("%s; it will be replaced", error)
            return None

    def _current_generation(self, prefix: str) -> str | None:
        value = self._call(lambda: self.client.hget(f"{prefix}:manifest", "generation"))
        return value.decode() if value is not None else None

    @staticmethod
    def _warn_if_different(existing: Manifest, options: PublishOptions) -> None:
        if (existing.encoding, existing.compression, existing.topk) != (options.encoding, options.compression, options.topk):
            logger.warning(
                "entry %s/%s/%s already published with encoding=%s compression=%s topk=%s; keeping it "
                "(pass overwrite=True to re-encode)", existing.teacher_fp, existing.dataset_fp, existing.split,
                existing.encoding, existing.compression, existing.topk,
            )

    def _acquire_or_wait(self, prefix: str, stale_generation: str | None,
                         max_wait_s: float = 3600.0) -> tuple[Manifest | None, _Lease | None]:
        """Take the writer lease, or wait until another writer publishes a usable manifest.

        A manifest counts as published unless its generation is ``stale_generation`` (the one
        being replaced). Returns (manifest, None) or (None, lease).
        """
        deadline = time.monotonic() + max_wait_s
        delay = 0.02
        while True:
            generation = self._current_generation(prefix)
            if generation is not None and generation != stale_generation:
                try:
                    manifest = self._load_manifest(prefix)
                except CacheIntegrityError:
                    manifest = None
                if manifest is not None:
                    return manifest, None
                stale_generation = generation  # corrupt: replace it
            lease = _Lease(self, prefix)
            if lease.try_acquire():
                generation = self._current_generation(prefix)
                if generation is not None and generation != stale_generation:
                    lease.release()
                    continue  # someone published between our check and the lease
                return None, lease
            if time.monotonic() > deadline:
                raise TimeoutError(f"{prefix}: waited {max_wait_s:.0f}s for another writer's manifest")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _write_locked(self, lease: _Lease, prefix: str, teacher_fp: str, dataset_fp: str, split: str,
                      logits: np.ndarray, teacher_spec: dict[str, Any], options: PublishOptions) -> Manifest:
        encoding, compression, topk = options.encoding, options.compression, options.topk
        view, view_params = options.view, options.view_params
        num_samples = logits.shape[0]
        sample_bytes = max(1, int(np.prod(logits.shape[1:])) * np.dtype(ENCODINGS[encoding]).itemsize)
        chunk_size = max(1, min(int(options.chunk_size), int(options.max_chunk_bytes) // sample_bytes))
        num_chunks = math.ceil(num_samples / chunk_size)
        generation = f"{int(time.time()):x}{secrets.token_hex(4)}"
        previous = self._current_generation(prefix)
        previous_manifest = None
        if previous is not None:
            try:
                previous_manifest = self._load_manifest(prefix)
            except CacheIntegrityError:
                previous_manifest = None
        checksums: list[list[int]] = []
        chunk_nbytes: list[int] = []
        ttl_ms = self.chunk_ttl_s * 1000
        written: list[str] = []
        try:
            batch: list[tuple[str, bytes]] = []
            batch_bytes = 0
            for chunk in range(num_chunks):
                block = logits[chunk * chunk_size : (chunk + 1) * chunk_size]
                value = _encode_chunk(block, encoding, topk, compression)
                checksums.append(stored_checksums(value))
                chunk_nbytes.append(len(value))
                batch.append((self._chunk_key(prefix, generation, chunk), value))
                batch_bytes += len(value)
                if batch_bytes >= _PIPELINE_BYTES or len(batch) >= _PIPELINE_KEYS:
                    self._write_batch(batch, ttl_ms)
                    written += [k for k, _ in batch]
                    batch, batch_bytes = [], 0
            if batch:
                self._write_batch(batch, ttl_ms)
                written += [k for k, _ in batch]
            manifest = Manifest(
                teacher_fp=teacher_fp, dataset_fp=dataset_fp, split=split, view=view, num_samples=num_samples,
                sample_shape=tuple(int(s) for s in logits.shape[1:]), dtype=str(logits.dtype), encoding=encoding,
                compression=compression, topk=None if topk is None else int(topk), chunk_size=chunk_size,
                num_chunks=num_chunks, checksums=checksums, chunk_nbytes=chunk_nbytes, nbytes=sum(chunk_nbytes),
                created_at=time.time(), generation=generation, teacher_spec=teacher_spec, view_params=view_params,
            )
            manifest = manifest.model_copy(update={"checksum": manifest.compute_checksum()})
            body = manifest.model_dump(mode="json", exclude={"view_params"})
            committed = self._call(lambda: self._commit(
                keys=[lease.key, f"{prefix}:manifest", self._index_key],
                args=[lease.token, json.dumps(body, separators=(",", ":")), generation,
                      json.dumps(view_params, separators=(",", ":")), prefix],
            ), f"commit {prefix}")
            if not committed and self._current_generation(prefix) != generation:
                raise _LeaseLost(prefix)
        except BaseException:
            self._unlink(written)
            raise
        with self._manifest_lock:
            self._manifests[prefix] = (manifest, time.monotonic())
        if previous_manifest is not None and previous_manifest.generation != generation:
            self._unlink([self._chunk_key(prefix, previous_manifest.generation, c) for c in range(previous_manifest.num_chunks)])
        self._lru.drop_prefix(prefix)
        logger.info("published %s: %d samples, %d chunks, %d bytes (%s%s%s)", prefix, num_samples, num_chunks,
                    manifest.nbytes, encoding, f", top-{topk}" if topk else "", f", {compression}" if compression else "")
        return manifest

    def _write_batch(self, batch: list[tuple[str, bytes]], ttl_ms: int) -> None:
        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key, value in batch:
                pipe.set(key, value, px=ttl_ms)
            pipe.execute()

        self._call(write, "write chunks")

    def _unlink(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _PIPELINE_KEYS):
            part = keys[start : start + _PIPELINE_KEYS]
            try:
                self._call(lambda: self.client.unlink(*part), "unlink")
            except redis.RedisError as error:  # they expire on their own
                logger.warning("could not unlink %d keys: %s", len(part), error)

    # ------------------------------------------------------------------ fetch
    def fetch(self, teacher_fp: str, dataset_fp: str, split: str, indices: np.ndarray | None = None,
              view: int | None = None) -> np.ndarray:
        """Logits as float32 ``(len(indices), *sample_shape)``; ``indices=None``: the whole split.

        Raises:
            CacheMissError: nothing published for this entry.
            CacheIntegrityError: corrupt manifest, corrupt/truncated/missing chunk.
            IndexError: an index outside ``[0, num_samples)``.
        """
        prefix = self.key_prefix(teacher_fp, dataset_fp, split, view)
        for attempt in range(3):
            manifest, fresh = self._cached_manifest(prefix)
            if manifest is None:
                raise CacheMissError(f"no soft labels cached for {prefix}")
            try:
                return self._fetch_with(prefix, manifest, indices, check_generation=not fresh)
            except _GenerationChanged:
                continue
            except CacheIntegrityError as error:
                self._count(integrity_errors=1)
                error.prefix, error.generation = prefix, manifest.generation
                if fresh or attempt == 2:
                    raise
                with self._manifest_lock:  # maybe republished since: recheck once with a fresh manifest
                    self._manifests.pop(prefix, None)
        raise CacheIntegrityError(f"{prefix}: manifest keeps changing under the reader", prefix=prefix)

    def _select(self, manifest: Manifest, indices: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
        if indices is None:
            return None, np.arange(manifest.num_chunks)
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise ValueError(f"indices must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= manifest.num_samples):
            bad = idx[(idx < 0) | (idx >= manifest.num_samples)][0]
            raise IndexError(f"index {bad} out of range for {manifest.num_samples} samples of {manifest.split}")
        return idx, np.unique(idx // manifest.chunk_size)

    def _fetch_with(self, prefix: str, manifest: Manifest, indices: np.ndarray | None, *, check_generation: bool) -> np.ndarray:
        idx, needed = self._select(manifest, indices)
        generation = manifest.generation
        chunks: dict[int, np.ndarray] = {}
        missing: list[int] = []
        for chunk in needed.tolist():
            cached = self._lru.get((prefix, generation, chunk)) if self.lru_bytes else None
            if cached is None:
                missing.append(chunk)
            else:
                chunks[chunk] = cached
        self._count(lru_hits=len(chunks))
        if missing or check_generation:
            for values in self._read_chunks(prefix, manifest, missing):
                for chunk, value in values:
                    if value is None:
                        raise CacheIntegrityError(
                            f"{prefix}: chunk {chunk} of generation {generation} is missing (evicted, expired or deleted)")
                    decoded = _decode_chunk(value, manifest, chunk)
                    chunks[chunk] = decoded
                    if self.lru_bytes:
                        self._lru.put((prefix, generation, chunk), decoded)
        return self._assemble(manifest, idx, chunks)

    def _read_chunks(self, prefix: str, manifest: Manifest, chunks: list[int]) -> Iterator[list[tuple[int, bytes | None]]]:
        """Yield groups of (chunk, value), each read in one round trip (pipelined MGET + HGET).

        The manifest's generation is read *after* the chunks: chunks of a generation are only
        deleted after its manifest was replaced or removed, so if the generation is still
        current after the MGET, a missing chunk is really lost (evicted, expired), and if it
        changed, the reader retries with the new manifest. Values that did arrive are checked
        against the manifest they belong to, so a completed read is always one consistent set.
        """
        groups: list[list[int]] = [[]]
        group_bytes = 0
        for chunk in chunks:
            if groups[-1] and (group_bytes >= _PIPELINE_BYTES or len(groups[-1]) >= _PIPELINE_KEYS):
                groups.append([])
                group_bytes = 0
            groups[-1].append(chunk)
            group_bytes += manifest.chunk_nbytes[chunk]
        for group in groups:
            keys = [self._chunk_key(prefix, manifest.generation, c) for c in group]

            def read() -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                if keys:
                    pipe.mget(keys)
                pipe.hget(f"{prefix}:manifest", "generation")
                return pipe.execute()

            replies = self._call(read, f"read {prefix}")
            values = replies[0] if keys else []
            current = replies[-1].decode() if replies[-1] is not None else None
            if current != manifest.generation:
                with self._manifest_lock:
                    self._manifests.pop(prefix, None)
                if any(v is None for v in values):
                    raise _GenerationChanged()
            self._count(chunk_reads=len(keys), bytes_read=sum(len(v) for v in values if v is not None))
            yield list(zip(group, values))

    @staticmethod
    def _assemble(manifest: Manifest, idx: np.ndarray | None, chunks: dict[int, np.ndarray]) -> np.ndarray:
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

    # ------------------------------------------------------------------ fetch or compute
    def fetch_or_compute(
        self,
        teacher_fp: str,
        dataset_fp: str,
        split: str,
        compute: Callable[[], np.ndarray],
        *,
        teacher_spec: dict[str, Any],
        **publish_kwargs: Any,
    ) -> tuple[np.ndarray, bool]:
        """The whole split's logits (float32) and whether they came from the cache.

        On a miss, a corrupt entry or missing chunks (evicted, lost in a Redis restart), logs a
        warning, calls ``compute()`` (the teacher, from its checkpoint) and republishes. Only one
        caller per entry computes; concurrent callers wait for its manifest. If Redis stays
        unreachable after retries, the computed logits are returned without caching.

        ``publish_kwargs`` are passed to :meth:`publish` (``encoding``, ``topk``, ``view``, ...).
        """
        publish_kwargs.pop("overwrite", None)
        try:
            options = PublishOptions(**publish_kwargs)
        except TypeError as error:
            raise TypeError(f"fetch_or_compute: unknown publish option ({error})") from None
        view = options.view
        prefix = self.key_prefix(teacher_fp, dataset_fp, split, view)
        stale: str | None = None
        computed: np.ndarray | None = None
        try:
            logits = self.fetch(teacher_fp, dataset_fp, split, view=view)
            self._touch(prefix)
            self._record(hit=True)
            return logits, True
        except CacheMissError:
            logger.warning("soft labels %s not cached: computing them", prefix)
        except CacheIntegrityError as error:
            logger.warning("soft labels %s unusable (%s): recomputing from the teacher", prefix, error)
            stale = error.generation or self._current_generation(prefix)
        except redis.RedisError as error:
            if not is_retryable(error):
                raise
            logger.error("Redis unreachable (%s): computing %s without caching", error, prefix)
            self._count(misses=1)
            return np.asarray(self._validated(compute(), prefix), np.float32), False
        try:
            manifest, lease = self._acquire_or_wait(prefix, stale_generation=stale)
            if lease is None:  # another process computed and published it meanwhile
                self._record(hit=True)
                return self.fetch(teacher_fp, dataset_fp, split, view=view), True
            try:
                self._record(hit=False)
                computed = self._validated(compute(), prefix)
                self._validate_publish(computed, teacher_spec, options)
            except BaseException:
                lease.release()
                raise
            self._publish_validated(prefix, teacher_fp, dataset_fp, split, computed, teacher_spec, options, stale, lease)
        except redis.RedisError as error:
            if not is_retryable(error):
                raise
            logger.error("Redis unreachable (%s): using computed %s without caching", error, prefix)
            if computed is None:
                computed = self._validated(compute(), prefix)
            return np.asarray(computed, np.float32), False
        try:
            # Return exactly what every other reader gets (float16/top-k rounding included).
            return self.fetch(teacher_fp, dataset_fp, split, view=view), False
        except (CacheIntegrityError, CacheMissError) as error:
            logger.warning("re-reading %s right after publishing failed (%s); using the computed logits", prefix, error)
            return np.asarray(computed, np.float32), False

    @staticmethod
    def _validated(logits: Any, prefix: str) -> np.ndarray:
        if not isinstance(logits, np.ndarray):
            raise TypeError(f"compute() for {prefix} must return a numpy array, got {type(logits).__name__}")
        return logits

    def _touch(self, prefix: str) -> None:
        """Refresh the TTL of an entry's chunks (it is in use)."""
        manifest, _ = self._cached_manifest(prefix)
        if manifest is None:
            return
        keys = [self._chunk_key(prefix, manifest.generation, c) for c in range(manifest.num_chunks)]
        ttl_ms = self.chunk_ttl_s * 1000

        def touch() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.pexpire(key, ttl_ms)
            pipe.execute()

        try:
            self._call(touch, f"touch {prefix}")
        except redis.RedisError as error:
            logger.warning("could not refresh TTLs of %s: %s", prefix, error)

    def _record(self, *, hit: bool) -> None:
        field = "hits" if hit else "misses"
        self._count(**{field: 1})
        try:
            self._call(lambda: self.client.hincrby(self._stats_key, field, 1))
        except redis.RedisError as error:
            logger.warning("could not update cache counters: %s", error)

    # ------------------------------------------------------------------ operations
    def verify(self, teacher_fp: str | None = None) -> list[Problem]:
        """Read and check every chunk of every entry (of one teacher); list what is wrong.

        Also reports orphan chunks (a generation without a manifest, left by a crashed writer).
        """
        if teacher_fp is not None:
            _check_name("teacher_fp", teacher_fp)
        problems: list[Problem] = []
        for prefix in self._prefixes():
            parts = prefix.split(":")
            if teacher_fp is not None and parts[-4] != teacher_fp:
                continue
            try:
                manifest = self._load_manifest(prefix)
            except CacheIntegrityError as error:
                problems.append(Problem(kind="corrupt_manifest", prefix=prefix, message=str(error),
                                        teacher_fp=parts[-4], split=parts[-2]))
                continue
            if manifest is None:
                continue
            try:
                for values in self._read_chunks(prefix, manifest, list(range(manifest.num_chunks))):
                    for chunk, value in values:
                        if value is None:
                            problems.append(Problem(kind="missing_chunk", prefix=prefix, chunk=chunk,
                                                    teacher_fp=manifest.teacher_fp, split=manifest.split,
                                                    message=f"chunk {chunk} is missing (evicted, expired or deleted)"))
                            continue
                        try:
                            _decode_chunk(value, manifest, chunk)
                        except CacheIntegrityError as error:
                            problems.append(Problem(kind="corrupt_chunk", prefix=prefix, chunk=chunk, message=str(error),
                                                    teacher_fp=manifest.teacher_fp, split=manifest.split))
            except _GenerationChanged:
                continue  # republished while verifying; the new generation is consistent by construction
        for prefix, generations in self._orphans(teacher_fp).items():
            problems.append(Problem(kind="orphan_chunks", prefix=prefix, teacher_fp=prefix.split(":")[-4],
                                    message=f"chunks of unpublished generation(s) {sorted(generations)}"))
        return problems

    def _orphans(self, teacher_fp: str | None) -> dict[str, dict[str, list[bytes]]]:
        """Chunk keys whose generation is not the published one and whose writer is gone."""
        pattern = f"{self.namespace}:sl:{teacher_fp or '*'}:*:g*:c*"
        found: dict[str, dict[str, list[bytes]]] = {}
        for key in self.client.scan_iter(match=pattern, count=1000):
            text = key.decode()
            head, _, _chunk = text.rpartition(":")
            prefix, _, gen = head.rpartition(":")
            found.setdefault(prefix, {}).setdefault(gen[1:], []).append(key)
        orphans: dict[str, dict[str, list[bytes]]] = {}
        for prefix, generations in found.items():
            current = self._current_generation(prefix)
            writing = self.client.exists(f"{prefix}:lock")
            stale = {g: keys for g, keys in generations.items() if g != current and not writing}
            if stale:
                orphans[prefix] = stale
        return orphans

    def stats(self) -> dict[str, Any]:
        """Cluster-wide hits/misses, entries and bytes per teacher and split, Redis memory, and
        this process's read counters under ``local``."""
        counters = self._call(lambda: self.client.hgetall(self._stats_key))
        by_teacher: dict[str, dict[str, Any]] = {}
        manifests = self.list_manifests()
        for m in manifests:
            entry = by_teacher.setdefault(m.teacher_fp, {"entries": 0, "bytes": 0, "splits": {}})
            entry["entries"] += 1
            entry["bytes"] += m.nbytes
            split_key = m.split if m.view is None else f"{m.split}/view{m.view}"
            entry["splits"][split_key] = entry["splits"].get(split_key, 0) + m.nbytes
        memory = self._call(lambda: self.client.info("memory"))
        with self._counters_lock:
            local = dict(self.counters)
        local["lru_bytes"] = self._lru.nbytes
        return {
            "hits": int(counters.get(b"hits", 0)),
            "misses": int(counters.get(b"misses", 0)),
            "entries": len(manifests),
            "bytes": sum(m.nbytes for m in manifests),
            "by_teacher": by_teacher,
            "redis": {
                "used_memory": int(memory.get("used_memory", 0)),
                "maxmemory": int(memory.get("maxmemory", 0)),
                "maxmemory_policy": memory.get("maxmemory_policy"),
            },
            "local": local,
        }

    def purge(self, teacher_fp: str | None = None, older_than_s: float | None = None) -> int:
        """Delete entries (of one teacher, and/or created more than ``older_than_s`` ago).

        The manifest goes first, so readers see a miss, never a half-deleted set. Without
        ``older_than_s``, orphan chunks left by crashed writers are deleted too. Returns the
        number of entries (manifests and orphan generations) removed.
        """
        if teacher_fp is not None:
            _check_name("teacher_fp", teacher_fp)
        if older_than_s is not None and older_than_s < 0:
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
        now = time.time()
        removed = 0
        for prefix in self._prefixes():
            if teacher_fp is not None and prefix.split(":")[-4] != teacher_fp:
                continue
            try:
                manifest = self._load_manifest(prefix)
            except CacheIntegrityError:
                manifest = None  # corrupt: purge it whatever its age
            else:
                if manifest is None:
                    self._call(lambda: self.client.srem(self._index_key, prefix))
                    continue
                if older_than_s is not None and now - manifest.created_at < older_than_s:
                    continue
            self._call(lambda: self.client.delete(f"{prefix}:manifest"))
            self._call(lambda: self.client.srem(self._index_key, prefix))
            if manifest is not None:
                self._unlink([self._chunk_key(prefix, manifest.generation, c) for c in range(manifest.num_chunks)])
            self._lru.drop_prefix(prefix)
            with self._manifest_lock:
                self._manifests.pop(prefix, None)
            removed += 1
        if older_than_s is None:
            for generations in self._orphans(teacher_fp).values():
                for keys in generations.values():
                    self._unlink([k.decode() for k in keys])
                    removed += 1
        return removed


class _LeaseLost(Exception):
    """The writer's lease expired or was taken before it committed."""


class _GenerationChanged(Exception):
    """The manifest was republished while a reader was using the previous one."""


def _rebuild(url: str, kwargs: dict[str, Any]) -> SoftLabelCache:
    return SoftLabelCache(url, **kwargs)
