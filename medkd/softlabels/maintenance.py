"""Operating the soft-label cache: list, verify, count and purge entries.

:class:`CacheMaintenance` adds the operator's view to :class:`EntryAccess`: every readable
manifest, a full check of every chunk (and of orphan chunks left by crashed writers), cluster-wide
statistics, and deletion by teacher or age. ``medkd cache`` (:mod:`medkd.softlabels.admin`) calls
these through :class:`~medkd.softlabels.store.SoftLabelCache`.

Examples:
    >>> cache.verify()                                  # doctest: +SKIP
    []
    >>> cache.purge(older_than_s=7 * 24 * 3600)         # doctest: +SKIP
    3
"""

from __future__ import annotations

import logging
import time
from typing import Any

from medkd.softlabels.chunks import decode_chunk
from medkd.softlabels.entry_access import EntryAccess, GenerationChanged
from medkd.softlabels.manifest import CacheIntegrityError, Manifest, Problem, check_name

logger = logging.getLogger(__name__)


class CacheMaintenance(EntryAccess):
    """Listing, verification, statistics and purging of a namespace's entries."""

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

    def verify(self, teacher_fp: str | None = None) -> list[Problem]:
        """Read and check every chunk of every entry (of one teacher); list what is wrong.

        Also reports orphan chunks (a generation without a manifest, left by a crashed writer).
        """
        if teacher_fp is not None:
            check_name("teacher_fp", teacher_fp)
        problems: list[Problem] = []
        for prefix in self._prefixes():
            parts = prefix.split(":")
            if teacher_fp is not None and parts[-4] != teacher_fp:
                continue
            try:
                manifest = self._load_manifest(prefix)
            except CacheIntegrityError as error:
                problems.append(
                    Problem(
                        kind="corrupt_manifest",
                        prefix=prefix,
                        message=str(error),
                        teacher_fp=parts[-4],
                        split=parts[-2],
                    )
                )
                continue
            if manifest is None:
                continue
            try:
                for values in self._read_chunks(prefix, manifest, list(range(manifest.num_chunks))):
                    for chunk, value in values:
                        if value is None:
                            problems.append(
                                Problem(
                                    kind="missing_chunk",
                                    prefix=prefix,
                                    chunk=chunk,
                                    teacher_fp=manifest.teacher_fp,
                                    split=manifest.split,
                                    message=f"chunk {chunk} is missing (evicted, expired or deleted)",
                                )
                            )
                            continue
                        try:
                            decode_chunk(value, manifest, chunk)
                        except CacheIntegrityError as error:
                            problems.append(
                                Problem(
                                    kind="corrupt_chunk",
                                    prefix=prefix,
                                    chunk=chunk,
                                    message=str(error),
                                    teacher_fp=manifest.teacher_fp,
                                    split=manifest.split,
                                )
                            )
            except GenerationChanged:
                continue  # republished while verifying; the new generation is consistent by construction
        for prefix, generations in self._orphans(teacher_fp).items():
            problems.append(
                Problem(
                    kind="orphan_chunks",
                    prefix=prefix,
                    teacher_fp=prefix.split(":")[-4],
                    message=f"chunks of unpublished generation(s) {sorted(generations)}",
                )
            )
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
            check_name("teacher_fp", teacher_fp)
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
                    self._call(lambda prefix=prefix: self.client.srem(self._index_key, prefix))
                    continue
                if older_than_s is not None and now - manifest.created_at < older_than_s:
                    continue
            self._call(lambda prefix=prefix: self.client.delete(f"{prefix}:manifest"))
            self._call(lambda prefix=prefix: self.client.srem(self._index_key, prefix))
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
