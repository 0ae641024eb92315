"""A distillation run resumed from its saved state after epoch k ends where the uninterrupted run ends.

No Ray: the state goes through the same files a search trial's checkpoint holds
(``TrainingState.save`` / ``load``), into a fresh model, optimiser and augmentation, as in the
process Tune starts for a retried trial.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medkd.data import AugmentSpec, build_augmentation
from medkd.students.distill import DistillConfig, array_teacher_logits, distill
from medkd.students.registry import create_student
from medkd.students.training_state import META_FILE, TENSORS_FILE, TrainingState
from tests.students.test_distill import META, tiny_data

EPOCHS = 4


def student(seed: int = 0) -> torch.nn.Module:
    """resnet_tiny with dropout, so torch's generator matters too."""
    torch.manual_seed(seed)
    return create_student(
        "resnet_tiny", spatial_dims=2, in_channels=1, num_classes=2, image_size=16, width=0.25, dropout=0.3
    )


def run(model, cfg, *, resume=None, on_state=None, on_epoch=None):
    images, labels, teachers = tiny_data()
    augment = build_augmentation(AugmentSpec(flip=0.5, affine={"prob": 0.5}), spatial_dims=2, seed=cfg.seed)
    return distill(
        model,
        cfg,
        train_images=images,
        train_labels=labels,
        teacher_logits=array_teacher_logits(teachers),
        meta=META,
        val_images=images[:16],
        val_labels=labels[:16],
        augment=augment,
        resume=resume,
        on_state=on_state,
        on_epoch=on_epoch,
    )


def config(**overrides) -> DistillConfig:
    base = {"student": "resnet_tiny", "width": 0.25, "epochs": EPOCHS, "batch_size": 16, "lr": 1e-2, "alpha": 0.3}
    return DistillConfig(**{**base, "ema_epochs": 1.0, **overrides})


@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_a_run_resumed_after_epoch_k_ends_with_the_uninterrupted_runs_weights(tmp_path, stop_after):
    cfg = config()
    initial = student()
    uninterrupted = copy.deepcopy(initial)
    reference = run(uninterrupted, cfg)

    # The interrupted run: trains until the state of epoch k is on disk, then "dies" (stops).
    saved: dict[int, Path] = {}

    def save(state: TrainingState) -> None:
        saved[state.epoch] = state.save(tmp_path / f"epoch{state.epoch}")

    run(copy.deepcopy(initial), cfg, on_state=save, on_epoch=lambda record: record["epoch"] == stop_after)
    assert sorted(saved) == list(range(1, stop_after + 1))

    # A new process: a freshly built student (other initial weights even), a fresh augmentation.
    resumed = student(seed=123)
    epochs_run: list[int] = []
    history = run(
        resumed,
        cfg,
        resume=TrainingState.load(saved[stop_after]),
        on_epoch=lambda record: epochs_run.append(record["epoch"]),
    )
    assert epochs_run == list(range(stop_after + 1, EPOCHS + 1))  # no epoch trained twice
    assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1))
    for key in ("train_loss", "val_auc"):
        assert [r[key] for r in history] == [r[key] for r in reference], key
    for (name, a), (_, b) in zip(uninterrupted.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_every_random_generator_is_part_of_the_state(tmp_path):
    cfg = config(epochs=2)
    run(student(), cfg, on_state=lambda state: state.save(tmp_path / "s"))
    tensors = TrainingState.load(tmp_path / "s").tensors
    assert set(tensors) == {"model", "optimizer", "scheduler", "average", "data_rng", "torch_rng", "augment"}
    assert tensors["average"]["updates"] == 2 * (48 // 16)  # the weight average's count of steps
    assert json.loads((tmp_path / "s" / META_FILE).read_text())["epoch"] == 2


def test_a_state_of_another_configuration_is_refused_naming_the_field(tmp_path):
    cfg = config(epochs=2)
    run(student(), cfg, on_state=lambda state: state.save(tmp_path / "s"), on_epoch=lambda record: True)
    state = TrainingState.load(tmp_path / "s")
    with pytest.raises(ValueError, match=r"another configuration \(lr: saved 0.01, now 0.02\)"):
        run(student(), config(epochs=2, lr=2e-2), resume=state)
    with pytest.raises(ValueError, match=r"another configuration \(epochs: saved 2, now 3\)"):
        run(student(), config(epochs=3), resume=state)
    with pytest.raises(ValueError, match="saved for a run of 2 epochs, this run has 1"):
        state.check_resumes(state.config, epochs=1)  # distill(epochs=...) overrides the config's


def test_an_incomplete_or_damaged_state_is_an_error_naming_the_file(tmp_path):
    TrainingState(epoch=1, epochs=2, config={}, tensors={"x": torch.zeros(1)}).save(tmp_path)
    (tmp_path / TENSORS_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=TENSORS_FILE):
        TrainingState.load(tmp_path)
    (tmp_path / META_FILE).write_text('{"epoch": -1}')
    with pytest.raises(ValueError, match=META_FILE):
        TrainingState.load(tmp_path)
    (tmp_path / TENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=TENSORS_FILE):
        TrainingState.load(tmp_path)
    assert not TrainingState.exists(tmp_path / "nowhere")


def test_augmentation_state_restores_the_view_sampler():
    spec = AugmentSpec(flip=0.5, affine={"prob": 0.5})
    first = build_augmentation(spec, spatial_dims=2, seed=0)
    images = np.random.default_rng(0).normal(size=(8, 1, 16, 16)).astype(np.float32)
    first(images)  # advance it
    twin = build_augmentation(spec, spatial_dims=2, seed=99)
    twin.load_state_dict(first.state_dict())
    assert np.array_equal(first(images)[0], twin(images)[0])
