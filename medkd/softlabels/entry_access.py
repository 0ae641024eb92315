"""Reading soft-label entries: the connection, key layout, manifests and raw chunk reads.

:class:`EntryAccess` is the part of :class:`~medkd.softlabels.store.SoftLabelCache` that every
operation shares (see :mod:`medkd.softlabels.store` for the key layout): it validates and builds
keys, runs Redis calls through the cache's retry policy, loads and checks manifests (keeping
recent ones in process for ``manifest_ttl_s``) and reads chunks in pipelined round trips.

Examples:
    >>> access = EntryAccess(server.url)                               # doctest: +SKIP
    >>> access.manifest("t1", "d1", "train")                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import redis

from medkd.softlabels.chunk_lru import ChunkLRU
from medkd.softlabels.chunks import assemble_rows, decode_chunk
from medkd.softlabels.lease import LeaseScripts
from medkd.softlabels.manifest import (
    SOFTLABEL_FORMAT_VERSION,
    CacheIntegrityError,
    CacheMissError,
    Manifest,
    check_name,
    check_view,
)
from medkd.softlabels.redis_client import DEFAULT_RETRIES, connect, redact_url

logger = logging.getLogger(__name__)

PIPELINE_BYTES = 64 << 20  # bytes per MGET/SET round trip (bounds client and server buffers)
PIPELINE_KEYS = 1024


class GenerationChanged(Exception):
    """The manifest was republished while a reader was using the previous one."""


class EntryAccess:
    """Connection, keys, manifests and chunk reads shared by every cache operation.

    Takes the arguments of :class:`~medkd.softlabels.store.SoftLabelCache` (documented there).
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "medkd",
        lru_bytes: int = 256 << 20,
        password_env: str | None = None,
        retries: int = DEFAULT_RETRIES,
        chunk_ttl_s: int = 30 * 24 * 3600,
        lock_ttl_s: float = 30.0,
        manifest_ttl_s: float = 5.0,
    ) -> None:
        check_name("namespace", namespace)
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
        self._scripts = LeaseScripts(self.client)
        self._lru = ChunkLRU(lru_bytes)
        self._manifests: dict[str, tuple[Manifest, float]] = {}
        self._manifest_lock = threading.Lock()
        self._counters_lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("lru_hits", "chunk_reads", "bytes_read", "integrity_errors", "hits", "misses"), 0
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url)!r}, namespace={self.namespace!r})"

    def close(self) -> None:
        self.client.close()

    def key_prefix(self, teacher_fp: str, dataset_fp: str, split: str, view: int | None = None) -> str:
        """``{namespace}:sl:{teacher_fp}:{dataset_fp}:{split}:v{view or -}``."""
        check_name("teacher_fp", teacher_fp)
        check_name("dataset_fp", dataset_fp)
        check_name("split", split)
        view = check_view(view)
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
        """Runs one Redis operation. Retries are the client's own policy (each command, or a
        pipeline as a whole, is retried by redis-py): no second loop here multiplies them."""
        return operation()

    def _count(self, **deltas: int) -> None:
        with self._counters_lock:
            for name, delta in deltas.items():
                self.counters[name] += delta

    def _load_manifest(self, prefix: str) -> Manifest | None:
        fields = self._call(
            lambda: self.client.hmget(f"{prefix}:manifest", ["json", "generation", "view_params"]),
            f"read manifest {prefix}",
        )
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
                prefix=prefix,
                generation=manifest.generation,
            )
        if manifest.checksum != manifest.compute_checksum():
            raise CacheIntegrityError(
                f"{prefix}: manifest checksum mismatch", prefix=prefix, generation=manifest.generation
            )
        if (
            generation is None
            or generation.decode() != manifest.generation
            or len(manifest.checksums) != manifest.num_chunks
        ):
            raise CacheIntegrityError(
                f"{prefix}: manifest is inconsistent", prefix=prefix, generation=manifest.generation
            )
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

    def _current_generation(self, prefix: str) -> str | None:
        value = self._call(lambda: self.client.hget(f"{prefix}:manifest", "generation"))
        return value.decode() if value is not None else None

    def _unlink(self, keys: list[str]) -> None:
        for start in range(0, len(keys), PIPELINE_KEYS):
            part = keys[start : start + PIPELINE_KEYS]
            try:
                self._call(lambda part=part: self.client.unlink(*part), "unlink")
            except redis.RedisError as error:  # they expire on their own
                logger.warning("could not unlink %d keys: %s", len(part), error)

    def fetch(
        self, teacher_fp: str, dataset_fp: str, split: str, indices: np.ndarray | None = None, view: int | None = None
    ) -> np.ndarray:
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
            except GenerationChanged:
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

    def _fetch_with(
        self, prefix: str, manifest: Manifest, indices: np.ndarray | None, *, check_generation: bool
    ) -> np.ndarray:
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
                            f"{prefix}: chunk {chunk} of generation {generation} is missing "
                            "(evicted, expired or deleted)"
                        )
                    decoded = decode_chunk(value, manifest, chunk)
                    chunks[chunk] = decoded
                    if self.lru_bytes:
                        self._lru.put((prefix, generation, chunk), decoded)
        return assemble_rows(manifest, idx, chunks)

    def _read_chunks(
        self, prefix: str, manifest: Manifest, chunks: list[int]
    ) -> Iterator[list[tuple[int, bytes | None]]]:
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
            if groups[-1] and (group_bytes >= PIPELINE_BYTES or len(groups[-1]) >= PIPELINE_KEYS):
                groups.append([])
                group_bytes = 0
            groups[-1].append(chunk)
            group_bytes += manifest.chunk_nbytes[chunk]
        for group in groups:
            keys = [self._chunk_key(prefix, manifest.generation, c) for c in group]

            def read(keys: list[str] = keys) -> list[Any]:
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
                    raise GenerationChanged()
            self._count(chunk_reads=len(keys), bytes_read=sum(len(v) for v in values if v is not None))
            yield list(zip(group, values, strict=True))
