"""Report sections: operating points with test sensitivity/specificity, calibration and the selection."""

from __future__ import annotations

from medkd.pipeline.report import write_report
from medkd.pipeline.report_clinical import calibration_summary, operating_point_rows, selection_rows, selection_rule

BEST = {
    "trial_id": "b",
    "params": 50_000,
    "config": {"student": "resnet_tiny"},
    "calibration": {"temperature": 1.8, "ece_before": 0.12, "ece_after": 0.03},
    "operating_point": "sensitivity>=0.90",
    "operating_points": [
        {"name": "argmax", "kind": "argmax", "val": {"sensitivity": 0.8, "specificity": 0.9}},
        {
            "name": "sensitivity>=0.90",
            "kind": "threshold",
            "threshold": 0.31,
            "val": {"sensitivity": 0.92, "specificity": 0.7},
        },
    ],
    "test_metrics": {
        "ece": 0.1,
        "ece_calibrated": 0.04,
        "operating_points": {
            "argmax": {"sensitivity": 0.78, "specificity": 0.91, "acc": 0.86, "balanced_acc": 0.845},
            "sensitivity>=0.90": {"sensitivity": 0.9, "specificity": 0.72, "acc": 0.8, "balanced_acc": 0.81},
        },
    },
}
SELECTION = {
    "chosen": "b",
    "quality": "val_auc",
    "rule": "highest val_auc; ties within 1 SE ...",
    "candidates": [
        {
            "trial_id": "a",
            "quality": 0.9124,
            "gap": 0.0,
            "gap_se": None,
            "tied": True,
            "decision_acc": 0.80,
            "latency_ms": 0.2,
            "model_bytes": 1000,
        },
        {
            "trial_id": "b",
            "quality": 0.9123,
            "gap": 0.0001,
            "gap_se": 0.01,
            "tied": True,
            "decision_acc": 0.85,
            "latency_ms": 0.3,
            "model_bytes": 1000,
        },
    ],
}


def test_operating_point_rows_show_val_choice_and_test_result():
    rows = operating_point_rows({"best": BEST})
    assert [r["operating point"] for r in rows] == ["argmax", "sensitivity>=0.90 (served)"]
    assert rows[1]["threshold"] == 0.31 and rows[1]["test sensitivity"] == 0.9 and rows[1]["test specificity"] == 0.72
    assert rows[0]["val sensitivity"] == 0.8


def test_calibration_and_selection_texts():
    text = calibration_summary({"best": BEST})
    assert "T = 1.800" in text and "val 0.1200 → 0.0300" in text and "test 0.1000 → 0.0400" in text
    assert calibration_summary({"best": {}}) == ""
    kept = {
        "temperature": 1.0,
        "fitted_temperature": 1.157,
        "nll_gain": 0.0026,
        "nll_gain_se": 0.0068,
        "ece_before": 0.09,
    }
    text = calibration_summary({"best": {**BEST, "calibration": kept}})
    assert text.startswith("Probabilities left as trained (T = 1)") and "(T = 1.157)" in text
    assert "by 0.0026, within its standard error 0.0068" in text and "on test 0.1000." in text and "→" not in text
    rows = selection_rows({"selection": SELECTION})
    assert rows[1]["trial"] == "b (served)" and rows[1]["tied"] == "yes" and rows[1]["val_auc"] == 0.9123
    assert selection_rule({"selection": SELECTION}).startswith("Selection rule: highest val_auc")
    assert selection_rule({}) == ""


def test_the_report_contains_the_sections(tmp_path):
    page = write_report({"job": "j", "best": BEST, "selection": SELECTION}, tmp_path).read_text()
    assert "Operating points" in page and "sensitivity&gt;=0.90 (served)" in page
    assert "Selection rule: highest val_auc" in page and "b (served)" in page
    assert "T = 1.800" in page
