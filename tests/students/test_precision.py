"""Students in bfloat16 on CPU (``DistillConfig.cpu_precision`` / ``search.cpu_precision``): the forward
pass runs under autocast, the losses see float32 logits, the student learns, and fp32 configs
serialise as they did before the field."""

from __future__ import annotations

import warnings

import pytest
import torch
from pydantic import ValidationError

from medkd.core import cpu_features
from medkd.students.distill import DistillConfig, array_teacher_logits, build_student, distill, uses_cpu_bf16
from tests.students.test_distill import META, config, tiny_data


def distill_tiny(cfg: DistillConfig, model: torch.nn.Module | None = None) -> list[dict]:
    """``distill`` on the tiny KD data of ``test_distill``; returns the history."""
    images, labels, teachers = tiny_data()
    model = build_student(META, cfg) if model is None else model
    return distill(
        model, cfg, train_images=images, train_labels=labels, teacher_logits=array_teacher_logits(teachers), meta=META
    )


@pytest.mark.filterwarnings("ignore:.*no native bf16:RuntimeWarning")  # tested below; bf16 is the point here
def test_bf16_student_trains_under_autocast_with_float32_losses_and_learns():
    cfg = config(alpha=0.3, temperature=4.0, cpu_precision="bf16")
    model = build_student(META, cfg)
    output_dtypes = []
    model.register_forward_hook(lambda module, inputs, output: output_dtypes.append(output.dtype))
    history = distill_tiny(cfg, model)
    # Training steps ran in bf16 (autocast), the losses are float32 numbers that went down.
    assert torch.bfloat16 in output_dtypes
    kd, loss = [r["train_kd"] for r in history], [r["train_loss"] for r in history]
    assert kd[-1] < kd[0] and loss[-1] < loss[0]
    # Weights stay float32 (autocast casts per op), so export and INT8 compression are unchanged.
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp32_student_never_runs_in_bf16():
    cfg = config(alpha=0.3, epochs=1)
    model = build_student(META, cfg)
    output_dtypes = []
    model.register_forward_hook(lambda module, inputs, output: output_dtypes.append(output.dtype))
    distill_tiny(cfg, model)
    assert set(output_dtypes) == {torch.float32}


def test_bf16_only_on_the_cpu():
    assert uses_cpu_bf16(DistillConfig(cpu_precision="bf16"), torch.device("cpu"))
    assert not uses_cpu_bf16(DistillConfig(cpu_precision="bf16"), torch.device("cuda"))
    assert not uses_cpu_bf16(DistillConfig(), torch.device("cpu"))


def test_fp32_configs_serialise_as_before_the_field():
    # Trial configs, final-training fingerprints and saved training states of fp32 runs stay as they were.
    assert "cpu_precision" not in DistillConfig().model_dump()
    assert "cpu_precision" not in DistillConfig(cpu_precision="fp32").model_dump_json()
    bf16 = DistillConfig(cpu_precision="bf16")
    assert bf16.model_dump()["cpu_precision"] == "bf16"
    assert DistillConfig.model_validate_json(bf16.model_dump_json()) == bf16  # reaches a Ray task intact
    assert DistillConfig.model_validate(DistillConfig().model_dump()).cpu_precision == "fp32"


def test_unknown_student_precision_names_the_field():
    with pytest.raises(ValidationError, match="cpu_precision"):
        DistillConfig(cpu_precision="fp16")


@pytest.mark.parametrize("native", [False, True])
def test_a_bf16_student_warns_only_on_a_cpu_without_native_bf16(monkeypatch, native):
    monkeypatch.setattr(cpu_features, "cpu_has_native_bf16", lambda: native)
    cfg = config(alpha=0.3, epochs=1, cpu_precision="bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distill_tiny(cfg)
    slow = [w for w in caught if issubclass(w.category, RuntimeWarning) and "no native bf16" in str(w.message)]
    assert len(slow) == (0 if native else 1)
    assert native or f"student {cfg.student!r}" in str(slow[0].message)
