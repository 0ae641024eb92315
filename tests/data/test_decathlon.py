"""Decathlon datalist adapter: tiny NIfTI volumes written with nibabel; bad entries."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medkd.data import DataFileNotFoundError, DataValidationError, DecathlonDataSpec, load_dataset

SHAPE = (12, 10, 6)


def write_case(root: Path, index: int, *, shape=SHAPE, label_shape=None, channels=None, seed=0) -> dict[str, str]:
    rng = np.random.default_rng(seed + index)
    image_shape = shape + ((channels,) if channels else ())
    image = rng.normal(100.0, 30.0, size=image_shape).astype(np.float32)
    label = np.zeros(label_shape or shape, dtype=np.uint8)
    label[3:8, 2:6, 1:4] = 1
    label[8:11, 6:9, 2:5] = 2
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    image_rel, label_rel = f"imagesTr/case_{index}.nii.gz", f"labelsTr/case_{index}.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / image_rel))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / label_rel))
    return {"image": image_rel, "label": label_rel}


def write_datalist(root: Path, entries: list[dict], **extra) -> Path:
    path = root / "dataset.json"
    path.write_text(json.dumps({"name": "TinyTask", "training": entries, **extra}))
    return path


@pytest.fixture
def datalist(tmp_path) -> Path:
    entries = [write_case(tmp_path, i) for i in range(6)]
    return write_datalist(tmp_path, entries, labels={"0": "background", "1": "liver", "2": "tumour"})


def test_3d_volumes(datalist):
    spec = DecathlonDataSpec(path=datalist, image_size=[8, 8, 4], num_classes=3, val_fraction=0.2, test_fraction=0.2)
    dataset = load_dataset(spec)
    assert dataset.name == "TinyTask" and dataset.task == "segmentation"
    assert dataset.class_names == ["background", "liver", "tumour"]
    sizes = {name: len(split) for name, split in dataset.splits.items()}
    assert sum(sizes.values()) == 6 and all(v >= 1 for v in sizes.values())
    train = dataset.splits["train"]
    assert train.images.shape[1:] == (1, 8, 8, 4) and train.images.dtype == np.float32
    assert train.labels.shape[1:] == (8, 8, 4) and train.labels.dtype == np.int64
    assert set(np.unique(train.labels)) == {0, 1, 2}  # nearest-neighbour resize keeps label values
    pre = dataset.preprocessing
    assert pre["clip"][0] < pre["clip"][1] and pre["offset"] == pre["clip"][0]
    assert load_dataset(spec).fingerprint == dataset.fingerprint


def test_2d_slices_keep_patients_in_one_split(datalist):
    spec = DecathlonDataSpec(path=datalist, image_size=[8, 8], spatial_dims=2, num_classes=3, slices="all")
    dataset = load_dataset(spec)
    assert sum(len(s) for s in dataset.splits.values()) == 6 * SHAPE[2]  # every axial slice
    assert all(len(s) % SHAPE[2] == 0 for s in dataset.splits.values())  # whole cases per split
    foreground = load_dataset(spec.model_copy(update={"slices": "foreground"}))
    assert sum(len(s) for s in foreground.splits.values()) == 6 * 4  # slices 1..4 hold labels
    assert foreground.splits["train"].images.shape[1:] == (1, 8, 8)


def test_given_validation_list_is_used(tmp_path):
    train = [write_case(tmp_path, i) for i in range(4)]
    val = [write_case(tmp_path, 10 + i) for i in range(2)]
    path = write_datalist(tmp_path, train, validation=val, test=["imagesTs/unlabelled.nii.gz"])
    dataset = load_dataset(DecathlonDataSpec(path=path, image_size=[6, 6, 4], num_classes=3, test_fraction=0.25))
    assert len(dataset.splits["val"]) == 2
    assert len(dataset.splits["train"]) == 3 and len(dataset.splits["test"]) == 1


def test_multichannel_4d_images(tmp_path):
    entries = [write_case(tmp_path, i, channels=2) for i in range(5)]
    dataset = load_dataset(
        DecathlonDataSpec(path=write_datalist(tmp_path, entries), image_size=[6, 6, 4], num_classes=3)
    )
    assert dataset.in_channels == 2 and dataset.splits["train"].images.shape[1] == 2


def test_missing_file_names_file_and_entry(tmp_path):
    entries = [write_case(tmp_path, i) for i in range(4)]
    entries[2]["label"] = "labelsTr/gone.nii.gz"
    path = write_datalist(tmp_path, entries)
    with pytest.raises(
        DataFileNotFoundError,
        match=r"gone\.nii\.gz: file not found \(referenced by .*dataset\.json training\[2\]\.label\)",
    ):
        load_dataset(DecathlonDataSpec(path=path, image_size=[6, 6, 4], num_classes=3))


def test_shape_mismatch_names_both_files(tmp_path):
    entries = [write_case(tmp_path, i) for i in range(3)]
    entries.append(write_case(tmp_path, 3, label_shape=(12, 10, 5)))
    path = write_datalist(tmp_path, entries)
    with pytest.raises(DataValidationError, match=r"case_3\.nii\.gz and .*case_3\.nii\.gz: image/label shape mismatch"):
        load_dataset(DecathlonDataSpec(path=path, image_size=[6, 6, 4], num_classes=3))


def test_label_out_of_range_names_the_file(datalist):
    with pytest.raises(
        DataValidationError, match=r"labelsTr/case_\d\.nii\.gz: segmentation labels out of range: found \[2\]"
    ):
        load_dataset(DecathlonDataSpec(path=datalist, image_size=[6, 6, 4], num_classes=2))


def test_corrupt_nifti_names_the_file(tmp_path):
    entries = [write_case(tmp_path, i) for i in range(3)]
    (tmp_path / entries[1]["image"]).write_bytes(b"not a nifti file at all")
    path = write_datalist(tmp_path, entries)
    with pytest.raises(DataValidationError, match=r"case_1\.nii\.gz: unreadable NIfTI"):
        load_dataset(DecathlonDataSpec(path=path, image_size=[6, 6, 4], num_classes=3))


def test_bad_json(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text("{not json")
    with pytest.raises(DataValidationError, match=r"dataset\.json: not a valid JSON datalist"):
        load_dataset(DecathlonDataSpec(path=path, image_size=[6, 6, 4], num_classes=3))
    path.write_text(json.dumps({"training": []}))
    with pytest.raises(DataValidationError, match=r"dataset\.json: expected .*'training'"):
        load_dataset(DecathlonDataSpec(path=path, image_size=[6, 6, 4], num_classes=3))


def test_missing_datalist_names_the_field(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"data\.path: file not found"):
        load_dataset(DecathlonDataSpec(path=tmp_path / "nope.json", image_size=[6, 6, 4], num_classes=3))
