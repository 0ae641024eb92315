"""Search helpers that need no Ray cluster: the trial's augmentation, calibration samples and training recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medkd.data import Augmentation
from medkd.data.meta import DatasetMeta
from medkd.search import recipe
from medkd.search.recipe import calibration_samples, trial_augmentation
from medkd.search.space import teacher_prior
from medkd.students.distill import DistillConfig, array_teacher_logits, build_student

META = DatasetMeta(
    task="classification", multilabel=False, spatial_dims=2, in_channels=1, num_classes=2, image_size=[16, 16]
)


def test_trial_augmentation_follows_search_augment():
    assert trial_augmentation(None, META, seed=0) is None
    assert trial_augmentation({"flip": 0.0}, META, seed=0) is None  # all off
    augment = trial_augmentation({"flip": 1.0, "flip_axes": [1]}, META, seed=0)
    assert isinstance(augment, Augmentation)
    images = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    flipped, masks = augment(images, None)
    assert masks is None
    assert torch.equal(flipped, images.flip(-1))


def test_calibration_samples_are_a_seeded_subset():
    images = np.arange(300, dtype=np.float32).reshape(300, 1, 1, 1)
    first, again, other = (calibration_samples(images, seed) for seed in (0, 0, 1))
    assert len(first) == 128 and len(np.unique(first)) == 128
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert len(calibration_samples(images[:10], 0)) == 10  # never more than there are


def test_teacher_prior_trusts_teachers_by_validation_skill():
    meta = META
    labels = np.array([0, 0, 0, 1, 1, 1])
    perfect = np.stack([-labels * 2.0 + 1, labels * 2.0 - 1], axis=1)
    chance = np.zeros((6, 2))
    inverted = perfect[:, ::-1].copy()
    weights = teacher_prior([perfect, chance, inverted], labels, meta)
    assert abs(sum(weights) - 1) < 1e-5
    assert weights[0] > weights[1] == weights[2]  # chance and worse-than-chance get the floor
    # Skills 2 * AUC - 1: 1 for the perfect teacher, the 0.05 floor for the other two.
    assert weights == pytest.approx([1 / 1.1, 0.05 / 1.1, 0.05 / 1.1], abs=1e-5)


def test_train_candidate_soups_the_training_but_fine_tunes_the_pruned_model_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 32)
    images = (rng.normal(0, 0.3, (32, 1, 16, 16)) + labels[:, None, None, None]).astype(np.float32)
    teachers = np.stack([np.stack([-labels, labels], 1).astype(np.float32)] * 2)
    meta = META
    config = DistillConfig(
        student="resnet_tiny",
        width=0.25,
        epochs=4,
        batch_size=16,
        alpha=0.5,
        branches=2,
        prune="channels",
        prune_amount=0.25,
        quantize="none",
    )
    calls = []
    real = recipe.distill

    def recording(model, cfg, **kwargs):
        history = real(model, cfg, **kwargs)
        calls.append((cfg.branches, [r.get("branch") for r in history]))
        return history

    monkeypatch.setattr(recipe, "distill", recording)
    metrics = recipe.train_candidate(
        build_student(meta, config),
        config,
        meta=meta,
        train=(images, labels[:, None]),
        val=(images[:16], labels[:16, None]),
        teacher_logits=array_teacher_logits(teachers),
        augment=None,
        directory=tmp_path,
        latency_runs=2,
    )
    (soup_branches, soup_records), (tune_branches, tune_records) = calls
    assert soup_branches == 2 and {1, 2} <= set(soup_records)
    assert tune_branches == 1 and set(tune_records) == {None}
    assert (tmp_path / "model.onnx").is_file() and metrics["val_auc"] >= 0.9  # images = noise + label: learnt


def test_the_default_objectives_weigh_the_decision_and_asha_ranks_on_both_qualities():
    from medkd.search.run import QUALITY_MEAN, asha_metric, quality_mean
    from medkd.spec.search import SearchSpec

    default = SearchSpec()
    assert [(o.metric, o.mode) for o in default.objectives] == [
        ("val_auc", "max"),
        ("val_acc", "max"),
        ("latency_ms", "min"),
    ]
    assert asha_metric(default.objectives) == (QUALITY_MEAN, "max")
    assert asha_metric(SearchSpec(objectives=[{"metric": "val_auc", "mode": "max"}]).objectives) == ("val_auc", "max")
    assert asha_metric(SearchSpec(objectives=[{"metric": "latency_ms", "mode": "min"}]).objectives) is None
    # A trial that ranks well but decides badly is ranked below one that does both.
    steady = quality_mean({"val_auc": 0.90, "val_acc": 0.88}, ["val_auc", "val_acc"])[QUALITY_MEAN]
    ranker = quality_mean({"val_auc": 0.92, "val_acc": 0.74}, ["val_auc", "val_acc"])[QUALITY_MEAN]
    assert steady == pytest.approx(0.89) and ranker < steady
    assert quality_mean({"val_auc": float("nan"), "val_acc": 0.8}, ["val_auc", "val_acc"])[QUALITY_MEAN] == 0.4


def test_optunas_sampler_takes_the_three_default_objectives():
    import random

    from ray.tune.search.optuna import OptunaSearch

    from medkd.search.space import define_space
    from medkd.spec.search import SearchSpec

    spec = SearchSpec()
    metrics, modes = [o.metric for o in spec.objectives], [o.mode for o in spec.objectives]
    searcher = OptunaSearch(space=define_space(spec.space, 2), metric=metrics, mode=modes, seed=0)
    rng = random.Random(0)
    for i in range(12):  # past TPE's 10 start-up trials, so its multi-objective model proposes the last ones
        assert 0.25 <= searcher.suggest(f"t{i}")["width"] <= 1.0
        searcher.on_trial_complete(
            f"t{i}", result={"val_auc": rng.random(), "val_acc": rng.random(), "latency_ms": rng.random()}
        )
    study = searcher._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE", "MINIMIZE"]
    assert all(len(t.values) == 3 for t in study.trials) and len(study.trials) == 12
    assert 1 <= len(study.best_trials) < 12  # a three-way Pareto front


def test_teacher_temperatures_calibrate_each_teacher_on_val():
    from medkd.search.space import teacher_temperatures

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    signal = np.stack([-(labels * 2.0 - 1), labels * 2.0 - 1], 1) + rng.normal(0, 1.5, (400, 2))
    over, under = 5.0 * signal, 0.2 * signal  # the same teacher, over- and under-confident
    temperatures = teacher_temperatures([over, under], labels, META)
    assert temperatures[0] > 1 > temperatures[1]
    assert temperatures[0] / temperatures[1] == pytest.approx(25.0, rel=0.05)  # both land on the same scale
    segmentation = DatasetMeta(task="segmentation", spatial_dims=2, in_channels=1, num_classes=2, image_size=[4, 4])
    with pytest.raises(ValueError, match="search.calibrate_teachers: teacher calibration is for classification"):
        teacher_temperatures([over], labels, segmentation)


def test_calibrate_teachers_changes_the_search_fingerprint_only_when_on():
    from medkd.spec.search import SearchSpec

    assert "calibrate_teachers" not in SearchSpec().fingerprint_fields()
    assert SearchSpec(calibrate_teachers=True).fingerprint_fields()["calibrate_teachers"] is True
