"""benchmarks._student_setup: a variant distilling from a teacher the run did not distill from (its
FKD views were never cached) gets those views from the teacher's checkpoint before any training
starts, against a real redis-server; the run's KD gain is read back only for what it trained."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks._student_setup import fill_missing_views, kd_gain_runs, retrain_variants
from medkd.data import AugmentSpec, SyntheticDataSpec, apply_view, load_dataset
from medkd.data.meta import DatasetMeta
from medkd.softlabels.compute import view_params
from medkd.softlabels.reading import cached_views, missing_views
from medkd.softlabels.store import SoftLabelCache
from medkd.students.distill import DistillConfig
from medkd.teachers.loop import MODEL_FILE, predict
from medkd.teachers.train import ARTIFACT_FILE, artifact_dir
from tests.search.test_distill_cache import fake_teacher

AUGMENT = AugmentSpec(flip=0.5)
VIEWS_SEED = 3


def write_teacher(run, dataset, name: str, seed: int) -> tuple[str, torch.nn.Module]:
    """An (untrained) teacher as the teacher stage leaves it in ``run``, its artifact's checkpoint
    path pointing where the run folder used to be."""
    artifact, model = fake_teacher(run.parent, dataset, name, seed)
    directory = artifact_dir(run, name, artifact.fingerprint)
    directory.mkdir(parents=True)
    Path(artifact.checkpoint).rename(directory / MODEL_FILE)
    moved = artifact.model_copy(update={"checkpoint": f"/moved/away/{name}/{MODEL_FILE}"})
    (directory / ARTIFACT_FILE).write_text(moved.model_dump_json())
    return artifact.fingerprint, model


@pytest.fixture
def run_with_a_dropped_teacher(redis_url, tmp_path):
    """A finished run whose students learned from ``cnn`` only: ``cnn``'s view 0 is cached, ``dropped``'s is not."""
    dataset = load_dataset(SyntheticDataSpec(image_size=16, num_classes=3, num_train=24, num_val=8, num_test=8))
    meta = DatasetMeta.of(dataset)
    images = dataset.splits["train"].images
    run = tmp_path / "run"
    (cnn_fp, _), (dropped_fp, dropped) = (
        write_teacher(run, dataset, "cnn", 0),
        write_teacher(run, dataset, "dropped", 1),
    )
    namespace = f"test-fill-views-{uuid.uuid4().hex[:8]}"
    writer = SoftLabelCache(redis_url, namespace=namespace)
    views_fp = f"views-{uuid.uuid4().hex[:6]}"
    params = view_params(AUGMENT, len(images), seed=VIEWS_SEED, view=0, meta=meta)
    cnn_view = np.random.default_rng(0).normal(size=(len(images), meta.num_classes)).astype(np.float32)
    writer.publish(cnn_fp, views_fp, "train", cnn_view, view=0, view_params=params, teacher_spec={"model": "resnet10"})
    cache = {
        "url": redis_url,
        "namespace": namespace,
        "password_env": None,
        "dataset_fp": dataset.fingerprint,
        "teacher_fps": [cnn_fp],
        "views": {"views": 1, "views_dataset_fp": views_fp, "seed": VIEWS_SEED},
    }
    results = {"teachers": [{"name": "cnn", "fingerprint": cnn_fp}, {"name": "dropped", "fingerprint": dropped_fp}]}
    spec = SimpleNamespace(
        cache=SimpleNamespace(encoding="float16", compression=None, topk=None), search=SimpleNamespace(augment=AUGMENT)
    )
    expected = predict(dropped, apply_view(images, params), 64, torch.device("cpu"))
    yield SimpleNamespace(
        run=run, spec=spec, cache=cache, results=results, dataset=dataset, fps=[cnn_fp, dropped_fp], expected=expected
    )
    writer.purge()
    writer.close()


def test_views_of_a_teacher_the_run_did_not_distill_from_come_from_its_checkpoint(run_with_a_dropped_teacher):
    r = run_with_a_dropped_teacher
    reader = SoftLabelCache(r.cache["url"], namespace=r.cache["namespace"])
    views_fp = r.cache["views"]["views_dataset_fp"]
    assert missing_views(reader, r.fps, views_fp, 1) == [(1, 0)]
    lines: list[str] = []
    fill_missing_views(r.run, r.spec, r.cache, r.results, r.dataset, r.fps, lines.append)
    assert missing_views(reader, r.fps, views_fp, 1) == []
    assert len(lines) == 1 and "teacher dropped" in lines[0]
    views = cached_views(reader, r.fps, views_fp, 1, segmentation=False)
    logits = views.logits(0, np.arange(len(r.dataset.splits["train"].images)))
    rounded = r.expected.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(logits[1], rounded, atol=2e-3)  # the dropped teacher on the same augmented images
    lines.clear()
    fill_missing_views(r.run, r.spec, r.cache, r.results, r.dataset, r.fps, lines.append)
    assert lines == []  # cached now: nothing computed twice
    reader.close()


def test_a_missing_checkpoint_fails_before_anything_is_trained_or_written(run_with_a_dropped_teacher):
    r = run_with_a_dropped_teacher
    (artifact_dir(r.run, "dropped", r.fps[1]) / MODEL_FILE).unlink()
    with pytest.raises(SystemExit, match=r"teacher dropped: its FKD views are not cached and its checkpoint is not in"):
        fill_missing_views(r.run, r.spec, r.cache, r.results, r.dataset, r.fps, print)
    reader = SoftLabelCache(r.cache["url"], namespace=r.cache["namespace"])
    assert missing_views(reader, r.fps, r.cache["views"]["views_dataset_fp"], 1) == [(1, 0)]
    reader.close()


def test_nothing_to_fill_without_views_or_teachers(run_with_a_dropped_teacher):
    r = run_with_a_dropped_teacher
    for cache, fps in (({**r.cache, "views": None}, r.fps), (r.cache, [])):
        lines: list[str] = []
        fill_missing_views(r.run, r.spec, cache, r.results, r.dataset, fps, lines.append)
        assert lines == []


def test_the_runs_kd_gain_is_read_only_when_it_trained_the_same_thing(tmp_path):
    config = DistillConfig(student="resnet_tiny", width=0.89, alpha=0.6, epochs=12, seed=834504245)
    runs = {
        kind: [
            {"seed": seed, "val_auc": 0.99, "val_acc": acc + seed / 100, "test_auc": 0.99, "test_acc": acc}
            for seed in (1, 2, 3)
        ]
        for kind, acc in (("kd", 0.96), ("ce", 0.95))
    }
    (tmp_path / "benchmark").mkdir()
    path = tmp_path / "benchmark" / "students.json"
    assert kd_gain_runs(tmp_path, config, [1, 2]) == {}  # no KD gain in the run
    path.write_text(
        json.dumps({"kd_gain": {"seeds": [1, 2, 3], "config": config.model_dump(mode="json"), "runs": runs}})
    )
    reused = kd_gain_runs(tmp_path, config, [3, 1])
    assert [r["seed"] for r in reused["ce"]] == [3, 1] and reused["kd"] == [runs["kd"][2], runs["kd"][0]]
    assert kd_gain_runs(tmp_path, config.model_copy(update={"loss": "hinton_kd"}), [1])["ce"] == [runs["ce"][0]]
    assert kd_gain_runs(tmp_path, config, [1, 4]) == {}  # a seed it did not train
    assert kd_gain_runs(tmp_path, config.model_copy(update={"epochs": 4}), [1]) == {}  # --epochs changed it
    assert kd_gain_runs(tmp_path, config.model_copy(update={"loss": "dkd"}), [1]) == {}  # not the loss it trained


def test_nothing_starts_when_every_variant_is_read_from_the_kd_gain(tmp_path):
    reused = {"kd_all": [{"seed": 1, "kd": True}], "ce": [{"seed": 1, "kd": False}]}
    lines: list[str] = []
    variants = {"ce": {"alpha": 1.0}, "kd_all": {"teachers": ["cnn"]}}
    # No run folder, spec or dataset: reading must not reach redis, Ray or the data.
    run = tmp_path / "no-run"
    runs = retrain_variants(run, None, {}, None, None, variants, [1], lines.append, reused=reused)
    assert list(runs) == ["ce", "kd_all"] and runs["ce"] == reused["ce"]
    assert lines == [f"ce, kd_all: read from the KD gain of {run} (same configuration and seeds), not trained again"]
    other = tmp_path / "other-run"
    lines.clear()
    retrain_variants(run, None, {}, None, None, variants, [1], lines.append, reused=reused, reused_from={"ce": other})
    assert lines == [
        f"ce: read from the KD gain of {other} (same configuration and seeds), not trained again",
        f"kd_all: read from the KD gain of {run} (same configuration and seeds), not trained again",
    ]
