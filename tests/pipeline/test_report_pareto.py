"""The report's Pareto plot shows every trial (stopped ones faded) on readable axes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from medkd.pipeline.report import pareto_figure, pareto_plot  # noqa: E402


def trial(trial_id: str, auc: float, latency: float, *, final: bool, pareto: bool = False) -> dict:
    return {
        "trial_id": trial_id,
        "status": "completed" if final else "stopped early",
        "final": final,
        "pareto": pareto,
        "metrics": {"val_auc": auc, "val_acc": auc - 0.05, "latency_ms": latency, "params": 50_000},
        "config": {},
    }


RESULTS = {
    "search": {"objectives": [{"metric": "val_auc", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}]},
    "trials": [trial("a", 0.91230, 0.21, final=True, pareto=True), trial("b", 0.91240, 0.25, final=True, pareto=True)]
    + [trial(f"s{i}", 0.85 + i / 100, 0.1 + i / 50, final=False) for i in range(7)]
    + [{"trial_id": "e", "status": "error", "final": False, "metrics": {}, "config": {}}],
    "best": {"trial_id": "b"},
}


def test_every_trial_is_drawn_and_stopped_ones_are_faded():
    figure = pareto_figure(RESULTS)
    axis = figure.axes[0]
    points = [c for c in axis.collections if len(c.get_offsets()) == 1]
    faded = [c for c in points if c.get_alpha() is not None and c.get_alpha() < 0.5]
    assert len(faded) == 7
    assert len(points) == 9 + 1  # nine trials and the served model's ring
    assert "9 trials (7 stopped early" in figure.get_suptitle()
    plt.close(figure)


def test_axes_have_no_offset_and_a_readable_quality_span():
    tight = {**RESULTS, "trials": RESULTS["trials"][:2]}  # two trials 0.0001 AUC apart
    figure = pareto_figure(tight)
    axis = figure.axes[0]
    figure.canvas.draw()
    assert axis.yaxis.get_offset_text().get_text() == ""
    assert axis.xaxis.get_offset_text().get_text() == ""
    low, high = axis.get_ylim()
    assert high - low >= 0.01
    plt.close(figure)


def test_no_trials_no_plot():
    assert pareto_plot({"search": RESULTS["search"], "trials": []}) is None
    assert pareto_plot({"trials": RESULTS["trials"]}) is None
    assert pareto_plot(RESULTS).startswith("data:image/png;base64,")


def test_the_decision_metric_gets_its_own_panel_with_every_trial():
    three = {
        **RESULTS,
        "search": {
            "objectives": [
                {"metric": "val_auc", "mode": "max"},
                {"metric": "val_acc", "mode": "max"},
                {"metric": "latency_ms", "mode": "min"},
            ]
        },
    }
    figure = pareto_figure(three)
    assert [axis.get_ylabel().split()[0] for axis in figure.axes] == ["val_auc", "val_acc"]
    for axis in figure.axes:
        points = [c for c in axis.collections if len(c.get_offsets()) == 1]
        assert len(points) == 9 + 1  # every trial and the served ring, in each panel
        assert len([c for c in points if c.get_alpha() is not None and c.get_alpha() < 0.5]) == 7
        assert axis.get_xlabel().startswith("latency_ms")
    figure.canvas.draw()
    assert all(axis.yaxis.get_offset_text().get_text() == "" for axis in figure.axes)
    assert "over val_auc, val_acc, latency_ms" in figure.get_suptitle()
    plt.close(figure)
