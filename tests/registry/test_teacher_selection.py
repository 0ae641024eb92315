"""``search.teacher_selection: val_contribution``: teachers whose removal improves the ensemble's val
decisions beyond the paired-bootstrap noise leave the soft labels; helpful and last teachers stay."""

from __future__ import annotations

import numpy as np
import pytest

from medkd.pipeline.report import contribution_rows, contribution_section
from medkd.registry.teacher_selection import decision_lines, select_teachers, select_teachers_for
from medkd.search.run import search_fingerprint
from medkd.spec.base import SpecError
from medkd.spec.job import parse_spec

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 2, 400)


def _teacher(correct_share: float, confidence: float, seed: int) -> np.ndarray:
    """Binary logits right on about ``correct_share`` of LABELS, with margin ``confidence``."""
    rng = np.random.default_rng(seed)
    right = rng.random(len(LABELS)) < correct_share
    predicted = np.where(right, LABELS, 1 - LABELS)
    margin = confidence * (0.5 + rng.random(len(LABELS)))
    logits = np.zeros((len(LABELS), 2))
    logits[np.arange(len(LABELS)), predicted] = margin
    return logits


GOOD = _teacher(0.92, 1.0, seed=1)
ALSO_GOOD = _teacher(0.90, 1.0, seed=2)
# Confidently wrong on ~45 % of the images: it overrules the good teacher where it is surer.
HARMFUL = _teacher(0.55, 4.0, seed=3)
HARMFUL_TOO = _teacher(0.55, 4.0, seed=4)


def test_a_teacher_that_hurts_on_val_is_dropped_with_its_figures():
    choice = select_teachers({"good": GOOD, "harmful": HARMFUL}, LABELS)
    assert choice.dropped == ["harmful"] and choice.kept == ["good"] and choice.manual == []
    first = {c.teacher: c for c in choice.steps[0].candidates}
    harmful = first["harmful"]
    assert harmful.droppable and harmful.acc_gain > harmful.acc_se > 0
    assert harmful.val_acc_without == pytest.approx(float(np.mean(GOOD.argmax(1) == LABELS)))
    assert not first["good"].droppable and first["good"].acc_gain <= 0 and first["good"].auc_loss > 0
    assert choice.steps[0].dropped == "harmful" and choice.steps[-1].dropped is None
    lines = decision_lines(choice)
    assert len(lines) == 2 and lines[0].startswith("teacher selection: drop harmful (val accuracy without it")
    assert "last teacher always stays" in lines[1]


def test_teachers_that_help_each_other_are_kept():
    choice = select_teachers({"a": GOOD, "b": ALSO_GOOD, "c": _teacher(0.9, 1.0, seed=5)}, LABELS)
    assert choice.dropped == [] and choice.kept == ["a", "b", "c"]
    assert len(choice.steps) == 1 and not any(c.droppable for c in choice.steps[0].candidates)
    assert choice.steps[0].reason.startswith("keep a, b, c: no removal helps beyond the val noise")


def test_a_gain_inside_the_noise_keeps_the_teacher():
    # Differs from GOOD on a single image: no removal can gain beyond one standard error.
    twin = GOOD.copy()
    twin[0] = twin[0, ::-1] * 3
    choice = select_teachers({"good": GOOD, "twin": twin}, LABELS)
    assert choice.dropped == []


def test_greedy_drops_the_worst_first_and_never_the_last_teacher():
    # Two coin-flip teachers: each drags the ensemble down, the second once the first is gone.
    coin, coin_too = _teacher(0.5, 1.0, seed=3), _teacher(0.5, 1.0, seed=4)
    choice = select_teachers({"coin": coin, "good": GOOD, "coin_too": coin_too}, LABELS)
    assert sorted(choice.dropped) == ["coin", "coin_too"] and choice.kept == ["good"] and len(choice.steps) == 3
    first, second = choice.steps[0], choice.steps[1]
    worst = max(first.candidates, key=lambda c: c.acc_gain)
    assert first.dropped == worst.teacher and second.teachers == [
        n for n in ("coin", "good", "coin_too") if n != worst.teacher
    ]
    assert choice.steps[-1].dropped is None and choice.steps[-1].teachers == ["good"]
    # Only the harmful ones: with two left, the rule could drop either but keeps at least one.
    alone = select_teachers({"harmful": HARMFUL, "harmful_too": HARMFUL_TOO}, LABELS)
    assert len(alone.kept) >= 1
    single = select_teachers({"harmful": HARMFUL}, LABELS)
    assert single.kept == ["harmful"] and single.steps[0].candidates == []


def test_a_manual_distill_false_wins_over_val():
    # good helps on val, but distill: false leaves it out; the last remaining teacher stays.
    choice = select_teachers({"good": GOOD, "harmful": HARMFUL}, LABELS, manual=["good"])
    assert choice.manual == ["good"] and choice.kept == ["harmful"] and choice.dropped == []
    assert decision_lines(choice)[0] == "teacher selection: good left out (distill: false)"
    everyone = select_teachers({"good": GOOD, "harmful": HARMFUL}, LABELS, mode="all")
    assert everyone.kept == ["good", "harmful"] and everyone.steps == [] and decision_lines(everyone) == []
    spec = _spec("val_contribution", distill=[True, False, True])
    chosen = select_teachers_for(spec, {"t0": HARMFUL, "t1": GOOD, "t2": GOOD}, LABELS)
    assert chosen.manual == ["t1"] and chosen.dropped == ["t0"] and chosen.kept == ["t2"]


def test_bad_inputs_name_the_teacher():
    with pytest.raises(ValueError, match=r"teacher 'short': 3 val logits for 400 val labels"):
        select_teachers({"good": GOOD, "short": GOOD[:3]}, LABELS)
    with pytest.raises(ValueError, match=r"distill: false \['nobody'\] have no val logits"):
        select_teachers({"good": GOOD}, LABELS, manual=["nobody"])


def _spec(selection: object = None, task: str = "classification", distill: list[bool] | None = None):
    flags = distill or [True, True]
    model = "unet" if task == "segmentation" else "resnet18"
    raw = {
        "name": "choice",
        "task": task,
        "data": {"kind": "synthetic", "task": task},
        "teachers": [{"name": f"t{i}", "model": model, "distill": flag} for i, flag in enumerate(flags)],
    }
    if selection is not None:
        raw["search"] = {"teacher_selection": selection}
    return parse_spec(raw)


def test_bad_spec_values_name_the_field():
    assert _spec().search.teacher_selection == "all"
    with pytest.raises(SpecError, match=r"search\.teacher_selection: Input should be 'all' or 'val_contribution'"):
        _spec("maybe")
    with pytest.raises(SpecError, match=r"search\.teacher_selection: 'val_contribution' scores .* segmentation"):
        _spec("val_contribution", task="segmentation")
    assert _spec("all", task="segmentation").search.teacher_selection == "all"


def test_the_option_changes_the_search_fingerprint_only_through_the_teacher_set():
    everyone, by_val = _spec("all"), _spec("val_contribution")
    assert (
        everyone.search.fingerprint_fields()
        == by_val.search.fingerprint_fields()
        == _spec().search.fingerprint_fields()
    )
    assert search_fingerprint(by_val, ["fp0", "fp1"], "data") == search_fingerprint(everyone, ["fp0", "fp1"], "data")
    assert search_fingerprint(by_val, ["fp0"], "data") != search_fingerprint(everyone, ["fp0", "fp1"], "data")


def test_the_report_states_the_rule_and_marks_dropped_teachers():
    choice = select_teachers({"good": GOOD, "harmful": HARMFUL, "manual": ALSO_GOOD}, LABELS, manual=["manual"])
    results = {
        "ensemble": {
            "distilled": choice.kept,
            "teacher_selection": choice.model_dump(mode="json"),
            "leave_one_out": {
                "split": "val",
                "all": {"auc": 0.9, "acc": 0.8},
                "teachers": {
                    name: {"without": {"auc": 0.8, "acc": 0.7}, "contribution": {"auc": 0.1, "acc": 0.1}}
                    for name in ("good", "harmful", "manual")
                },
            },
        }
    }
    rows = {r["teacher"]: r for r in contribution_rows(results)}
    assert {n: r["distilled"] for n, r in rows.items()} == {
        "good": "yes",
        "harmful": "no (val rule)",
        "manual": "no (distill: false)",
    }
    assert rows["harmful"]["decision_acc_se"] > 0 and rows["harmful"]["auc_se"] > 0
    text = " ".join(contribution_section(results).paragraphs)
    assert "val_contribution: a teacher is dropped" in text and "Dropped on val: harmful" in text
    assert "Step 1 (good, harmful:" in text and "drop harmful" in text
