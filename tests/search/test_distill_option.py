"""``teachers[i].distill: false``: the teacher stays trained and evaluated, but students do not learn from it."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest

from medkd.core.progress import Progress
from medkd.data import load_dataset
from medkd.data.meta import DatasetMeta
from medkd.pipeline.report import contribution_rows, contribution_section
from medkd.pipeline.runner import Pipeline
from medkd.search.context import distilled_teachers, search_context
from medkd.search.recipe import teacher_logits_source
from medkd.search.run import search_fingerprint
from medkd.softlabels.store import SoftLabelCache
from medkd.spec.base import SpecError
from medkd.spec.job import parse_spec
from medkd.teachers.train import TeacherArtifact

META = DatasetMeta(
    task="classification", multilabel=False, spatial_dims=2, in_channels=1, num_classes=2, image_size=[8, 8]
)


def _spec(*distill: bool | None, namespace: str = "distill-option"):
    teachers = []
    for i, flag in enumerate(distill):
        teacher = {"name": f"t{i}", "model": "resnet18"}
        if flag is not None:
            teacher["distill"] = flag
        teachers.append(teacher)
    return parse_spec(
        {"name": "distill", "data": {"kind": "synthetic"}, "teachers": teachers, "cache": {"namespace": namespace}}
    )


def _artifact(name: str, fp: str) -> TeacherArtifact:
    return TeacherArtifact(
        name=name,
        model="resnet18",
        family="cnn",
        model_kwargs={},
        fingerprint=fp,
        params=1,
        checkpoint="/nonexistent",
        epochs_run=1,
        best_epoch=0,
        best_val=0.5,
        history=[],
        train_seconds=0.0,
    )


def test_distill_is_left_out_of_the_teacher_fingerprint():
    unset, kept, dropped = (_spec(flag, True).teachers[0] for flag in (None, True, False))
    assert "distill" not in unset.training_fingerprint_fields()
    assert (
        unset.training_fingerprint_fields()
        == kept.training_fingerprint_fields()
        == dropped.training_fingerprint_fields()
    )


def test_the_search_fingerprint_follows_the_teachers_students_learn_from():
    fps, artifacts = ["fp0", "fp1", "fp2"], [_artifact(f"t{i}", f"fp{i}") for i in range(3)]
    everyone = _spec(None, None, None)
    assert distilled_teachers(everyone, fps, artifacts) == (fps, artifacts)  # existing specs: nothing changes
    dropped = _spec(None, False, None)
    kept_fps, kept = distilled_teachers(dropped, fps, artifacts)
    assert kept_fps == ["fp0", "fp2"] and [a.name for a in kept] == ["t0", "t2"]
    assert distilled_teachers(dropped, kept_fps, kept) == (kept_fps, kept)  # idempotent
    assert search_fingerprint(dropped, kept_fps, "data") != search_fingerprint(everyone, fps, "data")
    assert search_fingerprint(_spec(None, True, None), fps, "data") == search_fingerprint(everyone, fps, "data")


def test_every_teacher_dropped_is_a_spec_error_naming_the_field():
    with pytest.raises(SpecError, match=r"teachers\[0\]\.distill, teachers\[1\]\.distill: at least one teacher"):
        _spec(False, False)
    with pytest.raises(SpecError, match=r"teachers\[0\]\.distill: Input should be a valid boolean"):
        _spec("maybe")


def test_dropping_needs_the_artifacts_to_match_fingerprints():
    with pytest.raises(ValueError, match=r"teachers\[\]\.distill: false needs the trained teachers"):
        distilled_teachers(_spec(None, False), ["fp0", "fp1"], None)


def test_a_trial_reads_only_the_distilled_teachers_logits(redis_url):
    namespace = f"test-distill-option-{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(0)
    train = rng.standard_normal((12, 1, 8, 8)).astype(np.float32)
    logits = [rng.standard_normal((12, 2)).astype(np.float32) for _ in range(3)]
    fps = [f"teacher{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    artifacts = [_artifact(f"t{i}", fp) for i, fp in enumerate(fps)]
    writer = SoftLabelCache(redis_url, namespace=namespace)
    try:
        for fp, teacher in zip(fps, logits, strict=True):
            writer.publish(fp, "dataset", "train", teacher, teacher_spec={"model": fp})
        spec = _spec(None, False, None, namespace=namespace)
        context = search_context(
            spec,
            meta=META,
            data_ref=None,
            teacher_fps=fps,
            dataset_fp="dataset",
            cache_url=redis_url,
            teachers=artifacts,
        )
        assert context.teacher_fps == [fps[0], fps[2]] and context.num_teachers == 2
        assert [TeacherArtifact.model_validate_json(a).name for a in context.teacher_artifacts] == ["t0", "t2"]
        read, views = teacher_logits_source(context, train)
        assert views is None
        batch = read(np.arange(12))
        assert batch.shape == (2, 12, 2)
        # The cache stores float16: equal to that precision, and far from the dropped teacher's.
        np.testing.assert_allclose(batch[0], logits[0], atol=5e-3)
        np.testing.assert_allclose(batch[1], logits[2], atol=5e-3)
        assert np.abs(batch[1] - logits[1]).max() > 0.5
    finally:
        writer.purge()
        writer.close()


def test_a_teacher_dropped_on_val_is_not_read_by_the_search(redis_url, tmp_path):
    """The pipeline's soft-label stage applies search.teacher_selection to the cached val logits; the
    search context it hands on then reads only the kept teachers' train logits from Redis."""
    namespace = f"test-teacher-selection-{uuid.uuid4().hex[:8]}"
    spec = parse_spec(
        {
            "name": "selection",
            "data": {"kind": "synthetic", "image_size": 8, "num_train": 12, "num_val": 200, "num_test": 8},
            "teachers": [{"name": "t0", "model": "resnet18"}, {"name": "t1", "model": "resnet18"}],
            "cache": {"namespace": namespace},
            "search": {"teacher_selection": "val_contribution"},
            "output_dir": str(tmp_path / "run"),
        }
    )
    pipeline = Pipeline(spec, progress=Progress(io.StringIO()))
    pipeline.dataset = load_dataset(spec.data)
    pipeline.meta = DatasetMeta.of(pipeline.dataset)
    labels = pipeline.dataset.splits["val"].labels.reshape(-1)
    rng = np.random.default_rng(0)
    good = np.eye(2)[labels] * 2.0  # right on every val image
    coin = np.eye(2)[rng.integers(0, 2, len(labels))] * 6.0  # a confident coin flip: overrules it
    train = [rng.standard_normal((12, 2)).astype(np.float32) for _ in range(2)]
    fps = [f"teacher{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
    artifacts = [_artifact(f"t{i}", fp) for i, fp in enumerate(fps)]
    pipeline.teachers = artifacts
    pipeline.results.ensemble = {}  # the soft-label stage's ensemble metrics, set before it chooses
    writer = SoftLabelCache(redis_url, namespace=namespace)
    try:
        for fp, teacher in zip(fps, train, strict=True):
            writer.publish(fp, "dataset", "train", teacher, teacher_spec={"model": fp})
        chosen = pipeline._select_teachers({"t0": coin, "t1": good})
        assert pipeline.results.ensemble["distilled"] == ["t1"]
        assert pipeline.results.ensemble["teacher_selection"]["dropped"] == ["t0"]
        assert [t.distill for t in chosen.teachers] == [False, True] and chosen is pipeline.spec
        assert [t.distill for t in spec.teachers] == [True, True]  # the job as given is unchanged
        context = search_context(
            pipeline.spec,
            meta=META,
            data_ref=None,
            teacher_fps=fps,
            dataset_fp="dataset",
            cache_url=redis_url,
            teachers=artifacts,
        )
        assert context.teacher_fps == [fps[1]] and context.num_teachers == 1
        batch = teacher_logits_source(context, np.zeros((12, 1, 8, 8), np.float32))[0](np.arange(12))
        assert batch.shape == (1, 12, 2)
        np.testing.assert_allclose(batch[0], train[1], atol=5e-3)
        # The same search as with the teacher dropped by hand: one fingerprint, one cached outcome.
        manual = _spec(False, None)
        assert search_fingerprint(pipeline.spec, [fps[1]], "d") == search_fingerprint(manual, [fps[1]], "d")
    finally:
        writer.purge()
        writer.close()


def test_the_report_shows_each_teachers_contribution():
    results = {
        "ensemble": {
            "distilled": ["a"],
            "leave_one_out": {
                "split": "val",
                "all": {"auc": 0.9, "acc": 0.8},
                "teachers": {
                    "a": {"without": {"auc": 0.6, "acc": 0.55}, "contribution": {"auc": 0.3, "acc": 0.25}},
                    "noise": {"without": {"auc": 0.95, "acc": 0.85}, "contribution": {"auc": -0.05, "acc": -0.05}},
                },
            },
        }
    }
    rows = contribution_rows(results)
    assert [(r["teacher"], r["distilled"], r["auc_gain"]) for r in rows] == [
        ("a", "yes", 0.3),
        ("noise", "no (distill: false)", -0.05),
    ]
    section = contribution_section(results)
    assert section is not None and "val AUC 0.9000" in section.paragraphs[0]
    assert contribution_section({"ensemble": {"val_metrics": {}}}) is None
