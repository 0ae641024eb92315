"""Evaluation metrics for teachers, students and the report: NumPy arrays in, plain dicts out.

Classification follows the MedMNIST v2 evaluator where it defines a metric (AUC: binary on
``p[:, 1]``, multi-class macro one-vs-rest, multi-label mean per-label AUC; ACC: argmax, or
mean per-label accuracy at 0.5 for multi-label) and adds macro F1, per-class sensitivity and
specificity, confusion matrices and expected calibration error. A metric that is undefined for
some class (AUC of a class absent from the labels, F1 of a class neither present nor predicted)
is ``nan`` for that class and left out of the averages, so a small validation split never makes
evaluation fail; an average over no defined class is ``nan``.

Segmentation uses MONAI's ``DiceMetric`` and ``HausdorffDistanceMetric(percentile=95)`` on the
argmax prediction, per image and class; an image/class where both prediction and ground truth
are empty is left out (nnU-Net's convention), one where only the prediction is empty scores
Dice 0 and has no HD95.

Every value in the returned dicts is a Python ``int``/``float``/``str`` or a (nested) list of
them; undefined values are ``float("nan")``.

Examples::

    >>> import numpy as np
    >>> logits = np.array([[2.0, -1.0], [0.5, 1.5], [-1.0, 0.0]])
    >>> m = classification_metrics(probabilities(logits), np.array([0, 1, 1]))
    >>> m["auc"], m["acc"]
    (1.0, 1.0)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

ECE_BINS = 15
MULTILABEL_THRESHOLD = 0.5
#: The yardstick of "within the noise of the val split": a difference counts only beyond this many
#: standard errors (ties between trials, teachers that hurt, a fitted temperature worth applying).
NOISE_STANDARD_ERRORS = 1.0
_PROBABILITY_TOLERANCE = 1e-6  # rounding in float32 softmax/sigmoid outputs computed elsewhere
_SEGMENTATION_CHUNK = 8  # images per MONAI call, bounds the one-hot memory for large volumes

PRIMARY_METRICS = {"classification": "auc", "segmentation": "dice"}


def primary_metric(task: str) -> str:
    """The metric that ranks models for ``task``: "auc" (classification) or "dice" (segmentation)."""
    try:
        return PRIMARY_METRICS[task]
    except KeyError:
        raise ValueError(f"task must be one of {sorted(PRIMARY_METRICS)}, got {task!r}") from None


# --------------------------------------------------------------------------- probabilities


def _float_array(values: Any, arg: str, *, min_ndim: int) -> np.ndarray:
    array = np.asarray(values)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{arg} must be a numeric array, got dtype {array.dtype}")
    if array.ndim < min_ndim:
        raise ValueError(f"{arg} must have at least {min_ndim} dimensions (N, C, ...), got shape {array.shape}")
    return array


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, element-wise, in ``z``'s floating dtype; exact at large ``|z|``.

    Computed as ``exp(-log(1 + exp(-z)))`` (``np.logaddexp``), so it neither overflows nor
    returns 0/1 early for large negative/positive logits. The one sigmoid of medkd's NumPy code.

    Args:
        z: logits, any shape.

    Examples:
        >>> sigmoid(np.array([0.0, 800.0, -800.0]))
        array([0.5, 1. , 0. ])
    """
    return np.exp(-np.logaddexp(0.0, -z))


def softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    """Softmax along ``axis`` in ``z``'s floating dtype (max-shifted: large logits do not overflow).

    The one softmax of medkd's NumPy code; :func:`probabilities` adds validation, the
    temperature, float64 arithmetic and the multi-label and single-logit cases.

    Args:
        z: logits, e.g. ``(N, C)`` or ``(N, C, H, W)``.
        axis: the class axis.

    Examples:
        >>> softmax(np.array([[0.0, np.log(3.0)]]))
        array([[0.25, 0.75]])
    """
    shifted = np.exp(z - z.max(axis=axis, keepdims=True))
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


def probabilities(logits: np.ndarray, *, multilabel: bool = False, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from raw logits ``(N, C, ...)``.

    Softmax over axis 1 for single-label (and segmentation) logits, an element-wise sigmoid for
    multi-label. A single-label ``(N, 1)`` input is read as one binary logit and expanded to
    ``(N, 2)`` = ``[1 - p, p]`` so every single-label consumer sees one column per class.

    Args:
        logits: raw model outputs; float16/32 stay float32, float64 stays float64.
        multilabel: independent sigmoid per output instead of a softmax.
        temperature: logits are divided by it first (> 0), as in knowledge distillation.
    """
    array = _float_array(logits, "logits", min_ndim=2)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    z = array.astype(np.float64) / float(temperature)
    if multilabel:
        out = sigmoid(z)
    elif z.shape[1] == 1:
        positive = sigmoid(z)
        out = np.concatenate([1.0 - positive, positive], axis=1)
    else:
        out = softmax(z, axis=1)
    return out.astype(dtype, copy=False)


def ensemble_probabilities(
    logits_per_teacher: Sequence[np.ndarray],
    *,
    multilabel: bool = False,
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """The ensemble's prediction: the (weighted) mean of every teacher's probabilities.

    Args:
        logits_per_teacher: one logits array per teacher, all of the same shape.
        multilabel: sigmoid instead of softmax (see :func:`probabilities`).
        weights: one non-negative weight per teacher (normalised here); None means equal.
    """
    arrays = [
        _float_array(logits, f"logits_per_teacher[{i}]", min_ndim=2) for i, logits in enumerate(logits_per_teacher)
    ]
    if not arrays:
        raise ValueError("logits_per_teacher must hold at least one teacher's logits")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"every teacher's logits must have the same shape, got {[a.shape for a in arrays]}")
    if weights is None:
        w = np.full(len(arrays), 1.0 / len(arrays))
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(arrays),):
            raise ValueError(f"weights must have one entry per teacher ({len(arrays)}), got {list(weights)}")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
        w = w / w.sum()
    mean = sum(weight * probabilities(a, multilabel=multilabel).astype(np.float64) for weight, a in zip(w, arrays))
    return np.asarray(mean, dtype=np.float32)


# --------------------------------------------------------------------------- classification


def _nanmean(values: Sequence[float] | np.ndarray) -> float:
    array = np.asarray(values, dtype=np.float64)
    defined = array[~np.isnan(array)]
    return float(defined.mean()) if defined.size else float("nan")


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = numerator.astype(np.float64)
    denominator = denominator.astype(np.float64)
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _binary_auc(truth: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC, or nan when ``truth`` has a single class (AUC is undefined then)."""
    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, score))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE (Guo et al., 2017): bin-size-weighted gap between accuracy and mean confidence.

    Bins are equal-width over [0, 1], right-closed: (0, 1/bins], ..., with 0 in the first.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.size == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    filled = counts > 0
    gaps = np.abs(correct_sum[filled] - confidence_sum[filled])  # = count * |acc - conf|
    return float(gaps.sum() / confidence.size)


def _check_probs(probs: Any) -> np.ndarray:
    array = _float_array(probs, "probs", min_ndim=2).astype(np.float64)
    if array.ndim != 2:
        raise ValueError(f"probs must have shape (N, C), got {array.shape}")
    if array.shape[0] == 0:
        raise ValueError("probs is empty: no samples to evaluate")
    if not np.all(np.isfinite(array)):
        raise ValueError("probs contain NaN or infinite values (did training diverge?)")
    if array.min() < -_PROBABILITY_TOLERANCE or array.max() > 1.0 + _PROBABILITY_TOLERANCE:
        raise ValueError("probs must lie in [0, 1]; pass logits through probabilities() first")
    return np.clip(array, 0.0, 1.0)


def _integer_labels(labels: Any, arg: str) -> np.ndarray:
    array = np.asarray(labels)
    if np.issubdtype(array.dtype, np.bool_) or np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        return array.astype(np.int64)
    raise ValueError(f"{arg} must hold integer class indices, got dtype {array.dtype}")


def _per_class_counts(truth: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """TP/FP/FN/TN per column of boolean (N, K) truth/prediction indicator matrices."""
    tp = np.sum(truth & predicted, axis=0)
    fp = np.sum(~truth & predicted, axis=0)
    fn = np.sum(truth & ~predicted, axis=0)
    tn = np.sum(~truth & ~predicted, axis=0)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    multilabel: bool = False,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Metrics of predicted class probabilities against ground truth.

    Args:
        probs: ``(N, C)`` probabilities (softmax rows for single-label, independent sigmoids
            for multi-label), e.g. from :func:`probabilities` or :func:`ensemble_probabilities`.
        labels: single-label: ``(N,)`` or ``(N, 1)`` class indices in ``[0, C)``;
            multi-label: ``(N, C)`` of 0/1.
        multilabel: whether each sample may carry several labels.
        class_names: optional ``C`` names, echoed in the result for the report.

    Returns:
        a dict with ``n``, ``num_classes``, ``auc``, ``acc``, ``f1_macro``, ``ece`` (floats);
        ``per_class_auc``, ``f1_per_class``, ``sensitivity``, ``specificity`` (one float per
        class or label); ``confusion_matrix`` (single-label: ``C x C`` counts, rows true,
        columns predicted; multi-label: one ``[[TN, FP], [FN, TP]]`` per label); multi-label
        adds ``per_label_auc``; ``class_names`` if given.

    Raises:
        ValueError: shapes that do not match, labels out of range, probabilities that are not
            finite or outside [0, 1].
    """
    p = _check_probs(probs)
    n, c = p.shape
    y = _integer_labels(labels, "labels")
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"class_names has {len(class_names)} entries but probs has {c} columns")

    if multilabel:
        if y.shape != p.shape:
            raise ValueError(f"multi-label labels must have the shape of probs {p.shape}, got {y.shape}")
        if np.any((y != 0) & (y != 1)):
            raise ValueError("multi-label labels must be 0 or 1")
        truth = y.astype(bool)
        predicted = p > MULTILABEL_THRESHOLD
        per_auc = np.array([_binary_auc(truth[:, k], p[:, k]) for k in range(c)])
        auc = _nanmean(per_auc)
        acc = float(np.mean(truth == predicted))
        confidence = np.maximum(p, 1.0 - p)
        ece = _nanmean([expected_calibration_error(confidence[:, k], truth[:, k] == predicted[:, k]) for k in range(c)])
        counts = _per_class_counts(truth, predicted)
        confusion = [
            [[int(counts["tn"][k]), int(counts["fp"][k])], [int(counts["fn"][k]), int(counts["tp"][k])]]
            for k in range(c)
        ]
    else:
        if c < 2:
            raise ValueError(f"single-label probs need at least 2 columns, got {c}; see probabilities()")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.shape != (n,):
            raise ValueError(f"single-label labels must have shape ({n},) or ({n}, 1), got {y.shape}")
        if y.min() < 0 or y.max() >= c:
            raise ValueError(f"labels must lie in [0, {c - 1}] for {c} classes, got values in [{y.min()}, {y.max()}]")
        predicted_index = p.argmax(axis=1)
        truth = np.eye(c, dtype=bool)[y]
        predicted = np.eye(c, dtype=bool)[predicted_index]
        per_auc = np.array([_binary_auc(truth[:, k], p[:, k]) for k in range(c)])
        auc = float(per_auc[1]) if c == 2 else _nanmean(per_auc)
        acc = float(np.mean(predicted_index == y))
        ece = expected_calibration_error(p.max(axis=1), predicted_index == y)
        counts = _per_class_counts(truth, predicted)
        matrix = np.zeros((c, c), dtype=np.int64)
        np.add.at(matrix, (y, predicted_index), 1)
        confusion = matrix.tolist()

    f1 = _ratio(2 * counts["tp"], 2 * counts["tp"] + counts["fp"] + counts["fn"])
    result: dict[str, Any] = {
        "n": int(n),
        "num_classes": int(c),
        "auc": auc,
        "acc": acc,
        "f1_macro": _nanmean(f1),
        "ece": ece,
        "per_class_auc": _floats(per_auc),
        "f1_per_class": _floats(f1),
        "sensitivity": _floats(_ratio(counts["tp"], counts["tp"] + counts["fn"])),
        "specificity": _floats(_ratio(counts["tn"], counts["tn"] + counts["fp"])),
        "confusion_matrix": confusion,
    }
    if multilabel:
        result["per_label_auc"] = list(result["per_class_auc"])
    if class_names is not None:
        result["class_names"] = [str(name) for name in class_names]
    return result


# --------------------------------------------------------------------------- segmentation


def _one_hot(indices: np.ndarray, num_classes: int) -> Any:
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
    one_hot = torch.nn.functional.one_hot(tensor, num_classes)  # (n, *spatial, C)
    return one_hot.movedim(-1, 1).to(torch.float32)


def segmentation_metrics(
    logits_or_probs: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    include_background: bool = False,
    hd95: bool = True,
) -> dict[str, Any]:
    """Dice and 95th-percentile Hausdorff distance of an argmax segmentation.

    Args:
        logits_or_probs: ``(N, num_classes, *spatial)`` logits or probabilities (the argmax is
            the same for both).
        labels: ``(N, *spatial)`` (or ``(N, 1, *spatial)``) integer masks in ``[0, num_classes)``.
        num_classes: classes including the background (index 0).
        include_background: also score class 0.
        hd95: compute HD95 (in voxels); it is the slow part, so training loops may skip it.

    Returns:
        a dict with ``n``, ``num_classes``, ``classes`` (the class indices scored),
        ``dice`` (mean over those classes of ``dice_per_class``, each the mean over images) and,
        when ``hd95`` is true, ``hd95`` and ``hd95_per_class`` likewise.

    Raises:
        ValueError: shapes that do not match, a wrong ``num_classes``, labels out of range.
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    scores = _float_array(logits_or_probs, "logits_or_probs", min_ndim=3)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}")
    if scores.shape[1] != num_classes:
        raise ValueError(f"logits_or_probs has {scores.shape[1]} channels but num_classes is {num_classes}")
    if scores.shape[0] == 0:
        raise ValueError("logits_or_probs is empty: no images to evaluate")
    y = _integer_labels(labels, "labels")
    if y.ndim == scores.ndim and y.shape[1] == 1:
        y = y[:, 0]
    expected = (scores.shape[0], *scores.shape[2:])
    if y.shape != expected:
        raise ValueError(
            f"labels must have shape {expected} (N, *spatial) to match logits {scores.shape}, got {y.shape}"
        )
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got values in [{y.min()}, {y.max()}]")

    predicted = np.argmax(scores, axis=1)
    classes = list(range(0 if include_background else 1, num_classes))
    dice_rows, hd_rows = [], []
    dice_metric = DiceMetric(include_background=include_background, reduction="none", ignore_empty=False)
    hd_metric = HausdorffDistanceMetric(include_background=include_background, percentile=95, reduction="none")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is all 0.*")  # empty masks are handled below
        warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
        for start in range(0, len(y), _SEGMENTATION_CHUNK):
            pred_1h = _one_hot(predicted[start : start + _SEGMENTATION_CHUNK], num_classes)
            true_1h = _one_hot(y[start : start + _SEGMENTATION_CHUNK], num_classes)
            dice = dice_metric(y_pred=pred_1h, y=true_1h).numpy().astype(np.float64)
            offset = 0 if include_background else 1
            both_empty = (pred_1h[:, offset:].flatten(2).sum(-1) == 0) & (true_1h[:, offset:].flatten(2).sum(-1) == 0)
            dice[both_empty.numpy()] = np.nan
            dice_rows.append(dice)
            if hd95:
                distance = hd_metric(y_pred=pred_1h, y=true_1h).numpy().astype(np.float64)
                distance[~np.isfinite(distance)] = np.nan
                hd_rows.append(distance)

    dice_all = np.concatenate(dice_rows)
    dice_per_class = [_nanmean(dice_all[:, k]) for k in range(len(classes))]
    result: dict[str, Any] = {
        "n": int(scores.shape[0]),
        "num_classes": int(num_classes),
        "classes": classes,
        "dice": _nanmean(dice_per_class),
        "dice_per_class": dice_per_class,
    }
    if hd95:
        hd_all = np.concatenate(hd_rows)
        hd_per_class = [_nanmean(hd_all[:, k]) for k in range(len(classes))]
        result["hd95"] = _nanmean(hd_per_class)
        result["hd95_per_class"] = hd_per_class
    return result
