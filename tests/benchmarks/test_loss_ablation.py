"""benchmarks.loss_ablation: its variants, summary, RESULT line and argument errors (the trainings run
in the benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks._student_setup import served_config
from benchmarks.loss_ablation import best_by_val, parse_args, result_line, reusable_runs, summarise, variants
from medkd.students.distill import DistillConfig


def test_variants_add_standardization_only_where_it_means_something():
    binary = variants(["hinton_kd", "dkd", "dist"], num_classes=2, standardization="auto")
    assert list(binary) == ["ce", "hinton_kd", "dkd", "dist"]
    assert binary["ce"]["alpha"] == 1.0 and binary["dkd"] == {"loss": "dkd", "logit_standardization": False}
    blood = variants(["hinton_kd", "dkd"], num_classes=8, standardization="auto")
    assert list(blood) == ["ce", "hinton_kd", "dkd", "hinton_kd+ls", "dkd+ls"]
    assert blood["dkd+ls"] == {"loss": "dkd", "logit_standardization": True}
    assert list(variants(["dist"], num_classes=8, standardization="off")) == ["ce", "dist"]
    orientation = variants(
        ["hinton_kd", "dkd", "dist"], num_classes=8, standardization="auto", standardized=["hinton_kd"]
    )
    assert list(orientation) == ["ce", "hinton_kd", "dkd", "dist", "hinton_kd+ls"]
    with pytest.raises(ValueError, match="--standardization on: .*at least 3 classes, this set has 2"):
        variants(["dkd"], num_classes=2, standardization="on")


def test_summary_result_line_and_choice_by_val():
    runs = {
        "ce": [
            {"val_auc": 0.80, "val_acc": 0.90, "test_auc": 0.85, "test_acc": 0.80},
            {"val_auc": 0.82, "val_acc": 0.90, "test_auc": 0.87, "test_acc": 0.84},
        ],
        "dkd+ls": [
            {"val_auc": 0.90, "val_acc": 0.80, "test_auc": 0.84, "test_acc": 0.82},
            {"val_auc": 0.90, "val_acc": 0.82, "test_auc": 0.86, "test_acc": 0.82},
        ],
    }
    summary = {name: summarise(r) for name, r in runs.items()}
    assert summary["ce"]["test_acc"] == pytest.approx(0.82) and summary["dkd+ls"]["val_auc_std"] == 0.0
    assert best_by_val(summary) == "dkd+ls"  # by val, even though its test AUC is lower
    assert best_by_val(summary, "val_acc") == "ce"
    line = result_line("bloodmnist", summary)
    assert line == (
        "RESULT dataset=bloodmnist ce_test_auc=0.8600 ce_test_acc=0.8200 dkd_ls_test_auc=0.8500 "
        "dkd_ls_test_acc=0.8200 best_by_val=dkd+ls best_by_val_acc=ce"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--losses", "fitnet"], "--losses: unknown ['fitnet']"),
        (["--losses", "dkd", "dkd"], "--losses: each loss once"),
        (["--standardization", "maybe"], "--standardization must be auto, on or off"),
        (["--losses", "dkd", "--ls-losses", "dist"], "--ls-losses: choose among --losses ['dkd']"),
        (["--seeds", "1", "1"], "--seeds: each seed once"),
        (["--epochs", "0"], "--epochs must be >= 1"),
    ],
)
def test_bad_arguments_name_the_flag(tmp_path, capsys, extra, message):
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "redis").mkdir()
    data = tmp_path / "bloodmnist.npz"
    data.write_bytes(b"")
    with pytest.raises(SystemExit):
        parse_args(["--run", str(tmp_path), "--data", str(data), *extra])
    assert message in capsys.readouterr().err


def test_missing_data_and_a_folder_that_is_not_a_run_name_the_flag(tmp_path, capsys):
    data = tmp_path / "breastmnist.npz"
    with pytest.raises(SystemExit):
        parse_args(["--run", str(tmp_path), "--data", str(data)])
    assert f"--data {data}: no such file" in capsys.readouterr().err
    data.write_bytes(b"")
    with pytest.raises(SystemExit):
        parse_args(["--run", str(tmp_path), "--data", str(data)])
    assert f"--run {tmp_path}: no results.json and redis/" in capsys.readouterr().err


def test_kd_accuracy_study_compares_on_val_only():
    from benchmarks.loss_ablation import accuracy_variants, val_markdown, val_result_line

    assert accuracy_variants(0.7) == {
        "kd": {},
        "kd_calibrated": {"calibrate_teachers": True},
        "alpha_0.70": {"alpha": 0.7},
    }
    assert accuracy_variants(0.8, with_ce=True)["ce"] == {"alpha": 1.0}
    runs = {
        "kd": [{"val_auc": 0.93, "val_acc": 0.86}, {"val_auc": 0.95, "val_acc": 0.84}],
        "alpha_0.70": [{"val_auc": 0.92, "val_acc": 0.88}, {"val_auc": 0.92, "val_acc": 0.88}],
    }
    summary = {name: summarise(r, ("val_auc", "val_acc")) for name, r in runs.items()}
    assert set(summary["kd"]) == {"val_auc", "val_auc_std", "val_acc", "val_acc_std"}  # nothing of test
    assert val_result_line("breastmnist", summary) == (
        "RESULT study=kd_accuracy dataset=breastmnist kd_val_auc=0.9400 kd_val_acc=0.8500 "
        "alpha_070_val_auc=0.9200 alpha_070_val_acc=0.8800 best_by_val_acc=alpha_0.70"
    )
    report = {
        "command": "c",
        "date": "d",
        "wall_seconds": 60,
        "load_average": "1",
        "dataset": "breastmnist",
        "config": {},
        "seeds": [1, 2],
        "runs": runs,
        "summary": summary,
    }
    table = val_markdown(report)
    assert "| kd | 0.9400 ± 0.0141 | 0.8500 ± 0.0141 | 0.9300 / 0.8600 | 0.9500 / 0.8400 |" in table
    assert "test" not in table.replace("test not scored", "")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--high-alpha", "1.0"], "--high-alpha must lie in [0, 1)"),
        (["--branches", "0"], "--branches must be >= 1"),
        (["--only", "ce"], "--only: choose among the kd_accuracy variants ['kd', 'kd_calibrated', 'alpha_0.70']"),
    ],
)
def test_bad_study_arguments_name_the_flag(tmp_path, capsys, extra, message):
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "redis").mkdir()
    data = tmp_path / "breastmnist.npz"
    data.write_bytes(b"")
    with pytest.raises(SystemExit):
        parse_args(["--run", str(tmp_path), "--data", str(data), "--study", "kd_accuracy", *extra])
    assert message in capsys.readouterr().err


def _write_kd_gain(run: Path, config: DistillConfig, kd_acc: float, ce_acc: float, dataset_fp: str = "data") -> None:
    runs = {
        kind: [{"seed": seed, "val_auc": 0.99, "val_acc": acc, "test_auc": 0.99, "test_acc": acc} for seed in (1, 2, 3)]
        for kind, acc in (("kd", kd_acc), ("ce", ce_acc))
    }
    (run / "benchmark").mkdir(parents=True)
    (run / "redis").mkdir()
    (run / "results.json").write_text(
        json.dumps({"dataset": {"fingerprint": dataset_fp}, "best": {"config": config.model_dump(mode="json")}})
    )
    gain = {"seeds": [1, 2, 3], "config": config.model_dump(mode="json"), "runs": runs}
    (run / "benchmark" / "students.json").write_text(json.dumps({"kd_gain": gain}))


def test_config_from_another_run_reuses_only_its_ce_runs(tmp_path):
    """--config-from trains another run's served student on this run's teachers: that run's CE runs are
    the same trainings (CE reads no teacher), its KD runs are not (other teachers)."""
    served_here = DistillConfig(student="mobilenet_tiny", width=0.8, alpha=0.44, epochs=12, seed=7)
    served_there = DistillConfig(student="resnet_tiny", width=0.89, alpha=0.61, epochs=12, seed=7)
    here, there = tmp_path / "here", tmp_path / "there"
    _write_kd_gain(here, served_here, kd_acc=0.964, ce_acc=0.965)
    _write_kd_gain(there, served_there, kd_acc=0.966, ce_acc=0.958)

    config = served_config(there, "data")
    data = tmp_path / "data.npz"
    data.write_bytes(b"")
    argv = ["--run", str(here), "--data", str(data), "--seeds", "1", "2", "--config-from", str(there)]
    args = parse_args([*argv, "--retrain-all"])
    assert config == served_there and reusable_runs(args, config) == {}
    args.retrain_all = False
    reused = reusable_runs(args, config)
    assert list(reused) == ["ce"] and reused["ce"][0] == there
    assert [r["test_acc"] for r in reused["ce"][1]] == [0.958, 0.958]
    own = reusable_runs(args, served_here)
    assert own["ce"][0] == here and own["ce"][1][0]["test_acc"] == 0.965  # the run's own CE wins over --config-from's
    args.config_from = None
    assert reusable_runs(args, served_here)["kd"] == (here, own["kd"][1])  # the run's own KD gain, as before


def test_config_from_a_run_on_other_data_or_no_run_is_refused_naming_it(tmp_path, capsys):
    _write_kd_gain(tmp_path / "here", DistillConfig(student="resnet_tiny"), 0.9, 0.9)
    (tmp_path / "data.npz").write_bytes(b"")
    with pytest.raises(SystemExit):
        parse_args(["--run", str(tmp_path / "here"), "--data", str(tmp_path / "data.npz"), "--config-from", "nowhere"])
    assert "--config-from nowhere: no results.json" in capsys.readouterr().err
    _write_kd_gain(tmp_path / "there", DistillConfig(student="resnet_tiny"), 0.9, 0.9, dataset_fp="other")
    with pytest.raises(SystemExit, match="there ran on other data than this run"):
        served_config(tmp_path / "there", "data")
    with pytest.raises(SystemExit, match="nowhere: no results.json"):
        served_config(tmp_path / "nowhere", "data")
