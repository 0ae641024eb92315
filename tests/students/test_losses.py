"""Distillation losses and multi-teacher aggregation strategies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from medkd.students.losses import (
    create_aggregation,
    create_loss,
    default_loss_name,
    list_aggregations,
    list_losses,
    register_loss,
)

N, C = 6, 4


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def logits(*shape: int, gen: torch.Generator, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def labels(gen: torch.Generator, n: int = N, classes: int = C) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=gen)


def manual_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) per sample, averaged (torch's kl_div)."""
    return F.kl_div(
        F.log_softmax(student / temperature, 1),
        F.log_softmax(teacher / temperature, 1),
        log_target=True,
        reduction="batchmean",
    )


# ----------------------------------------------------------------------------- registries


def test_registries_hold_the_built_ins():
    assert list_losses() == ["dist", "dkd", "hinton_kd", "multilabel_kd", "pixel_kd"]
    assert list_aggregations() == ["confidence", "mean", "weighted"]
    assert default_loss_name("classification") == "hinton_kd"
    assert default_loss_name("classification", multilabel=True) == "multilabel_kd"
    assert default_loss_name("segmentation") == "pixel_kd"
    with pytest.raises(ValueError, match="task"):
        default_loss_name("detection")


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match="unknown loss 'fitnet'.*hinton_kd"):
        create_loss("fitnet")
    with pytest.raises(ValueError, match="unknown aggregation 'median'.*confidence"):
        create_aggregation("median")
    with pytest.raises(ValueError, match="aggregation 'median'"):
        create_loss("hinton_kd", aggregation="median")


def test_registering_a_taken_loss_name_is_refused():
    class Other(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_loss("hinton_kd", applies_to="single_label")(Other)


# ----------------------------------------------------------------------------- Hinton KD


def test_alpha_one_is_exactly_cross_entropy(gen):
    student, teachers, y = logits(N, C, gen=gen), logits(3, N, C, gen=gen), labels(gen)
    loss, parts = create_loss("hinton_kd", alpha=1.0, temperature=3.0)(student, teachers, y)
    assert torch.equal(loss, F.cross_entropy(student, y))
    assert parts["ce"] == pytest.approx(loss.item()) and parts["kd"] > 0


def test_alpha_one_needs_no_teachers_but_lower_alpha_does(gen):
    student, y = logits(N, C, gen=gen), labels(gen)
    loss, parts = create_loss("hinton_kd", alpha=1.0)(student, None, y)
    assert torch.equal(loss, F.cross_entropy(student, y)) and parts["kd"] == 0.0
    with pytest.raises(ValueError, match="teacher_logits"):
        create_loss("hinton_kd", alpha=0.5)(student, None, y)


def test_kd_term_vanishes_when_student_equals_single_teacher(gen):
    student = logits(N, C, gen=gen)
    _, parts = create_loss("hinton_kd", temperature=4.0)(student, student.unsqueeze(0).clone(), labels(gen))
    assert abs(parts["kd"]) < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_kd_term_is_t_squared_times_kl(gen, temperature):
    student, teacher, y = logits(N, C, gen=gen), logits(N, C, gen=gen), labels(gen)
    loss_fn = create_loss("hinton_kd", temperature=temperature, alpha=0.0)
    loss, parts = loss_fn(student, teacher.unsqueeze(0), y)
    expected = temperature**2 * manual_kl(teacher, student, temperature)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert parts["kd"] == pytest.approx(expected.item(), rel=1e-5)


def test_alpha_mixes_hard_and_kd_terms(gen):
    student, teachers, y = logits(N, C, gen=gen), logits(2, N, C, gen=gen), labels(gen)
    loss, parts = create_loss("hinton_kd", alpha=0.3, temperature=2.0)(student, teachers, y)
    assert loss.item() == pytest.approx(0.3 * parts["ce"] + 0.7 * parts["kd"], rel=1e-6)
    assert parts["loss"] == pytest.approx(loss.item())


def test_class_weights_and_label_smoothing_reach_the_cross_entropy(gen):
    student, teachers, y = logits(N, C, gen=gen), logits(1, N, C, gen=gen), labels(gen)
    weights = [1.0, 2.0, 0.5, 3.0]
    loss, _ = create_loss("hinton_kd", alpha=1.0, class_weights=weights, label_smoothing=0.1)(student, teachers, y)
    torch.testing.assert_close(loss, F.cross_entropy(student, y, weight=torch.tensor(weights), label_smoothing=0.1))
    with pytest.raises(ValueError, match="class_weights"):
        create_loss("hinton_kd", class_weights=[1.0, 2.0])(student, teachers, y)


def test_medmnist_shaped_labels_are_accepted(gen):
    student, teachers, y = logits(N, C, gen=gen), logits(2, N, C, gen=gen), labels(gen)
    loss_fn = create_loss("hinton_kd", aggregation="confidence")
    torch.testing.assert_close(loss_fn(student, teachers, y.unsqueeze(1))[0], loss_fn(student, teachers, y)[0])


def test_gradients_reach_the_student_only(gen):
    student = logits(N, C, gen=gen).requires_grad_()
    teachers = logits(2, N, C, gen=gen).requires_grad_()
    loss, _ = create_loss("hinton_kd", alpha=0.5, aggregation="confidence")(student, teachers, labels(gen))
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teachers.grad is None


def test_kd_only_training_pulls_the_student_to_the_teacher_mixture(gen):
    teachers = logits(2, N, C, gen=gen)
    student = torch.zeros(N, C, requires_grad=True)
    loss_fn = create_loss("hinton_kd", alpha=0.0, temperature=2.0, aggregation="mean")
    optimizer = torch.optim.Adam([student], lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        loss_fn(student, teachers, labels(gen))[0].backward()
        optimizer.step()
    target = (teachers / 2.0).softmax(2).mean(0)
    torch.testing.assert_close((student.detach() / 2.0).softmax(1), target, atol=2e-3, rtol=0)


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("distribution", ["categorical", "bernoulli"])
def test_mean_of_identical_teachers_is_that_teacher(gen, distribution):
    teacher = logits(N, C, gen=gen)
    one = create_aggregation("mean")(teacher.unsqueeze(0), temperature=3.0, distribution=distribution)
    three = create_aggregation("mean")(teacher.expand(3, N, C), temperature=3.0, distribution=distribution)
    torch.testing.assert_close(three, one)
    expected = (teacher / 3.0).softmax(1) if distribution == "categorical" else (teacher / 3.0).sigmoid()
    torch.testing.assert_close(one, expected)


def test_mean_averages_softened_distributions(gen):
    teachers = logits(3, N, C, gen=gen)
    target = create_aggregation("mean")(teachers, temperature=2.0)
    torch.testing.assert_close(target, (teachers / 2.0).softmax(2).mean(0))
    torch.testing.assert_close(target.sum(1), torch.ones(N))


def test_weighted_one_zero_is_teacher_zero(gen):
    teachers = logits(2, N, C, gen=gen)
    target = create_aggregation("weighted", teacher_weights=[1.0, 0.0])(teachers, temperature=2.0)
    torch.testing.assert_close(target, (teachers[0] / 2.0).softmax(1))


def test_weighted_normalises_weights(gen):
    teachers = logits(2, N, C, gen=gen)
    equal = create_aggregation("weighted", teacher_weights=[3.0, 3.0])(teachers, temperature=2.0)
    torch.testing.assert_close(equal, create_aggregation("mean")(teachers, temperature=2.0))
    skewed = create_aggregation("weighted", teacher_weights=[3.0, 1.0])(teachers, temperature=2.0)
    p = (teachers / 2.0).softmax(2)
    torch.testing.assert_close(skewed, 0.75 * p[0] + 0.25 * p[1])


def _right_and_wrong_teachers(y: torch.Tensor, classes: int = C) -> torch.Tensor:
    """Teacher 0 is confidently right about every sample, teacher 1 confidently wrong."""
    right = F.one_hot(y, classes).float() * 5.0
    wrong = F.one_hot((y + 1) % classes, classes).float() * 5.0
    return torch.stack([right, wrong])


def test_confidence_trusts_the_teacher_that_is_right(gen):
    y = labels(gen)
    teachers = _right_and_wrong_teachers(y)
    aggregation = create_aggregation("confidence")
    weights = aggregation.weights(teachers, y, "categorical")
    assert weights.shape == (2, N)
    assert (weights[0] > 0.9).all()
    torch.testing.assert_close(weights.sum(0), torch.ones(N))
    target = aggregation(teachers, temperature=2.0, targets=y)
    assert (target.argmax(1) == y).all()


def test_confidence_weights_are_per_sample(gen):
    y = labels(gen)
    teachers = _right_and_wrong_teachers(y)
    teachers[:, :3] = teachers[:, :3].flip(0)  # teacher 1 is right about the first three samples
    weights = create_aggregation("confidence").weights(teachers, y, "categorical")
    assert (weights[1, :3] > weights[0, :3]).all() and (weights[0, 3:] > weights[1, 3:]).all()


def test_confidence_without_labels_trusts_the_sharper_teacher(gen):
    sharp = logits(N, C, gen=gen, scale=6.0)
    flat = logits(N, C, gen=gen, scale=0.1)
    weights = create_aggregation("confidence").weights(torch.stack([flat, sharp]), None, "categorical")
    assert (weights[1] > weights[0]).all()


def test_confidence_prior_weights_can_exclude_a_teacher(gen):
    y = labels(gen)
    teachers = _right_and_wrong_teachers(y)
    target = create_aggregation("confidence", teacher_weights=[0.0, 1.0])(teachers, temperature=2.0, targets=y)
    torch.testing.assert_close(target, (teachers[1] / 2.0).softmax(1))


def test_confidence_multilabel_trusts_the_teacher_that_is_right(gen):
    y = torch.randint(0, 2, (N, C), generator=gen).float()
    right, wrong = (y * 2 - 1) * 4.0, (1 - 2 * y) * 4.0
    weights = create_aggregation("confidence").weights(torch.stack([wrong, right]), y, "bernoulli")
    assert (weights[1] > 0.9).all()


def test_confidence_segmentation_is_per_pixel(gen):
    y = torch.randint(0, 3, (2, 5, 5), generator=gen)
    right = F.one_hot(y, 3).permute(0, 3, 1, 2).float() * 5.0
    wrong = F.one_hot((y + 1) % 3, 3).permute(0, 3, 1, 2).float() * 5.0
    teachers = torch.stack([right, wrong])
    teachers[:, :, :, 0] = teachers[:, :, :, 0].flip(0)  # teacher 1 right on the first row only
    weights = create_aggregation("confidence").weights(teachers, y, "categorical")
    assert weights.shape == (2, 2, 5, 5)
    assert (weights[1, :, 0] > 0.9).all() and (weights[0, :, 1:] > 0.9).all()


# ----------------------------------------------------------------------------- multi-label KD


def test_multilabel_kd_shapes_and_sanity(gen):
    student, teachers = logits(N, C, gen=gen), logits(2, N, C, gen=gen)
    y = torch.randint(0, 2, (N, C), generator=gen)
    loss, parts = create_loss("multilabel_kd", alpha=0.4, temperature=2.0)(student.requires_grad_(), teachers, y)
    assert loss.ndim == 0 and set(parts) == {"loss", "bce", "kd"}
    assert parts["bce"] == pytest.approx(F.binary_cross_entropy_with_logits(student, y.float()).item(), rel=1e-6)
    assert parts["kd"] > 0
    loss.backward()
    assert student.grad.abs().sum() > 0


def test_multilabel_kd_is_t_squared_binary_kl(gen):
    student, teacher = logits(N, C, gen=gen), logits(N, C, gen=gen)
    y = torch.randint(0, 2, (N, C), generator=gen)
    t = 3.0
    loss, _ = create_loss("multilabel_kd", alpha=0.0, temperature=t)(student, teacher.unsqueeze(0), y)
    p, q = (teacher / t).sigmoid(), (student / t).sigmoid()
    kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    torch.testing.assert_close(loss, t**2 * kl.mean(), rtol=1e-5, atol=1e-6)
    _, same = create_loss("multilabel_kd", temperature=t)(student, student.unsqueeze(0), y)
    assert abs(same["kd"]) < 1e-5


def test_multilabel_kd_stays_finite_for_extreme_logits():
    student = torch.tensor([[80.0, -80.0]])
    teachers = torch.tensor([[[-80.0, 80.0]]])
    loss, _ = create_loss("multilabel_kd", temperature=1.0)(student, teachers, torch.tensor([[1, 0]]))
    assert torch.isfinite(loss)


def test_multilabel_targets_must_match_the_logits(gen):
    with pytest.raises(ValueError, match="targets"):
        create_loss("multilabel_kd")(logits(N, C, gen=gen), logits(1, N, C, gen=gen), labels(gen))


# ----------------------------------------------------------------------------- pixel KD


@pytest.mark.parametrize("spatial", [(8, 8), (4, 4, 4)])
def test_pixel_kd_shapes_and_sanity(gen, spatial):
    classes = 3
    student = logits(2, classes, *spatial, gen=gen).requires_grad_()
    teachers = logits(2, 2, classes, *spatial, gen=gen)
    mask = torch.randint(0, classes, (2, *spatial), generator=gen)
    loss, parts = create_loss("pixel_kd", alpha=0.5, temperature=2.0, aggregation="confidence")(student, teachers, mask)
    assert loss.ndim == 0 and set(parts) == {"loss", "dice_ce", "kd"} and parts["kd"] > 0
    loss.backward()
    assert student.grad.shape == student.shape and student.grad.abs().sum() > 0


def test_pixel_kd_hard_term_is_monai_dice_ce(gen):
    student, teachers = logits(2, 3, 8, 8, gen=gen), logits(1, 2, 3, 8, 8, gen=gen)
    mask = torch.randint(0, 3, (2, 1, 8, 8), generator=gen)
    loss, _ = create_loss("pixel_kd", alpha=1.0)(student, teachers, mask)
    torch.testing.assert_close(loss, DiceCELoss(to_onehot_y=True, softmax=True)(student, mask))


def test_pixel_kd_is_t_squared_mean_pixel_kl(gen):
    student, teacher = logits(2, 3, 8, 8, gen=gen), logits(2, 3, 8, 8, gen=gen)
    mask = torch.randint(0, 3, (2, 8, 8), generator=gen)
    t = 2.0
    loss, _ = create_loss("pixel_kd", alpha=0.0, temperature=t)(student, teacher.unsqueeze(0), mask)
    per_pixel = F.kl_div(
        F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="none"
    ).sum(1)
    torch.testing.assert_close(loss, t**2 * per_pixel.mean(), rtol=1e-5, atol=1e-6)
    _, same = create_loss("pixel_kd", temperature=t)(student, student.unsqueeze(0), mask)
    assert abs(same["kd"]) < 1e-5


def test_pixel_kd_rejects_a_mask_of_the_wrong_size(gen):
    with pytest.raises(ValueError, match="targets"):
        create_loss("pixel_kd")(
            logits(2, 3, 8, 8, gen=gen), logits(1, 2, 3, 8, 8, gen=gen), torch.zeros(2, 4, 4, dtype=torch.long)
        )


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("name", ["hinton_kd", "multilabel_kd", "pixel_kd"])
@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -2.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"aggregation": "weighted"}, "teacher_weights"),
        ({"aggregation": "weighted", "teacher_weights": [1.0, -1.0]}, "teacher_weights"),
        ({"aggregation": "weighted", "teacher_weights": [0.0, 0.0]}, "teacher_weights"),
        ({"aggregation": "confidence", "teacher_weights": "ab"}, "teacher_weights"),
        ({"aggregation": "mean", "teacher_weights": [1.0, 1.0]}, "teacher_weights"),
    ],
)
def test_bad_arguments_name_the_argument(name, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        create_loss(name, **kwargs)


@pytest.mark.parametrize("aggregation", ["weighted", "confidence"])
def test_teacher_weight_count_must_match_the_teachers(gen, aggregation):
    loss_fn = create_loss("hinton_kd", aggregation=aggregation, teacher_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="teacher_weights"):
        loss_fn(logits(N, C, gen=gen), logits(3, N, C, gen=gen), labels(gen))


@pytest.mark.parametrize(
    "teacher_shape",
    [(N, C), (2, N, C + 1), (2, N + 1, C)],
)
def test_teacher_logits_must_stack_student_shaped_logits(gen, teacher_shape):
    with pytest.raises(ValueError, match="teacher_logits"):
        create_loss("hinton_kd")(logits(N, C, gen=gen), logits(*teacher_shape, gen=gen), labels(gen))


@pytest.mark.parametrize("bad", [torch.full((N,), C), torch.full((N,), -1), torch.zeros(N + 1, dtype=torch.long)])
def test_class_labels_are_checked(gen, bad):
    with pytest.raises(ValueError, match="targets"):
        create_loss("hinton_kd")(logits(N, C, gen=gen), logits(1, N, C, gen=gen), bad)
