"""DIST: values against NumPy's Pearson correlation, its invariances, gradients and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medkd.students.losses import create_loss
from medkd.students.losses.dist import pearson_correlation


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference_dist(student: np.ndarray, teacher: np.ndarray, t: float, beta: float, gamma: float) -> float:
    ys, yt = softmax(student / t), softmax(teacher / t)
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(len(ys))])
    intra = 1 - np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(ys.shape[1])])
    return t**2 * (beta * inter + gamma * intra)


STUDENT = np.array([[1.0, 2.0, 3.0, -1.0], [0.5, -0.5, 2.5, 0.0], [-2.0, 1.0, 0.0, 3.0]])
TEACHER = np.array([[4.0, 1.0, 0.0, -2.0], [0.0, 0.0, 5.0, 1.0], [1.0, 2.0, -1.0, 2.5]])


@pytest.mark.parametrize("temperature,beta,gamma", [(1.0, 1.0, 1.0), (4.0, 2.0, 2.0), (2.0, 1.0, 0.0)])
def test_dist_matches_numpy_correlations(temperature, beta, gamma):
    loss_fn = create_loss("dist", temperature=temperature, alpha=0.0, inter_weight=beta, intra_weight=gamma)
    loss, _ = loss_fn(torch.tensor(STUDENT), torch.tensor(TEACHER)[None], torch.tensor([0, 2, 3]))
    assert loss.item() == pytest.approx(reference_dist(STUDENT, TEACHER, temperature, beta, gamma), rel=1e-6, abs=1e-9)


def test_pearson_ignores_shift_and_scale():
    a = torch.tensor([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])
    b = torch.tensor([[0.2, 1.0, 0.8], [0.9, 0.9, 1.2]]) + 3.0
    torch.testing.assert_close(pearson_correlation(a, b), torch.ones(2), rtol=1e-5, atol=1e-5)


def test_student_equal_to_teacher_costs_nothing_and_gradients_flow_otherwise():
    teacher = torch.tensor(TEACHER, dtype=torch.float32)
    same, _ = create_loss("dist", alpha=0.0)(teacher.clone(), teacher[None], torch.tensor([0, 2, 3]))
    assert same.item() == pytest.approx(0.0, abs=1e-5)
    student = torch.tensor(STUDENT, dtype=torch.float32, requires_grad=True)
    teachers = torch.stack([teacher, teacher.flip(1)]).requires_grad_()
    loss, _ = create_loss("dist", alpha=0.5, aggregation="confidence")(student, teachers, torch.tensor([0, 2, 3]))
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teachers.grad is None


def test_binary_dist_learns_from_the_intra_class_term_only():
    """Two 2-vectors always correlate +-1: the inter-class term has no gradient (but for its eps), the
    intra-class one does."""
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(1, 8, 2, generator=gen) * 2
    labels = torch.randint(0, 2, (8,), generator=gen)
    grads = {}
    for name, weights in {"inter": (1.0, 0.0), "intra": (0.0, 1.0)}.items():
        student = (torch.randn(8, 2, generator=torch.Generator().manual_seed(1))).requires_grad_()
        loss, _ = create_loss("dist", alpha=0.0, inter_weight=weights[0], intra_weight=weights[1])(
            student, teacher, labels
        )
        loss.backward()
        grads[name] = student.grad.abs().sum().item()
    assert grads["intra"] > 1.0 and grads["inter"] < 1e-4 * grads["intra"]


def test_dist_refuses_bad_weights_and_segmentation_shapes():
    with pytest.raises(ValueError, match="inter_weight"):
        create_loss("dist", inter_weight=-0.5)
    with pytest.raises(ValueError, match="intra_weight"):
        create_loss("dist", intra_weight=True)
    with pytest.raises(ValueError, match=r"\(N, C\) for dist"):
        create_loss("dist")(torch.zeros(2, 3, 4, 4), torch.zeros(1, 2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
