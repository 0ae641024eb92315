"""The Jinja2 report: every section from a results dict, escaping, the extension point, packaging."""

from __future__ import annotations

import re
import tomllib
from importlib.resources import files

from medkd.pipeline.report import (
    EXTRA_SECTIONS,
    REPORT_FILE,
    ReportSection,
    ReportTable,
    render_report,
    write_report,
)
from tests.conftest import REPO_ROOT

HISTORY = [{"epoch": 1, "train_loss": 0.9, "val_auc": 0.7}, {"epoch": 2, "train_loss": 0.6, "val_auc": 0.8}]
RESULTS = {
    "job": "quick<script>",
    "job_fingerprint": "abc123",
    "dataset": {"name": "synthetic", "fingerprint": "d0f", "task": "classification", "class_names": ["a", "b"]},
    "teachers": [
        {
            "name": "cnn",
            "model": "resnet10",
            "params": 4_900_000,
            "history": HISTORY,
            "test_metrics": {"auc": 0.91, "acc": 0.8},
        }
    ],
    "ensemble": {"test_metrics": {"auc": 0.93, "acc": 0.82, "confusion_matrix": [[40, 10], [5, 45]]}},
    "search": {"objectives": [{"metric": "val_auc", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}]},
    "trials": [
        {
            "trial_id": "t1",
            "status": "completed",
            "final": True,
            "pareto": True,
            "metrics": {"val_auc": 0.9, "latency_ms": 0.21, "params": 5000},
            "config": {"student": "resnet_tiny", "width": 0.5, "quantize": "int8_static"},
        }
    ],
    "best": {
        "trial_id": "t1",
        "model_id": "m-1",
        "params": 5000,
        "latency_ms": 0.2134,
        "size_bytes": 12_345,
        "config": {"student": "resnet_tiny", "width": 0.5, "quantize": "int8_static"},
        "test_metrics": {"auc": 0.9, "acc": 0.79, "confusion_matrix": [[38, 12], [9, 41]]},
        "final_training": {"epochs": 10, "search_epochs": 5, "branches": 1, "search_val": {"auc": 0.88}},
        "val_metrics": {"auc": 0.9},
    },
    "serve": {"url": "http://127.0.0.1:8000/m-1", "demo": {"answer": "b"}},
    "stages": {"teachers": {"status": "ran", "seconds": 12.5}, "report": {"status": "ran", "seconds": 0.4}},
}


def headings(page: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", page)


def test_the_report_has_every_section_in_order_with_its_figures(tmp_path):
    path = write_report(RESULTS, tmp_path)
    assert path == tmp_path / REPORT_FILE
    page = path.read_text()
    assert headings(page) == [
        "Teachers vs student (test split)",
        "Search",
        "Teacher training",
        "Confusion matrices",
        "Served model",
        "Stages",
    ]
    assert page.count('src="data:image/png;base64,') == 4  # Pareto front, curves, two confusion matrices
    assert '<td class="num">0.9300</td>' in page  # the ensemble's test AUC, formatted
    assert '<td class="num">12,345</td>' in page  # the served model's size
    assert "trained again after the search for 10 epochs (search: 5); val auc 0.9000 (search 0.8800)" in page
    assert "endpoint http://127.0.0.1:8000/m-1; demo answer: b" in page


def test_text_from_results_is_escaped():
    page = render_report(RESULTS)
    assert "quick<script>" not in page and "quick&lt;script&gt;" in page


def test_sections_without_content_are_left_out():
    page = render_report({"job": "empty", "stages": {}})
    assert headings(page) == ["Teachers vs student (test split)", "Search", "Teacher training", "Stages"]
    assert "none" in page and "<img" not in page


def test_other_parts_add_sections_after_a_core_one(monkeypatch):
    def calibration(results):
        return ReportSection("Calibration", paragraphs=["T = 1.5"], tables=[ReportTable([{"bin": 1, "ece": 0.02}])])

    monkeypatch.setitem(EXTRA_SECTIONS, "served model", [*EXTRA_SECTIONS["served model"], calibration])
    page = render_report(RESULTS)
    names = headings(page)
    assert names.index("Calibration") == names.index("Served model") + 1
    assert "<p>T = 1.5</p>" in page and '<td class="num">0.0200</td>' in page


def test_the_template_is_package_data():
    assert (files("medkd.pipeline") / "templates" / "report.html.j2").is_file()
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "templates/*.j2" in config["tool"]["setuptools"]["package-data"]["medkd.pipeline"]


def test_a_failed_stage_shows_its_error_and_seconds_have_one_decimal():
    results = {
        "job": "j",
        "stages": {
            "teachers": {"status": "ran", "seconds": 516.25},
            "soft_labels": {"status": "failed", "seconds": 168.12, "error": "TypeError: x"},
        },
    }
    page = render_report(results)
    assert "<th>error</th>" in page and "<td>TypeError: x</td>" in page
    assert '<td class="num">516.2</td>' in page and '<td class="num">168.1</td>' in page


def test_counts_that_went_through_a_float_print_as_counts():
    page = render_report(
        {
            "job": "j",
            "stages": {},
            "selection": {
                "rule": "r",
                "chosen": "a",
                "candidates": [
                    {
                        "trial_id": "a",
                        "quality": 0.9,
                        "gap": 0.0,
                        "tied": False,
                        "decision_acc": 0.8,
                        "model_bytes": 595429.0,
                    }
                ],
            },
        }
    )
    assert '<td class="num">595,429</td>' in page


def test_the_served_instance_after_the_final_training_is_stated_with_both_val_figures():
    from medkd.registry.selection import final_rule

    judged = {
        "served": "search",
        "reason": "the final training is worse beyond the val noise: val AUC 0.9240 vs 0.9486 (gap 0.0246 > 1 SE 0.0170)",
        "rule": final_rule(),
        "search_quality": 0.9486,
        "final_quality": 0.9240,
        "quality_se": 0.0170,
        "search_decision_acc": 0.8974,
        "final_decision_acc": 0.8718,
        "decision_se": 0.0300,
    }
    results = {
        **RESULTS,
        "best": {**RESULTS["best"], "final_training": None},
        "final": {"epochs": 40, "branches": 4},
        "selection": {"chosen": "t1", "rule": "highest val_auc", "candidates": [], "final": judged},
    }
    page = render_report(results)
    assert (
        "Served instance: the search&#39;s instance of trial t1 (final training: 40 epochs, a weight soup of 4" in page
    )
    assert "Val AUC: final 0.9240, search 0.9486 (SE of the difference 0.0170)" in page
    assert "val accuracy at the operating point: final 0.8718, search 0.8974" in page
    assert "paired bootstrap of the val split" in page
    served = render_report({**results, "selection": {**results["selection"], "final": {**judged, "served": "final"}}})
    assert "Served instance: the final training (final training: 40 epochs" in served
