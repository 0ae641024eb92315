"""Logit standardization (CVPR 2024) as a switch on every softmax KD loss, the loss-family choice
(``DistillConfig.loss``) and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medkd.data.meta import DatasetMeta
from medkd.students.distill import DistillConfig, build_distillation_loss
from medkd.students.losses import create_loss, list_losses, standardize_logits
from medkd.students.losses.dist import DISTLoss
from medkd.students.losses.dkd import DKDLoss
from medkd.students.losses.families import check_loss_space, resolve_loss_name
from medkd.students.losses.kd import HintonKDLoss


def zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(1, keepdims=True)) / (x.std(1, ddof=1, keepdims=True) + 1e-7)


def test_standardize_matches_the_reference_zscore():
    x = np.array([[1.0, 2.0, 3.0], [10.0, -4.0, 0.5]])
    np.testing.assert_allclose(standardize_logits(torch.tensor(x)).numpy(), zscore(x), rtol=1e-12)
    torch.testing.assert_close(standardize_logits(torch.tensor([[5.0, 5.0, 5.0]])), torch.zeros(1, 3))


def test_kd_with_standardization_matches_numpy():
    student = np.array([[1.0, 2.0, 3.0, -1.0], [0.5, -0.5, 2.5, 0.0]])
    teacher = np.array([[4.0, 1.0, 0.0, -2.0], [0.0, 0.0, 5.0, 1.0]])
    t = 2.0
    zs, zt = zscore(student) / t, zscore(teacher) / t
    log_q = zs - np.log(np.exp(zs).sum(1, keepdims=True))
    p = np.exp(zt) / np.exp(zt).sum(1, keepdims=True)
    expected = t**2 * (p * (np.log(p) - log_q)).sum(1).mean()
    loss, _ = create_loss("hinton_kd", temperature=t, alpha=0.0, logit_standardization=True)(
        torch.tensor(student), torch.tensor(teacher)[None], torch.tensor([0, 2])
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # the aggregation works in float32


@pytest.mark.parametrize("name", ["hinton_kd", "dkd", "dist"])
def test_standardized_kd_ignores_the_students_logit_scale(name):
    """The point of the paper: the student matches relations, not the teacher's logit magnitude."""
    gen = torch.Generator().manual_seed(0)
    student, teachers = torch.randn(6, 5, generator=gen), torch.randn(2, 6, 5, generator=gen) * 4
    labels = torch.randint(0, 5, (6,), generator=gen)
    plain = create_loss(name, temperature=2.0, alpha=0.0)
    standardized = create_loss(name, temperature=2.0, alpha=0.0, logit_standardization=True)
    base, _ = standardized(student, teachers, labels)
    scaled, _ = standardized(3.0 * student + 1.5, teachers, labels)
    torch.testing.assert_close(scaled, base, rtol=1e-4, atol=1e-5)
    assert (
        abs(plain(3.0 * student + 1.5, teachers, labels)[0].item() - plain(student, teachers, labels)[0].item()) > 1e-3
    )


@pytest.mark.parametrize("name", ["hinton_kd", "dkd", "dist"])
def test_standardized_losses_train_with_every_aggregation(name):
    gen = torch.Generator().manual_seed(1)
    teachers = torch.randn(3, 6, 4, generator=gen) * 3
    labels = torch.randint(0, 4, (6,), generator=gen)
    for aggregation, weights in (("mean", None), ("weighted", [1.0, 2.0, 0.5]), ("confidence", [0.2, 0.3, 0.5])):
        student = torch.randn(6, 4, generator=gen).requires_grad_()
        loss, parts = create_loss(
            name, alpha=0.3, aggregation=aggregation, teacher_weights=weights, logit_standardization=True
        )(student, teachers, labels)
        loss.backward()
        assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0, aggregation
        assert np.isfinite(parts["kd"])


def test_pixel_kd_standardizes_per_pixel():
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(2, 3, 4, 4, generator=gen).requires_grad_()
    loss, _ = create_loss("pixel_kd", alpha=0.0, logit_standardization=True)(
        student, torch.randn(1, 2, 3, 4, 4, generator=gen), torch.randint(0, 3, (2, 4, 4), generator=gen)
    )
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_standardization_refuses_binary_and_multilabel_logits():
    with pytest.raises(ValueError, match="logit_standardization needs at least 3 classes.*2"):
        create_loss("hinton_kd", logit_standardization=True)(
            torch.zeros(4, 2), torch.zeros(1, 4, 2), torch.zeros(4, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="logit_standardization needs a softmax"):
        create_loss("multilabel_kd", logit_standardization=True)
    with pytest.raises(ValueError, match="logit_standardization must be true or false"):
        create_loss("dkd", logit_standardization="yes")


def test_the_new_families_are_registered():
    assert {"dkd", "dist"} <= set(list_losses())
    assert isinstance(create_loss("dkd"), DKDLoss) and isinstance(create_loss("dist"), DISTLoss)
    assert "logit_standardization=True" in repr(create_loss("dist", logit_standardization=True))


META = DatasetMeta(
    task="classification", multilabel=False, num_classes=8, spatial_dims=2, in_channels=3, image_size=[28, 28]
)


def test_distill_config_builds_the_chosen_loss_and_defaults_to_hinton_kd():
    assert type(build_distillation_loss(META, DistillConfig())) is HintonKDLoss
    loss = build_distillation_loss(META, DistillConfig(loss="dkd", logit_standardization=True, alpha=0.2))
    assert isinstance(loss, DKDLoss) and loss.logit_standardization and loss.alpha == 0.2
    assert isinstance(build_distillation_loss(META, DistillConfig(loss="dist")), DISTLoss)


def test_loss_choices_that_do_not_fit_the_task_are_refused_by_name():
    with pytest.raises(ValueError, match="loss 'dkd' is for single-label classification; multi-label"):
        build_distillation_loss(META.model_copy(update={"multilabel": True}), DistillConfig(loss="dkd"))
    with pytest.raises(ValueError, match="loss 'dist' is for single-label classification; segmentation"):
        resolve_loss_name("segmentation", False, 3, loss="dist")
    with pytest.raises(ValueError, match="loss must be one of"):
        resolve_loss_name("classification", False, 3, loss="fitnet")
    with pytest.raises(ValueError, match="search.space.logit_standardization: .*at least 3 classes"):
        check_loss_space(["hinton_kd", "dkd"], [False, True], task="classification", multilabel=False, num_classes=2)
    with pytest.raises(ValueError, match="search.space.loss: loss 'dkd'"):
        check_loss_space(["dkd"], None, task="classification", multilabel=True, num_classes=5)
    check_loss_space(["hinton_kd", "dkd", "dist"], [False], task="classification", multilabel=False, num_classes=2)
