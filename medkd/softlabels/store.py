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
    Reading, chunk encodings and operations live in their own modules: :mod:`.manifest`
    (what an entry is), :mod:`.chunks` (encodings, decode, gather), :mod:`.chunk_lru`,
    :mod:`.lease`, :mod:`.entry_access` (keys, manifests, chunk reads) and :mod:`.maintenance`
    (verify, stats, purge).

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

import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import redis

from medkd.softlabels.chunks import encode_chunk
from medkd.softlabels.codec import stored_checksums
from medkd.softlabels.entry_access import PIPELINE_BYTES, PIPELINE_KEYS
from medkd.softlabels.lease import Lease, LeaseLost
from medkd.softlabels.maintenance import CacheMaintenance
from medkd.softlabels.manifest import (
    ENCODINGS,
    CacheIntegrityError,
    CacheMissError,
    Manifest,
    PublishOptions,
    validate_publish,
)
from medkd.softlabels.redis_client import is_retryable

logger = logging.getLogger(__name__)


class SoftLabelCache(CacheMaintenance):
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

    def _lease(self, prefix: str) -> Lease:
        return Lease(self.client, self._scripts, prefix, ttl_s=self.lock_ttl_s, call=self._call)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.url, self._init_kwargs()))

    def _init_kwargs(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "lru_bytes": self.lru_bytes,
            "password_env": self.password_env,
            "retries": self.retries,
            "chunk_ttl_s": self.chunk_ttl_s,
            "lock_ttl_s": self.lock_ttl_s,
            "manifest_ttl_s": self.manifest_ttl_s,
        }

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
        options = PublishOptions(
            encoding=encoding,
            compression=compression,
            topk=topk,
            view=view,
            view_params=view_params,
            chunk_size=chunk_size,
            max_chunk_bytes=max_chunk_bytes,
        )
        prefix = self.key_prefix(teacher_fp, dataset_fp, split, view)
        validate_publish(logits, teacher_spec, options)
        existing = self._existing_for_publish(prefix, overwrite)
        if existing is not None:
            self._warn_if_different(existing, options)
            return existing
        stale = self._current_generation(prefix) if overwrite else None
        return self._publish_validated(prefix, teacher_fp, dataset_fp, split, logits, teacher_spec, options, stale)

    def _publish_validated(
        self,
        prefix: str,
        teacher_fp: str,
        dataset_fp: str,
        split: str,
        logits: np.ndarray,
        teacher_spec: dict[str, Any],
        options: PublishOptions,
        stale: str | None,
        lease: Lease | None = None,
    ) -> Manifest:
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
            except LeaseLost:
                logger.warning("%s: lost the writer lease before committing; retrying", prefix)
            finally:
                lease.release()
                lease = None
        raise RuntimeError(
            f"{prefix}: lost the writer lease three times (writes slower than lock_ttl_s={self.lock_ttl_s}s?)"
        )

    def _existing_for_publish(self, prefix: str, overwrite: bool) -> Manifest | None:
        if overwrite:
            return None
        try:
            return self._load_manifest(prefix)
        except CacheIntegrityError as error:
            logger.warning("%s; it will be replaced", error)
            return None

    @staticmethod
    def _warn_if_different(existing: Manifest, options: PublishOptions) -> None:
        if (existing.encoding, existing.compression, existing.topk) != (
            options.encoding,
            options.compression,
            options.topk,
        ):
            logger.warning(
                "entry %s/%s/%s already published with encoding=%s compression=%s topk=%s; keeping it "
                "(pass overwrite=True to re-encode)",
                existing.teacher_fp,
                existing.dataset_fp,
                existing.split,
                existing.encoding,
                existing.compression,
                existing.topk,
            )

    def _acquire_or_wait(
        self, prefix: str, stale_generation: str | None, max_wait_s: float = 3600.0
    ) -> tuple[Manifest | None, Lease | None]:
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
            lease = self._lease(prefix)
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

    def _write_locked(
        self,
        lease: Lease,
        prefix: str,
        teacher_fp: str,
        dataset_fp: str,
        split: str,
        logits: np.ndarray,
        teacher_spec: dict[str, Any],
        options: PublishOptions,
    ) -> Manifest:
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
                value = encode_chunk(block, encoding, topk, compression)
                checksums.append(stored_checksums(value))
                chunk_nbytes.append(len(value))
                batch.append((self._chunk_key(prefix, generation, chunk), value))
                batch_bytes += len(value)
                if batch_bytes >= PIPELINE_BYTES or len(batch) >= PIPELINE_KEYS:
                    self._write_batch(batch, ttl_ms)
                    written += [k for k, _ in batch]
                    batch, batch_bytes = [], 0
            if batch:
                self._write_batch(batch, ttl_ms)
                written += [k for k, _ in batch]
            manifest = Manifest(
                teacher_fp=teacher_fp,
                dataset_fp=dataset_fp,
                split=split,
                view=view,
                num_samples=num_samples,
                sample_shape=tuple(int(s) for s in logits.shape[1:]),
                dtype=str(logits.dtype),
                encoding=encoding,
                compression=compression,
                topk=None if topk is None else int(topk),
                chunk_size=chunk_size,
                num_chunks=num_chunks,
                checksums=checksums,
                chunk_nbytes=chunk_nbytes,
                nbytes=sum(chunk_nbytes),
                created_at=time.time(),
                generation=generation,
                teacher_spec=teacher_spec,
                view_params=view_params,
            )
            manifest = manifest.model_copy(update={"checksum": manifest.compute_checksum()})
            body = manifest.model_dump(mode="json", exclude={"view_params"})
            committed = self._call(
                lambda: self._scripts.commit(
                    keys=[lease.key, f"{prefix}:manifest", self._index_key],
                    args=[
                        lease.token,
                        json.dumps(body, separators=(",", ":")),
                        generation,
                        json.dumps(view_params, separators=(",", ":")),
                        prefix,
                    ],
                ),
                f"commit {prefix}",
            )
            if not committed and self._current_generation(prefix) != generation:
                raise LeaseLost(prefix)
        except BaseException:
            self._unlink(written)
            raise
        with self._manifest_lock:
            self._manifests[prefix] = (manifest, time.monotonic())
        if previous_manifest is not None and previous_manifest.generation != generation:
            self._unlink(
                [self._chunk_key(prefix, previous_manifest.generation, c) for c in range(previous_manifest.num_chunks)]
            )
        self._lru.drop_prefix(prefix)
        logger.info(
            "published %s: %d samples, %d chunks, %d bytes (%s%s%s)",
            prefix,
            num_samples,
            num_chunks,
            manifest.nbytes,
            encoding,
            f", top-{topk}" if topk else "",
            f", {compression}" if compression else "",
        )
        return manifest

    def _write_batch(self, batch: list[tuple[str, bytes]], ttl_ms: int) -> None:
        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key, value in batch:
                pipe.set(key, value, px=ttl_ms)
            pipe.execute()

        self._call(write, "write chunks")

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
                validate_publish(computed, teacher_spec, options)
            except BaseException:
                lease.release()
                raise
            self._publish_validated(
                prefix, teacher_fp, dataset_fp, split, computed, teacher_spec, options, stale, lease
            )
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


def _rebuild(url: str, kwargs: dict[str, Any]) -> SoftLabelCache:
    return SoftLabelCache(url, **kwargs)
