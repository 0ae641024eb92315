"""Report sections for the served model's calibration, operating points and the selection rule.

Small functions from the results dict to rows / HTML fragments, so any report template can place
them: :func:`operating_point_rows` (test sensitivity and specificity at each operating point
chosen on val), :func:`calibration_summary` (temperature, ECE before/after on val and test) and
:func:`selection_rows` (every completed trial as the selection saw it).

Examples:
    >>> operating_point_rows({"best": {}})
    []
"""

from __future__ import annotations

import html
from typing import Any


def operating_point_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per operating point of the served model: how it was chosen (val) and what it gives on test."""
    best = results.get("best") or {}
    points = best.get("operating_points") or []
    test = (best.get("test_metrics") or {}).get("operating_points") or {}
    served = best.get("operating_point")
    rows = []
    for point in points:
        name = point["name"]
        val, measured = point.get("val") or {}, test.get(name) or {}
        rows.append(
            {
                "operating point": name + (" (served)" if name == served else ""),
                "threshold": point.get("threshold"),
                "val sensitivity": val.get("sensitivity"),
                "val specificity": val.get("specificity"),
                "test sensitivity": measured.get("sensitivity"),
                "test specificity": measured.get("specificity"),
                "test acc": measured.get("acc"),
                "test balanced acc": measured.get("balanced_acc"),
            }
        )
    return rows


def calibration_summary(results: dict[str, Any]) -> str:
    """One sentence: the temperature and the ECE before/after on val (fitted there) and test (15 bins)."""
    best = results.get("best") or {}
    calibration = best.get("calibration")
    if not calibration:
        return ""
    test = best.get("test_metrics") or {}
    fitted = calibration.get("fitted_temperature")
    if fitted is not None and fitted != calibration["temperature"]:
        text = (
            f"Probabilities left as trained (T = 1): the temperature fitted on val (T = {fitted:.3f}) lowered the "
            f"val NLL by {_fmt(calibration.get('nll_gain'))}, within its standard error "
            f"{_fmt(calibration.get('nll_gain_se'))}; ECE (15 bins) on val {_fmt(calibration.get('ece_before'))}"
            + (f", on test {_fmt(test['ece'])}" if test.get("ece") is not None else "")
        )
        return html.escape(text + ".")
    text = (
        f"Probabilities calibrated by temperature scaling on val: T = {calibration['temperature']:.3f}; "
        f"ECE (15 bins) on val {_fmt(calibration.get('ece_before'))} → {_fmt(calibration.get('ece_after'))}"
    )
    if test.get("ece_calibrated") is not None:
        text += f", on test {_fmt(test.get('ece'))} → {_fmt(test.get('ece_calibrated'))}"
    return html.escape(text + ".")


def selection_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every completed trial as the selection ranked it (best quality first)."""
    selection = results.get("selection") or {}
    rows = []
    for candidate in selection.get("candidates", []):
        rows.append(
            {
                "trial": candidate["trial_id"]
                + (" (served)" if candidate["trial_id"] == selection.get("chosen") else ""),
                selection.get("quality", "quality"): candidate["quality"],
                "gap": candidate["gap"],
                "gap SE": candidate.get("gap_se"),
                "tied": "yes" if candidate["tied"] else "",
                "val acc at the operating point": candidate["decision_acc"],
                "latency_ms": candidate.get("latency_ms"),
                "model_bytes": candidate.get("model_bytes"),
            }
        )
    return rows


def selection_rule(results: dict[str, Any]) -> str:
    """The rule that chose the served trial, escaped for HTML ('' when the results have none)."""
    rule = (results.get("selection") or {}).get("rule")
    return html.escape(f"Selection rule: {rule}.") if rule else ""


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}"
