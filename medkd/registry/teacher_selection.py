"""Whose soft labels the students learn from (``search.teacher_selection``), decided on val with the
student selection's yardstick.

``val_contribution``: the equal-weight ensemble of the teachers still in is scored on val with and
without each of them, on the same paired bootstrap of the val split as
:func:`medkd.registry.selection.select_trial` (:func:`~medkd.registry.selection.bootstrap_indices`,
:func:`~medkd.registry.selection.paired_se`, :data:`~medkd.core.metrics.NOISE_STANDARD_ERRORS`).
A teacher can go when the ensemble without it decides better on val beyond the noise (accuracy at
the served operating point, each ensemble's own point chosen on val, higher by more than one
standard error) and ranks no worse beyond it (val AUC not lower by more than one standard error).
The one whose removal gains most goes, and the rest are scored again, while two or more remain:
the last teacher always stays. ``teachers[i].distill: false`` teachers are out from the start.

Examples:
    >>> choice = select_teachers({"cnn": cnn_val, "vit": vit_val}, val_labels)  # doctest: +SKIP
    >>> choice.dropped, choice.kept  # doctest: +SKIP
    (['vit'], ['cnn'])
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal

import numpy as np
from pydantic import BaseModel

from medkd.core.metrics import NOISE_STANDARD_ERRORS, ensemble_probabilities
from medkd.registry.selection import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    beyond_noise,
    bootstrap_indices,
    paired_se,
    resampled_scores,
)
from medkd.spec.job import JobSpec

TeacherSelectionMode = Literal["all", "val_contribution"]


def teacher_selection_rule(mode: TeacherSelectionMode, target_sensitivity: float | None = None) -> str:
    """The rule in words, for ``results.json``, the report and the progress log."""
    if mode == "all":
        return "all: the students learn from every teacher with distill: true"
    point = (
        f"the threshold reaching val sensitivity {target_sensitivity:g}" if target_sensitivity is not None else "argmax"
    )
    return (
        f"val_contribution: a teacher is dropped from the soft labels when the equal-weight ensemble without it has "
        f"a val accuracy at the served operating point ({point}) higher by more than {NOISE_STANDARD_ERRORS:g} "
        f"standard error and a val AUC not lower by more than {NOISE_STANDARD_ERRORS:g} (paired bootstrap of the "
        f"val split, {BOOTSTRAP_RESAMPLES} resamples); the one whose removal gains most accuracy goes first and "
        f"the rest are scored again, while two or more remain; distill: false teachers are out from the start"
    )


class TeacherCandidate(BaseModel):
    """The ensemble without one teacher, against the ensemble with it (val).

    ``acc_gain``: decision accuracy without the teacher minus with it (positive: better without);
    ``auc_loss``: AUC with it minus without it (positive: AUC is lower without); each with the
    paired-bootstrap standard error of that difference.
    """

    teacher: str
    val_auc_without: float
    val_acc_without: float
    acc_gain: float
    acc_se: float
    auc_loss: float
    auc_se: float
    droppable: bool


class TeacherStep(BaseModel):
    """One decision: the ensemble scored, every candidate removal, and the teacher dropped (or None: stop)."""

    teachers: list[str]
    val_auc: float
    val_acc: float
    candidates: list[TeacherCandidate]
    dropped: str | None
    reason: str


class TeacherSelection(BaseModel):
    """The teachers students learn from and why: ``manual`` (``distill: false``), ``dropped`` by the
    rule (in the order it dropped them), ``kept``; ``steps`` holds the val figures of each decision."""

    mode: TeacherSelectionMode
    rule: str
    manual: list[str]
    dropped: list[str]
    kept: list[str]
    steps: list[TeacherStep]


def select_teachers(
    val_logits: Mapping[str, np.ndarray],
    val_labels: np.ndarray,
    *,
    mode: TeacherSelectionMode = "val_contribution",
    manual: Collection[str] = (),
    multilabel: bool = False,
    target_sensitivity: float | None = None,
    positive_class: int = 1,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> TeacherSelection:
    """Apply :func:`teacher_selection_rule` to the teachers' val logits.

    Args:
        val_logits: teacher name -> its ``(N, C)`` val logits (the cached soft labels of val).
        val_labels: the val labels.
        mode: ``all`` keeps every teacher not in ``manual``; ``val_contribution`` applies the rule.
        manual: teachers with ``distill: false``: never in, whatever val says.
        multilabel: sigmoid probabilities, per-label decisions.
        target_sensitivity: the served operating point of a binary task (None: argmax).
        positive_class: the class whose sensitivity ``target_sensitivity`` is.
        resamples: bootstrap resamples of the val split (paired across the ensembles compared).

    Raises:
        ValueError: no teacher, a ``manual`` name that is not a teacher, every teacher in ``manual``,
            or logits without one row per val label (naming the teacher).

    Examples:
        >>> choice = select_teachers({"good": good_val, "noisy": noisy_val}, val_labels)  # doctest: +SKIP
        >>> choice.dropped, choice.steps[0].candidates[1].acc_gain  # doctest: +SKIP
        (['noisy'], 0.04)
    """
    labels = np.asarray(val_labels)
    names = list(val_logits)
    unknown = sorted(set(manual) - set(names))
    if unknown:
        raise ValueError(f"teachers with distill: false {unknown} have no val logits (teachers: {names})")
    for name in names:
        if len(val_logits[name]) != len(labels):
            raise ValueError(f"teacher {name!r}: {len(val_logits[name])} val logits for {len(labels)} val labels")
    remaining = [n for n in names if n not in set(manual)]
    if not remaining:
        raise ValueError("every teacher has distill: false: students need at least one teacher's soft labels")
    selection = TeacherSelection(
        mode=mode,
        rule=teacher_selection_rule(mode, target_sensitivity),
        manual=[n for n in names if n in set(manual)],
        dropped=[],
        kept=list(remaining),
        steps=[],
    )
    if mode == "all":
        return selection
    indices = bootstrap_indices(len(labels), resamples, seed)
    options = {"multilabel": multilabel, "target_sensitivity": target_sensitivity, "positive_class": positive_class}

    def score(members: list[str]) -> tuple[np.ndarray, np.ndarray]:
        probs = ensemble_probabilities([val_logits[n] for n in members], multilabel=multilabel)
        return resampled_scores(probs, labels, indices, **options)

    while True:
        auc, acc = score(remaining)
        candidates = []
        for name in remaining if len(remaining) >= 2 else []:
            auc_without, acc_without = score([n for n in remaining if n != name])
            acc_gain, acc_se = float(acc_without[0] - acc[0]), paired_se(acc_without, acc)
            auc_loss, auc_se = float(auc[0] - auc_without[0]), paired_se(auc, auc_without)
            better, not_worse = beyond_noise(acc_gain, acc_se), not beyond_noise(auc_loss, auc_se)
            candidates.append(
                TeacherCandidate(
                    teacher=name,
                    val_auc_without=float(auc_without[0]),
                    val_acc_without=float(acc_without[0]),
                    acc_gain=acc_gain,
                    acc_se=acc_se,
                    auc_loss=auc_loss,
                    auc_se=auc_se,
                    droppable=better and not_worse,
                )
            )
        droppable = [c for c in candidates if c.droppable]
        worst = max(droppable, key=lambda c: (c.acc_gain, -c.auc_loss, c.teacher)) if droppable else None
        step = TeacherStep(
            teachers=list(remaining),
            val_auc=float(auc[0]),
            val_acc=float(acc[0]),
            candidates=candidates,
            dropped=None if worst is None else worst.teacher,
            reason=_reason(remaining, candidates, worst),
        )
        selection.steps.append(step)
        if worst is None:
            break
        remaining = [n for n in remaining if n != worst.teacher]
        selection.dropped.append(worst.teacher)
    selection.kept = remaining
    return selection


def select_teachers_for(
    spec: JobSpec, val_logits: Mapping[str, np.ndarray], val_labels: np.ndarray, *, multilabel: bool = False
) -> TeacherSelection:
    """:func:`select_teachers` as the job asks: ``search.teacher_selection``, its ``distill: false``
    teachers and its served operating point (``export.target_sensitivity`` / ``positive_class``).

    Examples:
        >>> select_teachers_for(spec, {t.name: cached_val[t.name] for t in trained}, val_labels).kept  # doctest: +SKIP
        ['cnn']
    """
    return select_teachers(
        val_logits,
        val_labels,
        mode=spec.search.teacher_selection,
        manual=[t.name for t in spec.teachers if not t.distill],
        multilabel=multilabel,
        target_sensitivity=spec.export.target_sensitivity,
        positive_class=spec.export.positive_class,
    )


def decision_lines(selection: TeacherSelection) -> list[str]:
    """One progress line per decision of ``selection`` (nothing for ``all`` without manual drops).

    Examples:
        >>> decision_lines(select_teachers({"a": a_val, "b": b_val}, labels))  # doctest: +SKIP
        ['teacher selection: drop b (val accuracy without it 0.9615 vs 0.9231, +0.0385 > 1 SE 0.0211; ...)']
    """
    lines = [f"teacher selection: {name} left out (distill: false)" for name in selection.manual]
    lines += [f"teacher selection: {step.reason}" for step in selection.steps]
    return lines


def _reason(remaining: list[str], candidates: list[TeacherCandidate], worst: TeacherCandidate | None) -> str:
    if len(remaining) < 2:
        return f"keep {remaining[0]} (the last teacher always stays)"
    if worst is not None:
        return f"drop {worst.teacher} ({_figures(worst)})"
    closest = max(candidates, key=lambda c: (c.acc_gain, -c.auc_loss, c.teacher))
    return f"keep {', '.join(remaining)}: no removal helps beyond the val noise (closest: {closest.teacher}, {_figures(closest)})"


def _figures(c: TeacherCandidate) -> str:
    sign = "+" if c.acc_gain >= 0 else ""
    return (
        f"val accuracy without it {c.val_acc_without:.4f}, {sign}{c.acc_gain:.4f} vs {NOISE_STANDARD_ERRORS:g} SE "
        f"{c.acc_se:.4f}; val AUC without it {c.val_auc_without:.4f}, {-c.auc_loss:+.4f} vs SE {c.auc_se:.4f}"
    )
