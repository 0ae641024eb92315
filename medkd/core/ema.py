"""Exponential moving average of a model's weights (EMA, as timm's ``ModelEmaV2``).

On small medical datasets the weights of the last few epochs scatter around a good solution and
a validation split of a few dozen images picks among them mostly by noise; their average is a
better and steadier model. For teachers the averaged copy is what is validated, checkpointed and
cached as soft labels; for students (``search.ema_epochs``) what is validated, compressed and served.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(ema_epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay whose averaging horizon (``1 / (1 - decay)`` steps) is ``ema_epochs`` epochs.

    Examples:
        >>> round(ema_decay(2.0, 50), 4)
        0.99
    """
    if ema_epochs <= 0:
        raise ValueError(f"ema_epochs must be > 0, got {ema_epochs}")
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    return 1.0 - 1.0 / max(1.0, ema_epochs * steps_per_epoch)


class WeightAverage:
    """An averaged copy of ``model``: ``update(model)`` after every optimiser step.

    Floating-point parameters and buffers (BatchNorm statistics too) are averaged; integer
    buffers (``num_batches_tracked``) are copied. Early updates use a smaller decay,
    ``min(decay, (1 + n) / (10 + n))``, so the average is not dominated by the random
    initial weights on short runs.

    Args:
        model: the model being trained (unwrapped from DDP).
        decay: per-step decay in [0, 1).

    Examples:
        >>> average = WeightAverage(model, decay=0.99)
        >>> for batch in loader:
        ...     train_step(model, batch)
        ...     average.update(model)
        >>> validate(average.model)
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self._paired: tuple | None = None
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats, others = self._pairs(model)
        if floats[0]:
            torch._foreach_lerp_(floats[0], floats[1], 1.0 - decay)
        for averaged, current in zip(*others):
            averaged.copy_(current)
        self.updates += 1

    def _pairs(self, model: nn.Module) -> tuple[tuple[list, list], tuple[list, list]]:
        """(averaged, current) tensor lists, floating point and other, paired once per trained model:
        ``update`` runs after every optimiser step and must not rebuild two state dicts each time."""
        if self._paired is None or self._paired[0] is not model:
            floats: tuple[list, list] = ([], [])
            others: tuple[list, list] = ([], [])
            for averaged, current in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
                target = floats if averaged.dtype.is_floating_point else others
                target[0].append(averaged)
                target[1].append(current.detach())
            self._paired = (model, floats, others)
        return self._paired[1], self._paired[2]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])  # copies in place: the paired tensors stay valid
        self.updates = int(state["updates"])

    def copy(self) -> WeightAverage:
        """An independent average with the same weights, decay and update count (for a forked run)."""
        twin = WeightAverage.__new__(WeightAverage)
        twin.decay, twin.updates, twin._paired = self.decay, self.updates, None
        twin.model = copy.deepcopy(self.model)
        return twin
