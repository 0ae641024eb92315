"""benchmarks.teacher_selection: the teacher subset a variant distills from, its summary, RESULT line and
argument errors (the rule is tested in tests/registry/test_teacher_selection.py, the trainings run in the
benchmark)."""

from __future__ import annotations

import json

import pytest

from benchmarks._student_setup import teacher_subset
from benchmarks.teacher_selection import (
    best_by_val,
    parse_args,
    result_line,
    reusable_kd_gain,
    summarise,
    variants_for,
)
from medkd.students.distill import DistillConfig

RESULTS = {
    "teachers": [{"name": "cnn", "fingerprint": "fp-cnn"}, {"name": "vit", "fingerprint": "fp-vit"}],
    "ensemble": {"distilled": ["cnn", "vit"]},
}
CACHE = {"url": "redis://127.0.0.1:1/0", "teacher_fps": ["fp-cnn", "fp-vit"], "views": None}


def test_a_variant_distills_from_its_teachers_only_with_their_weights():
    config = DistillConfig(student="mobilenet_tiny", aggregation="confidence", teacher_weights=[0.6, 0.4])
    update, cache = teacher_subset({"teachers": ["cnn"], "alpha": 0.5}, config, CACHE, RESULTS)
    assert update == {"alpha": 0.5, "teacher_weights": [1.0]} and cache["teacher_fps"] == ["fp-cnn"]
    assert CACHE["teacher_fps"] == ["fp-cnn", "fp-vit"]  # the shared source is not changed
    both, cache = teacher_subset({"teachers": ["vit", "cnn"]}, config, CACHE, RESULTS)
    assert both["teacher_weights"] == pytest.approx([0.6, 0.4]) and cache["teacher_fps"] == ["fp-cnn", "fp-vit"]
    assert teacher_subset({"alpha": 1.0}, config, CACHE, RESULTS) == ({"alpha": 1.0}, CACHE)
    # Weights of a run whose students learned from the CNN only cannot be cut for the ViT: none.
    cnn_only = {**RESULTS, "ensemble": {"distilled": ["cnn"]}}
    single = DistillConfig(student="mobilenet_tiny", aggregation="confidence", teacher_weights=[1.0])
    assert teacher_subset({"teachers": ["cnn", "vit"]}, single, CACHE, cnn_only)[0]["teacher_weights"] is None
    with pytest.raises(SystemExit, match=r"teachers \['swin'\] are not teachers of the run"):
        teacher_subset({"teachers": ["swin"]}, config, CACHE, RESULTS)


def test_variants_each_teacher_alone_without_repeating_a_trained_one():
    assert variants_for(["cnn", "vit"], ["cnn", "vit"], ["cnn", "vit"]) == {
        "ce": {"alpha": 1.0},
        "kd_all": {"teachers": ["cnn", "vit"]},
    }
    dropped = variants_for(["cnn", "vit"], ["cnn"], ["cnn", "vit"], each_teacher=True)
    # kd_selected already distills from the CNN alone, so only the ViT gets its own variant.
    assert dropped == {
        "ce": {"alpha": 1.0},
        "kd_all": {"teachers": ["cnn", "vit"]},
        "kd_selected": {"teachers": ["cnn"]},
        "kd_vit": {"teachers": ["vit"]},
    }
    # A run whose students learned from one teacher: the other one alone, and no CE when asked.
    one = variants_for(["cnn"], ["cnn"], ["cnn", "cnn_ls0"], with_ce=False, each_teacher=True)
    assert one == {"kd_all": {"teachers": ["cnn"]}, "kd_cnn_ls0": {"teachers": ["cnn_ls0"]}}


def test_ce_and_kd_all_are_read_from_the_runs_kd_gain_when_it_trained_them(tmp_path):
    config = DistillConfig(student="mobilenet_tiny", aggregation="confidence", teacher_weights=[0.6, 0.4])
    runs = {kind: [{"seed": seed, "kind": kind} for seed in (1, 2)] for kind in ("kd", "ce")}
    (tmp_path / "benchmark").mkdir()
    gain = {"kd_gain": {"config": config.model_dump(mode="json"), "runs": runs}}
    (tmp_path / "benchmark" / "students.json").write_text(json.dumps(gain))
    variants = variants_for(["cnn", "vit"], ["cnn"], ["cnn", "vit"], each_teacher=True)
    reused = reusable_kd_gain(tmp_path, config, RESULTS, variants, [2, 1])
    assert reused == {"ce": runs["ce"][::-1], "kd_all": runs["kd"][::-1]}  # kd_selected and kd_vit train
    # Weights that distilling from the run's teachers renormalises: kd_all is not the KD gain's kd.
    unnormalised = config.model_copy(update={"teacher_weights": [0.3, 0.2]})
    gain["kd_gain"]["config"] = unnormalised.model_dump(mode="json")
    (tmp_path / "benchmark" / "students.json").write_text(json.dumps(gain))
    assert reusable_kd_gain(tmp_path, unnormalised, RESULTS, variants, [1]) == {"ce": runs["ce"][:1]}
    assert reusable_kd_gain(tmp_path, config, RESULTS, variants, [1]) == {}  # another configuration


def test_summary_result_line_and_choice_by_val():
    runs = {
        "kd_all": [
            {"val_auc": 0.90, "val_acc": 0.85, "test_auc": 0.91, "test_acc": 0.86},
            {"val_auc": 0.92, "val_acc": 0.87, "test_auc": 0.89, "test_acc": 0.84},
        ],
        "kd_selected": [
            {"val_auc": 0.93, "val_acc": 0.88, "test_auc": 0.88, "test_acc": 0.83},
            {"val_auc": 0.93, "val_acc": 0.88, "test_auc": 0.88, "test_acc": 0.83},
        ],
    }
    summary = {name: summarise(r) for name, r in runs.items()}
    assert summary["kd_all"]["val_auc"] == pytest.approx(0.91) and summary["kd_selected"]["test_acc_std"] == 0.0
    assert best_by_val(summary) == "kd_selected"  # by val, even though its test figures are lower
    report = {"selection": {"dropped": ["vit"]}, "summary": summary, "best_by_val": best_by_val(summary)}
    line = result_line("breastmnist", report)
    assert line.startswith("RESULT dataset=breastmnist dropped=vit kd_all_val_auc=0.9100 kd_all_val_acc=0.8600")
    assert line.endswith("kd_selected_test_acc=0.8300 best_by_val=kd_selected")
    assert result_line("x", {"selection": {"dropped": []}}) == "RESULT dataset=x dropped=none"


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--seeds", "1", "1"], "--seeds: each seed once"), (["--epochs", "0"], "--epochs must be >= 1")],
)
def test_bad_arguments_name_the_flag(tmp_path, capsys, extra, message):
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "redis").mkdir()
    data = tmp_path / "breastmnist.npz"
    data.write_bytes(b"")
    with pytest.raises(SystemExit):
        parse_args(["--run", str(tmp_path), "--data", str(data), *extra])
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--run", str(tmp_path / "nothing"), "--data", str(data)])
    assert "no results.json and redis/" in capsys.readouterr().err
