"""benchmarks.synthetic_npz: a MedMNIST-format file medkd's own medmnist loader reads, and clear argument errors."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.synthetic_npz import main
from medkd.data import load_dataset
from medkd.spec.data import MedMNISTDataSpec


def test_writes_a_medmnist_file_that_loads_deterministically(tmp_path):
    paths = [tmp_path / "a.npz", tmp_path / "b.npz"]
    for path in paths:
        assert main(["--output", str(path), "--num-train", "20", "--num-val", "6", "--num-test", "8"]) == 0
    first, second = (np.load(path) for path in paths)
    assert first["train_images"].shape == (20, 28, 28) and first["train_images"].dtype == np.uint8
    assert first["test_labels"].shape == (8, 1)
    assert all(np.array_equal(first[key], second[key]) for key in first.files)
    dataset = load_dataset(MedMNISTDataSpec(path=paths[0]))
    assert {name: len(split.images) for name, split in dataset.splits.items()} == {"train": 20, "val": 6, "test": 8}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--difficulty", "1.5"], "--difficulty must be in"),
        (["--num-train", "0"], "--num-train must be a positive integer"),
    ],
)
def test_bad_arguments_name_the_flag(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path / "x.npz"), *argv])
    assert message in capsys.readouterr().err


def test_output_must_be_an_npz(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path / "x.txt")])
    assert "a .npz path expected" in capsys.readouterr().err
