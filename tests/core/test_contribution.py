"""Leave-one-out contributions of teachers to the ensemble, checked against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from medkd.core.contribution import leave_one_out


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _ensemble_auc_acc(logits: list[np.ndarray], labels: np.ndarray) -> tuple[float, float]:
    probs = np.mean([_softmax(x) for x in logits], axis=0)
    return roc_auc_score(labels, probs[:, 1]), accuracy_score(labels, probs.argmax(axis=1))


@pytest.fixture
def three_teachers():
    """Two skilled binary teachers (different errors) and one that outputs noise."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=200)
    signal = np.where(labels == 1, 1.0, -1.0)

    def skilled(noise: float) -> np.ndarray:
        margin = signal + noise * rng.standard_normal(len(labels))
        return np.stack([-margin, margin], axis=1)

    useless = 3.0 * rng.standard_normal((len(labels), 2))
    return {"a": skilled(1.0), "b": skilled(1.2), "noise": useless}, labels


def test_leave_one_out_matches_an_independent_computation(three_teachers):
    logits, labels = three_teachers
    table = leave_one_out(logits, labels)
    auc, acc = _ensemble_auc_acc(list(logits.values()), labels)
    assert table["all"]["auc"] == pytest.approx(auc, abs=1e-6)
    assert table["all"]["acc"] == pytest.approx(acc, abs=1e-6)
    for name in logits:
        auc_without, acc_without = _ensemble_auc_acc([x for n, x in logits.items() if n != name], labels)
        entry = table["teachers"][name]
        assert entry["without"]["auc"] == pytest.approx(auc_without, abs=1e-6)
        assert entry["without"]["acc"] == pytest.approx(acc_without, abs=1e-6)
        assert entry["contribution"]["auc"] == pytest.approx(auc - auc_without, abs=1e-6)
    # The noisy teacher hurts the ensemble; each skilled one helps it.
    assert table["teachers"]["noise"]["contribution"]["auc"] < 0
    assert table["teachers"]["a"]["contribution"]["auc"] > 0
    assert table["teachers"]["b"]["contribution"]["auc"] > 0


def test_a_single_teacher_has_no_ensemble_without_it(three_teachers):
    logits, labels = three_teachers
    table = leave_one_out({"a": logits["a"]}, labels)
    assert table["teachers"]["a"] == {"without": None, "contribution": None}
    assert table["all"]["auc"] == pytest.approx(_ensemble_auc_acc([logits["a"]], labels)[0], abs=1e-6)


def test_no_teachers_is_an_error():
    with pytest.raises(ValueError, match="at least one teacher"):
        leave_one_out({}, np.array([0, 1]))
