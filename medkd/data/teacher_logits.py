"""Where a student's teacher logits come from, as the distillation loop sees them.

The soft-label stage produces these (from Redis) and the students stage consumes them, so the
types live below both: ``teacher_logits(indices) -> (T, B, C[, *spatial])`` for the training
split, and :class:`CachedViews` for FKD-style cached augmented views.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from medkd.data.augment import apply_view, apply_view_to_masks, identity_view

TeacherLogitsFn = Callable[[np.ndarray], np.ndarray]
ViewLogitsFn = Callable[[int, np.ndarray], np.ndarray]


class CachedViews:
    """``K`` cached augmented views of the training split: their parameters and teacher logits.

    Args:
        params: ``params[k][i]`` is the view-parameter dict (see
            :func:`medkd.data.sample_view_params`) of view ``k`` of training sample ``i``.
        logits: ``(k, indices) -> (T, B, ...)`` raw teacher logits of view ``k`` of those samples.

    Examples:
        >>> views = CachedViews(params, lambda k, idx: stacked_views[k][:, idx])
        >>> distill(model, config, ..., teacher_logits=originals, views=views)
    """

    def __init__(self, params: list[list[dict[str, Any]]], logits: ViewLogitsFn) -> None:
        if not params:
            raise ValueError("params must hold at least one view")
        sizes = {len(view) for view in params}
        if len(sizes) != 1:
            raise ValueError(f"every view needs parameters for every sample, got sizes {sorted(sizes)}")
        self.params = params
        self.logits = logits
        self.num_samples = sizes.pop()

    @property
    def num_views(self) -> int:
        return len(self.params)

    def draw(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """Per-sample choice for a batch: 0 = the original image, ``k >= 1`` = cached view ``k - 1``."""
        return rng.integers(0, self.num_views + 1, size=batch)

    def batch(
        self,
        indices: np.ndarray,
        choice: np.ndarray,
        images: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: TeacherLogitsFn,
        segmentation: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The batch's images (and masks) with the chosen views applied, and the matching teacher logits."""
        params = [identity_view() if k == 0 else self.params[k - 1][i] for i, k in zip(indices, choice)]
        images = apply_view(images, params)
        if segmentation:
            labels = apply_view_to_masks(labels, params)
        parts = {
            k: (teacher_logits(indices[choice == k]) if k == 0 else self.logits(k - 1, indices[choice == k]))
            for k in np.unique(choice)
        }
        first = next(iter(parts.values()))
        teachers = np.empty((first.shape[0], len(indices), *first.shape[2:]), dtype=np.float32)
        for k, logits in parts.items():
            teachers[:, choice == k] = logits
        return images, labels, teachers


def array_teacher_logits(stacked: np.ndarray) -> TeacherLogitsFn:
    """Teacher logits held in memory as one (T, N, ...) array."""
    return lambda indices: stacked[:, indices]
