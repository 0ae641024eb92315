"""Data and augmentation specs: unknown keys and bad values are errors that name the field."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from medkd.data import (
    AugmentSpec,
    DataFileNotFoundError,
    DataSpec,
    DecathlonDataSpec,
    FolderDataSpec,
    MedMNISTDataSpec,
    SyntheticDataSpec,
)

DATA = TypeAdapter(DataSpec)


def error_locations(error: ValidationError) -> list[str]:
    return [".".join(str(p) for p in item["loc"]) for item in error.errors()]


def test_kind_selects_the_model():
    assert isinstance(DATA.validate_python({"kind": "synthetic"}), SyntheticDataSpec)
    assert isinstance(DATA.validate_python({"kind": "medmnist", "path": "x.npz"}), MedMNISTDataSpec)
    assert isinstance(DATA.validate_python({"kind": "folder", "path": "d", "image_size": 32}), FolderDataSpec)
    spec = DATA.validate_python({"kind": "decathlon", "path": "d.json", "image_size": [8, 8, 8], "num_classes": 2})
    assert isinstance(spec, DecathlonDataSpec)


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ValidationError) as caught:
        DATA.validate_python({"kind": "dicomweb"})
    message = str(caught.value)
    assert "dicomweb" in message and "synthetic" in message and "medmnist" in message


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"kind": "synthetic", "imag_size": 28}, "imag_size"),
        ({"kind": "medmnist", "path": "x.npz", "subsample": 10}, "subsample"),
        ({"kind": "folder", "path": "d", "image_size": 8, "colour": True}, "colour"),
    ],
)
def test_unknown_key_is_rejected_by_name(raw, field):
    with pytest.raises(ValidationError) as caught:
        DATA.validate_python(raw)
    assert any(loc.endswith(field) for loc in error_locations(caught.value))
    assert caught.value.errors()[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"kind": "synthetic", "image_size": 4}, "image_size"),
        ({"kind": "synthetic", "num_classes": 1}, "num_classes"),
        ({"kind": "synthetic", "num_train": 0}, "num_train"),
        ({"kind": "synthetic", "difficulty": 1.5}, "difficulty"),
        ({"kind": "synthetic", "spatial_dims": 4}, "spatial_dims"),
        ({"kind": "synthetic", "task": "detection"}, "task"),
        ({"kind": "medmnist", "path": "x.npz", "subsample_train": -5}, "subsample_train"),
        ({"kind": "medmnist"}, "path"),
        ({"kind": "folder", "path": "d", "image_size": 8, "in_channels": 2}, "in_channels"),
        ({"kind": "folder", "path": "d"}, "image_size"),
        ({"kind": "decathlon", "path": "d.json", "image_size": [8, 2, 8], "num_classes": 2}, "image_size"),
    ],
)
def test_bad_value_names_the_field(raw, field):
    with pytest.raises(ValidationError) as caught:
        DATA.validate_python(raw)
    assert any(loc.endswith(field) for loc in error_locations(caught.value)), error_locations(caught.value)


def test_fractions_must_leave_a_train_split():
    with pytest.raises(ValidationError, match="val_fraction \\+ test_fraction must be < 1"):
        FolderDataSpec(path="d", image_size=8, val_fraction=0.5, test_fraction=0.5)


def test_decathlon_size_must_match_spatial_dims():
    with pytest.raises(ValidationError, match="image_size has 3 entries but spatial_dims is 2"):
        DecathlonDataSpec(path="d.json", image_size=[8, 8, 8], spatial_dims=2, num_classes=2)
    with pytest.raises(ValidationError, match="class_names has 2 names but num_classes is 3"):
        DecathlonDataSpec(path="d.json", image_size=[8, 8, 8], num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValidationError, match="intensity_percentiles"):
        DecathlonDataSpec(path="d.json", image_size=[8, 8, 8], num_classes=3, intensity_percentiles=(99, 1))


def test_content_fields_exclude_location():
    spec = MedMNISTDataSpec(path="/a/b.npz", name="x", subsample_train=10)
    fields = spec.content_fields()
    assert "path" not in fields and "name" not in fields
    assert fields["subsample_train"] == 10 and fields["kind"] == "medmnist"


def test_check_paths_names_the_field(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"data\.path: file not found: .*x\.npz.*medmnist\.com"):
        MedMNISTDataSpec(path=tmp_path / "x.npz").check_paths()
    with pytest.raises(DataFileNotFoundError, match=r"data\.path: is not a file"):
        MedMNISTDataSpec(path=tmp_path).check_paths()
    with pytest.raises(DataFileNotFoundError, match=r"data\.base_dir: folder not found"):
        (tmp_path / "d.json").write_text("{}")
        DecathlonDataSpec(
            path=tmp_path / "d.json", base_dir=tmp_path / "nope", image_size=[8, 8, 8], num_classes=2
        ).check_paths()
    SyntheticDataSpec().check_paths()  # nothing to check


def test_spec_round_trips_through_json():
    spec = DATA.validate_python({"kind": "medmnist", "path": "x.npz", "spatial_dims": 3})
    assert DATA.validate_json(DATA.dump_json(spec)) == spec


# ------------------------------------------------------------------------------ augmentation


def test_augment_defaults_are_off():
    spec = AugmentSpec()
    assert not spec.enabled
    assert spec.flip == 0 and spec.rotate90 == 0 and spec.affine is None and spec.intensity is None


def test_augment_booleans_mean_half_probability():
    spec = AugmentSpec(flip=True, rotate90=False)
    assert spec.flip == 0.5 and spec.rotate90 == 0.0 and spec.enabled


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"flip": 1.5}, "flip"),
        ({"flip_axes": [0, 0]}, "flip_axes"),
        ({"affine": {"scale": [1.2, 0.8]}}, "affine.scale"),
        ({"affine": {"scale": [0.0, 1.0]}}, "affine.scale"),
        ({"affine": {"rotate_degrees": -1}}, "affine.rotate_degrees"),
        ({"affine": {"padding_mode": "wrap"}}, "affine.padding_mode"),
        ({"intensity": {"gamma": [1.5, 0.5]}}, "intensity.gamma"),
        ({"intensity": {"noise_std": -0.1}}, "intensity.noise_std"),
        ({"intensity": {"nosie_std": 0.1}}, "intensity.nosie_std"),
        ({"mixup": 0.2}, "mixup"),
    ],
)
def test_bad_augment_names_the_field(raw, field):
    with pytest.raises(ValidationError) as caught:
        AugmentSpec.model_validate(raw)
    assert field in error_locations(caught.value), error_locations(caught.value)
