"""Temperature scaling on val and the operating points the export stores (and the server applies)."""

from __future__ import annotations

import numpy as np
import pytest

from medkd.registry.calibration import (
    OperatingPoint,
    calibrated_probabilities,
    choose_operating_points,
    decision_metrics,
    fit_calibration,
    negative_log_likelihood,
)


def overconfident(n: int = 600, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = 8.0 * np.eye(classes)[labels] + rng.normal(0, 4.0, (n, classes))
    return logits, labels


def test_temperature_is_the_nll_minimum_found_by_a_grid():
    logits, labels = overconfident()
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 4001))
    best = grid[np.argmin([negative_log_likelihood(logits, labels, t) for t in grid])]
    calibration = fit_calibration(logits, labels)
    assert calibration.temperature == pytest.approx(best, rel=5e-3)
    assert calibration.temperature > 1.5  # over-confident logits are softened
    assert calibration.nll_after < calibration.nll_before
    assert calibration.ece_after < calibration.ece_before


def test_underconfident_logits_are_sharpened_and_argmax_never_moves():
    logits, labels = overconfident(seed=1)
    soft = logits / 10.0
    calibration = fit_calibration(soft, labels)
    assert calibration.temperature < 1.0
    calibrated = calibrated_probabilities(soft, calibration.temperature)
    np.testing.assert_array_equal(calibrated.argmax(1), soft.argmax(1))
    np.testing.assert_allclose(calibrated.sum(1), 1.0)


def test_a_calibrated_model_keeps_temperature_one():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2.0, (2000, 4))
    labels = np.array([rng.choice(4, p=p) for p in calibrated_probabilities(logits)])
    assert fit_calibration(logits, labels).temperature == pytest.approx(1.0, abs=0.15)


def test_binary_single_logit_and_multilabel_models_are_calibrated():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    single = (labels * 2 - 1) * 6.0 + rng.normal(0, 5.0, 400)
    calibration = fit_calibration(single[:, None], labels)
    assert calibration.temperature > 1 and calibration.ece_after < calibration.ece_before
    multi = rng.integers(0, 2, (400, 3))
    fit = fit_calibration((multi * 2 - 1) * 6.0 + rng.normal(0, 5.0, (400, 3)), multi, multilabel=True)
    assert fit.temperature > 1 and fit.ece_after < fit.ece_before


def test_threshold_reaches_the_target_sensitivity_and_is_the_highest_that_does():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 300)
    probs = calibrated_probabilities(np.stack([np.zeros(300), (labels - 0.5) * 2 + rng.normal(0, 1.5, 300)], 1))
    argmax, point = choose_operating_points(probs, labels, target_sensitivity=0.9)
    assert argmax.name == "argmax" and point.name == "sensitivity>=0.90"
    assert point.val["sensitivity"] >= 0.9 > argmax.val["sensitivity"]
    assert point.val["specificity"] < argmax.val["specificity"]  # what the higher sensitivity costs
    higher = OperatingPoint(name="x", kind="threshold", threshold=np.nextafter(point.threshold, 1), positive_class=1)
    assert decision_metrics(higher.decide(probs), labels, num_classes=2)["sensitivity"] < 0.9


def test_positive_class_zero_counts_class_zero_as_the_finding():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
    labels = np.array([0, 0, 1, 1])
    _, point = choose_operating_points(probs, labels, target_sensitivity=1.0, positive_class=0)
    assert point.threshold == 0.4 and point.val["sensitivity"] == 1.0 and point.val["specificity"] == 0.5
    assert point.decide(probs).tolist() == [0, 0, 1, 0]


def test_decision_metrics_by_hand():
    metrics = decision_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]), num_classes=3)
    assert metrics["acc"] == 0.75
    assert metrics["balanced_acc"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert metrics["specificity"] == pytest.approx((1 + 1 + 2 / 3) / 3)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="export.target_sensitivity: .*binary single-label.*3 classes"):
        choose_operating_points(np.full((4, 3), 1 / 3), np.array([0, 1, 2, 0]), target_sensitivity=0.9)
    with pytest.raises(ValueError, match="export.target_sensitivity: val has no sample of the positive class 1"):
        choose_operating_points(np.full((3, 2), 0.5), np.zeros(3), target_sensitivity=0.9)
    with pytest.raises(ValueError, match="finite"):
        fit_calibration(np.array([[0.0, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="3 rows but the logits have 2"):
        fit_calibration(np.zeros((2, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        fit_calibration(np.zeros((0, 2)), np.zeros(0))
    with pytest.raises(ValueError, match="threshold applies to binary"):
        OperatingPoint(name="t", kind="threshold", threshold=0.5, positive_class=1).decide(np.full((2, 3), 1 / 3))


# ----------------------------------------------------------------------------- the served decision

from pydantic import ValidationError  # noqa: E402

from medkd.registry.metadata import ModelMetadata  # noqa: E402

INPUT = {"in_channels": 1, "spatial_dims": 2, "image_size": [28, 28]}


def metadata(**fields) -> ModelMetadata:
    return ModelMetadata.model_validate(
        {
            "model_id": "m",
            "task": "classification",
            "num_classes": 2,
            "class_names": ["benign", "malignant"],
            "input": INPUT,
            **fields,
        }
    )


def test_classify_returns_calibrated_probabilities_and_the_threshold_decision():
    point = {
        "name": "sensitivity>=0.90",
        "kind": "threshold",
        "threshold": 0.3,
        "positive_class": 1,
        "target_sensitivity": 0.9,
    }
    meta = metadata(
        calibration={"temperature": 2.0},
        operating_points=[{"name": "argmax", "kind": "argmax"}, point],
        operating_point="sensitivity>=0.90",
    )
    logits = np.array([[0.0, -1.2], [0.0, -2.0], [0.0, 3.0]])
    answers = meta.classify(logits)
    expected = calibrated_probabilities(logits, 2.0)
    np.testing.assert_allclose([a["probabilities"] for a in answers], expected)
    assert expected[0, 1] > 0.3 > expected[1, 1]  # p(malignant) 0.354 and 0.269 at T = 2
    assert [a["predicted_label"] for a in answers] == [
        "malignant",
        "benign",
        "malignant",
    ]  # argmax would say benign first
    assert answers[0]["operating_point"] == "sensitivity>=0.90" and answers[0]["threshold"] == 0.3


def test_classify_without_calibration_is_the_plain_argmax():
    answers = metadata().classify(np.array([[0.0, 2.0], [1.0, -1.0]]))
    assert [a["predicted_class"] for a in answers] == [1, 0] and answers[0]["operating_point"] == "argmax"
    assert answers[0]["probabilities"][1] == pytest.approx(1 / (1 + np.exp(-2.0)))


def test_multilabel_classify_calibrates_each_label():
    meta = ModelMetadata.model_validate(
        {
            "model_id": "m",
            "task": "classification",
            "num_classes": 3,
            "multilabel": True,
            "input": INPUT,
            "calibration": {"temperature": 4.0},
        }
    )
    answer = meta.classify(np.array([[4.0, -1.0, 0.5]]))[0]
    np.testing.assert_allclose(answer["probabilities"], 1 / (1 + np.exp(-np.array([1.0, -0.25, 0.125]))))
    assert answer["predicted_labels"] == ["0", "2"]


def test_metadata_refuses_an_unknown_or_impossible_operating_point():
    with pytest.raises(ValidationError, match="operating_point 'youden' is not one of operating_points"):
        metadata(operating_point="youden")
    point = {"name": "t", "kind": "threshold", "threshold": 0.3, "positive_class": 1}
    with pytest.raises(ValidationError, match="needs a binary single-label model"):
        ModelMetadata.model_validate(
            {
                "model_id": "m",
                "task": "classification",
                "num_classes": 3,
                "input": INPUT,
                "operating_points": [point],
                "operating_point": "t",
            }
        )
    with pytest.raises(ValidationError, match="temperature"):
        metadata(calibration={"temperature": 0.0})


def test_a_temperature_whose_val_gain_is_within_the_noise_is_not_applied():
    # 78 val images (BreastMNIST's val split) from a model calibrated by construction: the NLL
    # minimum still lands away from T = 1, by chance.
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, (78, 2))
    labels = (rng.random(78) < calibrated_probabilities(logits)[:, 1]).astype(int)
    calibration = fit_calibration(logits, labels)
    assert calibration.fitted_temperature == pytest.approx(1.157, abs=1e-3)
    assert 0 < calibration.nll_gain < calibration.nll_gain_se
    assert calibration.temperature == 1.0 and calibration.within_noise
    assert calibration.ece_after == calibration.ece_before and calibration.nll_after == calibration.nll_before
    # The same miscalibration on 40 times the images is beyond the noise: applied.
    many = np.tile(logits, (40, 1)) * 1.3  # over-confident by a third
    many_labels = np.tile(labels, 40)
    applied = fit_calibration(many, many_labels)
    assert applied.nll_gain > applied.nll_gain_se and not applied.within_noise
    assert applied.temperature == applied.fitted_temperature > 1.2
