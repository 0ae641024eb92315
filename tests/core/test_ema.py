"""Weight averaging (EMA): the average and its decay (teachers and students use it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medkd.core.ema import WeightAverage, ema_decay


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)).eval()


def build() -> nn.Module:
    model = small_model()
    model(torch.zeros(1, 1, 6, 6))  # materialise the lazy layer
    return model


def test_ema_decay_matches_the_horizon_in_epochs():
    assert ema_decay(2.0, 50) == pytest.approx(0.99)
    assert ema_decay(0.01, 10) == 0.0  # a horizon under one step: no averaging
    with pytest.raises(ValueError, match="ema_epochs"):
        ema_decay(0.0, 10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        ema_decay(1.0, 0)


def test_average_follows_the_weights_and_copies_integer_buffers():
    model = build()
    average = WeightAverage(model, decay=0.9)
    start = {k: v.clone() for k, v in average.model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(7)
    average.update(model)  # first update: decay min(0.9, 1/10) = 0.1
    state = average.model.state_dict()
    torch.testing.assert_close(state["0.weight"], start["0.weight"] + 0.9)
    torch.testing.assert_close(state["1.running_mean"], start["1.running_mean"] + 1.8)
    assert int(state["1.num_batches_tracked"]) == 7
    for _ in range(400):
        average.update(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(average.model.state_dict()[key], value, atol=1e-4, rtol=0)
    assert not any(p.requires_grad for p in average.model.parameters())


def test_average_state_round_trip_and_bad_decay():
    model = build()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.mul_(3)
    average.update(model)
    restored = WeightAverage(build(), decay=0.5)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 1
    torch.testing.assert_close(restored.model[0].weight, average.model[0].weight)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


def test_a_copied_average_follows_its_own_model_only():
    import copy

    model = build()
    average = WeightAverage(model, decay=0.5)
    average.update(model)
    fork = copy.deepcopy(model)
    twin = average.copy()
    assert (twin.decay, twin.updates) == (average.decay, average.updates)
    before = {k: v.clone() for k, v in average.model.state_dict().items()}
    with torch.no_grad():
        for parameter in fork.parameters():
            parameter.add_(1.0)
    twin.update(fork)
    assert all(torch.equal(v, average.model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert not torch.equal(twin.model[0].weight, average.model[0].weight)
    assert twin.updates == average.updates + 1
