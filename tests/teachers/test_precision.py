"""Teachers in bfloat16 on CPU (``cpu_precision: bf16``): what runs in bf16, what stays fp32, and
that a teacher trained without the field keeps its fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from medkd.data.meta import DatasetMeta
from medkd.spec.teachers import TeacherSpec
from medkd.teachers.loop import build_optimizer, predict, train_epoch, uses_cpu_bf16
from medkd.teachers.train import epoch_timing_line

META = DatasetMeta(
    task="classification", spatial_dims=2, in_channels=1, num_classes=3, image_size=[8, 8], multilabel=False
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))


def _loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 8, 8, generator=generator), torch.arange(16) % 3) for _ in range(4)]


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_autocast_runs_the_convolutions_in_bf16_and_keeps_weights_and_loss_fp32(bf16):
    model = _model()
    seen: list[torch.dtype] = []
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    optimizer = build_optimizer(model, {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0})
    losses = [
        train_epoch(
            model,
            _loader(),
            criterion=nn.CrossEntropyLoss(),
            optimizer=optimizer,
            scaler=torch.amp.GradScaler("cuda", enabled=False),
            augment=None,
            meta=META,
            device=torch.device("cpu"),
            use_amp=bf16,
        )
        for _ in range(5)
    ]
    assert set(seen) == {torch.bfloat16 if bf16 else torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0]  # it learns in both precisions


def test_predict_in_bf16_returns_float32_logits_close_to_fp32():
    model = _model()
    images = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32)
    full = predict(model, images, 16, torch.device("cpu"))
    half = predict(model, images, 16, torch.device("cpu"), bf16=True)
    assert half.dtype == np.float32 and half.shape == full.shape == (40, 3)
    assert not np.array_equal(half, full)  # really computed in bf16
    np.testing.assert_allclose(half, full, atol=0.05)
    assert (half.argmax(1) == full.argmax(1)).mean() >= 0.95


def test_cpu_precision_is_used_on_cpu_only():
    assert uses_cpu_bf16({"cpu_precision": "bf16"}, torch.device("cpu"))
    assert not uses_cpu_bf16({"cpu_precision": "bf16"}, torch.device("cuda"))
    assert not uses_cpu_bf16({"cpu_precision": None}, torch.device("cpu"))
    assert not uses_cpu_bf16({}, torch.device("cpu"))  # a dump from before the field


def test_fp32_or_unset_keeps_the_fingerprint_fields_bf16_changes_them():
    base = {"name": "cnn", "model": "resnet18"}
    unset = TeacherSpec.model_validate(base).training_fingerprint_fields()
    assert "cpu_precision" not in unset
    assert TeacherSpec.model_validate({**base, "cpu_precision": "fp32"}).training_fingerprint_fields() == unset
    assert TeacherSpec.model_validate({**base, "cpu_precision": "bf16"}).training_fingerprint_fields() == {
        **unset,
        "cpu_precision": "bf16",
    }


def test_unknown_cpu_precision_names_the_field():
    with pytest.raises(ValidationError, match="cpu_precision"):
        TeacherSpec.model_validate({"name": "cnn", "model": "resnet18", "cpu_precision": "fp16"})


def test_epoch_timing_line_says_where_the_epoch_went_and_the_eta():
    line = epoch_timing_line("vit", {"epoch": 2, "epoch_seconds": 90.0, "train_seconds": 80.0}, 5, [110.0, 90.0])
    assert line == "  teacher vit: epoch 2/5 took 90s (train 80s, validation and checkpoint 10s); ETA 5.0 min"
    last = epoch_timing_line("vit", {"epoch": 5, "epoch_seconds": 60.0, "train_seconds": 50.0}, 5, [60.0])
    assert last.endswith("ETA 0.0 min")
