"""The HTML report and the terminal results table.

Why one module: the section builders each render one part of the one page and share its figure
helpers; sections owned by other concerns already live beside it (``report_clinical.py``) and
plug in through :data:`EXTRA_SECTIONS`.

The report (``report.html``, one portable file: plots are embedded as PNG data) is rendered by
Jinja2 from ``templates/report.html.j2``: a header (job, dataset) and a list of
:class:`ReportSection` -- teachers vs student, the search (Pareto front, trials), teacher training
curves, confusion matrices, the served model, the stages. Other parts of medkd add sections by
appending a builder (``results -> ReportSection | None``) to :data:`EXTRA_SECTIONS` under the
core section they follow (e.g. calibration and operating points after ``"served model"``).

Examples:
    >>> page = render_report({"job": "demo", "dataset": {"name": "synthetic", "task": "classification"}})
    >>> "<h1>medkd report — demo</h1>" in page
    True
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from medkd.pipeline.report_clinical import calibration_summary, operating_point_rows, selection_rows, selection_rule

REPORT_FILE = "report.html"


def _quality_keys(results: dict[str, Any]) -> list[str]:
    return ["dice"] if results.get("dataset", {}).get("task") == "segmentation" else ["auc", "acc"]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 10_000:
        value = int(value)  # a byte or parameter count that went through a float
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def comparison_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per teacher, the ensemble and the served student (test metrics)."""
    keys = _quality_keys(results)
    rows = []
    for teacher in results.get("teachers", []):
        test = teacher.get("test_metrics", {})
        rows.append(
            {
                "model": teacher["name"],
                "kind": f"teacher ({teacher['model']})",
                "params": teacher["params"],
                **{f"test_{k}": test.get(k) for k in keys},
                "latency_ms": None,
                "size_bytes": None,
            }
        )
    if "ensemble" in results:
        test = results["ensemble"].get("test_metrics", {})
        rows.append(
            {
                "model": "ensemble",
                "kind": _count(len(results.get("teachers", [])), "teacher"),
                "params": sum(t["params"] for t in results.get("teachers", [])),
                **{f"test_{k}": test.get(k) for k in keys},
                "latency_ms": None,
                "size_bytes": None,
            }
        )
    best = results.get("best")
    if best:
        test = best.get("test_metrics", {})
        config = best.get("config", {})
        kind = f"{config.get('student')} w={_fmt(config.get('width'), 2)} {config.get('quantize')}"
        rows.append(
            {
                "model": "student",
                "kind": kind,
                "params": best["params"],
                **{f"test_{k}": test.get(k) for k in keys},
                "latency_ms": best.get("latency_ms"),
                "size_bytes": best.get("size_bytes"),
            }
        )
    return rows


def print_results_table(results: dict[str, Any], progress: Any) -> None:
    rows = comparison_rows(results)
    if not rows:
        return
    columns = list(rows[0].keys())
    table = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    progress.line("results (test split):")
    progress.line("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in table:
        progress.line("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


# ---------------------------------------------------------------------------- plots


def _figure_to_data_uri(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pareto_plot(results: dict[str, Any]) -> str | None:
    """The search's trials as a PNG data URI (see :func:`pareto_figure`), or None without trials."""
    figure = pareto_figure(results)
    return None if figure is None else _figure_to_data_uri(figure)


def pareto_figure(results: dict[str, Any]) -> Any:
    """Every trial with its metrics: completed ones solid (Pareto front red), ASHA-stopped ones faded
    at their last report, the served one ringed; axes in plain numbers (no offset). One panel per
    quality objective against the cost (by default val AUC and the decision metric, val accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = results.get("search", {}).get("objectives", [])
    if not objectives:
        return None
    qualities = [o["metric"] for o in objectives if o["metric"].startswith("val_")][:2] or [objectives[0]["metric"]]
    cost = next(
        (o["metric"] for o in objectives if o["metric"] in ("latency_ms", "model_bytes", "params")), "latency_ms"
    )
    trials = [
        t
        for t in results.get("trials", [])
        if t.get("status") != "error"
        and isinstance(t["metrics"].get(qualities[0]), (int, float))
        and isinstance(t["metrics"].get(cost), (int, float))
    ]
    if not trials:
        return None
    figure, axes = plt.subplots(1, len(qualities), figsize=(6.5 * len(qualities), 4.2), squeeze=False)
    for axis, quality in zip(axes[0], qualities):
        _pareto_panel(
            axis, results, [t for t in trials if isinstance(t["metrics"].get(quality), (int, float))], quality, cost
        )
    stopped = sum(1 for t in trials if not t.get("final"))
    figure.suptitle(
        f"Search: {_count(len(trials), 'trial')} ({stopped} stopped early, faded); Pareto front red (over "
        + ", ".join(o["metric"] for o in objectives)
        + "), served ringed",
        fontsize=9,
    )
    figure.tight_layout()
    return figure


def _pareto_panel(axis: Any, results: dict[str, Any], trials: list[dict[str, Any]], quality: str, cost: str) -> None:
    selected = results.get("best", {}).get("trial_id")
    largest = max(1, max(t["metrics"].get("params", 1) or 1 for t in trials))
    for trial in trials:
        metrics = trial["metrics"]
        size = 20 + 200 * ((metrics.get("params") or 0) / largest)
        x, y = metrics[cost], metrics[quality]
        if trial.get("final"):
            colour = "tab:red" if trial.get("pareto") else "tab:gray"
            axis.scatter(x, y, s=size, c=colour, alpha=0.8, edgecolors="k", linewidths=0.5)
        else:
            axis.scatter(x, y, s=size, c="tab:gray", alpha=0.25, edgecolors="none")
        if trial["trial_id"] == selected:
            axis.scatter(x, y, s=size * 2.2, facecolors="none", edgecolors="tab:blue", linewidths=2)
    front = sorted((t for t in trials if t.get("pareto")), key=lambda t: t["metrics"][cost])
    if len(front) > 1:
        axis.plot([t["metrics"][cost] for t in front], [t["metrics"][quality] for t in front], "r--", lw=1)
    _readable_axis(axis, [t["metrics"][quality] for t in trials], "y")
    _readable_axis(axis, [t["metrics"][cost] for t in trials], "x")
    axis.set_xlabel(f"{cost} (compressed ONNX, batch 1, CPU)")
    axis.set_ylabel(f"{quality} (compressed model; stopped trials: last report)")
    axis.set_title(f"{quality} vs {cost}", fontsize=9)
    axis.grid(alpha=0.3)


MIN_AXIS_SPAN = {"y": 0.01, "x": 0.0}  # quality axes span at least 0.01 so 1e-4 differences are not blown up


def _readable_axis(axis: Any, values: list[float], which: str) -> None:
    """Plain tick labels (no ``1e-5`` offset) and, for the quality axis, a span of at least 0.01."""
    axis.ticklabel_format(axis=which, style="plain", useOffset=False)
    low, high = min(values), max(values)
    span = max(high - low, MIN_AXIS_SPAN[which])
    if span > 0 and which == "y":
        middle, pad = (low + high) / 2, span * 0.6
        axis.set_ylim(middle - pad, middle + pad)


def curves_plot(results: dict[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    teachers = [t for t in results.get("teachers", []) if t.get("history")]
    if not teachers:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for teacher in teachers:
        history = teacher["history"]
        epochs = [h["epoch"] for h in history]
        metric = next((k for k in history[0] if k.startswith("val_") and k != "val_acc"), None)
        axes[0].plot(epochs, [h.get("train_loss") for h in history], marker="o", label=teacher["name"])
        if metric:
            axes[1].plot(epochs, [h.get(metric) for h in history], marker="o", label=f"{teacher['name']} {metric}")
    axes[0].set_title("teacher training loss")
    axes[1].set_title("teacher validation metric")
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return _figure_to_data_uri(figure)


def confusion_plot(matrix: list[list[int]], class_names: list[str], title: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(matrix, dtype=float)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        return None
    figure, axis = plt.subplots(figsize=(3.6, 3.2))
    axis.imshow(values, cmap="Blues")
    names = class_names if len(class_names) == len(values) else [str(i) for i in range(len(values))]
    axis.set_xticks(range(len(values)), names, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(values)), names, fontsize=8)
    for i in range(len(values)):
        for j in range(len(values)):
            axis.text(
                j,
                i,
                f"{int(values[i, j])}",
                ha="center",
                va="center",
                color="white" if values[i, j] > values.max() / 2 else "black",
                fontsize=8,
            )
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title, fontsize=9)
    return _figure_to_data_uri(figure)


# ---------------------------------------------------------------------------- html


@dataclass
class ReportTable:
    """A table of ``rows`` (dicts; every key of any row is a column, in order of appearance).

    Numbers are formatted by the report (4 decimals, or ``digits[column]``), a missing value is "–".
    """

    rows: list[dict[str, Any]]
    caption: str | None = None
    digits: dict[str, int] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(key for row in self.rows for key in row))

    @property
    def cells(self) -> list[list[tuple[str, bool]]]:
        """Per row, per column: the formatted value and whether it is a number (right-aligned)."""
        return [
            [(_fmt(row.get(c), self.digits.get(c, 4)), isinstance(row.get(c), (int, float))) for c in self.columns]
            for row in self.rows
        ]


@dataclass
class ReportImage:
    """An embedded plot: a ``data:image/png;base64,...`` URI and its alt text."""

    uri: str
    alt: str


@dataclass
class ReportSection:
    """One section of the report: a heading, then paragraphs, images, tables and notes, in that order.

    Paragraphs and notes are text (escaped by the template); pass a ``markupsafe.Markup`` for
    HTML that is already escaped.

    Examples:
        >>> ReportSection("Stages", tables=[ReportTable([{"stage": "teachers", "seconds": 1.5}])]).anchor
        'stages'
    """

    title: str
    paragraphs: list[str] = field(default_factory=list)
    images: list[ReportImage] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    level: int = 2

    @property
    def anchor(self) -> str:
        return "-".join("".join(c if c.isalnum() else " " for c in self.title.lower()).split())


SectionBuilder = Callable[[dict[str, Any]], "ReportSection | None"]


def _images(*pairs: tuple[str | None, str]) -> list[ReportImage]:
    return [ReportImage(uri, alt) for uri, alt in pairs if uri]


def comparison_section(results: dict[str, Any]) -> ReportSection:
    """Teachers, their ensemble and the served student on the test split."""
    return ReportSection("Teachers vs student (test split)", tables=[ReportTable(comparison_rows(results))])


def trial_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per search trial: status, Pareto membership, configuration and its metrics."""
    rows = []
    for trial in results.get("trials", []):
        m, c = trial["metrics"], trial["config"]
        rows.append(
            {
                "trial": trial["trial_id"],
                "status": trial["status"],
                "pareto": "★" if trial.get("pareto") else "",
                "student": c.get("student"),
                "width": c.get("width"),
                "T": c.get("temperature"),
                "alpha": c.get("alpha"),
                "aggregation": c.get("aggregation"),
                "prune": c.get("prune"),
                "quantize": c.get("quantize"),
                **{
                    k: m.get(k)
                    for k in ("val_auc", "val_acc", "val_dice", "latency_ms", "params", "model_bytes")
                    if k in m
                },
            }
        )
    return rows


def search_section(results: dict[str, Any]) -> ReportSection:
    """The Pareto plot of the search and a table of its trials."""
    return ReportSection(
        "Search",
        images=_images((pareto_plot(results), "Pareto front")),
        tables=[ReportTable(trial_rows(results), caption="trials")],
    )


def training_section(results: dict[str, Any]) -> ReportSection:
    """The teachers' training loss and validation metric per epoch."""
    return ReportSection("Teacher training", images=_images((curves_plot(results), "training curves")))


def confusion_section(results: dict[str, Any]) -> ReportSection | None:
    """Test confusion matrices of the served student and of the teacher ensemble (classification)."""
    class_names = results.get("dataset", {}).get("class_names", [])
    best = results.get("best") or {}
    student = (best.get("test_metrics") or {}).get("confusion_matrix")
    ensemble = (results.get("ensemble", {}).get("test_metrics") or {}).get("confusion_matrix")
    images = _images(
        (confusion_plot(student, class_names, "student (served), test") if student else None, "student confusion"),
        (confusion_plot(ensemble, class_names, "teacher ensemble, test") if ensemble else None, "ensemble confusion"),
    )
    return ReportSection("Confusion matrices", images=images) if images else None


def final_decision_note(results: dict[str, Any], judged: dict[str, Any]) -> str:
    """Which instance of the selected configuration is served after the final training, why, with both val figures."""
    final = results.get("final") or {}
    trial = (results.get("selection") or {}).get("chosen", "?")
    instance = "the final training" if judged["served"] == "final" else f"the search's instance of trial {trial}"
    trained = (
        f"final training: {final.get('epochs')} epochs"
        + (f", a weight soup of {final['branches']} branches" if final.get("branches", 1) > 1 else "")
        if final
        else "final training"
    )
    figures = ""
    if judged.get("final_quality") is not None and judged.get("search_decision_acc") is not None:
        figures = (
            f" Val AUC: final {_fmt(judged['final_quality'])}, search {_fmt(judged['search_quality'])} "
            f"(SE of the difference {_fmt(judged['quality_se'])}); val accuracy at the operating point: "
            f"final {_fmt(judged['final_decision_acc'])}, search {_fmt(judged['search_decision_acc'])} "
            f"(SE {_fmt(judged['decision_se'])})."
        )
    reason = judged["reason"][:1].upper() + judged["reason"][1:]
    return f"Served instance: {instance} ({trained}). {reason}.{figures} Rule: {judged['rule']}."


def served_section(results: dict[str, Any]) -> ReportSection | None:
    """The served model: its ONNX file, parity, size and latency, how it was trained, the endpoint."""
    best = results.get("best") or {}
    if not best:
        return None
    section = ReportSection(
        "Served model",
        tables=[
            ReportTable(
                [
                    {
                        "model_id": best.get("model_id"),
                        "onnx": best.get("onnx_path"),
                        "parity max|diff|": (best.get("parity") or {}).get("max_abs_diff"),
                        "size_bytes": best.get("size_bytes"),
                        "fp32_bytes": best.get("fp32_bytes"),
                        "latency_ms": best.get("latency_ms"),
                    }
                ]
            )
        ],
    )
    final = best.get("final_training")
    if final:
        section.notes.append(
            f"trained again after the search for {final['epochs']} epochs (search: {final['search_epochs']})"
            + (f", a weight soup of {final['branches']} branches" if final.get("branches", 1) > 1 else "")
            + (f", from a fresh seed ({final['seed']})" if final.get("seed") is not None else "")
            + "; val "
            + ", ".join(
                f"{k} {_fmt(v)} (search {_fmt(final['search_val'].get(k))})"
                for k, v in best.get("val_metrics", {}).items()
            )
        )
    judged = (results.get("selection") or {}).get("final")
    if judged:
        section.notes.append(final_decision_note(results, judged))
    serve = results.get("serve", {})
    if serve.get("url"):
        section.notes.append(f"endpoint {serve['url']}; demo answer: {serve.get('demo', {}).get('answer')}")
    return section


def stages_section(results: dict[str, Any]) -> ReportSection:
    """What each pipeline stage did (ran / skipped / failed) and how long it took."""
    rows = [{"stage": name, **info} for name, info in results.get("stages", {}).items()]
    return ReportSection("Stages", tables=[ReportTable(rows, digits={"seconds": 1})])


#: The report's sections in order, by name; each builder may return None (nothing to show).
CORE_SECTIONS: dict[str, SectionBuilder] = {
    "comparison": comparison_section,
    "search": search_section,
    "training": training_section,
    "confusion": confusion_section,
    "served model": served_section,
    "stages": stages_section,
}


def selection_section(results: dict[str, Any]) -> ReportSection | None:
    """How the served trial was chosen: the rule and every candidate (:mod:`.report_clinical`)."""
    if not results.get("selection"):
        return None
    return ReportSection(
        "Selection of the served trial",
        level=3,
        paragraphs=[Markup(selection_rule(results))],
        tables=[ReportTable(selection_rows(results))],
    )


def calibration_section(results: dict[str, Any]) -> ReportSection | None:
    """The served model's calibration and its operating points chosen on val (:mod:`.report_clinical`)."""
    best = results.get("best") or {}
    if not (best.get("calibration") or best.get("operating_points")):
        return None
    summary = calibration_summary(results)
    points = ReportTable(operating_point_rows(results), caption="Operating points (chosen on val)")
    return ReportSection(
        "Calibration and operating points", paragraphs=[Markup(summary)] if summary else [], tables=[points]
    )


def contribution_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per teacher: the ensemble's val metrics without it, what it adds (leave-one-out), and whether
    the students learn from it (``no (val rule)``: dropped by ``search.teacher_selection``; ``no (distill:
    false)``: by the spec); with the rule on, the paired-bootstrap SEs of its first decision."""
    ensemble = results.get("ensemble") or {}
    table = ensemble.get("leave_one_out") or {}
    distilled = ensemble.get("distilled")
    choice = ensemble.get("teacher_selection") or {}
    first_step = {c["teacher"]: c for c in (choice.get("steps") or [{}])[0].get("candidates", [])}
    rows = []
    for name, entry in (table.get("teachers") or {}).items():
        without, gain = entry.get("without") or {}, entry.get("contribution") or {}
        if distilled is None or name in distilled:
            learned_from = "yes"
        elif name in (choice.get("dropped") or []):
            learned_from = "no (val rule)"
        else:
            learned_from = "no (distill: false)"
        row = {
            "teacher": name,
            "distilled": learned_from,
            "val_auc_without": without.get("auc"),
            "auc_gain": gain.get("auc"),
            "val_acc_without": without.get("acc"),
            "acc_gain": gain.get("acc"),
        }
        if choice.get("mode") == "val_contribution":
            scored = first_step.get(name) or {}
            row["decision_acc_se"] = scored.get("acc_se")
            row["auc_se"] = scored.get("auc_se")
        rows.append(row)
    return rows


def contribution_section(results: dict[str, Any]) -> ReportSection | None:
    """Each teacher's contribution to the ensemble on val, which ones the students learn from, and the rule."""
    rows = contribution_rows(results)
    if not rows:
        return None
    everyone = results["ensemble"]["leave_one_out"]["all"]
    paragraph = (
        f"The equal-weight ensemble of all {len(rows)} teachers reaches val AUC {_fmt(everyone['auc'])} and "
        f"val accuracy {_fmt(everyone['acc'])}. A gain is the ensemble's metric minus the metric without "
        "that teacher; a teacher with a negative gain hurts the ensemble on val."
    )
    paragraphs = [paragraph]
    choice = results["ensemble"].get("teacher_selection")
    if choice:
        dropped = ", ".join(choice.get("dropped") or []) or "none"
        paragraphs.append(
            f"Teacher selection (search.teacher_selection) — {choice['rule']}. Dropped on val: {dropped}; "
            f"students learn from: {', '.join(choice.get('kept') or [])}."
        )
        paragraphs += [
            f"Step {i + 1} ({', '.join(step['teachers'])}: val AUC {_fmt(step['val_auc'])}, decision accuracy "
            f"{_fmt(step['val_acc'])}): {step['reason']}."
            for i, step in enumerate(choice.get("steps") or [])
        ]
    else:
        paragraphs.append(
            "A teacher can be left out of the students' soft labels with teachers[i].distill: false or "
            "search.teacher_selection: val_contribution (nothing is retrained)."
        )
    return ReportSection(
        "Teacher contributions (val, leave-one-out)", level=3, paragraphs=paragraphs, tables=[ReportTable(rows)]
    )


#: Sections other parts of medkd add, by the core section they follow; a builder returns a
#: :class:`ReportSection`, or None when the results have nothing for it.
EXTRA_SECTIONS: dict[str, list[SectionBuilder]] = {name: [] for name in CORE_SECTIONS}
EXTRA_SECTIONS["comparison"].append(contribution_section)
EXTRA_SECTIONS["search"].append(selection_section)
EXTRA_SECTIONS["served model"].append(calibration_section)


def report_sections(results: dict[str, Any]) -> list[ReportSection]:
    """Every section with something to show, core ones each followed by their extras."""
    sections = []
    for name, builder in CORE_SECTIONS.items():
        for build in (builder, *EXTRA_SECTIONS.get(name, ())):
            section = build(results)
            if section is not None:
                sections.append(section)
    return sections


_environment = Environment(
    loader=PackageLoader("medkd.pipeline", "templates"),
    autoescape=select_autoescape(["html", "j2"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render_report(results: dict[str, Any], sections: list[ReportSection] | None = None) -> str:
    """The report page for ``results`` (the ``results.json`` dict).

    Args:
        results: the pipeline's results.
        sections: the sections to show; default :func:`report_sections` of ``results``.

    Examples:
        >>> "Stages" in render_report({"job": "j", "stages": {"teachers": {"status": "ran", "seconds": 2.0}}})
        True
    """
    dataset = results.get("dataset", {})
    return _environment.get_template("report.html.j2").render(
        job=str(results.get("job")),
        job_fingerprint=results.get("job_fingerprint"),
        dataset={key: dataset.get(key) for key in ("name", "fingerprint", "task")},
        class_names=[str(name) for name in dataset.get("class_names", [])],
        sections=report_sections(results) if sections is None else sections,
    )


def write_report(results: dict[str, Any], output_dir: Path) -> Path:
    """Write ``report.html`` from the results dict into ``output_dir``; returns its path.

    Examples:
        >>> write_report(json.loads((run_dir / "results.json").read_text()), run_dir)  # doctest: +SKIP
        PosixPath('runs/quickstart/report.html')
    """
    path = Path(output_dir) / REPORT_FILE
    path.write_text(render_report(results))
    return path
