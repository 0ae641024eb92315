"""Synthetic data: deterministic, balanced, right shapes for 2D/3D classification/segmentation."""

from __future__ import annotations

import numpy as np
import pytest

from medkd.data import SyntheticDataSpec, load_dataset

SMALL = {"num_train": 48, "num_val": 16, "num_test": 16, "image_size": 16}


def test_same_spec_gives_same_arrays_and_fingerprint():
    first = load_dataset(SyntheticDataSpec(**SMALL))
    second = load_dataset(SyntheticDataSpec(**SMALL))
    assert first.fingerprint == second.fingerprint
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(first.splits[split].images, second.splits[split].images)
        np.testing.assert_array_equal(first.splits[split].labels, second.splits[split].labels)


@pytest.mark.parametrize("change", [{"seed": 1}, {"difficulty": 0.9}, {"num_classes": 3}, {"image_size": 20}])
def test_content_changes_change_the_fingerprint(change):
    base = load_dataset(SyntheticDataSpec(**SMALL))
    changed = load_dataset(SyntheticDataSpec(**{**SMALL, **change}))
    assert changed.fingerprint != base.fingerprint


def test_different_seed_gives_different_images():
    a = load_dataset(SyntheticDataSpec(**SMALL, seed=0)).splits["train"].images
    b = load_dataset(SyntheticDataSpec(**SMALL, seed=1)).splits["train"].images
    assert not np.array_equal(a, b)


def test_display_name_does_not_change_the_fingerprint():
    assert (
        load_dataset(SyntheticDataSpec(**SMALL)).fingerprint
        == load_dataset(SyntheticDataSpec(**SMALL, name="x")).fingerprint
    )


def test_train_split_does_not_depend_on_the_other_split_sizes():
    a = load_dataset(SyntheticDataSpec(**SMALL))
    b = load_dataset(SyntheticDataSpec(**{**SMALL, "num_val": 40}))
    np.testing.assert_array_equal(a.splits["train"].labels, b.splits["train"].labels)
    # Normalisation uses train statistics only, so train images are identical too.
    np.testing.assert_array_equal(a.splits["train"].images, b.splits["train"].images)


@pytest.mark.parametrize(
    ("task", "dims", "channels"),
    [
        ("classification", 2, 1),
        ("classification", 3, 1),
        ("segmentation", 2, 1),
        ("segmentation", 3, 2),
        ("classification", 2, 3),
    ],
)
def test_shapes_and_dtypes(task, dims, channels):
    size = 16 if dims == 2 else 12
    spec = SyntheticDataSpec(
        task=task,
        spatial_dims=dims,
        in_channels=channels,
        num_classes=3,
        image_size=size,
        num_train=24,
        num_val=8,
        num_test=8,
    )
    dataset = load_dataset(spec)
    train = dataset.splits["train"]
    assert train.images.shape == (24, channels) + (size,) * dims
    assert train.images.dtype == np.float32
    assert dataset.image_size == (size,) * dims
    assert dataset.in_channels == channels and dataset.spatial_dims == dims and dataset.task == task
    if task == "classification":
        assert train.labels.shape == (24,)
    else:
        assert train.labels.shape == (24,) + (size,) * dims
    assert train.labels.dtype == np.int64
    assert train.labels.min() >= 0 and train.labels.max() < 3
    assert len(dataset.splits["val"]) == 8 and len(dataset.splits["test"]) == 8


def test_classification_classes_are_balanced():
    dataset = load_dataset(SyntheticDataSpec(num_classes=4, num_train=100, num_val=20, num_test=20, image_size=16))
    assert dataset.class_counts("train") == [25, 25, 25, 25]
    assert dataset.class_counts("val") == [5, 5, 5, 5]


def test_segmentation_masks_contain_every_class():
    dataset = load_dataset(
        SyntheticDataSpec(task="segmentation", num_classes=4, num_train=32, num_val=8, num_test=8, image_size=24)
    )
    counts = dataset.class_counts("train")
    assert len(counts) == 4 and all(c > 0 for c in counts)
    assert dataset.class_names[0] == "background"


def test_normalised_with_train_statistics():
    dataset = load_dataset(SyntheticDataSpec(**SMALL))
    train = dataset.splits["train"].images
    assert abs(float(train.mean())) < 1e-3
    assert abs(float(train.std()) - 1.0) < 1e-3
    assert dataset.preprocessing["scale"] == pytest.approx(1 / 255)


def test_classes_differ_in_texture_orientation():
    """The class signal is real: mean image gradients differ between classes (0 vs 90 degrees)."""
    dataset = load_dataset(SyntheticDataSpec(num_classes=2, num_train=200, num_val=8, num_test=8, difficulty=0.0))
    images, labels = dataset.splits["train"].images[:, 0], dataset.splits["train"].labels
    vertical = np.abs(np.diff(images, axis=1)).mean(axis=(1, 2))
    horizontal = np.abs(np.diff(images, axis=2)).mean(axis=(1, 2))
    ratio = vertical / horizontal
    # class 0 stripes vary along x, class 1 along y: the two classes separate completely.
    assert ratio[labels == 0].max() < ratio[labels == 1].min()
