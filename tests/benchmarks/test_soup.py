"""benchmarks.soup: its variants, summary and argument errors (the trainings run in the benchmark)."""

from __future__ import annotations

import pytest

from benchmarks.soup import parse_args, result_line, summarise, variants


def test_variants_are_one_run_then_one_soup_per_fork():
    assert variants(4, [0.25, 0.5]) == {
        "single": {"branches": 1},
        "soup4@0.25": {"branches": 4, "fork_fraction": 0.25},
        "soup4@0.5": {"branches": 4, "fork_fraction": 0.5},
    }


def test_summary_and_result_line():
    single = [{"val_auc": 0.9, "test_auc": 0.8, "test_acc": 0.7}, {"val_auc": 0.8, "test_auc": 0.9, "test_acc": 0.9}]
    soup = [{"val_auc": 0.95, "test_auc": 0.92, "test_acc": 0.8}, {"val_auc": 0.95, "test_auc": 0.92, "test_acc": 0.8}]
    summary = {"single": summarise(single), "soup4@0.25": summarise(soup)}
    assert summary["single"]["test_auc"] == pytest.approx(0.85) and summary["single"]["min_test_auc"] == 0.8
    assert summary["single"]["test_auc_std"] == pytest.approx(0.0707, abs=1e-4)
    assert summary["soup4@0.25"]["test_auc_std"] == 0.0
    line = result_line(summary, "soup4@0.25")
    assert line.startswith("RESULT single_val_auc=0.8500 single_test_auc=0.8500 ")
    assert "soup_test_auc=0.9200 soup_test_auc_std=0.0000 soup_min_test_auc=0.9200" in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--branches", "1"], "--branches must be >= 2"),
        (["--forks", "1.0"], "--forks must be in (0, 1)"),
        (["--seeds", "0"], "--seeds needs at least two seeds"),
    ],
)
def test_bad_arguments_name_the_flag(tmp_path, capsys, extra, message):
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "redis").mkdir()
    with pytest.raises(SystemExit):
        parse_args(["--run", str(tmp_path), *extra])
    assert message in capsys.readouterr().err


def test_a_folder_that_is_not_a_benchmark_run_names_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--run", str(tmp_path)])
    assert f"--run {tmp_path}: no results.json and redis/" in capsys.readouterr().err


def test_data_of_another_run_is_refused_before_anything_starts(tmp_path):
    import json

    import numpy as np

    from benchmarks.soup import main

    arrays = {}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = np.zeros((n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    run = tmp_path / "run"
    (run / "redis").mkdir(parents=True)
    (run / "results.json").write_text(
        json.dumps({"best": {"config": {"student": "resnet_tiny"}}, "dataset": {"fingerprint": "another"}})
    )
    with pytest.raises(SystemExit, match=r"--data .*breastmnist.npz is not the data of --run .*run"):
        main(["--run", str(run), "--data", str(tmp_path / "breastmnist.npz")])
    assert not (run / "redis" / "medkd-redis.conf").exists()  # no redis-server was started
