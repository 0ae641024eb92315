"""The student distillation loop (medkd.students.distill.distill) on tiny synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medkd.students.distill import DistillConfig, array_teacher_logits, build_student, distill

META = {"task": "classification", "multilabel": False, "spatial_dims": 2, "in_channels": 1,
        "num_classes": 2, "image_size": [16, 16]}
N = 48


def tiny_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images whose class is where a bright square sits (left/right), and two teachers' logits."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, N)
    images = rng.normal(0.0, 0.3, (N, 1, 16, 16)).astype(np.float32)
    for i, label in enumerate(labels):
        images[i, 0, 5:11, (2 if label == 0 else 9):(2 if label == 0 else 9) + 5] += 1.5
    signal = np.where(labels == 1, 1.0, -1.0)[:, None] * np.array([-1.5, 1.5])
    teachers = np.stack([signal + rng.normal(0, 0.5, signal.shape) for _ in range(2)]).astype(np.float32)
    return images, labels[:, None].astype(np.int64), teachers


def config(**overrides) -> DistillConfig:
    base = {"student": "resnet_tiny", "width": 0.25, "epochs": 6, "batch_size": 16, "lr": 1e-2, "seed": 0}
    return DistillConfig(**{**base, **overrides})


def test_kd_loss_decreases_with_teacher_logits():
    images, labels, teachers = tiny_data()
    cfg = config(alpha=0.3, temperature=4.0)
    model = build_student(META, cfg)
    history = distill(model, cfg, train_images=images, train_labels=labels,
                      teacher_logits=array_teacher_logits(teachers), meta=META)
    assert len(history) == cfg.epochs
    kd = [record["train_kd"] for record in history]
    assert all(np.isfinite(kd))
    assert kd[-1] < kd[0]
    assert not model.training  # returned in eval mode


def test_alpha_one_trains_on_hard_labels_without_teacher_logits():
    images, labels, _ = tiny_data()
    cfg = config(alpha=1.0, epochs=2)
    model = build_student(META, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    history = distill(model, cfg, train_images=images, train_labels=labels, teacher_logits=None, meta=META,
                      val_images=images[:16], val_labels=labels[:16])
    assert [r["epoch"] for r in history] == [1, 2]
    assert "train_ce" in history[0] and "train_kd" not in history[0]
    assert 0.0 <= history[-1]["val_auc"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.99])
def test_missing_teacher_logits_with_kd_weight_is_an_error(alpha):
    images, labels, _ = tiny_data()
    cfg = config(alpha=alpha, epochs=1)
    with pytest.raises(ValueError, match="teacher_logits"):
        distill(build_student(META, cfg), cfg, train_images=images, train_labels=labels, teacher_logits=None, meta=META)


def test_same_seed_gives_the_same_student():
    images, labels, teachers = tiny_data()
    cfg = config(alpha=0.5, epochs=1)
    weights = []
    for noise in range(2):
        torch.randn(noise + 1)  # a different global RNG state: the seed alone decides the init
        model = build_student(META, cfg)
        distill(model, cfg, train_images=images, train_labels=labels, teacher_logits=array_teacher_logits(teachers), meta=META)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_augment_callable_sees_every_training_batch_and_on_epoch_can_stop():
    images, labels, teachers = tiny_data()
    cfg = config(alpha=0.5, epochs=5)
    calls = []

    def augment(batch, masks):
        assert masks is None  # classification: labels are not geometric
        calls.append(batch.shape[0])
        return batch.flip(-1), masks

    history = distill(build_student(META, cfg), cfg, train_images=images, train_labels=labels,
                      teacher_logits=array_teacher_logits(teachers), meta=META, augment=augment,
                      on_epoch=lambda record: record["epoch"] == 2)
    assert len(history) == 2
    assert sum(calls) == 2 * (N // cfg.batch_size) * cfg.batch_size
