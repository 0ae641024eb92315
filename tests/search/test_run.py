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
