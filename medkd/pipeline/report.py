"""The HTML report (teachers vs students, Pareto front, curves, confusion matrices) and the
terminal results table. Plots are embedded as PNG data so the report is one portable file."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from medkd.pipeline.report_clinical import calibration_summary, operating_point_rows, selection_rows, selection_rule

REPORT_FILE = "report.html"


def _quality_keys(results: dict[str, Any]) -> list[str]:
    return ["dice"] if results.get("dataset", {}).get("task") == "segmentation" else ["auc", "acc"]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def comparison_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per teacher, the ensemble and the served student (test metrics)."""
    keys = _quality_keys(results)
    rows = []
    for teacher in results.get("teachers", []):
        test = teacher.get("test_metrics", {})
        rows.append({"model": teacher["name"], "kind": f"teacher ({teacher['model']})", "params": teacher["params"],
                     **{f"test_{k}": test.get(k) for k in keys}, "latency_ms": None, "size_bytes": None})
    if "ensemble" in results:
        test = results["ensemble"].get("test_metrics", {})
        rows.append({"model": "ensemble", "kind": f"{len(results.get('teachers', []))} teachers",
                     "params": sum(t["params"] for t in results.get("teachers", [])),
                     **{f"test_{k}": test.get(k) for k in keys}, "latency_ms": None, "size_bytes": None})
    best = results.get("best")
    if best:
        test = best.get("test_metrics", {})
        config = best.get("config", {})
        rows.append({"model": "student", "kind": f"{config.get('student')} w={_fmt(config.get('width'), 2)} {config.get('quantize')}",
                     "params": best["params"], **{f"test_{k}": test.get(k) for k in keys},
                     "latency_ms": best.get("latency_ms"), "size_bytes": best.get("size_bytes")})
    return rows


def print_results_table(results: dict[str, Any], progress: Any) -> None:
    rows = comparison_rows(results)
    if not rows:
        return
    columns = list(rows[0].keys())
    table = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    progress.line("results (test split):")
    progress.line("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in table:
        progress.line("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)))


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
    """Every trial with both metrics: completed ones solid (Pareto front red), ASHA-stopped ones faded
    at their last report, the served one ringed; axes in plain numbers (no offset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = results.get("search", {}).get("objectives", [])
    if not objectives:
        return None
    quality = next((o["metric"] for o in objectives if o["metric"].startswith("val_")), objectives[0]["metric"])
    cost = next((o["metric"] for o in objectives if o["metric"] in ("latency_ms", "model_bytes", "params")), "latency_ms")
    trials = [t for t in results.get("trials", []) if t.get("status") != "error"
              and isinstance(t["metrics"].get(quality), (int, float)) and isinstance(t["metrics"].get(cost), (int, float))]
    if not trials:
        return None
    selected = results.get("best", {}).get("trial_id")
    largest = max(1, max(t["metrics"].get("params", 1) or 1 for t in trials))
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
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
    stopped = sum(1 for t in trials if not t.get("final"))
    axis.set_xlabel(f"{cost} (compressed ONNX, batch 1, CPU)")
    axis.set_ylabel(f"{quality} (compressed model; stopped trials: last report)")
    axis.set_title(f"Search: {len(trials)} trials ({stopped} stopped early, faded); Pareto front red, served ringed",
                   fontsize=9)
    axis.grid(alpha=0.3)
    return figure


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
            axis.text(j, i, f"{int(values[i, j])}", ha="center", va="center",
                      color="white" if values[i, j] > values.max() / 2 else "black", fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title, fontsize=9)
    return _figure_to_data_uri(figure)


# ---------------------------------------------------------------------------- html


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    columns = list(rows[0].keys())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(uri: str | None, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{uri}">' if uri else ""


def write_report(results: dict[str, Any], output_dir: Path) -> Path:
    """Write ``report.html`` from the results dict; returns its path."""
    class_names = results.get("dataset", {}).get("class_names", [])
    sections = [f"<h1>medkd report — {html.escape(str(results.get('job')))}</h1>"]
    dataset = results.get("dataset", {})
    sections.append(f"<p>dataset <b>{html.escape(str(dataset.get('name')))}</b> "
                    f"(fingerprint {html.escape(str(dataset.get('fingerprint')))}), task {html.escape(str(dataset.get('task')))}, "
                    f"classes {html.escape(', '.join(map(str, class_names)))}</p>")
    sections.append("<h2>Teachers vs student (test split)</h2>" + _table(comparison_rows(results)))
    sections.append("<h2>Search</h2>" + _img(pareto_plot(results), "Pareto front"))
    if results.get("selection"):
        sections.append(f"<p>{selection_rule(results)}</p>" + _table(selection_rows(results)))
    trial_rows = []
    for trial in results.get("trials", []):
        m, c = trial["metrics"], trial["config"]
        trial_rows.append({"trial": trial["trial_id"], "status": trial["status"], "pareto": "★" if trial.get("pareto") else "",
                           "student": c.get("student"), "width": c.get("width"), "T": c.get("temperature"),
                           "alpha": c.get("alpha"), "aggregation": c.get("aggregation"), "prune": c.get("prune"),
                           "quantize": c.get("quantize"),
                           **{k: m.get(k) for k in ("val_auc", "val_dice", "latency_ms", "params", "model_bytes") if k in m}})
    sections.append(_table(trial_rows))
    sections.append("<h2>Teacher training</h2>" + _img(curves_plot(results), "training curves"))
    plots = []
    best = results.get("best") or {}
    if best.get("test_metrics", {}).get("confusion_matrix"):
        plots.append(_img(confusion_plot(best["test_metrics"]["confusion_matrix"], class_names, "student (served), test"), "student confusion"))
    ensemble = results.get("ensemble", {}).get("test_metrics", {})
    if ensemble.get("confusion_matrix"):
        plots.append(_img(confusion_plot(ensemble["confusion_matrix"], class_names, "teacher ensemble, test"), "ensemble confusion"))
    if plots:
        sections.append("<h2>Confusion matrices</h2>" + "".join(plots))
    if best:
        sections.append("<h2>Served model</h2>" + _table([{"model_id": best.get("model_id"), "onnx": best.get("onnx_path"),
                                                            "parity max|diff|": best.get("parity", {}).get("max_abs_diff"),
                                                            "size_bytes": best.get("size_bytes"), "fp32_bytes": best.get("fp32_bytes"),
                                                            "latency_ms": best.get("latency_ms")}]))
        final = best.get("final_training")
        if final:
            sections.append(
                f"<p>trained again after the search for {final['epochs']} epochs (search: {final['search_epochs']})"
                + (f", a weight soup of {final['branches']} branches" if final.get("branches", 1) > 1 else "") + "; "
                "val " + html.escape(", ".join(f"{k} {_fmt(v)} (search {_fmt(final['search_val'].get(k))})"
                                               for k, v in best.get("val_metrics", {}).items())) + "</p>")
    if best.get("calibration") or best.get("operating_points"):
        sections.append("<h2>Calibration and operating points</h2>" + f"<p>{calibration_summary(results)}</p>"
                        + "<h3>Operating points (chosen on val)</h3>" + _table(operating_point_rows(results)))
    serve = results.get("serve", {})
    if serve.get("url"):
        sections.append(f"<p>endpoint {html.escape(serve['url'])}; demo answer: <code>{html.escape(str(serve.get('demo', {}).get('answer')))}</code></p>")
    stage_rows = [{"stage": name, **info} for name, info in results.get("stages", {}).items()]
    sections.append("<h2>Stages</h2>" + _table(stage_rows))
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}th{background:#f3f3f3}"
             "img{margin:0.5em;vertical-align:top}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>medkd report</title><style>{style}</style></head><body>{''.join(sections)}</body></html>"
    path = Path(output_dir) / REPORT_FILE
    path.write_text(page)
    return path
