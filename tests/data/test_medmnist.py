"""MedMNIST .npz adapter: the real BreastMNIST file, generated 3D / RGB / multi-label files, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medkd.data import DataFileNotFoundError, DataValidationError, MedMNISTDataSpec, load_dataset
from medkd.data.medmnist import REQUIRED_KEYS

SIZES = {"train": 12, "val": 4, "test": 6}


def write_npz(path: Path, *, image_shape=(28, 28), labels="binary", seed=0, **overrides) -> Path:
    """A small MedMNIST-layout file; ``overrides`` replace or (with None) drop keys."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SIZES.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *image_shape), dtype=np.uint8)
        if labels == "binary":
            arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
        elif labels == "multiclass":
            arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1).astype(np.uint8)
        else:  # multi-label, 5 labels
            arrays[f"{split}_labels"] = rng.integers(0, 2, size=(n, 5), dtype=np.uint8)
    for key, value in overrides.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return path


def load(path: Path, **kwargs):
    return load_dataset(MedMNISTDataSpec(path=path, **kwargs))


# ---------------------------------------------------------------------------------- real file


def test_breastmnist_real_file(breastmnist_path):
    dataset = load(breastmnist_path)
    assert {name: len(split) for name, split in dataset.splits.items()} == {"train": 546, "val": 78, "test": 156}
    assert dataset.class_counts("train") == [147, 399]
    assert dataset.class_counts("val") == [21, 57]
    assert dataset.class_counts("test") == [42, 114]
    assert dataset.task == "classification" and not dataset.multilabel
    assert dataset.spatial_dims == 2 and dataset.in_channels == 1 and dataset.num_classes == 2
    assert dataset.image_size == (28, 28)
    assert dataset.class_names == ["malignant", "normal, benign"]
    train = dataset.splits["train"]
    assert train.images.shape == (546, 1, 28, 28) and train.images.dtype == np.float32
    assert train.labels.dtype == np.int64
    pre = dataset.preprocessing
    assert pre["scale"] == pytest.approx(1 / 255)
    raw = np.load(breastmnist_path)["train_images"].astype(np.float64) / 255
    assert pre["mean"][0] == pytest.approx(raw.mean(), rel=1e-6)
    assert pre["std"][0] == pytest.approx(raw.std(), rel=1e-6)
    assert load(breastmnist_path).fingerprint == dataset.fingerprint


def test_breastmnist_subsample_is_stratified_and_deterministic(breastmnist_path):
    small = load(breastmnist_path, subsample_train=100, seed=3)
    assert len(small.splits["train"]) == 100
    counts = small.class_counts("train")
    assert abs(counts[0] - round(100 * 147 / 546)) <= 1
    assert small.fingerprint == load(breastmnist_path, subsample_train=100, seed=3).fingerprint
    assert small.fingerprint != load(breastmnist_path, subsample_train=100, seed=4).fingerprint
    assert small.fingerprint != load(breastmnist_path).fingerprint


# ------------------------------------------------------------------------- generated layouts


def test_3d_file(tmp_path):
    dataset = load(write_npz(tmp_path / "organmnist3d.npz", image_shape=(8, 10, 12), labels="multiclass"))
    assert dataset.spatial_dims == 3 and dataset.in_channels == 1
    assert dataset.splits["train"].images.shape == (12, 1, 8, 10, 12)
    assert dataset.num_classes == 11  # the official OrganMNIST3D names fit the labels (0..2 used)
    assert dataset.class_names[0] == "liver"


def test_3d_file_with_side_3_is_not_mistaken_for_rgb(tmp_path):
    dataset = load(write_npz(tmp_path / "vol.npz", image_shape=(3, 3, 3)))
    assert dataset.spatial_dims == 3 and dataset.in_channels == 1


def test_rgb_file_is_channels_first(tmp_path):
    dataset = load(write_npz(tmp_path / "dermamnist_64.npz", image_shape=(16, 16, 3), labels="multiclass"))
    assert dataset.spatial_dims == 2 and dataset.in_channels == 3
    assert dataset.splits["train"].images.shape == (12, 3, 16, 16)
    assert len(dataset.preprocessing["mean"]) == 3
    assert dataset.num_classes == 7 and dataset.class_names[4] == "melanoma"


def test_spatial_dims_override(tmp_path):
    path = write_npz(tmp_path / "x.npz", image_shape=(16, 16, 3))
    assert load(path, spatial_dims=3).spatial_dims == 3


def test_multilabel_file(tmp_path):
    dataset = load(write_npz(tmp_path / "chest.npz", labels="multilabel"))
    assert dataset.multilabel and dataset.task == "classification" and dataset.num_classes == 5
    labels = dataset.splits["train"].labels
    assert labels.shape == (12, 5) and labels.dtype == np.float32
    assert set(np.unique(labels)) <= {0.0, 1.0}
    assert dataset.class_counts("train") == [int(c) for c in labels.sum(axis=0)]
    assert load(tmp_path / "chest.npz", task="multilabel").multilabel


def test_multilabel_task_on_single_label_file_is_an_error(tmp_path):
    path = write_npz(tmp_path / "single.npz")
    with pytest.raises(DataValidationError, match=r"single\.npz.*multilabel"):
        load(path, task="multilabel")


def test_float_images_in_pixel_range_are_accepted(tmp_path):
    images = np.random.default_rng(0).uniform(0, 255, size=(12, 28, 28)).astype(np.float32)
    assert load(write_npz(tmp_path / "f.npz", train_images=images)).splits["train"].images.dtype == np.float32


def test_class_names_from_spec(tmp_path):
    dataset = load(write_npz(tmp_path / "x.npz"), class_names=["benign", "malignant"])
    assert dataset.class_names == ["benign", "malignant"]


# -------------------------------------------------------------------------------- bad files


def test_missing_file_names_path_and_where_to_get_it(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(DataFileNotFoundError) as caught:
        load(path)
    message = str(caught.value)
    assert str(path) in message and "medmnist.com" in message and "zenodo" in message and "local path" in message
    assert isinstance(caught.value, FileNotFoundError)


def test_missing_key_lists_present_keys(tmp_path):
    path = write_npz(tmp_path / "nokey.npz", val_labels=None)
    with pytest.raises(DataValidationError) as caught:
        load(path)
    message = str(caught.value)
    assert str(path) in message and "val_labels" in message and "missing" in message
    assert "val_images" in message  # lists the keys the file does have


def test_mismatched_counts(tmp_path):
    path = write_npz(tmp_path / "counts.npz", train_labels=np.zeros((11, 1), np.uint8))
    with pytest.raises(DataValidationError, match=r"counts\.npz.*train_images has 12 images but train_labels has 11"):
        load(path)


def test_float_images_outside_pixel_range(tmp_path):
    images = np.random.default_rng(0).normal(size=(4, 28, 28)).astype(np.float32) * 300
    path = write_npz(tmp_path / "dtype.npz", val_images=images)
    with pytest.raises(DataValidationError, match=r"dtype\.npz \[val_images\].*float32.*\[0, 255\]"):
        load(path)


def test_object_array_is_never_unpickled(tmp_path):
    labels = np.empty(6, dtype=object)
    labels[:] = ["a"] * 6
    path = write_npz(tmp_path / "obj.npz", test_labels=labels)
    with pytest.raises(DataValidationError, match=r"obj\.npz \[test_labels\].*object"):
        load(path)


def test_nan_images(tmp_path):
    images = np.full((12, 28, 28), 10.0, dtype=np.float32)
    images[3, 4, 5] = np.nan
    path = write_npz(tmp_path / "nan.npz", train_images=images)
    with pytest.raises(DataValidationError, match=r"nan\.npz \[train_images\].*1 NaN.*\(3, 4, 5\)"):
        load(path)


def test_labels_out_of_range(tmp_path):
    path = write_npz(tmp_path / "range.npz", test_labels=np.full((6, 1), -1, dtype=np.int64))
    with pytest.raises(DataValidationError, match=r"range\.npz \[test_labels\].*out of range"):
        load(path)


def test_labels_beyond_declared_classes(tmp_path):
    path = write_npz(tmp_path / "classes.npz", labels="multiclass")
    with pytest.raises(DataValidationError, match=r"classes\.npz \[train_labels\].*< num_classes=2"):
        load(path, class_names=["a", "b"])


def test_multilabel_values_must_be_binary(tmp_path):
    path = write_npz(tmp_path / "ml.npz", labels="multilabel", val_labels=np.full((4, 5), 2, np.uint8))
    with pytest.raises(DataValidationError, match=r"ml\.npz \[val_labels\].*0 or 1"):
        load(path)


def test_empty_split(tmp_path):
    path = write_npz(
        tmp_path / "empty.npz", val_images=np.zeros((0, 28, 28), np.uint8), val_labels=np.zeros((0, 1), np.uint8)
    )
    with pytest.raises(DataValidationError, match=r"empty\.npz.*val split is empty"):
        load(path)


def test_image_shape_differs_between_splits(tmp_path):
    path = write_npz(tmp_path / "shape.npz", test_images=np.zeros((6, 14, 14), np.uint8))
    with pytest.raises(DataValidationError, match=r"shape\.npz \[test_images\].*\(14, 14\)"):
        load(path)


def test_truncated_file(tmp_path):
    path = write_npz(tmp_path / "truncated.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataValidationError, match=r"truncated\.npz.*(corrupt|truncated)"):
        load(path)


def test_not_an_npz(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("hello, I am not an archive")
    with pytest.raises(DataValidationError, match=r"text\.npz.*not a readable \.npz"):
        load(path)


def test_single_npy_array(tmp_path):
    path = tmp_path / "single.npy"
    np.save(path, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataValidationError, match=r"single\.npy.*single array.*train_images"):
        load(path)


def test_required_keys_are_the_medmnist_layout():
    assert set(REQUIRED_KEYS) == {f"{s}_{p}" for s in ("train", "val", "test") for p in ("images", "labels")}


def test_corrupt_member_names_the_key(tmp_path):
    path = tmp_path / "corrupt.npz"
    rng = np.random.default_rng(0)
    arrays = {
        key: rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
        if key.endswith("images")
        else (np.arange(20) % 2).reshape(20, 1)
        for key in REQUIRED_KEYS
    }
    np.savez_compressed(path, **arrays)
    data = bytearray(path.read_bytes())
    data[2000:2100] = bytes(b ^ 0xFF for b in data[2000:2100])  # inside the first member
    path.write_bytes(bytes(data))
    with pytest.raises(DataValidationError, match=r"corrupt\.npz \[train_images\].*(corrupt|truncated)"):
        load(path)
