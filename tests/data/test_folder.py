"""Image-folder adapter: class sub-folders of PNG/JPEG/DICOM, stratified splits, bad images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medkd.data import DataFileNotFoundError, DataValidationError, FolderDataSpec, load_dataset


def write_images(folder: Path, count: int, *, size=(20, 24), mode="L", value=None, suffix=".png", seed=0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
        pixels = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels, mode=mode).save(folder / f"img_{index:03d}{suffix}")


@pytest.fixture
def class_folder(tmp_path) -> Path:
    root = tmp_path / "xray"
    write_images(root / "normal", 20, value=40)
    write_images(root / "pneumonia", 10, value=200, suffix=".jpg", mode="RGB")
    return root


def test_class_folders_become_labels_with_stratified_splits(class_folder):
    dataset = load_dataset(FolderDataSpec(path=class_folder, image_size=16, val_fraction=0.2, test_fraction=0.2))
    assert dataset.class_names == ["normal", "pneumonia"]
    assert dataset.task == "classification" and dataset.num_classes == 2 and dataset.in_channels == 1
    assert dataset.summary()["splits"] == {
        "train": {"size": 18, "class_counts": [12, 6]},
        "val": {"size": 6, "class_counts": [4, 2]},
        "test": {"size": 6, "class_counts": [4, 2]},
    }
    assert dataset.splits["train"].images.shape == (18, 1, 16, 16)
    # Labels follow the content: the uniform class images keep their brightness order.
    train = dataset.splits["train"]
    assert train.images[train.labels == 0].max() < train.images[train.labels == 1].min()


def test_split_is_deterministic_and_seeded(class_folder):
    a = load_dataset(FolderDataSpec(path=class_folder, image_size=8, seed=0))
    b = load_dataset(FolderDataSpec(path=class_folder, image_size=8, seed=0))
    c = load_dataset(FolderDataSpec(path=class_folder, image_size=8, seed=1))
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint


def test_rgb_output(class_folder):
    dataset = load_dataset(FolderDataSpec(path=class_folder, image_size=12, in_channels=3))
    assert dataset.splits["val"].images.shape[1:] == (3, 12, 12)
    assert len(dataset.preprocessing["mean"]) == 3


def test_given_train_val_test_folders(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        write_images(tmp_path / split / "a", n, seed=1)
        write_images(tmp_path / split / "b", n, seed=2)
    dataset = load_dataset(FolderDataSpec(path=tmp_path, image_size=8))
    assert [len(dataset.splits[s]) for s in ("train", "val", "test")] == [12, 4, 6]


def test_hidden_and_non_image_files_are_ignored(class_folder):
    (class_folder / "normal" / "notes.txt").write_text("not an image")
    (class_folder / "normal" / ".DS_Store").write_bytes(b"\x00\x01")
    (class_folder / ".cache").mkdir()
    dataset = load_dataset(FolderDataSpec(path=class_folder, image_size=8))
    assert sum(len(s) for s in dataset.splits.values()) == 30


def test_sixteen_bit_png_is_scaled(tmp_path):
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(5):
            pixels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * (i + 1)) % 65535
            Image.fromarray(pixels).save(folder / f"{i}.png")
    dataset = load_dataset(FolderDataSpec(path=tmp_path, image_size=16))
    assert np.isfinite(dataset.splits["train"].images).all()


def test_dicom_images(tmp_path):

    def write_dicom(path: Path, pixels: np.ndarray) -> None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\x00" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)

    rng = np.random.default_rng(0)
    for name in ("ct_a", "ct_b"):
        (tmp_path / name).mkdir()
        for i in range(5):
            write_dicom(tmp_path / name / f"{i}.dcm", rng.integers(0, 4096, size=(32, 32)))
    dataset = load_dataset(FolderDataSpec(path=tmp_path, image_size=16))
    assert dataset.class_names == ["ct_a", "ct_b"]
    assert dataset.splits["train"].images.shape[1:] == (1, 16, 16)
    assert sum(len(split) for split in dataset.splits.values()) == 10
    train = dataset.splits["train"].images
    assert np.isfinite(train).all() and float(train.std()) > 0  # the DICOM pixels were read, not zeros


def test_unreadable_image_names_the_file(class_folder):
    broken = class_folder / "pneumonia" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataValidationError, match=r"broken\.png: unreadable image"):
        load_dataset(FolderDataSpec(path=class_folder, image_size=8))


def test_truncated_image_names_the_file(class_folder):
    victim = class_folder / "normal" / "img_003.png"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataValidationError, match=r"img_003\.png: unreadable image"):
        load_dataset(FolderDataSpec(path=class_folder, image_size=8))


def test_single_class_folder_is_an_error(tmp_path):
    write_images(tmp_path / "only", 5)
    with pytest.raises(DataValidationError, match=r"1 class sub-folder"):
        load_dataset(FolderDataSpec(path=tmp_path, image_size=8))


def test_class_folder_without_images(tmp_path):
    write_images(tmp_path / "a", 5)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(DataValidationError, match=r"b: no images.*readme\.txt"):
        load_dataset(FolderDataSpec(path=tmp_path, image_size=8))


def test_missing_folder_names_the_field(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"data\.path: folder not found: .*missing"):
        load_dataset(FolderDataSpec(path=tmp_path / "missing", image_size=8))


def test_too_few_images_for_the_splits(tmp_path):
    write_images(tmp_path / "a", 1)
    write_images(tmp_path / "b", 1)
    with pytest.raises(DataValidationError, match=r"split is empty"):
        load_dataset(FolderDataSpec(path=tmp_path, image_size=8))
