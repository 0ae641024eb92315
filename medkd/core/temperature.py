"""Temperature scaling (Guo et al., ICML 2017): the one scalar ``T > 0`` that divides a model's logits
before the softmax (a sigmoid per label for multi-label) so that the val labels are most likely.

Shared by the served student's calibration (:mod:`medkd.registry.calibration`) and the teachers'
soft labels (``search.calibrate_teachers``), so both fit the same way.

Examples:
    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 3, 500)
    >>> logits = 6.0 * np.eye(3)[labels] + rng.normal(0, 3, (500, 3))  # over-confident
    >>> fit_temperature(logits, labels) > 1
    True
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from medkd.core.metrics import probabilities

TEMPERATURE_BOUNDS = (0.05, 20.0)  # searched in log space; a fit at a bound means the logits are degenerate


def scaled_probabilities(logits: np.ndarray, temperature: float = 1.0, *, multilabel: bool = False) -> np.ndarray:
    """Probabilities ``(N, C)`` of ``logits / temperature`` in float64 (a binary single logit becomes two columns).

    Examples:
        >>> scaled_probabilities(np.array([[0.0, 2.0]]), 2.0).round(3).tolist()
        [[0.269, 0.731]]
    """
    return probabilities(
        np.asarray(logits, dtype=np.float64).reshape(len(logits), -1), multilabel=multilabel, temperature=temperature
    )


def negative_log_likelihood(
    logits: np.ndarray, labels: np.ndarray, temperature: float, *, multilabel: bool = False
) -> float:
    """Mean NLL of ``labels`` under ``logits / temperature`` (BCE averaged over labels for multi-label).

    Examples:
        >>> round(negative_log_likelihood(np.array([[0.0, 0.0]]), np.array([1]), 1.0), 4)
        0.6931
    """
    return float(np.mean(sample_nll(logits, labels, temperature, multilabel=multilabel)))


def sample_nll(logits: np.ndarray, labels: np.ndarray, temperature: float, *, multilabel: bool = False) -> np.ndarray:
    """Each sample's NLL ``(N,)`` under ``logits / temperature`` (multi-label: its BCE averaged over labels).

    Examples:
        >>> sample_nll(np.array([[0.0, 0.0], [0.0, 0.0]]), np.array([1, 0]), 1.0).round(4).tolist()
        [0.6931, 0.6931]
    """
    probs = np.clip(scaled_probabilities(logits, temperature, multilabel=multilabel), 1e-12, 1.0)
    if multilabel:
        truth = np.asarray(labels).reshape(probs.shape).astype(bool)
        return -np.mean(np.where(truth, np.log(probs), np.log1p(-np.minimum(probs, 1 - 1e-12))), axis=1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    return -np.log(probs[np.arange(len(labels)), labels])


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, multilabel: bool = False) -> float:
    """The ``T`` minimising the val NLL of ``logits / T`` (1.0 when no ``T`` does better than leaving them alone).

    Args:
        logits: ``(N, C)`` val logits; ``(N, 1)`` for a single logit.
        labels: ``(N,)``/``(N, 1)`` class indices, or ``(N, C)`` 0/1 for multi-label.
        multilabel: one sigmoid per label.

    Raises:
        ValueError: empty or non-finite logits, or labels that do not fit them (naming which).

    Examples:
        >>> fit_temperature(np.array([[0.0, 9.0], [9.0, 0.0], [0.0, 9.0]]), np.array([1, 1, 1])) > 1
        True
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"val logits must be a non-empty (N, C) array, got shape {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("val logits must be finite to fit a temperature")
    labels = np.asarray(labels)
    if len(labels) != len(logits):
        raise ValueError(f"val labels have {len(labels)} rows but the logits have {len(logits)}")

    def objective(log_t: float) -> float:
        return negative_log_likelihood(logits, labels, math.exp(log_t), multilabel=multilabel)

    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(objective, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    if objective(0.0) <= float(result.fun):  # never worse than leaving the model alone
        return 1.0
    return round(float(math.exp(result.x)), 6)
