"""Distillation fed from the real soft-label cache (real redis-server) trains the same student as
distillation fed from the same logits in memory.

Trials read teacher logits from :class:`SoftLabelCache`: per batch with ``fetch(indices=...)``
(segmentation) or the whole split at once (classification). Stored in float16, the logits come
back rounded, so a run from the cache must equal, step for step, a run from the in-memory logits
rounded to float16 — any misaligned row, wrong teacher order or stale chunk would change it.
"""

from __future__ import annotations

import copy
import uuid

import numpy as np
import pytest
import torch

from medkd.data import SyntheticDataSpec, load_dataset
from medkd.data.meta import DatasetMeta
from medkd.search.context import TrialContext
from medkd.search.recipe import teacher_logits_source
from medkd.softlabels.reading import cached_teacher_logits, cached_views
from medkd.softlabels.store import SoftLabelCache
from medkd.students.distill import DistillConfig, array_teacher_logits, build_student, distill

TEACHERS = ("cnn-a", "vit-b", "cnn-c")
NUM_TRAIN = 40


def tiny_dataset(task: str):
    spec = SyntheticDataSpec(task=task, image_size=16, num_classes=3, num_train=NUM_TRAIN, num_val=8, num_test=8)
    return load_dataset(spec)


def teacher_logits_for(dataset, seed: int = 1) -> np.ndarray:
    """(T, N, C[, H, W]) logits that carry the labels plus noise, with values that float16 rounds."""
    rng = np.random.default_rng(seed)
    labels = dataset.splits["train"].labels
    shape = (len(labels), dataset.num_classes, *labels.shape[1:])
    onehot = np.zeros(shape, np.float32)
    np.put_along_axis(onehot, np.expand_dims(labels, 1), 1.0, axis=1)
    return np.stack([3.0 * onehot + rng.normal(0.0, 1.3, shape) for _ in TEACHERS]).astype(np.float32)


def config(dataset) -> DistillConfig:
    student = "unet_small" if dataset.task == "segmentation" else "resnet_tiny"
    return DistillConfig(
        student=student, width=0.25, depth=0.5, epochs=2, batch_size=16, alpha=0.3, temperature=2.0, lr=1e-2, seed=0
    )


def run(dataset, cfg: DistillConfig, teacher_logits, initial: torch.nn.Module) -> tuple[torch.nn.Module, list[dict]]:
    model = copy.deepcopy(initial)
    train = dataset.splits["train"]
    history = distill(
        model,
        cfg,
        train_images=train.images,
        train_labels=train.labels,
        teacher_logits=teacher_logits,
        meta=DatasetMeta.of(dataset),
    )
    return model, history


def assert_same_student(a: torch.nn.Module, b: torch.nn.Module, **tolerance) -> None:
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


def output_gap(a: torch.nn.Module, b: torch.nn.Module, images: np.ndarray) -> float:
    """Mean absolute difference of two students' logits on ``images``."""
    with torch.no_grad():
        batch = torch.from_numpy(images)
        return float((a.eval()(batch) - b.eval()(batch)).abs().mean())


@pytest.fixture
def publish(redis_url):
    """Publish (T, N, ...) logits under a fresh namespace; yields (cache factory, fingerprints)."""
    namespace = f"test-distill-cache-{uuid.uuid4().hex[:8]}"
    caches: list[SoftLabelCache] = []

    def make_cache(**kwargs) -> SoftLabelCache:
        caches.append(SoftLabelCache(redis_url, namespace=namespace, **kwargs))
        return caches[-1]

    def _publish(logits: np.ndarray, dataset_fp: str, chunk_size: int = 16) -> list[str]:
        writer = make_cache()
        fps = [f"{name}-{uuid.uuid4().hex[:6]}" for name in TEACHERS]
        for fp, teacher in zip(fps, logits):
            writer.publish(fp, dataset_fp, "train", teacher, teacher_spec={"model": fp}, chunk_size=chunk_size)
        return fps

    yield make_cache, _publish
    if caches:
        caches[0].purge()
    for cache in caches:
        cache.close()


@pytest.mark.parametrize(
    "task, read",
    [("classification", "batch"), ("classification", "split"), ("segmentation", "batch")],
)
def test_student_from_cached_logits_equals_student_from_in_memory_logits(publish, task, read):
    make_cache, publish_logits = publish
    dataset = tiny_dataset(task)
    logits = teacher_logits_for(dataset)
    fps = publish_logits(logits, dataset.fingerprint)  # 16 samples per chunk: a batch spans several chunks
    cache = make_cache(lru_bytes=0)  # every batch is a real Redis read
    requested: list[np.ndarray] = []

    def from_cache(indices: np.ndarray) -> np.ndarray:
        requested.append(indices.copy())
        return np.stack([cache.fetch(fp, dataset.fingerprint, "train", indices=indices) for fp in fps])

    if read == "batch":
        cached_source = from_cache
    else:
        cached_source = array_teacher_logits(np.stack([cache.fetch(fp, dataset.fingerprint, "train") for fp in fps]))
    cfg = config(dataset)
    torch.manual_seed(0)
    initial = build_student(DatasetMeta.of(dataset), cfg)

    cached_student, cached_history = run(dataset, cfg, cached_source, initial)
    rounded = logits.astype(np.float16).astype(np.float32)
    memory_student, memory_history = run(dataset, cfg, array_teacher_logits(rounded), initial)

    assert cache.counters["chunk_reads"] > 0 and cache.counters["integrity_errors"] == 0
    if read == "batch":
        steps = NUM_TRAIN // cfg.batch_size
        assert len(requested) == cfg.epochs * steps
        assert all(len(np.unique(batch)) == cfg.batch_size for batch in requested)
    assert_same_student(cached_student, memory_student, rtol=1e-6, atol=1e-6)
    for cached_record, memory_record in zip(cached_history, memory_history, strict=True):
        assert cached_record["train_kd"] == pytest.approx(memory_record["train_kd"], rel=1e-6)
        assert cached_record["train_loss"] == pytest.approx(memory_record["train_loss"], rel=1e-6)

    # float32 logits differ from the cached ones only by float16 rounding: a much smaller change
    # to the student than feeding each sample another sample's logits (a misaligned read).
    exact_student, _ = run(dataset, cfg, array_teacher_logits(logits), initial)
    shuffled_student, _ = run(dataset, cfg, array_teacher_logits(np.roll(rounded, 1, axis=1)), initial)
    images = dataset.splits["train"].images
    rounding_gap = output_gap(cached_student, exact_student, images)
    misaligned_gap = output_gap(cached_student, shuffled_student, images)
    assert rounding_gap < 0.25 * misaligned_gap, (rounding_gap, misaligned_gap)


def test_cache_entry_smaller_than_the_training_split_fails_loudly(publish):
    """Logits published for a different (smaller) split must not train a student silently."""
    make_cache, publish_logits = publish
    dataset = tiny_dataset("classification")
    logits = teacher_logits_for(dataset)[:, : NUM_TRAIN - 8]
    fps = publish_logits(logits, dataset.fingerprint)
    cache = make_cache()
    cfg = config(dataset)
    initial = build_student(DatasetMeta.of(dataset), cfg)

    def from_cache(indices: np.ndarray) -> np.ndarray:
        return np.stack([cache.fetch(fp, dataset.fingerprint, "train", indices=indices) for fp in fps])

    with pytest.raises(IndexError, match="out of range"):
        run(dataset, cfg, from_cache, initial)


def test_cached_views_read_back_the_published_views(publish):
    """FKD views published by the soft-label stage come back with their parameters and logits."""
    from medkd.data import AugmentSpec, sample_view_params
    from medkd.softlabels.manifest import CacheMissError

    make_cache, _ = publish
    dataset = tiny_dataset("classification")
    logits = teacher_logits_for(dataset)
    writer = make_cache()
    fps = [f"{name}-{uuid.uuid4().hex[:6]}" for name in TEACHERS]
    views_fp = f"views-{uuid.uuid4().hex[:8]}"
    augment = AugmentSpec(flip=0.5, affine={"rotate_degrees": 10})
    params = [sample_view_params(augment, NUM_TRAIN, rng=k) for k in range(2)]
    for k in range(2):
        for t, fp in enumerate(fps):
            writer.publish(
                fp, views_fp, "train", logits[t] + k + 1, view=k, view_params=params[k], teacher_spec={"model": fp}
            )

    views = cached_views(make_cache(), fps, views_fp, 2, segmentation=False)
    assert views.num_views == 2 and views.params == params
    indices = np.array([1, 4, 9])
    expected = (logits[:, indices] + 2).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(views.logits(1, indices), expected)

    with pytest.raises(CacheMissError, match="view 2"):
        cached_views(make_cache(), fps, views_fp, 3, segmentation=False)
    other = [{**p, "rot90": 1} for p in params[0]]  # a teacher that saw other images
    writer.publish(
        fps[2], views_fp, "train", logits[2], view=0, view_params=other, teacher_spec={"model": fps[2]}, overwrite=True
    )
    with pytest.raises(ValueError, match="disagree"):
        cached_views(make_cache(), fps, views_fp, 2, segmentation=False)


# --------------------------------------------------------------------------- recovery mid-search


def fake_teacher(tmp_path, dataset, name: str, seed: int):
    """A real (untrained) teacher checkpoint with its artifact, as the teacher stage leaves them."""
    from medkd.teachers.registry import create_teacher
    from medkd.teachers.train import TeacherArtifact, load_teacher_model

    meta = DatasetMeta.of(dataset)
    torch.manual_seed(seed)
    model = create_teacher(
        "resnet10",
        spatial_dims=2,
        in_channels=meta.in_channels,
        num_classes=meta.num_classes,
        image_size=meta.image_size,
    )
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    artifact = TeacherArtifact(
        name=name,
        model="resnet10",
        family="cnn",
        model_kwargs={},
        fingerprint=f"{name}-{uuid.uuid4().hex[:6]}",
        params=1,
        checkpoint=str(path),
        epochs_run=1,
        best_epoch=1,
        best_val=0.5,
        history=[],
        train_seconds=0.0,
    )
    return artifact, load_teacher_model(artifact, meta)


def test_trial_restores_soft_labels_lost_mid_search_from_the_teacher_checkpoints(publish, tmp_path):
    """Entries deleted (a Redis restart without persistence) or corrupted after the soft-label stage
    are recomputed from the teacher checkpoints, republished, and the trial reads the right logits."""
    from medkd.data import AugmentSpec, apply_view
    from medkd.softlabels.compute import view_params
    from medkd.softlabels.manifest import CacheMissError
    from medkd.teachers.loop import predict

    make_cache, _ = publish
    dataset = tiny_dataset("classification")
    meta = DatasetMeta.of(dataset)
    images = dataset.splits["train"].images
    teachers = [fake_teacher(tmp_path, dataset, name, seed) for seed, name in enumerate(("cnn-a", "cnn-b"))]
    expected = [predict(model, images, 64, torch.device("cpu")) for _, model in teachers]
    augment = AugmentSpec(flip=0.5)
    views_fp = f"views-{uuid.uuid4().hex[:6]}"
    params = view_params(augment, len(images), seed=3, view=0, meta=meta)
    expected_view = [predict(model, apply_view(images, params), 64, torch.device("cpu")) for _, model in teachers]
    writer = make_cache()
    for (artifact, _), logits, view_logits in zip(teachers, expected, expected_view):
        writer.publish(artifact.fingerprint, dataset.fingerprint, "train", logits, teacher_spec={"model": "resnet10"})
        writer.publish(
            artifact.fingerprint,
            views_fp,
            "train",
            view_logits,
            view=0,
            view_params=params,
            teacher_spec={"model": "resnet10"},
        )
    fps = [artifact.fingerprint for artifact, _ in teachers]

    # Damage after the soft-label stage: teacher 0's train entry gone, teacher 1's view 0 corrupted.
    writer.purge(teacher_fp=fps[0])
    writer.publish(
        fps[0], views_fp, "train", expected_view[0], view=0, view_params=params, teacher_spec={"model": "resnet10"}
    )
    manifest = writer.manifest(fps[1], views_fp, "train", view=0)
    prefix = writer.key_prefix(fps[1], views_fp, "train", view=0)
    writer.client.set(f"{prefix}:g{manifest.generation}:c0", b"garbage")

    reader = make_cache(lru_bytes=0)
    with pytest.raises(CacheMissError):
        cached_teacher_logits(reader, fps, dataset.fingerprint, segmentation=False)  # no recovery: the error
    context = TrialContext.model_construct(  # only what reading the soft labels needs
        cache_url=reader.url,
        cache_namespace=reader.namespace,
        password_env=None,
        teacher_fps=fps,
        dataset_fp=dataset.fingerprint,
        meta=meta,
        events=None,
        augment=augment.model_dump(mode="json"),
        views={"views": 1, "views_dataset_fp": views_fp, "seed": 3},
        teacher_artifacts=[artifact.model_dump_json() for artifact, _ in teachers],
        cache_options={"encoding": "float16", "compression": None, "topk": None},
    )
    originals, views = teacher_logits_source(context, images)
    indices = np.arange(len(images))
    rounded = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731
    np.testing.assert_allclose(originals(indices), rounded(np.stack(expected)), atol=2e-3)
    np.testing.assert_allclose(views.logits(0, indices), rounded(np.stack(expected_view)), atol=2e-3)
    assert views.params == [params]
    # Restored for everyone: every entry reads back intact, nothing corrupt or orphaned is left.
    fresh = make_cache(lru_bytes=0)
    np.testing.assert_allclose(fresh.fetch(fps[0], dataset.fingerprint, "train"), rounded(expected[0]), atol=2e-3)
    np.testing.assert_allclose(fresh.fetch(fps[1], views_fp, "train", view=0), rounded(expected_view[1]), atol=2e-3)
    assert fresh.verify() == []
