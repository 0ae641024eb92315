"""Job spec validation: bad specs fail with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medkd.spec.job import SpecError, load_spec, parse_override, parse_spec

REPO = Path(__file__).resolve().parents[2]


def minimal(**changes):
    raw = {
        "name": "t",
        "data": {"kind": "synthetic", "num_train": 32, "num_val": 16, "num_test": 16},
        "teachers": [{"name": "a", "model": "resnet18", "epochs": 1}],
    }
    raw.update(changes)
    return raw


def write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_examples_validate():
    for path in sorted((REPO / "examples").glob("*.yaml")):
        spec = load_spec(path)
        assert spec.teachers and spec.name


def test_unknown_key_names_the_field(tmp_path):
    raw = minimal()
    raw["teachers"][0]["epoks"] = 3
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, raw))
    assert "teachers[0].epoks: unknown field" in str(error.value)
    assert str(tmp_path / "job.yaml") in str(error.value)


def test_negative_epochs_names_the_field(tmp_path):
    raw = minimal(teachers=[{"name": "a", "model": "resnet18"}, {"name": "b", "model": "vit", "epochs": -1}])
    with pytest.raises(SpecError, match=r"teachers\[1\]\.epochs: must be > 0"):
        load_spec(write(tmp_path, raw))


def test_top_level_unknown_key(tmp_path):
    with pytest.raises(SpecError, match=r"serch: unknown field"):
        load_spec(write(tmp_path, minimal(serch={"num_trials": 2})))


def test_missing_data_path_named(tmp_path):
    from medkd.data import load_dataset

    raw = minimal(data={"kind": "medmnist", "path": "does/not/exist.npz"})
    spec = load_spec(write(tmp_path, raw))
    with pytest.raises(ValueError, match="exist.npz"):
        load_dataset(spec.data)


def test_duplicate_teacher_names_rejected():
    raw = minimal(teachers=[{"name": "a", "model": "resnet18"}, {"name": "a", "model": "vit"}])
    with pytest.raises(SpecError, match="duplicate names"):
        parse_spec(raw)


def test_bad_redis_url_and_ranges():
    with pytest.raises(SpecError, match=r"cache.redis_url"):
        parse_spec(minimal(cache={"redis_url": "http://x"}))
    with pytest.raises(SpecError, match=r"search.space.temperature"):
        parse_spec(minimal(search={"space": {"temperature": {"low": 5, "high": 1}}}))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_fingerprint_stable_and_sensitive():
    a = parse_spec(minimal())
    b = parse_spec(minimal())
    assert a.fingerprint() == b.fingerprint()
    changed = minimal()
    changed["teachers"][0]["epochs"] = 2
    assert parse_spec(changed).fingerprint() != a.fingerprint()
    moved = parse_spec(minimal(output_dir="elsewhere"))
    assert moved.fingerprint() == a.fingerprint()  # where results go does not change what they are


def test_overrides(tmp_path):
    path = write(tmp_path, minimal())
    spec = load_spec(path, overrides=dict([parse_override("search.num_trials=3")]))
    assert spec.search.num_trials == 3
    with pytest.raises(SpecError, match="KEY=VALUE"):
        parse_override("search.num_trials")


def test_overrides_reach_list_items_and_bad_paths_name_the_override(tmp_path):
    raw = minimal()
    raw["teachers"].append({**raw["teachers"][0], "name": "second"})
    path = write(tmp_path, raw)
    spec = load_spec(path, {"teachers.1.epochs": 7, "search.num_trials": 3})
    assert [t.epochs for t in spec.teachers][1] == 7 and spec.search.num_trials == 3
    with pytest.raises(
        SpecError, match=r"override 'teachers\.5\.epochs': teachers\.5 is not an item of the 2-item list teachers"
    ):
        load_spec(path, {"teachers.5.epochs": 1})
    with pytest.raises(SpecError, match=r"override 'teachers\.x\.epochs'"):
        load_spec(path, {"teachers.x.epochs": 1})
    with pytest.raises(SpecError, match=r"override 'name\.deeper': name is a value, not a section"):
        load_spec(path, {"name.deeper": 1})


def test_online_augmentation_of_segmentation_students_needs_cached_views(tmp_path):
    raw = minimal()
    raw["task"] = "segmentation"
    raw["data"] = {"kind": "synthetic", "task": "segmentation"}
    raw["teachers"][0]["model"] = "unet"
    raw["search"] = {"augment": {"flip": 0.5}}
    with pytest.raises(SpecError, match="search.augment: for segmentation.*set cache.views"):
        load_spec(write(tmp_path, raw))
    raw["cache"] = {"views": 2}
    assert load_spec(write(tmp_path, raw)).cache.views == 2


def test_non_positive_ema_epochs_names_the_field(tmp_path):
    raw = minimal()
    raw["teachers"][0]["ema_epochs"] = 0
    with pytest.raises(SpecError, match=r"teachers\[0\]\.ema_epochs"):
        load_spec(write(tmp_path, raw))


def test_search_ema_epochs_validated_and_kept_out_of_old_fingerprints(tmp_path):
    raw = minimal()
    raw["search"] = {"ema_epochs": -1}
    with pytest.raises(SpecError, match=r"search\.ema_epochs"):
        load_spec(write(tmp_path, raw))
    raw["search"] = {"ema_epochs": 4}
    averaged = load_spec(write(tmp_path, raw)).search
    plain = load_spec(write(tmp_path, minimal())).search
    assert "ema_epochs" not in plain.fingerprint_fields()  # searches from before the field keep their fingerprints
    assert averaged.fingerprint_fields()["ema_epochs"] == 4


@pytest.mark.parametrize(("field", "bad", "good"), [("final_epochs", 0, 120), ("final_branches", 1, 4)])
def test_final_training_settings_validated_and_not_part_of_the_search_fingerprint(tmp_path, field, bad, good):
    raw = minimal()
    raw["search"] = {field: bad}
    with pytest.raises(SpecError, match=rf"search\.{field}"):
        load_spec(write(tmp_path, raw))
    raw["search"] = {field: good}
    final = load_spec(write(tmp_path, raw))
    plain = load_spec(write(tmp_path, minimal()))
    assert getattr(final.search, field) == good and final.search.final_training and not plain.search.final_training
    # The trials do not depend on it: adding it reuses a finished search.
    assert final.search.fingerprint_fields() == plain.search.fingerprint_fields()
    assert final.fingerprint() != plain.fingerprint()


def test_search_cpu_precision_validated_and_in_the_fingerprint_only_when_bf16(tmp_path):
    raw = minimal()
    raw["search"] = {"cpu_precision": "fp16"}
    with pytest.raises(SpecError, match=r"search\.cpu_precision"):
        load_spec(write(tmp_path, raw))
    plain = load_spec(write(tmp_path, minimal())).search
    raw["search"] = {"cpu_precision": "fp32"}
    fp32 = load_spec(write(tmp_path, raw)).search
    raw["search"] = {"cpu_precision": "bf16"}
    bf16 = load_spec(write(tmp_path, raw)).search
    # fp32 is what searches did before the field: their fingerprints stay.
    assert plain.cpu_precision == "fp32" and "cpu_precision" not in plain.fingerprint_fields()
    assert fp32.fingerprint_fields() == plain.fingerprint_fields()
    assert bf16.fingerprint_fields() == {**plain.fingerprint_fields(), "cpu_precision": "bf16"}
