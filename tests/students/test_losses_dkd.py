"""Decoupled KD (DKD): values against an independent NumPy transcription of the paper's reference
code, the KD decomposition, gradients, multi-teacher aggregation and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medkd.students.losses import create_loss
from medkd.students.losses.dkd import dkd_parts


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def reference_dkd(
    student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, alpha: float, beta: float, t: float
) -> float:
    """mdistiller's dkd_loss in NumPy (the -1000 mask, batch-mean, T^2 included)."""
    gt = np.zeros_like(student, dtype=bool)
    gt[np.arange(len(labels)), labels] = True
    ps, pt = softmax(student / t), softmax(teacher / t)
    bs = np.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = np.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = (bt * (np.log(bt) - np.log(bs))).sum() * t**2 / len(labels)
    pt2 = softmax(teacher / t - 1000.0 * gt)
    log_pt2, log_ps2 = log_softmax(teacher / t - 1000.0 * gt), log_softmax(student / t - 1000.0 * gt)
    nckd = (pt2 * (log_pt2 - log_ps2)).sum() * t**2 / len(labels)
    return alpha * tckd + beta * nckd


STUDENT = np.array([[1.0, 2.0, 3.0, -1.0], [0.5, -0.5, 2.5, 0.0], [-2.0, 1.0, 0.0, 3.0]])
TEACHER = np.array([[4.0, 1.0, 0.0, -2.0], [0.0, 0.0, 5.0, 1.0], [1.0, 2.0, -1.0, 2.5]])
LABELS = np.array([0, 2, 3])


@pytest.mark.parametrize("temperature,tckd_weight,nckd_weight", [(1.0, 1.0, 8.0), (4.0, 1.0, 8.0), (2.0, 0.5, 2.0)])
def test_dkd_matches_the_reference_formula(temperature, tckd_weight, nckd_weight):
    loss_fn = create_loss("dkd", temperature=temperature, alpha=0.0, tckd_weight=tckd_weight, nckd_weight=nckd_weight)
    loss, parts = loss_fn(torch.tensor(STUDENT), torch.tensor(TEACHER)[None], torch.tensor(LABELS))
    expected = reference_dkd(STUDENT, TEACHER, LABELS, tckd_weight, nckd_weight, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["kd"] == pytest.approx(expected, rel=1e-6)


def test_kd_is_tckd_plus_weighted_nckd():
    """The paper's decomposition: KL(p||q) = TCKD + (1 - p_gt) * NCKD, sample by sample."""
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(16, 6, generator=gen) * 3, torch.randn(16, 6, generator=gen) * 3
    labels = torch.randint(0, 6, (16,), generator=gen)
    p = F.softmax(teacher / 2.0, 1)
    tckd, nckd = dkd_parts(student, p, labels, 2.0)
    kl = (p * (p.log() - F.log_softmax(student / 2.0, 1))).sum(1)
    p_gt = p.gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(tckd + (1 - p_gt) * nckd, kl, rtol=1e-5, atol=1e-6)
    assert (tckd >= -1e-7).all() and (nckd >= -1e-7).all()


def test_binary_dkd_is_hinton_kd():
    """Two classes leave no non-target spread: NCKD = 0 and TCKD is the whole KL."""
    gen = torch.Generator().manual_seed(2)
    student, teachers = torch.randn(8, 2, generator=gen), torch.randn(2, 8, 2, generator=gen) * 2
    labels = torch.randint(0, 2, (8,), generator=gen)
    kd, _ = create_loss("hinton_kd", temperature=3.0, alpha=0.4, aggregation="confidence")(student, teachers, labels)
    dkd, _ = create_loss("dkd", temperature=3.0, alpha=0.4, aggregation="confidence", nckd_weight=8.0)(
        student, teachers, labels
    )
    torch.testing.assert_close(dkd, kd, rtol=1e-5, atol=1e-6)


def test_identical_teachers_aggregate_to_one_and_weights_select_a_teacher():
    gen = torch.Generator().manual_seed(3)
    student, teacher, other = (torch.randn(5, 4, generator=gen) * 2 for _ in range(3))
    labels = torch.randint(0, 4, (5,), generator=gen)
    single, _ = create_loss("dkd", alpha=0.0)(student, teacher[None], labels)
    twice, _ = create_loss("dkd", alpha=0.0)(student, torch.stack([teacher, teacher]), labels)
    chosen, _ = create_loss("dkd", alpha=0.0, aggregation="weighted", teacher_weights=[1.0, 0.0])(
        student, torch.stack([teacher, other]), labels
    )
    torch.testing.assert_close(twice, single)
    torch.testing.assert_close(chosen, single)


def test_gradients_reach_the_student_only_and_are_finite_for_confident_teachers():
    student = torch.tensor(STUDENT, dtype=torch.float32, requires_grad=True)
    # A teacher sure of the label: p_gt rounds to 1 and the non-target mass to 0.
    teacher = torch.tensor([[80.0, 0.0, 0.0, 0.0], [0.0, 0.0, 80.0, 0.0], [0.0, 0.0, 0.0, 80.0]], requires_grad=True)
    loss, parts = create_loss("dkd", temperature=1.0, alpha=0.5)(student, teacher[None], torch.tensor(LABELS))
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert np.isfinite(parts["kd"])


def test_dkd_refuses_bad_weights_and_non_classification_shapes():
    with pytest.raises(ValueError, match="nckd_weight"):
        create_loss("dkd", nckd_weight=-1.0)
    with pytest.raises(ValueError, match="tckd_weight"):
        create_loss("dkd", tckd_weight=float("nan"))
    with pytest.raises(ValueError, match=r"\(N, C\) for dkd"):
        create_loss("dkd")(torch.zeros(2, 3, 4, 4), torch.zeros(1, 2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have shape"):  # multi-label 0/1 targets are not class indices
        create_loss("dkd")(torch.zeros(2, 3), torch.zeros(1, 2, 3), torch.ones(2, 3))


# ----------------------------------------------------------------------------- warm-up


def test_warmup_follows_the_reference_linear_ramp():
    from medkd.students.losses.dkd import DEFAULT_WARMUP_SHARE, warmup_factor

    # mdistiller: min(epoch / warmup, 1.0) * dkd, 1-based epochs, DKD.WARMUP = 20 of 240 on CIFAR-100.
    assert [warmup_factor(e, 20) for e in (1, 10, 20, 21, 240)] == [0.05, 0.5, 1.0, 1.0, 1.0]
    assert DEFAULT_WARMUP_SHARE * 240 == pytest.approx(20)
    assert warmup_factor(1, 0) == 1.0


def test_set_epoch_scales_the_dkd_term_only():
    student = torch.tensor(STUDENT, dtype=torch.float32)
    teacher = torch.tensor(TEACHER, dtype=torch.float32)[None]
    labels = torch.tensor(LABELS)
    plain = create_loss("dkd", temperature=2.0, alpha=0.3)
    warmed = create_loss("dkd", temperature=2.0, alpha=0.3, warmup_epochs=4)
    _, full = plain(student, teacher, labels)
    warmed.set_epoch(1, 40)
    _, first = warmed(student, teacher, labels)
    assert first["kd"] == pytest.approx(0.25 * full["kd"], rel=1e-6)
    assert first["ce"] == pytest.approx(full["ce"])  # the hard term is never warmed up
    warmed.set_epoch(4, 40)
    assert warmed(student, teacher, labels)[1]["kd"] == pytest.approx(full["kd"], rel=1e-6)
    by_share = create_loss("dkd", temperature=2.0)  # the reference's share: 20 of 240 -> 2 of 24 epochs
    by_share.set_epoch(1, 24)
    assert by_share.warmup == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"epoch must lie in \[1, epochs=24\], got 25"):
        by_share.set_epoch(25, 24)
    with pytest.raises(ValueError, match="warmup_epochs must be a finite number >= 0"):
        create_loss("dkd", warmup_epochs=-1)
