"""A teacher checkpoint with weight averaging: the average is the teacher, the trained weights resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medkd.core.ema import WeightAverage
from medkd.teachers.loop import MODEL_FILE, STATE_FILE, save_checkpoint
from tests.core.test_ema import build


def test_checkpoint_with_average_holds_the_average_as_the_teacher_and_the_trained_weights_for_resuming():
    model = build()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    checkpoint = save_checkpoint(model, optimizer, scheduler, {"epoch": 1}, {"epoch": 1}, average)
    directory = Path(checkpoint.path)
    teacher = torch.load(directory / MODEL_FILE, weights_only=True)
    state = torch.load(directory / STATE_FILE, weights_only=True)
    torch.testing.assert_close(teacher["0.weight"], average.model[0].weight)
    torch.testing.assert_close(state["model"]["0.weight"], model[0].weight)
    assert not torch.equal(teacher["0.weight"], state["model"]["0.weight"])
    assert state["average"]["updates"] == 1
    assert json.loads((directory / "meta.json").read_text())["state"] == {"epoch": 1}
