"""Dataset container: preprocessing replication, summary, subsets, splitting, adapter registry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medkd.core.errors import DataValidationError
from medkd.data import (
    RawData,
    Split,
    SyntheticDataSpec,
    apply_preprocessing,
    available_adapters,
    build_dataset,
    get_adapter,
    load_dataset,
    register_adapter,
)
from medkd.data.splitting import stratified_partition, stratified_sample
from medkd.data.synthetic import generate_split

SPEC = SyntheticDataSpec(num_classes=3, num_train=60, num_val=15, num_test=15, image_size=12)


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(SPEC)


def test_preprocessing_replicates_normalisation_from_raw_pixels(dataset):
    raw = generate_split(SPEC, "test").images  # the uint8 pixels a client would send
    assert raw.dtype == np.uint8
    replicated = apply_preprocessing(raw, json.loads(json.dumps(dataset.preprocessing)))
    np.testing.assert_array_equal(replicated, dataset.splits["test"].images)


def test_preprocessing_channels_last(dataset):
    raw = generate_split(SPEC, "val").images
    channels_last = np.moveaxis(raw, 1, -1)
    out = apply_preprocessing(channels_last, dataset.preprocessing, channel_axis=-1)
    np.testing.assert_array_equal(np.moveaxis(out, -1, 1), dataset.splits["val"].images)
    with pytest.raises(ValueError, match="channel"):
        apply_preprocessing(np.zeros((1, 3, 4, 4)), dataset.preprocessing)


def test_summary_is_json_and_complete(dataset):
    summary = json.loads(json.dumps(dataset.summary()))
    assert summary["fingerprint"] == dataset.fingerprint and summary["kind"] == "synthetic"
    assert summary["splits"]["train"] == {"size": 60, "class_counts": [20, 20, 20]}
    assert summary["image_size"] == [12, 12] and summary["num_classes"] == 3
    assert set(summary["preprocessing"]) == {"clip", "offset", "scale", "mean", "std"}


def test_arrays_are_plain_tuples(dataset):
    arrays = dataset.arrays()
    assert set(arrays) == {"train", "val", "test"}
    images, labels = arrays["train"]
    assert images is dataset.splits["train"].images and labels is dataset.splits["train"].labels


def test_subset_by_size_is_stratified_and_fingerprinted(dataset):
    small = dataset.subset({"train": 30}, seed=1)
    assert len(small.splits["train"]) == 30 and small.class_counts("train") == [10, 10, 10]
    assert len(small.splits["val"]) == 15
    assert small.preprocessing == dataset.preprocessing
    assert small.fingerprint != dataset.fingerprint
    assert small.fingerprint == dataset.subset({"train": 30}, seed=1).fingerprint
    assert small.fingerprint != dataset.subset({"train": 30}, seed=2).fingerprint


def test_subset_by_indices(dataset):
    picked = dataset.subset(indices={"val": [0, 2, 4]})
    np.testing.assert_array_equal(picked.splits["val"].images, dataset.splits["val"].images[[0, 2, 4]])
    with pytest.raises(ValueError, match="exactly one"):
        dataset.subset()
    with pytest.raises(ValueError, match="out of range"):
        dataset.subset(indices={"val": [99]})
    with pytest.raises(KeyError, match="unknown split"):
        dataset.subset({"holdout": 3})


def test_build_dataset_checks_structure():
    images = np.zeros((4, 1, 8, 8), np.uint8)
    good = {name: Split(images, np.array([0, 1, 0, 1])) for name in ("train", "val", "test")}
    raw = RawData(name="x", task="classification", spatial_dims=2, num_classes=2, splits=good, source="x.src")
    assert build_dataset(raw, "test-kind", {}).num_classes == 2
    bad_shape = {**good, "test": Split(np.zeros((4, 1, 6, 6), np.uint8), np.array([0, 1, 0, 1]))}
    with pytest.raises(DataValidationError, match=r"x\.src: test images have shape"):
        build_dataset(
            RawData(name="x", task="classification", spatial_dims=2, num_classes=2, splits=bad_shape, source="x.src"),
            "k",
            {},
        )
    missing = {k: v for k, v in good.items() if k != "val"}
    with pytest.raises(DataValidationError, match=r"missing split\(s\) \['val'\]"):
        build_dataset(
            RawData(name="x", task="classification", spatial_dims=2, num_classes=2, splits=missing, source="x.src"),
            "k",
            {},
        )
    with pytest.raises(DataValidationError, match="4 images but 3 labels"):
        Split(images, np.array([0, 1, 0]))


def test_constant_images_do_not_divide_by_zero():
    images = np.full((4, 1, 8, 8), 7, np.uint8)
    splits = {name: Split(images, np.array([0, 1, 0, 1])) for name in ("train", "val", "test")}
    dataset = build_dataset(
        RawData(name="c", task="classification", spatial_dims=2, num_classes=2, splits=splits, source="c"), "k", {}
    )
    assert np.isfinite(dataset.splits["train"].images).all()


def test_stratified_partition_keeps_proportions_and_covers_everything():
    labels = np.array([0] * 70 + [1] * 30)
    parts = stratified_partition(labels, 100, [0.7, 0.1, 0.2], seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert [int((labels[p] == 1).sum()) for p in parts] == [21, 3, 6]
    assert all(np.array_equal(a, b) for a, b in zip(parts, stratified_partition(labels, 100, [0.7, 0.1, 0.2], seed=0)))
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_partition(labels, 100, [0.5, 0.2], seed=0)


def test_stratified_sample_size_is_exact():
    labels = np.array([0] * 7 + [1] * 5 + [2] * 3)
    for size in (1, 4, 9, 14):
        assert len(stratified_sample(labels, 15, size, seed=0)) == size
    assert len(stratified_sample(labels, 15, 40, seed=0)) == 15


def test_registry():
    assert {"synthetic", "medmnist", "folder", "decathlon"} <= set(available_adapters())
    with pytest.raises(
        ValueError, match="unknown data adapter 'nope'; known data adapters: decathlon, folder, medmnist, synthetic"
    ):
        get_adapter("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("synthetic")(lambda spec: None)


def test_load_dataset_accepts_a_dict():
    dataset = load_dataset({"kind": "synthetic", "num_train": 8, "num_val": 4, "num_test": 4, "image_size": 8})
    assert len(dataset.splits["train"]) == 8
