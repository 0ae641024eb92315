"""Metrics against hand-computed cases and against scikit-learn."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    recall_score,
    roc_auc_score,
)

from medkd.core.metrics import (
    classification_metrics,
    ensemble_probabilities,
    expected_calibration_error,
    primary_metric,
    probabilities,
    segmentation_metrics,
    sigmoid,
    softmax,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _plain(value) -> bool:
    """Only JSON-native Python types (nested lists allowed)."""
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, (int, float, str)) and not isinstance(value, np.generic)


# --------------------------------------------------------------------------- probabilities


def test_softmax_matches_torch_at_any_temperature(rng):
    logits = rng.normal(scale=3.0, size=(16, 5)).astype(np.float32)
    for temperature in (0.5, 1.0, 4.0):
        expected = torch.softmax(torch.from_numpy(logits) / temperature, dim=1).numpy()
        probs = probabilities(logits, temperature=temperature)
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    # a higher temperature gives softer distributions
    entropy = [-(p * np.log(p)).sum(1).mean() for p in (probabilities(logits, temperature=t) for t in (1.0, 4.0))]
    assert entropy[1] > entropy[0]


def test_sigmoid_for_multilabel_is_stable(rng):
    logits = np.array([[0.0, 2.0, -3.0, 1000.0, -1000.0]])
    probs = probabilities(logits, multilabel=True)
    np.testing.assert_allclose(probs[0, :3], 1.0 / (1.0 + np.exp(-logits[0, :3])))
    assert probs[0, 3] == 1.0 and probs[0, 4] == 0.0 and np.all(np.isfinite(probs))
    assert probs.dtype == np.float64  # float64 stays float64


def test_softmax_over_segmentation_channels(rng):
    logits = rng.normal(size=(2, 3, 4, 4)).astype(np.float16)
    probs = probabilities(logits)
    assert probs.shape == logits.shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_single_binary_logit_expands_to_two_columns():
    probs = probabilities(np.array([[0.0], [math.log(3.0)]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0.25, 0.75]])


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), True, "2"])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        probabilities(np.zeros((2, 2)), temperature=temperature)


def test_logits_need_a_class_axis():
    with pytest.raises(ValueError, match=r"logits must have at least 2 dimensions"):
        probabilities(np.zeros(4))
    with pytest.raises(ValueError, match="logits must be a numeric array"):
        probabilities(np.array([["a", "b"]]))


def test_ensemble_is_the_mean_of_softmaxes():
    a = np.array([[0.0, 0.0], [2.0, 0.0]])
    b = np.array([[math.log(3.0), 0.0], [0.0, 0.0]])
    mean = ensemble_probabilities([a, b])
    np.testing.assert_allclose(mean[0], [(0.5 + 0.75) / 2, (0.5 + 0.25) / 2], rtol=1e-6)
    np.testing.assert_allclose(mean, (probabilities(a) + probabilities(b)) / 2, rtol=1e-6)
    # not the softmax of the mean logits
    assert not np.allclose(mean, probabilities((a + b) / 2))


def test_ensemble_weights_are_normalised(rng):
    logits = [rng.normal(size=(5, 3)) for _ in range(3)]
    np.testing.assert_allclose(ensemble_probabilities(logits, weights=[2, 0, 0]), probabilities(logits[0]), rtol=1e-6)
    weighted = ensemble_probabilities(logits, weights=[1, 1, 2])
    expected = (probabilities(logits[0]) + probabilities(logits[1]) + 2 * probabilities(logits[2])) / 4
    np.testing.assert_allclose(weighted, expected, rtol=1e-6)
    multilabel = ensemble_probabilities(logits, multilabel=True)
    np.testing.assert_allclose(
        multilabel, np.mean([probabilities(x, multilabel=True) for x in logits], axis=0), rtol=1e-6
    )


@pytest.mark.parametrize(
    "arrays,weights,message",
    [
        ([], None, "at least one teacher"),
        ([np.zeros((2, 3)), np.zeros((2, 4))], None, "same shape"),
        ([np.zeros((2, 3))] * 2, [1.0], "one entry per teacher"),
        ([np.zeros((2, 3))] * 2, [1.0, -1.0], "non-negative"),
        ([np.zeros((2, 3))] * 2, [0.0, 0.0], "not all zero"),
    ],
)
def test_bad_ensembles(arrays, weights, message):
    with pytest.raises(ValueError, match=message):
        ensemble_probabilities(arrays, weights=weights)


# --------------------------------------------------------------------------- classification


def test_binary_matches_sklearn(rng):
    labels = rng.integers(0, 2, 200)
    probs = probabilities(rng.normal(size=(200, 2)) + np.stack([np.zeros(200), labels * 1.0], 1))
    m = classification_metrics(probs, labels)
    predicted = probs.argmax(1)
    assert m["n"] == 200 and m["num_classes"] == 2
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    assert m["acc"] == pytest.approx(accuracy_score(labels, predicted))
    assert m["f1_macro"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(labels, predicted).tolist()
    np.testing.assert_allclose(m["sensitivity"], recall_score(labels, predicted, average=None))
    # specificity of class 1 is the sensitivity of class 0 in the binary case
    assert m["specificity"] == pytest.approx(m["sensitivity"][::-1])
    assert 0 < m["ece"] < 1
    assert all(_plain(v) for v in m.values())
    json.dumps(m)


def test_multiclass_matches_sklearn(rng):
    labels = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4))
    logits[np.arange(300), labels] += 1.0
    probs = probabilities(logits)
    predicted = probs.argmax(1)
    m = classification_metrics(probs, labels.reshape(-1, 1), class_names=["a", "b", "c", "d"])
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert m["acc"] == pytest.approx(accuracy_score(labels, predicted))
    assert m["f1_macro"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    np.testing.assert_allclose(m["f1_per_class"], f1_score(labels, predicted, average=None))
    cm = confusion_matrix(labels, predicted)
    assert m["confusion_matrix"] == cm.tolist()
    np.testing.assert_allclose(m["sensitivity"], recall_score(labels, predicted, average=None))
    tn = cm.sum() - cm.sum(0) - cm.sum(1) + np.diag(cm)
    np.testing.assert_allclose(m["specificity"], tn / (tn + cm.sum(0) - np.diag(cm)))
    np.testing.assert_allclose(m["per_class_auc"], [roc_auc_score(labels == k, probs[:, k]) for k in range(4)])
    assert m["class_names"] == ["a", "b", "c", "d"]
    json.dumps(m)


def test_multilabel_matches_sklearn(rng):
    labels = rng.integers(0, 2, (150, 5))
    probs = probabilities(rng.normal(size=(150, 5)) + 1.5 * (labels - 0.5), multilabel=True)
    predicted = probs > 0.5
    m = classification_metrics(probs, labels, multilabel=True)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs, average="macro"))
    np.testing.assert_allclose(m["per_label_auc"], roc_auc_score(labels, probs, average=None))
    assert m["acc"] == pytest.approx(np.mean([accuracy_score(labels[:, k], predicted[:, k]) for k in range(5)]))
    assert m["f1_macro"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert m["confusion_matrix"] == multilabel_confusion_matrix(labels, predicted).tolist()
    np.testing.assert_allclose(m["sensitivity"], recall_score(labels, predicted, average=None))
    json.dumps(m)


def test_perfect_and_worst_predictions():
    labels = np.array([0, 1, 2, 1, 0, 2])
    perfect = np.eye(3)[labels] * 0.8 + 0.2 / 3
    m = classification_metrics(perfect, labels)
    assert (m["auc"], m["acc"], m["f1_macro"]) == (1.0, 1.0, 1.0)
    assert m["sensitivity"] == [1.0] * 3 and m["specificity"] == [1.0] * 3
    assert np.trace(m["confusion_matrix"]) == 6

    binary_labels = np.array([0, 0, 1, 1, 1])
    worst = np.stack([binary_labels * 0.9 + 0.05, 0.95 - binary_labels * 0.9], axis=1)
    w = classification_metrics(worst, binary_labels)
    assert (w["auc"], w["acc"], w["f1_macro"]) == (0.0, 0.0, 0.0)
    assert w["ece"] == pytest.approx(0.95)  # always 95% confident, never right


def test_absent_class_is_skipped_not_fatal(rng):
    labels = np.array([0, 1, 0, 1, 1, 0])
    probs = np.array(
        [[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.3, 0.4, 0.3], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]]
    )
    m = classification_metrics(probs, labels)
    assert math.isnan(m["per_class_auc"][2])
    assert m["auc"] == pytest.approx(np.mean(m["per_class_auc"][:2]))
    assert math.isnan(m["sensitivity"][2]) and m["specificity"][2] == 1.0
    assert math.isnan(m["f1_per_class"][2]) and m["f1_macro"] == 1.0  # class 2: never present, never predicted
    assert m["confusion_matrix"][2] == [0, 0, 0]

    only_one = classification_metrics(np.array([[0.8, 0.2], [0.6, 0.4]]), np.array([0, 0]))
    assert math.isnan(only_one["auc"]) and only_one["acc"] == 1.0

    multilabel = classification_metrics(np.array([[0.9, 0.1], [0.2, 0.3]]), np.array([[1, 0], [0, 0]]), multilabel=True)
    assert math.isnan(multilabel["per_label_auc"][1]) and multilabel["auc"] == 1.0


def test_ece_of_a_calibrated_and_of_an_overconfident_model():
    # 10 predictions at 80% confidence of which exactly 8 are right: perfectly calibrated.
    labels = np.array([1] * 8 + [0] * 2)
    probs = np.tile([0.2, 0.8], (10, 1))
    assert classification_metrics(probs, labels)["ece"] == pytest.approx(0.0, abs=1e-12)
    # two bins by hand: 4 at 0.95 (3 right) and 4 at 0.55 (all right) -> (4*0.2 + 4*0.45) / 8
    confidence = np.array([0.95] * 4 + [0.55] * 4)
    correct = np.array([1, 1, 1, 0, 1, 1, 1, 1])
    assert expected_calibration_error(confidence, correct) == pytest.approx((4 * 0.2 + 4 * 0.45) / 8)
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0  # edges land in bins


@pytest.mark.parametrize(
    "probs,labels,kwargs,message",
    [
        (np.array([[0.5, np.nan]]), np.array([0]), {}, "NaN or infinite"),
        (np.array([[2.0, -1.0]]), np.array([0]), {}, r"must lie in \[0, 1\].*probabilities\(\)"),
        (np.zeros((3, 2)), np.array([0, 1]), {}, r"shape \(3,\) or \(3, 1\)"),
        (np.full((2, 2), 0.5), np.array([0, 2]), {}, r"labels must lie in \[0, 1\]"),
        (np.full((2, 2), 0.5), np.array([0.5, 1.0]), {}, "integer class indices"),
        (np.full((2, 1), 0.5), np.array([0, 1]), {}, "at least 2 columns"),
        (np.full((2, 2), 0.5), np.array([[0, 2], [1, 0]]), {"multilabel": True}, "must be 0 or 1"),
        (np.full((2, 2), 0.5), np.array([0, 1]), {"multilabel": True}, "shape of probs"),
        (np.full((2, 2), 0.5), np.array([0, 1]), {"class_names": ["a"]}, "class_names has 1 entries"),
        (np.zeros((0, 2)), np.zeros(0), {}, "no samples"),
        (np.full(3, 0.5), np.array([0, 1, 1]), {}, "at least 2 dimensions"),
    ],
)
def test_bad_classification_inputs(probs, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(probs, labels, **kwargs)


# --------------------------------------------------------------------------- segmentation


def _square_mask(size: int, start: tuple[int, int], width: int, value: int = 1) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.int64)
    mask[start[0] : start[0] + width, start[1] : start[1] + width] = value
    return mask


def _logits_for(masks: np.ndarray, num_classes: int) -> np.ndarray:
    return np.moveaxis(np.eye(num_classes)[masks], -1, 1) * 4.0 - 2.0


def test_identical_masks_score_dice_one_and_hd95_zero():
    masks = np.stack(
        [_square_mask(24, (2, 2), 6), _square_mask(24, (10, 4), 8) + _square_mask(24, (0, 16), 5, value=2)]
    )
    m = segmentation_metrics(_logits_for(masks, 3), masks, num_classes=3)
    assert m["classes"] == [1, 2] and m["n"] == 2
    assert m["dice"] == 1.0 and m["dice_per_class"] == [1.0, 1.0]
    assert m["hd95"] == 0.0
    json.dumps(m)


def test_disjoint_masks_score_dice_zero_and_finite_hd95():
    truth = _square_mask(24, (1, 1), 5)[None]
    predicted = _square_mask(24, (15, 15), 5)[None]
    m = segmentation_metrics(_logits_for(predicted, 2), truth, num_classes=2)
    assert m["dice"] == 0.0
    assert math.isfinite(m["hd95"]) and m["hd95"] >= 14 * math.sqrt(2) * 0.5


def test_dice_and_hd95_by_hand():
    truth = np.zeros((1, 8, 8), dtype=np.int64)
    truth[0, 2, 2:6] = 1  # 4 pixels
    predicted = np.zeros_like(truth)
    predicted[0, 2, 4:8] = 1  # 4 pixels, 2 overlap
    m = segmentation_metrics(_logits_for(predicted, 2), truth, num_classes=2)
    assert m["dice"] == pytest.approx(2 * 2 / (4 + 4))
    # hd95 grows with the shift and stays within it
    shifts = []
    for shift in (1, 2, 4):
        moved = np.roll(_square_mask(32, (8, 8), 10)[None], shift, axis=2)
        shifts.append(
            segmentation_metrics(_logits_for(moved, 2), _square_mask(32, (8, 8), 10)[None], num_classes=2)["hd95"]
        )
    assert 0 < shifts[0] < shifts[1] < shifts[2] <= 4


def test_classes_empty_everywhere_are_left_out():
    truth = _square_mask(16, (2, 2), 4)[None]  # class 2 never occurs, never predicted
    m = segmentation_metrics(_logits_for(truth, 3), truth, num_classes=3)
    assert m["dice_per_class"][0] == 1.0 and math.isnan(m["dice_per_class"][1])
    assert m["dice"] == 1.0 and m["hd95"] == 0.0


def test_false_positives_on_an_empty_image_count_as_zero():
    truth = np.zeros((2, 16, 16), dtype=np.int64)
    truth[0] = _square_mask(16, (2, 2), 4)
    predicted = truth.copy()
    predicted[1] = _square_mask(16, (8, 8), 3)  # image 1 has no foreground but we predict some
    m = segmentation_metrics(_logits_for(predicted, 2), truth, num_classes=2)
    assert m["dice"] == pytest.approx(0.5)  # image 0: 1, image 1: 0


def test_probabilities_logits_3d_and_background(rng):
    logits = rng.normal(size=(2, 3, 8, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 1, 8, 8, 8))
    from_logits = segmentation_metrics(logits, labels, num_classes=3)
    from_probs = segmentation_metrics(probabilities(logits), labels, num_classes=3)
    assert from_logits == from_probs
    with_background = segmentation_metrics(logits, labels, num_classes=3, include_background=True, hd95=False)
    assert with_background["classes"] == [0, 1, 2] and len(with_background["dice_per_class"]) == 3
    assert "hd95" not in with_background
    assert with_background["dice_per_class"][1:] == pytest.approx(from_logits["dice_per_class"])


@pytest.mark.parametrize(
    "logits,labels,num_classes,message",
    [
        (np.zeros((1, 2, 4, 4)), np.zeros((1, 4, 4)), 3, "has 2 channels but num_classes is 3"),
        (np.zeros((1, 2, 4, 4)), np.zeros((1, 4, 5)), 2, r"labels must have shape \(1, 4, 4\)"),
        (np.zeros((1, 2, 4, 4)), np.full((1, 4, 4), 2), 2, r"labels must lie in \[0, 1\]"),
        (np.zeros((1, 2, 4, 4)), np.zeros((1, 4, 4)), 1, "num_classes must be an integer >= 2"),
        (np.zeros((0, 2, 4, 4)), np.zeros((0, 4, 4)), 2, "no images"),
    ],
)
def test_bad_segmentation_inputs(logits, labels, num_classes, message):
    with pytest.raises(ValueError, match=message):
        segmentation_metrics(logits, labels, num_classes=num_classes)


def test_primary_metric():
    assert primary_metric("classification") == "auc"
    assert primary_metric("segmentation") == "dice"
    with pytest.raises(ValueError, match="task must be one of"):
        primary_metric("detection")


def test_float32_rounding_above_one_is_accepted():
    probs = np.array([[1.0 + 1e-7, 0.0], [0.25, 0.75]], dtype=np.float64)
    assert classification_metrics(probs, np.array([0, 1]))["acc"] == 1.0


def test_softmax_and_sigmoid_are_exact_stable_and_keep_the_dtype(rng):
    logits = np.array([[0.0, np.log(3.0)], [1000.0, 1000.0 + np.log(3.0)]])
    np.testing.assert_allclose(softmax(logits), [[0.25, 0.75], [0.25, 0.75]], rtol=1e-12)  # no overflow
    volume = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
    out = softmax(volume, axis=1)
    assert out.dtype == np.float32 and out.shape == volume.shape
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(softmax(volume.astype(np.float64) + 50.0, axis=1), out, rtol=1e-5)  # shift-invariant
    np.testing.assert_allclose(sigmoid(np.array([0.0, np.log(3.0), -np.log(3.0)])), [0.5, 0.75, 0.25], rtol=1e-12)
    assert sigmoid(np.array([800.0]))[0] == 1.0 and sigmoid(np.array([-800.0]))[0] == 0.0


def test_ensemble_of_segmentation_logits_is_the_mean_of_per_pixel_softmaxes(rng):
    """The pipeline's segmentation ensemble (two teachers' (N, C, H, W) logits)."""
    first, second = rng.normal(size=(2, 2, 3, 4, 4)).astype(np.float32)
    expected = (softmax(first.astype(np.float64)) + softmax(second.astype(np.float64))) / 2
    np.testing.assert_allclose(ensemble_probabilities([first, second]), expected, rtol=1e-6)
