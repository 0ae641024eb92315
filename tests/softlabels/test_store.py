"""The soft-label cache against a real redis-server: encodings, integrity, concurrency, faults."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from medkd.softlabels.chunk_lru import ChunkLRU
from medkd.softlabels.manifest import CacheIntegrityError, CacheMissError, Manifest, PublishOptions
from medkd.softlabels.redis_client import RedisConnectionError, connect
from medkd.softlabels.redis_server import ManagedRedisServer
from medkd.softlabels.store import SoftLabelCache
from tests.conftest import free_port

TEACHER_SPEC = {"name": "cnn", "model": "resnet18"}


# ---------------------------------------------------------------------- data


def classification_logits(n: int = 300, classes: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, classes)) * 2
    z[np.arange(n), rng.integers(0, classes, n)] += 6
    return z.astype(np.float32)


def segmentation_logits(n: int = 6, classes: int = 14, size: tuple[int, ...] = (32, 32), seed: int = 0) -> np.ndarray:
    """Region-wise confident per-pixel logits: true class +8 over N(0, 2) others, pixel noise 0.5."""
    rng = np.random.default_rng(seed)
    coarse_shape = tuple(s // 8 for s in size)
    coarse = rng.normal(size=(n, classes, *coarse_shape)) * 2
    labels = rng.integers(0, classes, (n, 1, *coarse_shape))
    np.put_along_axis(coarse, labels, np.take_along_axis(coarse, labels, 1) + 8, 1)
    for axis in range(2, 2 + len(size)):
        coarse = coarse.repeat(8, axis=axis)
    return (coarse + rng.normal(size=coarse.shape) * 0.5).astype(np.float32)


def softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    z = z / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def mean_kl(z: np.ndarray, z_hat: np.ndarray, temperature: float) -> float:
    p, q = softmax(z.astype(np.float64), temperature), softmax(z_hat.astype(np.float64), temperature)
    return float((p * (np.log(p + 1e-300) - np.log(q + 1e-300))).sum(axis=1).mean())


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def cache(redis_url: str, namespace: str):
    cache = SoftLabelCache(redis_url, namespace=namespace)
    yield cache
    cache.purge()
    cache.client.delete(f"{namespace}:sl:stats", f"{namespace}:sl:index")
    cache.close()


def chunk_keys(client: redis.Redis, namespace: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{namespace}:sl:*:g*:c*", count=1000))


# ---------------------------------------------------------------------- encodings


@pytest.mark.parametrize("encoding", ["float16", "float32"])
@pytest.mark.parametrize("compression", [None, "zlib", "lzma"])
def test_classification_round_trip(cache: SoftLabelCache, encoding: str, compression: str | None) -> None:
    logits = classification_logits()
    manifest = cache.publish(
        "teach1",
        "data1",
        "train",
        logits,
        teacher_spec=TEACHER_SPEC,
        encoding=encoding,
        compression=compression,
        chunk_size=64,
    )
    assert (manifest.num_samples, manifest.sample_shape, manifest.num_chunks) == (300, (10,), 5)
    assert manifest.encoding == encoding and manifest.dtype == "float32"
    out = cache.fetch("teach1", "data1", "train")
    assert out.dtype == np.float32 and out.shape == logits.shape
    if encoding == "float32":
        np.testing.assert_array_equal(out, logits)
    else:  # documented bound: |error| <= |z| * 2**-11
        assert np.all(np.abs(out - logits) <= np.abs(logits) * 2.0**-11 + 1e-7)
        assert mean_kl(logits, out, 1.0) < 1e-6 and mean_kl(logits, out, 4.0) < 1e-6


@pytest.mark.parametrize("size", [(32, 32), (16, 16, 8)], ids=["2d", "3d"])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_segmentation_round_trip_is_lossless_up_to_float16(
    cache: SoftLabelCache, size: tuple[int, ...], compression: str | None
) -> None:
    logits = segmentation_logits(size=size)
    cache.publish("teach1", "data1", "train", logits, teacher_spec=TEACHER_SPEC, compression=compression)
    out = cache.fetch("teach1", "data1", "train")
    assert out.shape == logits.shape
    np.testing.assert_array_equal(out, logits.astype(np.float16).astype(np.float32))


def test_topk_error_is_bounded(cache: SoftLabelCache) -> None:
    """The error top-k introduces, as documented in the softlabels module docstring."""
    logits = segmentation_logits(n=4, classes=14, size=(64, 64))
    manifest = cache.publish("teach1", "data1", "train", logits, teacher_spec=TEACHER_SPEC, topk=3, compression="zlib")
    plain = cache.publish("teach1", "data1", "val", logits, teacher_spec=TEACHER_SPEC)
    out = cache.fetch("teach1", "data1", "train")
    assert out.shape == logits.shape
    reference = logits.astype(np.float16).astype(np.float32)
    # The argmax and the kept logits are exact (up to float16)...
    np.testing.assert_array_equal(out.argmax(axis=1), reference.argmax(axis=1))
    top3 = np.argsort(-logits, axis=1)[:, :3]
    np.testing.assert_array_equal(np.take_along_axis(out, top3, 1), np.take_along_axis(reference, top3, 1))
    # ...the other classes hold the per-pixel mean of the dropped logits.
    dropped_mean = (logits.sum(1) - np.take_along_axis(logits, top3, 1).sum(1)) / 11
    lowest = np.argsort(-logits, axis=1)[:, -1:]
    np.testing.assert_allclose(np.take_along_axis(out, lowest, 1)[:, 0], dropped_mean, atol=0.02)
    # Documented distribution error for this data: mean KL ~2e-2 (T=1), ~3e-2 (T=4).
    assert mean_kl(logits, out, 1.0) < 0.05 and mean_kl(logits, out, 4.0) < 0.06
    assert manifest.nbytes < plain.nbytes / 2


def test_topk_is_validated_and_works_for_many_classes(cache: SoftLabelCache) -> None:
    logits = np.random.default_rng(1).normal(size=(3, 300, 4, 4)).astype(np.float32)  # > 256 classes: uint16 indices
    cache.publish("teach1", "data1", "train", logits, teacher_spec={}, topk=5)
    out = cache.fetch("teach1", "data1", "train")
    np.testing.assert_array_equal(out.argmax(1), logits.astype(np.float16).argmax(1))
    for bad in (0, 300, 2.5, True):
        with pytest.raises(ValueError, match="topk"):
            cache.publish("teach1", "data1", "val", logits, teacher_spec={}, topk=bad)


# ---------------------------------------------------------------------- reads


def test_fetch_indices_any_order_duplicates_and_empty(cache: SoftLabelCache) -> None:
    logits = classification_logits(n=1000)
    cache.publish("teach1", "data1", "train", logits, teacher_spec={}, encoding="float32", chunk_size=100)
    rng = np.random.default_rng(3)
    indices = np.concatenate([rng.permutation(1000)[:256], [5, 5, 999, 0]])
    np.testing.assert_array_equal(cache.fetch("teach1", "data1", "train", indices=indices), logits[indices])
    np.testing.assert_array_equal(
        cache.fetch("teach1", "data1", "train", indices=np.array([], np.int64)), np.zeros((0, 10), np.float32)
    )
    np.testing.assert_array_equal(cache.fetch("teach1", "data1", "train", indices=[7, 3]), logits[[7, 3]])


def test_fetch_rejects_bad_indices(cache: SoftLabelCache) -> None:
    cache.publish("teach1", "data1", "train", classification_logits(n=50), teacher_spec={})
    with pytest.raises(IndexError, match="index 50 out of range for 50 samples"):
        cache.fetch("teach1", "data1", "train", indices=np.array([1, 50]))
    with pytest.raises(IndexError, match="-1"):
        cache.fetch("teach1", "data1", "train", indices=np.array([-1]))
    with pytest.raises(ValueError, match="1-D integer"):
        cache.fetch("teach1", "data1", "train", indices=np.array([0.5]))
    with pytest.raises(CacheMissError, match="no soft labels"):
        cache.fetch("teach1", "data1", "test")


def test_large_samples_get_small_chunks(cache: SoftLabelCache) -> None:
    logits = segmentation_logits(n=10, size=(32, 32))  # 28 KiB per sample in float16
    manifest = cache.publish("teach1", "data1", "train", logits, teacher_spec={}, max_chunk_bytes=64 << 10)
    assert manifest.chunk_size == 2 and manifest.num_chunks == 5
    np.testing.assert_array_equal(
        cache.fetch("teach1", "data1", "train", indices=[9, 0, 4]),
        logits[[9, 0, 4]].astype(np.float16).astype(np.float32),
    )


def test_repeated_epochs_are_served_from_the_lru(cache: SoftLabelCache) -> None:
    cache.publish("teach1", "data1", "train", classification_logits(n=512), teacher_spec={}, chunk_size=128)
    first = cache.fetch("teach1", "data1", "train")
    reads = cache.counters["chunk_reads"]
    second = cache.fetch("teach1", "data1", "train", indices=np.arange(512)[::-1])
    assert cache.counters["chunk_reads"] == reads  # no chunk read again
    assert cache.counters["lru_hits"] >= 4
    np.testing.assert_array_equal(second, first[::-1])
    second[:] = 0  # callers own what they get; the LRU is not aliased
    np.testing.assert_array_equal(cache.fetch("teach1", "data1", "train"), first)


def test_views_keep_their_augmentation_parameters(cache: SoftLabelCache) -> None:
    logits = [classification_logits(n=20, seed=s) for s in range(2)]
    params = [[{"flip": bool(i % 2), "crop": [i, i + 8], "view": v} for i in range(20)] for v in range(2)]
    for view in range(2):
        cache.publish(
            "teach1",
            "data1",
            "train",
            logits[view],
            teacher_spec={},
            view=view,
            view_params=params[view],
            encoding="float32",
        )
    for view in range(2):
        np.testing.assert_array_equal(cache.fetch("teach1", "data1", "train", view=view), logits[view])
        assert cache.manifest("teach1", "data1", "train", view=view).view_params == params[view]
    assert not cache.exists("teach1", "data1", "train")  # the un-augmented entry is separate
    with pytest.raises(ValueError, match="view_params .* is required"):
        cache.publish("teach1", "data1", "train", logits[0], teacher_spec={}, view=3)
    with pytest.raises(ValueError, match="list of 20 dicts"):
        cache.publish("teach1", "data1", "train", logits[0], teacher_spec={}, view=3, view_params=params[0][:5])
    with pytest.raises(ValueError, match="without view"):
        cache.publish("teach1", "data1", "train", logits[0], teacher_spec={}, view_params=params[0])


# ---------------------------------------------------------------------- publish rules


def test_publishing_twice_writes_nothing_twice(cache: SoftLabelCache, namespace: str) -> None:
    logits = classification_logits(n=100)
    first = cache.publish("teach1", "data1", "train", logits, teacher_spec={}, chunk_size=25)
    keys = chunk_keys(cache.client, namespace)
    second = cache.publish("teach1", "data1", "train", logits, teacher_spec={}, chunk_size=25)
    assert second.generation == first.generation and chunk_keys(cache.client, namespace) == keys
    replaced = cache.publish("teach1", "data1", "train", logits * 2, teacher_spec={}, chunk_size=25, overwrite=True)
    assert replaced.generation != first.generation
    new_keys = chunk_keys(cache.client, namespace)
    assert len(new_keys) == 4 and not set(new_keys) & set(keys)  # old generation unlinked
    np.testing.assert_allclose(cache.fetch("teach1", "data1", "train"), logits * 2, rtol=1e-3)


def test_manifests_never_expire_and_chunks_do(cache: SoftLabelCache, namespace: str) -> None:
    cache.publish("teach1", "data1", "train", classification_logits(n=10), teacher_spec={})
    prefix = cache.key_prefix("teach1", "data1", "train")
    assert cache.client.ttl(f"{prefix}:manifest") == -1
    assert all(cache.client.ttl(k) > 0 for k in chunk_keys(cache.client, namespace))


@pytest.mark.parametrize(
    ("logits", "kwargs", "message"),
    [
        (np.arange(20).reshape(2, 10), {}, "floating point"),
        (np.zeros(10, np.float32), {}, r"shape \(N, C, ...\)"),
        (np.array([[np.nan, 1.0]], np.float32), {}, "NaN or inf"),
        (np.array([[7e4, 1.0]], np.float32), {}, "float16 range"),
        ([[1.0, 2.0]], {}, "numpy array"),
        (np.zeros((2, 3), np.float32), {"encoding": "bfloat16"}, "encoding must be one of"),
        (np.zeros((2, 3), np.float32), {"compression": "zstd"}, "compression must be"),
        (np.zeros((2, 3), np.float32), {"chunk_size": 0}, "chunk_size"),
        (np.zeros((2, 3), np.float32), {"teacher_spec": {"f": object()}}, "JSON"),
    ],
)
def test_publish_rejects_bad_input(cache: SoftLabelCache, logits, kwargs, message: str) -> None:
    kwargs = {"teacher_spec": {}, **kwargs}
    with pytest.raises(ValueError, match=message):
        cache.publish("teach1", "data1", "train", logits, **kwargs)
    assert not cache.exists("teach1", "data1", "train")


def test_key_prefix_is_a_content_address_and_rejects_unsafe_names(cache: SoftLabelCache, namespace: str) -> None:
    assert cache.key_prefix("abc", "def", "train") == f"{namespace}:sl:abc:def:train:v-"
    assert cache.key_prefix("abc", "def", "train", view=2) == f"{namespace}:sl:abc:def:train:v2"
    for bad in ("a:b", "a*", "", "x" * 200, "a b"):
        with pytest.raises(ValueError, match="teacher_fp"):
            cache.key_prefix(bad, "def", "train")
    with pytest.raises(ValueError, match="view"):
        cache.key_prefix("abc", "def", "train", view=-1)


# ---------------------------------------------------------------------- integrity


def _publish_and_get_keys(cache: SoftLabelCache) -> tuple[np.ndarray, Manifest, list[str]]:
    logits = classification_logits(n=200)
    manifest = cache.publish("teach1", "data1", "train", logits, teacher_spec={}, chunk_size=50)
    prefix = cache.key_prefix("teach1", "data1", "train")
    keys = [f"{prefix}:g{manifest.generation}:c{c}" for c in range(manifest.num_chunks)]
    return logits, manifest, keys


def _fresh(cache: SoftLabelCache) -> SoftLabelCache:
    """Another reader (another trial), with no LRU or cached manifest."""
    return SoftLabelCache(cache.url, namespace=cache.namespace)


@pytest.mark.parametrize("damage", ["flip_bit", "truncate", "delete", "swap_chunks", "garbage"])
def test_damaged_chunk_is_detected_and_recomputed(cache: SoftLabelCache, damage: str) -> None:
    logits, manifest, keys = _publish_and_get_keys(cache)
    value = cache.client.get(keys[1])
    if damage == "flip_bit":
        corrupted = bytearray(value)
        corrupted[len(value) // 2] ^= 0x01
        cache.client.set(keys[1], bytes(corrupted))
    elif damage == "truncate":
        cache.client.set(keys[1], value[:-7])
    elif damage == "delete":
        cache.client.delete(keys[1])
    elif damage == "swap_chunks":  # valid, same shape, but not this chunk: only the manifest can tell
        cache.client.set(keys[1], cache.client.get(keys[2]))
    else:
        cache.client.set(keys[1], b"not an array at all")
    reader = _fresh(cache)
    with pytest.raises(CacheIntegrityError, match="chunk 1"):
        reader.fetch("teach1", "data1", "train")
    assert [p.kind for p in reader.verify()] == ["missing_chunk" if damage == "delete" else "corrupt_chunk"]

    calls = []
    out, hit = reader.fetch_or_compute(
        "teach1", "data1", "train", lambda: calls.append(1) or logits, teacher_spec={}, chunk_size=50
    )
    assert not hit and calls == [1]
    np.testing.assert_allclose(out, logits, rtol=1e-3)
    assert reader.manifest("teach1", "data1", "train").generation != manifest.generation
    assert reader.verify() == []
    _, hit = _fresh(cache).fetch_or_compute("teach1", "data1", "train", lambda: 1 / 0, teacher_spec={})
    assert hit


def test_corrupt_manifest_is_detected_and_recomputed(cache: SoftLabelCache) -> None:
    logits, manifest, _ = _publish_and_get_keys(cache)
    key = cache.key_prefix("teach1", "data1", "train") + ":manifest"
    body = cache.client.hget(key, "json").decode().replace('"num_samples":200', '"num_samples":150')
    cache.client.hset(key, "json", body)
    with pytest.raises(CacheIntegrityError, match="manifest checksum"):
        _fresh(cache).manifest("teach1", "data1", "train")
    cache.client.hset(key, "json", "{not json")
    with pytest.raises(CacheIntegrityError, match="unreadable"):
        _fresh(cache).fetch("teach1", "data1", "train")
    assert [p.kind for p in cache.verify()] == ["corrupt_manifest"]
    out, hit = _fresh(cache).fetch_or_compute("teach1", "data1", "train", lambda: logits, teacher_spec={})
    assert not hit
    np.testing.assert_allclose(out, logits, rtol=1e-3)


def test_fetch_or_compute_counts_hits_and_misses(cache: SoftLabelCache) -> None:
    logits = classification_logits(n=40)
    out, hit = cache.fetch_or_compute(
        "teach1", "data1", "train", lambda: logits, teacher_spec=TEACHER_SPEC, encoding="float32"
    )
    assert not hit
    np.testing.assert_array_equal(out, logits)
    out, hit = cache.fetch_or_compute("teach1", "data1", "train", lambda: 1 / 0, teacher_spec=TEACHER_SPEC)
    assert hit
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 1, 1)
    assert stats["by_teacher"]["teach1"]["splits"]["train"] == cache.manifest("teach1", "data1", "train").nbytes
    with pytest.raises(TypeError, match="unknown publish option"):
        cache.fetch_or_compute("teach1", "data1", "train", lambda: logits, teacher_spec={}, encodng="float32")
    with pytest.raises(TypeError, match="numpy array"):
        cache.fetch_or_compute("teach1", "data1", "val", lambda: [1.0], teacher_spec={})


# ---------------------------------------------------------------------- concurrency


def test_two_writer_threads_produce_one_set_of_entries(cache: SoftLabelCache, namespace: str) -> None:
    logits = classification_logits(n=400)
    barrier = threading.Barrier(2)
    results: list[Manifest] = []

    def write() -> None:
        writer = _fresh(cache)
        barrier.wait()
        results.append(writer.publish("teach1", "data1", "train", logits, teacher_spec={}, chunk_size=10))

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2 and results[0].generation == results[1].generation
    keys = chunk_keys(cache.client, namespace)
    assert len(keys) == 40 and {k.split(b":")[-2] for k in keys} == {f"g{results[0].generation}".encode()}


def test_concurrent_fetch_or_compute_runs_the_teacher_once(cache: SoftLabelCache) -> None:
    logits = classification_logits(n=100)
    calls: list[int] = []
    barrier = threading.Barrier(3)
    outcomes: list[tuple[np.ndarray, bool]] = []

    def compute() -> np.ndarray:
        calls.append(1)
        time.sleep(0.5)  # a slow teacher
        return logits

    def trial() -> None:
        reader = _fresh(cache)
        barrier.wait()
        outcomes.append(reader.fetch_or_compute("teach1", "data1", "train", compute, teacher_spec={}))

    threads = [threading.Thread(target=trial) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1 and len(outcomes) == 3
    assert sorted(hit for _, hit in outcomes) == [False, True, True]
    for out, _ in outcomes:
        np.testing.assert_array_equal(out, outcomes[0][0])


def _process_writer(url: str, namespace: str, start_at: float, queue) -> None:  # runs in a child process
    cache = SoftLabelCache(url, namespace=namespace)
    time.sleep(max(0.0, start_at - time.time()))
    manifest = cache.publish("teach1", "data1", "train", classification_logits(n=400), teacher_spec={}, chunk_size=10)
    queue.put(manifest.generation)


@pytest.mark.slow
def test_two_writer_processes_produce_one_set_of_entries(cache: SoftLabelCache, namespace: str) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start_at = time.time() + 4.0  # both children are up by then
    procs = [context.Process(target=_process_writer, args=(cache.url, namespace, start_at, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    generations = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert generations[0] == generations[1]
    assert {k.split(b":")[-2] for k in chunk_keys(cache.client, namespace)} == {f"g{generations[0]}".encode()}


def test_writer_that_lost_its_lease_does_not_commit(cache: SoftLabelCache, namespace: str) -> None:
    prefix = cache.key_prefix("teach1", "data1", "train")
    lease = cache._lease(prefix)
    assert lease.try_acquire()
    cache.client.set(f"{prefix}:lock", "someone-else")  # the lease expired and another writer took it
    cache.client.delete(f"{prefix}:lock")  # ...and that writer died
    logits = classification_logits(n=40)
    manifest = cache._publish_validated(
        prefix, "teach1", "data1", "train", logits, {}, PublishOptions(chunk_size=10), None, lease
    )
    keys = chunk_keys(cache.client, namespace)
    assert len(keys) == 4 and {k.split(b":")[-2] for k in keys} == {f"g{manifest.generation}".encode()}
    np.testing.assert_allclose(cache.fetch("teach1", "data1", "train"), logits, rtol=1e-3)


def test_reader_never_observes_a_partial_set(cache: SoftLabelCache) -> None:
    """A writer keeps replacing the entry (all 1s, then all 2s, ...) while readers fetch it."""
    n, classes = 200, 4
    cache.publish("teach1", "data1", "train", np.full((n, classes), 1.0, np.float32), teacher_spec={}, chunk_size=5)
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[float] = []

    def writer() -> None:
        w = _fresh(cache)
        value = 1.0
        while not stop.is_set():
            value += 1
            w.publish(
                "teach1",
                "data1",
                "train",
                np.full((n, classes), value, np.float32),
                teacher_spec={},
                chunk_size=5,
                overwrite=True,
            )

    def reader() -> None:
        r = SoftLabelCache(cache.url, namespace=cache.namespace, lru_bytes=0, manifest_ttl_s=0)
        try:
            while not stop.is_set():
                out = r.fetch("teach1", "data1", "train")
                values = np.unique(out)
                assert values.size == 1, f"mixed generations: {values}"
                seen.append(float(values[0]))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert len(set(seen)) > 2  # the readers really raced several generations


# ---------------------------------------------------------------------- faults


def test_reader_recovers_from_redis_kill_and_restart(tmp_path: Path) -> None:
    server = ManagedRedisServer(data_dir=tmp_path, port=free_port()).start()
    port, password = server.port, server.password
    try:
        writer = SoftLabelCache(server.url, namespace="fault")
        saved = classification_logits(n=500)
        writer.publish("teach1", "data1", "train", saved, teacher_spec={}, encoding="float32", chunk_size=50)
        writer.client.save()  # on disk: survives the kill
        lost = classification_logits(n=50, seed=9)
        writer.publish("teach1", "data1", "val", lost, teacher_spec={}, encoding="float32")  # only in memory

        reader = SoftLabelCache(server.url, namespace="fault", lru_bytes=0, retries=8)
        stop = threading.Event()
        errors: list[BaseException] = []
        reads = [0]

        def read_loop() -> None:
            rng = np.random.default_rng(0)
            try:
                while not stop.is_set():
                    idx = rng.integers(0, 500, 64)
                    np.testing.assert_array_equal(reader.fetch("teach1", "data1", "train", indices=idx), saved[idx])
                    reads[0] += 1
            except BaseException as error:  # noqa: BLE001
                errors.append(error)

        thread = threading.Thread(target=read_loop)
        thread.start()
        time.sleep(0.5)
        server.kill()  # SIGKILL, mid-read
        time.sleep(1.0)
        reads_while_down = reads[0]
        server = ManagedRedisServer(data_dir=tmp_path, port=port, password=password).start()
        time.sleep(1.5)
        stop.set()
        thread.join(60)
        assert not errors, errors[0]
        assert reads[0] > reads_while_down  # it kept reading after the restart

        # The unsaved entry is gone after the restart: recomputed, not a failure.
        calls = []
        out, hit = reader.fetch_or_compute(
            "teach1", "data1", "val", lambda: calls.append(1) or lost, teacher_spec={}, encoding="float32"
        )
        assert not hit and calls == [1]
        np.testing.assert_array_equal(out, lost)
    finally:
        server.stop()


def test_bad_url_gives_a_clear_error() -> None:
    with pytest.raises(RedisConnectionError, match="cannot connect to Redis at redis://127.0.0.1"):
        SoftLabelCache(f"redis://127.0.0.1:{free_port()}/0", retries=1)
    with pytest.raises(ValueError, match="redis://"):
        SoftLabelCache("localhost:6379")


# ---------------------------------------------------------------------- operations


def test_list_stats_and_purge(cache: SoftLabelCache, namespace: str) -> None:
    for teacher in ("teachA", "teachB"):
        for split in ("train", "val"):
            cache.publish(teacher, "data1", split, classification_logits(n=30), teacher_spec={"name": teacher})
    listed = cache.list_manifests()
    assert [(m.teacher_fp, m.split) for m in listed] == [
        ("teachA", "train"),
        ("teachA", "val"),
        ("teachB", "train"),
        ("teachB", "val"),
    ]
    stats = cache.stats()
    assert stats["entries"] == 4 and stats["bytes"] == sum(m.nbytes for m in listed)
    assert set(stats["by_teacher"]["teachA"]["splits"]) == {"train", "val"}
    assert stats["redis"]["maxmemory_policy"] == "volatile-lru"

    assert cache.purge(older_than_s=3600) == 0
    assert cache.purge(teacher_fp="teachA") == 2
    assert [m.teacher_fp for m in cache.list_manifests()] == ["teachB", "teachB"]
    with pytest.raises(CacheMissError):
        cache.fetch("teachA", "data1", "train")
    assert cache.purge(older_than_s=0) == 2
    assert cache.list_manifests() == [] and chunk_keys(cache.client, namespace) == []
    with pytest.raises(ValueError, match="older_than_s"):
        cache.purge(older_than_s=-1)


def test_orphan_chunks_of_a_crashed_writer_are_reported_and_purged(cache: SoftLabelCache, namespace: str) -> None:
    cache.publish("teach1", "data1", "train", classification_logits(n=10), teacher_spec={})
    prefix = cache.key_prefix("teach1", "data1", "train")
    cache.client.set(f"{prefix}:gdeadbeef:c0", b"left behind", px=60_000)
    cache.client.set(cache.key_prefix("teach2", "data1", "train") + ":gabc:c0", b"never published", px=60_000)
    problems = cache.verify()
    assert sorted((p.kind, p.teacher_fp) for p in problems) == [
        ("orphan_chunks", "teach1"),
        ("orphan_chunks", "teach2"),
    ]
    assert [p.kind for p in cache.verify(teacher_fp="teach2")] == ["orphan_chunks"]
    assert cache.purge(teacher_fp="teach2") == 1
    assert cache.purge() == 2  # the entry and teach1's orphan
    assert chunk_keys(cache.client, namespace) == []


def test_pickled_cache_reconnects(cache: SoftLabelCache) -> None:
    cache.publish("teach1", "data1", "train", classification_logits(n=10), teacher_spec={}, encoding="float32")
    clone = pickle.loads(pickle.dumps(cache))
    assert clone is not cache and clone.namespace == cache.namespace
    np.testing.assert_array_equal(clone.fetch("teach1", "data1", "train"), cache.fetch("teach1", "data1", "train"))
    assert "***" in repr(clone) or "@" not in repr(clone)


def test_password_from_env(redis_server: ManagedRedisServer, monkeypatch: pytest.MonkeyPatch, namespace: str) -> None:
    monkeypatch.setenv("MEDKD_TEST_CACHE_PW", redis_server.password)
    cache = SoftLabelCache(
        f"redis://127.0.0.1:{redis_server.port}/0", namespace=namespace, password_env="MEDKD_TEST_CACHE_PW"
    )
    assert cache.list_manifests() == []
    assert connect(redis_server.url).ping() is True  # the URL's password authenticates


def test_chunk_lru_evicts_least_recently_used_within_its_byte_budget() -> None:
    lru = ChunkLRU(100)
    for chunk in range(3):
        lru.put(("p", "g1", chunk), np.zeros(10, np.float32))  # 40 bytes each: only two fit
    assert lru.get(("p", "g1", 0)) is None and lru.nbytes == 80
    assert lru.get(("p", "g1", 1)) is not None  # now the most recent
    lru.put(("q", "g1", 0), np.zeros(10, np.float32))
    assert lru.get(("p", "g1", 2)) is None and lru.get(("p", "g1", 1)) is not None
    lru.put(("p", "g1", 9), np.zeros(40, np.float32))  # larger than the budget: not kept
    assert lru.get(("p", "g1", 9)) is None
    lru.drop_prefix("p")
    assert lru.nbytes == 40 and lru.get(("q", "g1", 0)) is not None
    with pytest.raises(ValueError):
        lru.get(("q", "g1", 0))[0] = 1.0  # read-only: callers share the cached array
