"""Selection of the served trial: ties within the val split's noise go to the better decision, then
the cheaper model; clear gaps are respected."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medkd.registry.selection import auc_resamples, select_trial, selection_rule


def trial(trial_id: str, latency: float = 1.0, size: float = 1000.0) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, metrics={"latency_ms": latency, "model_bytes": size})


def binary_probs(score: np.ndarray) -> np.ndarray:
    return np.stack([1 - score, score], axis=1)


@pytest.fixture
def val() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 150)
    score = np.clip(0.5 + (labels - 0.5) * 0.4 + rng.normal(0, 0.25, 150), 0.001, 0.999)
    return labels, score


def test_auc_matches_sklearn_for_binary_multiclass_and_multilabel():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 80)
    probs = rng.dirichlet(np.ones(4), 80)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert auc_resamples(probs, labels, np.arange(80)[None])[0] == pytest.approx(expected)
    binary = rng.integers(0, 2, 80)
    assert auc_resamples(binary_probs(probs[:, 0]), binary, np.arange(80)[None])[0] == pytest.approx(
        roc_auc_score(binary, probs[:, 0])
    )
    multi = rng.integers(0, 2, (80, 3))
    expected = np.mean([roc_auc_score(multi[:, k], probs[:, k]) for k in range(3)])
    assert auc_resamples(probs[:, :3], multi, np.arange(80)[None], multilabel=True)[0] == pytest.approx(expected)


def test_a_tie_within_noise_goes_to_the_better_decision(val):
    labels, score = val
    # Same ranking (same AUC up to noise) but b's probabilities sit on the right side of 0.5 more often.
    a = binary_probs(np.clip(score * 0.6 + 0.35, 0, 1))  # shifted up: argmax calls most samples positive
    b = binary_probs(score)
    selection = select_trial([trial("a"), trial("b", latency=5.0)], {"a": a, "b": b}, labels)
    by_id = {c.trial_id: c for c in selection.candidates}
    assert abs(by_id["a"].quality - by_id["b"].quality) < 1e-9 and by_id["a"].tied and by_id["b"].tied
    assert by_id["b"].decision_acc > by_id["a"].decision_acc
    assert selection.chosen == "b"
    assert "paired bootstrap" in selection.rule and "accuracy" in selection.rule


def test_a_tie_with_equal_decisions_goes_to_the_cheaper_model(val):
    labels, score = val
    probs = binary_probs(score)
    selection = select_trial(
        [trial("slow", latency=3.0), trial("fast", latency=1.0)], {"slow": probs, "fast": probs.copy()}, labels
    )
    assert {c.trial_id for c in selection.candidates if c.tied} == {"slow", "fast"}
    assert selection.chosen == "fast"


def test_a_gap_beyond_the_noise_keeps_the_best_quality(val):
    labels, score = val
    good = binary_probs(score)
    poor = binary_probs(np.clip(0.5 + (score - 0.5) * 0.2 + np.random.default_rng(3).normal(0, 0.2, len(score)), 0, 1))
    selection = select_trial(
        [trial("good", latency=9.0), trial("poor", latency=0.1)], {"good": good, "poor": poor}, labels
    )
    poor_score = next(c for c in selection.candidates if c.trial_id == "poor")
    assert poor_score.gap > poor_score.gap_se and not poor_score.tied
    assert selection.chosen == "good" and selection.candidates[0].trial_id == "good"


def test_the_served_operating_point_decides_with_a_target_sensitivity(val):
    labels, score = val
    selection = select_trial([trial("a")], {"a": binary_probs(score)}, labels, target_sensitivity=0.95)
    assert "sensitivity 0.95" in selection.rule
    assert 0 < selection.candidates[0].decision_acc < 1
    assert "argmax" in selection_rule("val_auc")


def test_selection_errors_name_the_problem(val):
    labels, score = val
    with pytest.raises(ValueError, match="no completed trial"):
        select_trial([], {}, labels)
    with pytest.raises(ValueError, match=r"missing for trial\(s\) \['b'\]"):
        select_trial([trial("a"), trial("b")], {"a": binary_probs(score)}, labels)


# ----------------------------------------------------------------------------- with real ONNX models

import torch  # noqa: E402
from torch import nn  # noqa: E402

from medkd.data.meta import DatasetMeta  # noqa: E402
from medkd.registry.export import SelectionEvidence, _calibrate, select_for_export  # noqa: E402
from medkd.search.run import SearchOutcome, TrialRecord  # noqa: E402
from medkd.spec.export import ExportSpec  # noqa: E402
from medkd.students.compression import export_onnx  # noqa: E402


class Scaled(nn.Module):
    """A fixed binary "model": logits (0, scale * (mean pixel - 0.5))."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale * (x.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(z), z], dim=1)


def onnx_trial(tmp_path, trial_id: str, scale: float, latency: float) -> TrialRecord:
    directory = tmp_path / trial_id
    directory.mkdir()
    export_onnx(Scaled(scale), torch.zeros(2, 1, 4, 4), directory / "model.onnx")
    return TrialRecord(
        trial_id=trial_id,
        status="completed",
        config={},
        final=True,
        checkpoint=str(directory),
        metrics={"val_auc": 0.9, "latency_ms": latency, "model_bytes": 100},
    )


def val_split(n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    brightness = 0.5 + (labels - 0.5) * 0.1 + rng.normal(0, 0.08, n)
    return np.broadcast_to(brightness[:, None, None, None], (n, 1, 4, 4)).astype(np.float32).copy(), labels


def test_export_selection_reads_each_trials_model_and_breaks_the_tie_by_latency(tmp_path):
    images, labels = val_split()
    # Same ranking of the val images (same AUC), different confidence: a tie, and argmax decides alike.
    trials = [onnx_trial(tmp_path, "slow", 40.0, latency=2.0), onnx_trial(tmp_path, "fast", 5.0, latency=1.0)]
    outcome = SearchOutcome(
        fingerprint="f",
        experiment_path=str(tmp_path),
        trials=trials,
        pareto=["slow"],
        objectives=[{"metric": "val_auc", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}],
    )
    chosen, selection = select_for_export(outcome, "best", SelectionEvidence(images, labels))
    assert chosen.trial_id == "fast" and selection.chosen == "fast"  # off the Pareto front, tied, cheaper
    assert all(c.tied for c in selection.candidates)
    assert select_for_export(outcome, "best", None)[0].trial_id == "slow"  # no evidence: the front's best
    assert select_for_export(outcome, 0, SelectionEvidence(images, labels)) == (trials[0], None)


def test_export_calibrates_the_served_model_and_scores_its_operating_points(tmp_path):
    images, labels = val_split()
    trial = onnx_trial(tmp_path, "t", 200.0, latency=1.0)  # very over-confident
    dataset = SimpleNamespace(splits={"val": SimpleNamespace(images=images, labels=labels[:, None])})
    meta = DatasetMeta(
        task="classification", multilabel=False, num_classes=2, in_channels=1, spatial_dims=2, image_size=(4, 4)
    )
    spec = SimpleNamespace(export=ExportSpec(target_sensitivity=0.9, positive_class=1))
    test_metrics: dict = {}
    logits = np.stack([np.zeros(len(images)), 200.0 * (images.mean(axis=(1, 2, 3)) - 0.5)], 1)
    fields = _calibrate(
        spec, tmp_path / "t", dataset, meta, test_logits=logits, test_labels=labels[:, None], test_metrics=test_metrics
    )
    assert fields["calibration"]["temperature"] > 1
    assert fields["calibration"]["ece_after"] < fields["calibration"]["ece_before"]
    assert [p["name"] for p in fields["operating_points"]] == ["argmax", "sensitivity>=0.90"]
    assert fields["operating_point"] == "sensitivity>=0.90"
    assert test_metrics["operating_points"]["sensitivity>=0.90"]["sensitivity"] >= 0.9
    assert test_metrics["ece_calibrated"] < 0.2
    assert trial.checkpoint


def test_a_target_sensitivity_on_a_multilabel_task_is_refused_by_name(tmp_path):
    images, labels = val_split()
    trial = onnx_trial(tmp_path, "t", 5.0, latency=1.0)
    two_labels = np.stack([labels, 1 - labels], axis=1)
    dataset = SimpleNamespace(splits={"val": SimpleNamespace(images=images, labels=two_labels)})
    meta = DatasetMeta(
        task="classification", multilabel=True, num_classes=2, in_channels=1, spatial_dims=2, image_size=(4, 4)
    )
    spec = SimpleNamespace(export=ExportSpec(target_sensitivity=0.9))
    logits = np.zeros((len(images), 2))
    with pytest.raises(
        ValueError, match="export.target_sensitivity: a sensitivity threshold needs a binary single-label"
    ):
        _calibrate(
            spec,
            tmp_path / "t",
            dataset,
            meta,
            test_logits=logits,
            test_labels=two_labels,
            test_metrics={},
        )
    assert trial.final


# ----------------------------------------------------------------------------- the final training vs the search's instance

from medkd.registry.export import judge_final  # noqa: E402
from medkd.registry.selection import compare_final, paired_se  # noqa: E402
from medkd.search.final import FinalModel  # noqa: E402


def noisier(score: np.ndarray, noise: float, seed: int = 3) -> np.ndarray:
    return np.clip(0.5 + (score - 0.5) * 0.3 + np.random.default_rng(seed).normal(0, noise, len(score)), 0, 1)


def test_a_final_model_worse_beyond_the_noise_is_not_served(val):
    labels, score = val
    comparison = compare_final(binary_probs(score), binary_probs(noisier(score, 0.25)), labels)
    assert comparison.served == "search"
    assert comparison.quality_gap > comparison.quality_se > 0
    assert comparison.final_quality < comparison.search_quality
    assert "val AUC" in comparison.reason and "worse beyond the val noise" in comparison.reason
    assert "paired bootstrap" in comparison.rule and "accuracy" in comparison.rule
    again = compare_final(binary_probs(score), binary_probs(noisier(score, 0.25)), labels)
    assert again == comparison  # deterministic: a re-run decides the same


def test_a_final_model_within_the_noise_or_better_is_served(val):
    labels, score = val
    slightly = compare_final(binary_probs(score), binary_probs(np.clip(score + 0.01, 0, 1)), labels)
    assert slightly.served == "final" and "not worse" in slightly.reason
    better = compare_final(binary_probs(noisier(score, 0.25)), binary_probs(score), labels)
    assert better.served == "final" and better.quality_gap < 0 and "is better beyond the val noise" in better.reason


def test_a_final_model_with_the_same_ranking_but_worse_decisions_is_not_served(val):
    labels, score = val
    # Same ranking of val (same AUC to the last digit), but argmax now calls almost every sample positive.
    shifted = np.clip(score * 0.3 + 0.6, 0, 1)
    comparison = compare_final(binary_probs(score), binary_probs(shifted), labels)
    assert comparison.quality_gap == pytest.approx(0.0, abs=1e-12)
    assert comparison.decision_gap > comparison.decision_se > 0
    assert comparison.served == "search" and "val accuracy" in comparison.reason
    # At a target sensitivity each model decides at its own threshold: the shift no longer matters.
    at_point = compare_final(binary_probs(score), binary_probs(shifted), labels, target_sensitivity=0.9)
    assert at_point.served == "final" and at_point.decision_gap == pytest.approx(0.0, abs=1e-12)


def test_the_best_of_tied_trials_gives_a_fresh_final_model_its_selection_optimism(val):
    labels, score = val
    fresh = np.clip(score + np.random.default_rng(5).normal(0, 0.12, len(score)), 0.001, 0.999)
    alone = compare_final(binary_probs(score), binary_probs(fresh), labels)
    # Worse by 1.2-1.6 SE: beyond one SE, so against an instance chosen alone the search's is served ...
    assert 1 < alone.quality_gap / alone.quality_se < 2 and 1 < alone.decision_gap / alone.decision_se < 2
    assert alone.served == "search" and alone.selected_from == 1 and alone.selection_allowance == 0
    # ... but an instance that is the best of 5 tied trials overstates its val figures by about
    # 1.16 SE (the expected maximum of 5 standard normals), which a fresh draw cannot be expected to match.
    of_five = compare_final(binary_probs(score), binary_probs(fresh), labels, selected_from=5)
    assert of_five.served == "final" and of_five.selection_allowance == pytest.approx(1.163, abs=1e-3)
    assert "best of 5 tied trials" in of_five.reason and "expected maximum" in of_five.rule
    assert (of_five.quality_gap, of_five.quality_se) == (alone.quality_gap, alone.quality_se)
    with pytest.raises(ValueError, match="count must be >= 1"):
        compare_final(binary_probs(score), binary_probs(fresh), labels, selected_from=0)


def test_expected_maximum_of_standard_normals_matches_sampling():
    from medkd.registry.selection import expected_maximum

    draws = np.random.default_rng(0).standard_normal((200_000, 5)).max(axis=1).mean()
    assert expected_maximum(5) == pytest.approx(draws, abs=0.01)
    assert expected_maximum(1) == 0.0 and expected_maximum(2) == pytest.approx(1 / np.sqrt(np.pi), abs=1e-6)


def test_final_comparison_errors_name_the_model(val):
    labels, score = val
    with pytest.raises(ValueError, match="final model: 10 val probabilities for 150 val labels"):
        compare_final(binary_probs(score), binary_probs(score[:10]), labels)
    assert paired_se(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0


def test_judge_final_reads_the_stored_models(tmp_path):
    images, labels = val_split()
    trial = onnx_trial(tmp_path, "t", 5.0, latency=1.0)
    blurred = tmp_path / "final"
    blurred.mkdir()
    # The final "model" ranks val the wrong way round: worse beyond any noise.
    export_onnx(Scaled(-5.0), torch.zeros(2, 1, 4, 4), blurred / "model.onnx")
    final = FinalModel(
        fingerprint="f",
        trial_id="t",
        path=str(blurred),
        epochs=2,
        search_epochs=1,
        val={"val_auc": 0.1},
        search_val={"val_auc": 0.9},
        seconds=1.0,
    )
    evidence = SelectionEvidence(images, labels)
    comparison = judge_final(final, trial, evidence)
    assert comparison.served == "search" and comparison.final_quality < 0.5 < comparison.search_quality
    same = FinalModel(**{**final.model_dump(), "path": str(tmp_path / "t")})
    assert judge_final(same, trial, evidence).served == "final"
    segmentation = judge_final(final, trial, None)
    assert segmentation.served == "final" and "segmentation" in segmentation.reason
