"""Each teacher's contribution to the ensemble: the ensemble's metric with and without it.

Examples::

    >>> import numpy as np
    >>> labels = np.array([0, 1, 0, 1])
    >>> good = np.array([[2.0, -2.0], [-2.0, 2.0], [1.0, -1.0], [-1.0, 1.0]])
    >>> useless = np.zeros((4, 2))
    >>> table = leave_one_out({"good": good, "useless": useless}, labels)
    >>> table["teachers"]["useless"]["without"]["acc"], table["teachers"]["good"]["without"]["acc"]
    (1.0, 0.5)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from medkd.core.metrics import classification_metrics, ensemble_probabilities

CONTRIBUTION_METRICS = ("auc", "acc")


def _summary(logits: list[np.ndarray], labels: np.ndarray, multilabel: bool) -> dict[str, float]:
    metrics = classification_metrics(
        ensemble_probabilities(logits, multilabel=multilabel), labels, multilabel=multilabel
    )
    return {name: float(metrics[name]) for name in CONTRIBUTION_METRICS}


def leave_one_out(
    logits_by_teacher: Mapping[str, np.ndarray], labels: np.ndarray, *, multilabel: bool = False
) -> dict[str, Any]:
    """The equal-weight ensemble's AUC and accuracy with every teacher, and without each one.

    Args:
        logits_by_teacher: teacher name -> its ``(N, C)`` logits on one split (val: this is
            evidence for choosing teachers, so never the test split).
        labels: that split's labels, as :func:`medkd.core.metrics.classification_metrics` takes them.
        multilabel: sigmoid probabilities instead of softmax.

    Returns:
        ``{"all": {"auc", "acc"}, "teachers": {name: {"without": {"auc", "acc"} | None,
        "contribution": {"auc", "acc"} | None}}}``; ``contribution`` is the ensemble's metric
        minus the metric without that teacher (positive: the teacher helps). With a single
        teacher there is no ensemble without it, so both are None.

    Raises:
        ValueError: no teachers, or logits and labels that do not fit (from the metrics).

    Examples::

        >>> table = leave_one_out({"a": logits_a, "b": logits_b, "c": logits_c}, val_labels)
        >>> table["teachers"]["c"]["contribution"]["auc"]  # < 0: the ensemble is better without c
    """
    if not logits_by_teacher:
        raise ValueError("logits_by_teacher must hold at least one teacher's logits")
    names = list(logits_by_teacher)
    everyone = _summary([logits_by_teacher[n] for n in names], labels, multilabel)
    teachers: dict[str, dict[str, Any]] = {}
    for name in names:
        others = [logits_by_teacher[n] for n in names if n != name]
        if not others:
            teachers[name] = {"without": None, "contribution": None}
            continue
        without = _summary(others, labels, multilabel)
        teachers[name] = {
            "without": without,
            "contribution": {m: everyone[m] - without[m] for m in CONTRIBUTION_METRICS},
        }
    return {"all": everyone, "teachers": teachers}
