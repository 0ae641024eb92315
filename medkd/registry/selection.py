"""Which trained student is served: the best val quality, with ties inside the val split's noise
resolved by the decision a user gets, then by cost.

On a few hundred val images, AUC differences of a few thousandths are noise: a paired bootstrap
of the val split (the same resampled images for both models) gives the standard error of the
difference between the best trial and every other. Trials within one such standard error of
the best are tied; among them the one with the highest val accuracy at the served operating
point wins (argmax, or the target-sensitivity threshold of a binary task), then the lower
latency, then the smaller model. Every completed trial is a candidate, Pareto-optimal or not.

After the final training (``search.final_epochs`` / ``final_branches``, from a fresh seed) the same
yardstick decides which instance of the chosen configuration is served (:func:`compare_final`): the
retrained model unless it is worse than the search's instance on val AUC or on val accuracy at the
served operating point by more than one paired-bootstrap standard error plus the search instance's
selection optimism. That instance is the best of the trials tied within the noise, so its val
figures are the maximum of several noisy estimates: with ``k`` tied trials they overstate it by
about :func:`expected_maximum` ``(k)`` standard errors (1.16 for 5), a lead a fresh draw of the
same configuration cannot be expected to match. Without the allowance, the fresh model loses to
a lucky draw it is no worse than, and the served model is that draw (BreastMNIST, 2026-12-05:
served 4.5 SD above 3 fresh seeds of its configuration).

Examples:
    >>> selection = select_trial(trials, val_probs, val_labels, quality="val_auc")  # doctest: +SKIP
    >>> selection.chosen, selection.rule  # doctest: +SKIP
    >>> compare_final(search_probs, final_probs, val_labels).served  # doctest: +SKIP
    'search'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel
from scipy.integrate import quad
from scipy.stats import norm, rankdata

from medkd.core.metrics import NOISE_STANDARD_ERRORS
from medkd.registry.calibration import choose_operating_points

BOOTSTRAP_RESAMPLES = 200
BOOTSTRAP_SEED = 0


def selection_rule(quality: str, target_sensitivity: float | None = None) -> str:
    """The rule in words, for ``results.json`` and the report."""
    point = (
        f"the threshold reaching val sensitivity {target_sensitivity:g}" if target_sensitivity is not None else "argmax"
    )
    return (
        f"highest {quality}; trials within {NOISE_STANDARD_ERRORS:g} standard error of the best (paired bootstrap of "
        f"the val split, {BOOTSTRAP_RESAMPLES} resamples) are tied, and among tied trials the highest val accuracy "
        f"at the served operating point ({point}) wins, then the lowest latency_ms, then the smallest model_bytes"
    )


class CandidateScore(BaseModel):
    """One completed trial as the selection saw it."""

    trial_id: str
    quality: float
    gap: float  # best quality minus this one
    gap_se: float | None  # paired-bootstrap standard error of that gap (None for the best itself)
    tied: bool
    decision_acc: float
    latency_ms: float | None = None
    model_bytes: float | None = None


class FinalComparison(BaseModel):
    """Which instance of the selected configuration is served after the final training, and why.

    ``*_gap`` is the search instance's val figure minus the final model's (positive: the final
    model is worse), ``*_se`` its paired-bootstrap standard error.
    """

    served: Literal["final", "search"]
    reason: str
    rule: str
    selected_from: int = 1  # trials tied within the val noise that the search instance was chosen among
    selection_allowance: float = 0.0  # their expected maximum, in standard errors, added to the noise
    quality: str = "val_auc"
    search_quality: float | None = None
    final_quality: float | None = None
    quality_gap: float | None = None
    quality_se: float | None = None
    search_decision_acc: float | None = None
    final_decision_acc: float | None = None
    decision_gap: float | None = None
    decision_se: float | None = None


class Selection(BaseModel):
    """The served trial, the rule that chose it and every candidate's scores (best quality first);
    ``final``: the comparison of its final training with it, when there was one."""

    chosen: str
    rule: str
    quality: str
    candidates: list[CandidateScore]
    final: FinalComparison | None = None


def bootstrap_indices(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``(1 + resamples, n)`` sample indices: the split itself first, then seeded resamples with replacement
    (the same rows for every model compared: a paired bootstrap).

    Examples:
        >>> bootstrap_indices(3, resamples=2).shape
        (3, 3)
        >>> bootstrap_indices(3, resamples=2)[0].tolist()
        [0, 1, 2]
    """
    rng = np.random.default_rng(seed)
    return np.concatenate([np.arange(n)[None], rng.integers(0, n, size=(resamples, n))])


def paired_se(reference: np.ndarray, other: np.ndarray) -> float:
    """Standard error of ``reference - other`` over the resamples (rows 1: of :func:`bootstrap_indices`),
    resamples where either is undefined left out.

    Examples:
        >>> paired_se(np.array([0.9, 0.8, 0.9, 1.0]), np.array([0.8, 0.8, 0.8, 0.8]))
        0.1
    """
    differences = reference[1:] - other[1:]
    differences = differences[~np.isnan(differences)]
    return round(float(np.std(differences, ddof=1)), 12) if len(differences) > 1 else 0.0


def auc_resamples(
    probs: np.ndarray, labels: np.ndarray, indices: np.ndarray, *, multilabel: bool = False
) -> np.ndarray:
    """AUC on each row of ``indices`` (resamples of the val split), as the MedMNIST evaluator defines it:
    binary on ``p[:, 1]``, macro one-vs-rest over classes, mean over labels for multi-label. A class
    absent from a resample is left out of its mean.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` class indices or ``(N, C)`` 0/1 labels.
        indices: ``(B, M)`` sample indices, one resample per row (``np.arange(N)[None]`` = the split).

    Examples:
        >>> p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
        >>> auc_resamples(p, np.array([0, 1, 1]), np.arange(3)[None]).tolist()
        [1.0]
    """
    probs = np.asarray(probs, dtype=np.float64)
    if multilabel:
        truth = np.asarray(labels).reshape(probs.shape).astype(bool)
        columns = [(probs[:, k], truth[:, k]) for k in range(probs.shape[1])]
    else:
        labels = np.asarray(labels).reshape(-1)
        if probs.shape[1] == 2:
            columns = [(probs[:, 1], labels == 1)]
        else:
            columns = [(probs[:, k], labels == k) for k in range(probs.shape[1])]
    per_column = []
    for score, truth in columns:
        s, y = score[indices], truth[indices]
        positives = y.sum(1).astype(np.float64)
        negatives = y.shape[1] - positives
        ranks = rankdata(s, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = ((ranks * y).sum(1) - positives * (positives + 1) / 2) / (positives * negatives)
        per_column.append(np.where((positives > 0) & (negatives > 0), auc, np.nan))
    stacked = np.stack(per_column)
    with np.errstate(invalid="ignore"):
        counts = np.sum(~np.isnan(stacked), axis=0)
        return np.where(counts > 0, np.nansum(stacked, axis=0) / np.maximum(counts, 1), np.nan)


def select_trial(
    trials: Sequence[Any],
    val_probs: Mapping[str, np.ndarray],
    val_labels: np.ndarray,
    *,
    quality: str = "val_auc",
    multilabel: bool = False,
    target_sensitivity: float | None = None,
    positive_class: int = 1,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Selection:
    """Apply :func:`selection_rule` to completed trials.

    Args:
        trials: records with ``trial_id`` and ``metrics`` (``latency_ms``, ``model_bytes``), e.g.
            :class:`medkd.search.run.TrialRecord`.
        val_probs: each trial's val probabilities ``(N, C)`` of its served (compressed) model.
        val_labels: the val labels.
        quality: the name reported for the quality (the search's quality objective).
        target_sensitivity: the served operating point of a binary task (None: argmax).
        resamples: bootstrap resamples of the val split (paired across trials).

    Raises:
        ValueError: no trial, or a trial without val probabilities (named).
    """
    if not trials:
        raise ValueError("no completed trial to select from")
    missing = [t.trial_id for t in trials if t.trial_id not in val_probs]
    if missing:
        raise ValueError(f"val probabilities missing for trial(s) {missing}")
    labels = np.asarray(val_labels)
    indices = bootstrap_indices(len(labels), resamples, seed)
    aucs = {t.trial_id: auc_resamples(val_probs[t.trial_id], labels, indices, multilabel=multilabel) for t in trials}
    best = max(trials, key=lambda t: (aucs[t.trial_id][0], t.trial_id))
    best_auc = aucs[best.trial_id]
    scores = []
    for trial in trials:
        auc = aucs[trial.trial_id]
        gap = float(best_auc[0] - auc[0])
        if trial.trial_id == best.trial_id:
            se, tied = None, True
        else:
            se = paired_se(best_auc, auc)
            tied = gap <= NOISE_STANDARD_ERRORS * se
        probs = np.asarray(val_probs[trial.trial_id], dtype=np.float64)
        point = choose_operating_points(
            probs, labels, multilabel=multilabel, target_sensitivity=target_sensitivity, positive_class=positive_class
        )[-1]
        metrics = getattr(trial, "metrics", {}) or {}
        scores.append(
            CandidateScore(
                trial_id=trial.trial_id,
                quality=float(auc[0]),
                gap=gap,
                gap_se=se,
                tied=tied,
                decision_acc=float(point.val["acc"]),
                latency_ms=_number(metrics.get("latency_ms")),
                model_bytes=_number(metrics.get("model_bytes")),
            )
        )
    scores.sort(key=lambda s: (-s.quality, s.trial_id))
    tied = [s for s in scores if s.tied]
    chosen = min(
        tied, key=lambda s: (-s.decision_acc, _cost(s.latency_ms), _cost(s.model_bytes), -s.quality, s.trial_id)
    )
    return Selection(
        chosen=chosen.trial_id, rule=selection_rule(quality, target_sensitivity), quality=quality, candidates=scores
    )


def final_rule(target_sensitivity: float | None = None) -> str:
    """The final-training rule in words, for ``results.json`` and the report."""
    point = (
        f"the threshold reaching val sensitivity {target_sensitivity:g}" if target_sensitivity is not None else "argmax"
    )
    return (
        f"the final training (a fresh seed) is served unless it is worse than the search's instance by more than "
        f"{NOISE_STANDARD_ERRORS:g} standard error (paired bootstrap of the val split, {BOOTSTRAP_RESAMPLES} resamples) "
        f"plus the search instance's selection optimism (the expected maximum of k standard normals, in standard "
        f"errors, for the k trials tied within the noise it was chosen among) on val AUC or on val accuracy at the "
        f"served operating point ({point}); then the search's instance is served"
    )


def expected_maximum(count: int) -> float:
    """The expected maximum of ``count`` independent standard normal draws: how far, in standard
    errors, the best of ``count`` equally good models' val figures lies above their common value.

    Args:
        count: how many draws (>= 1).

    Raises:
        ValueError: ``count`` < 1.

    Examples:
        >>> [round(expected_maximum(k), 3) for k in (1, 2, 5, 12)]
        [0.0, 0.564, 1.163, 1.629]
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count == 1:
        return 0.0
    value, _ = quad(lambda x: x * count * norm.pdf(x) * norm.cdf(x) ** (count - 1), -np.inf, np.inf)
    return float(value)


def compare_final(
    search_probs: np.ndarray,
    final_probs: np.ndarray,
    val_labels: np.ndarray,
    *,
    multilabel: bool = False,
    target_sensitivity: float | None = None,
    positive_class: int = 1,
    selected_from: int = 1,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> FinalComparison:
    """Apply :func:`final_rule`: the final training's val AUC and decision accuracy against the search
    instance's, on the same bootstrap resamples of val as :func:`select_trial`.

    Each model decides at its own operating point chosen on val (argmax, or its threshold for the
    target sensitivity), as it would be served.

    Args:
        search_probs: ``(N, C)`` val probabilities of the search trial's served (compressed) model.
        final_probs: ``(N, C)`` val probabilities of the final training's served model.
        val_labels: the val labels.
        target_sensitivity: the served operating point of a binary task (None: argmax).
        selected_from: how many trials were tied within the val noise when the search instance was
            chosen (:class:`Selection`); their :func:`expected_maximum` widens the noise.

    Raises:
        ValueError: the probabilities do not have one row per val label (naming which), or
            ``selected_from`` < 1.

    Examples:
        >>> comparison = compare_final(search_probs, final_probs, val_labels)  # doctest: +SKIP
        >>> comparison.served, comparison.quality_gap, comparison.quality_se  # doctest: +SKIP
        ('search', 0.0246, 0.017)
    """
    labels = np.asarray(val_labels)
    for name, probs in (("search", search_probs), ("final", final_probs)):
        if len(probs) != len(labels):
            raise ValueError(f"{name} model: {len(probs)} val probabilities for {len(labels)} val labels")
    allowance = expected_maximum(selected_from)
    indices = bootstrap_indices(len(labels), resamples, seed)
    options = {"multilabel": multilabel, "target_sensitivity": target_sensitivity, "positive_class": positive_class}
    search_auc, search_acc = resampled_scores(search_probs, labels, indices, **options)
    final_auc, final_acc = resampled_scores(final_probs, labels, indices, **options)
    quality_gap, quality_se = float(search_auc[0] - final_auc[0]), paired_se(search_auc, final_auc)
    decision_gap, decision_se = float(search_acc[0] - final_acc[0]), paired_se(search_acc, final_acc)
    noise = f"{NOISE_STANDARD_ERRORS + allowance:.2f} SE" if allowance else f"{NOISE_STANDARD_ERRORS:g} SE"
    worse = [
        f"{name} {final:.4f} vs {search:.4f} (gap {gap:.4f} > {noise} {se:.4f})"
        for name, final, search, gap, se in (
            ("val AUC", final_auc[0], search_auc[0], quality_gap, quality_se),
            ("val accuracy", final_acc[0], search_acc[0], decision_gap, decision_se),
        )
        if beyond_noise(gap, se, allowance)
    ]
    optimism = (
        f"; the search instance is the best of {selected_from} tied trials, so the noise is widened by their "
        f"expected maximum, {allowance:.2f} SE"
        if allowance
        else ""
    )
    if worse:
        served, reason = "search", "the final training is worse beyond the val noise: " + "; ".join(worse)
    else:
        served = "final"
        # Said as it is: a final training better beyond the noise (e.g. trained longer) is not "not worse".
        better = beyond_noise(-quality_gap, quality_se) or beyond_noise(-decision_gap, decision_se)
        reason = (
            f"the final training is {'better' if better else 'not worse'} beyond the val noise: "
            f"val AUC {final_auc[0]:.4f} vs {search_auc[0]:.4f} (SE {quality_se:.4f}), "
            f"val accuracy {final_acc[0]:.4f} vs {search_acc[0]:.4f} (SE {decision_se:.4f})"
        )
    reason += optimism
    return FinalComparison(
        served=served,
        reason=reason,
        rule=final_rule(target_sensitivity),
        selected_from=selected_from,
        selection_allowance=round(allowance, 6),
        search_quality=float(search_auc[0]),
        final_quality=float(final_auc[0]),
        quality_gap=quality_gap,
        quality_se=quality_se,
        search_decision_acc=float(search_acc[0]),
        final_decision_acc=float(final_acc[0]),
        decision_gap=decision_gap,
        decision_se=decision_se,
    )


def beyond_noise(gap: float, se: float, allowance: float = 0.0) -> bool:
    """Whether a positive difference of two val figures exceeds the val noise: more than
    :data:`NOISE_STANDARD_ERRORS` paired-bootstrap standard errors, plus ``allowance`` more (a
    selection optimism, see :func:`compare_final`).

    Examples:
        >>> beyond_noise(0.03, 0.01), beyond_noise(0.01, 0.02), beyond_noise(-0.05, 0.01)
        (True, False, False)
        >>> beyond_noise(0.03, 0.01, allowance=2.5)
        False
    """
    return gap > 0 and gap > (NOISE_STANDARD_ERRORS + allowance) * se


def resampled_scores(
    probs: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    multilabel: bool = False,
    target_sensitivity: float | None = None,
    positive_class: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """One model's val AUC and decision accuracy (at its served operating point chosen on val) on each
    bootstrap resample of ``indices`` (row 0: the split itself), to compare models pairwise.

    Examples:
        >>> auc, acc = resampled_scores(probs, labels, bootstrap_indices(len(labels), 200, 0))  # doctest: +SKIP
    """
    probs = np.asarray(probs, dtype=np.float64)
    correct = decision_correct(
        probs, labels, multilabel=multilabel, target_sensitivity=target_sensitivity, positive_class=positive_class
    )
    return auc_resamples(probs, labels, indices, multilabel=multilabel), correct[indices].mean(1)


def decision_correct(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    multilabel: bool = False,
    target_sensitivity: float | None = None,
    positive_class: int = 1,
) -> np.ndarray:
    """Per val sample, the share of right decisions at the served operating point chosen on val (0/1;
    for multi-label, the share of its labels decided right): index it with :func:`bootstrap_indices`
    and take row means for the decision accuracy of each resample.

    Args:
        probs: ``(N, C)`` val probabilities.
        labels: the val labels.
        target_sensitivity: the served operating point of a binary task (None: argmax).
        positive_class: the class whose sensitivity ``target_sensitivity`` is.

    Examples:
        >>> decision_correct(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 1])).tolist()
        [1.0, 1.0, 0.0]
    """
    point = choose_operating_points(
        probs, labels, multilabel=multilabel, target_sensitivity=target_sensitivity, positive_class=positive_class
    )[-1]
    decisions = point.decide(probs, multilabel=multilabel)
    if multilabel:
        return (decisions == np.asarray(labels).reshape(decisions.shape)).mean(1).astype(np.float64)
    return (decisions == np.asarray(labels).reshape(-1)).astype(np.float64)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _cost(value: float | None) -> float:
    return math.inf if value is None else value
