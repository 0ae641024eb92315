"""Batched augmentation with explicit, reproducible per-sample views.

Every augmentation is a *view*: a small JSON-serialisable dict of explicit parameters drawn by
:func:`sample_view_params` and applied by :func:`apply_view` (images) and
:func:`apply_view_to_masks` (segmentation masks, same geometry, nearest neighbour). Because a
view is data, teacher logits for augmented view ``k`` of a sample can be cached with its
parameters and the exact same view rebuilt during student training (FKD-style).

The operations follow MONAI's array transforms and reproduce them exactly for the same
parameters — ``Flip``, ``Rotate90`` (last two spatial axes), ``Affine`` (rotate, translate,
scale; ``align_corners=False``), ``AdjustContrast`` — but run on a whole mini-batch at once
(MONAI's batched ``AffineTransform`` layer for the resampling), so a training loop can call
them per step on CPU for a few milliseconds.

A view::

    {"flip": [0],                         # spatial axes to flip
     "rot90": 1,                          # quarter turns in the last two spatial axes
     "affine": {"rotate": [0.1],          # radians (1 angle in 2D, 3 in 3D), MONAI order
                "scale": 1.05,            # isotropic zoom, > 1 enlarges the content
                "translate": [0.02, 0.0], # fraction of each spatial size
                "padding_mode": "border"} | None,
     "gamma": 1.2 | None,                 # contrast gamma (MONAI AdjustContrast)
     "noise": {"std": 0.05, "seed": 123} | None}

Examples:
    >>> spec = AugmentSpec(flip=0.5, affine={"rotate_degrees": 10})
    >>> views = sample_view_params(spec, 4, rng=0)
    >>> images = torch.zeros(4, 1, 28, 28)
    >>> apply_view(images, views).shape
    torch.Size([4, 1, 28, 28])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medkd.spec.data import AugmentSpec

ViewParams = dict[str, Any]
_GAMMA_EPSILON = 1e-7  # as MONAI AdjustContrast
_TASKS = ("classification", "segmentation")


def identity_view() -> ViewParams:
    return {"flip": [], "rot90": 0, "affine": None, "gamma": None, "noise": None}


def _generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_view_params(
    spec: AugmentSpec,
    n: int,
    rng: np.random.Generator | int | None = None,
    spatial_dims: int = 2,
    *,
    spatial_shape: Sequence[int] | None = None,
) -> list[ViewParams]:
    """Draw ``n`` random views of ``spec`` (plain dicts: store them to replay the views).

    Args:
        spec: what may happen and how often.
        n: number of views (one per sample).
        rng: a numpy ``Generator`` (advanced in place) or a seed.
        spatial_dims: 2 or 3.
        spatial_shape: the images' spatial shape; if the last two sizes differ, rotations by
            an odd number of quarter turns (which would change the shape) are not drawn.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = _generator(rng)
    square = spatial_shape is None or spatial_shape[-1] == spatial_shape[-2]
    flip_axes = [a for a in (spec.flip_axes if spec.flip_axes is not None else range(spatial_dims)) if a < spatial_dims]
    # One fixed block of draws per category keeps views reproducible from (spec, n, seed).
    flips = rng.random((n, spatial_dims)) < spec.flip
    rotate = rng.random(n) < spec.rotate90
    quarter_turns = rng.integers(1, 4, size=n) if square else np.full(n, 2)
    views = [identity_view() for _ in range(n)]
    for i, view in enumerate(views):
        view["flip"] = [a for a in flip_axes if flips[i, a]]
        view["rot90"] = int(quarter_turns[i]) if rotate[i] else 0

    affine = spec.affine
    if affine is not None and affine.prob > 0:
        apply = rng.random(n) < affine.prob
        max_angle = math.radians(affine.rotate_degrees)
        angles = rng.uniform(-max_angle, max_angle, size=(n, 1 if spatial_dims == 2 else 3))
        scales = rng.uniform(affine.scale[0], affine.scale[1], size=n)
        shifts = rng.uniform(-affine.translate, affine.translate, size=(n, spatial_dims))
        for i in np.flatnonzero(apply):
            views[i]["affine"] = {
                "rotate": [float(a) for a in angles[i]],
                "scale": float(scales[i]),
                "translate": [float(t) for t in shifts[i]],
                "padding_mode": affine.padding_mode,
            }

    intensity = spec.intensity
    if intensity is not None and intensity.prob > 0:
        apply = rng.random(n) < intensity.prob
        gammas = rng.uniform(*intensity.gamma, size=n) if intensity.gamma is not None else None
        stds = rng.uniform(0.0, intensity.noise_std, size=n)
        seeds = rng.integers(0, 2**62, size=n)
        for i in np.flatnonzero(apply):
            if gammas is not None:
                views[i]["gamma"] = float(gammas[i])
            if intensity.noise_std > 0:
                views[i]["noise"] = {"std": float(stds[i]), "seed": int(seeds[i])}
    return views


def _as_tensor(array: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, bool]:
    if isinstance(array, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array)), True
    if not isinstance(array, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array, got {type(array).__name__}")
    return array, False


def _check(array: torch.Tensor, params: Sequence[ViewParams], name: str, leading: int) -> int:
    spatial_dims = array.ndim - leading
    if spatial_dims not in (2, 3):
        layout = "(B, C, *spatial)" if leading == 2 else "(B, *spatial)"
        raise ValueError(f"{name} must be {layout} with 2 or 3 spatial dims, got shape {tuple(array.shape)}")
    if len(params) != array.shape[0]:
        raise ValueError(f"got {len(params)} views for a batch of {array.shape[0]} {name}")
    return spatial_dims


def _rotations(angles: np.ndarray) -> np.ndarray:
    """``(B, 1)`` angles -> 2D or ``(B, 3)`` -> 3D rotation matrices, as MONAI ``create_rotate``.

    3D uses MONAI's default intrinsic ``"XYZ"`` order: ``R = Rx(a0) @ Ry(a1) @ Rz(a2)``.
    """
    cos, sin = np.cos(angles), np.sin(angles)
    batch = len(angles)
    if angles.shape[1] == 1:
        return np.stack([np.stack([cos[:, 0], -sin[:, 0]], 1), np.stack([sin[:, 0], cos[:, 0]], 1)], 1)
    rx, ry, rz = (np.tile(np.eye(3), (batch, 1, 1)) for _ in range(3))
    rx[:, 1, 1], rx[:, 1, 2], rx[:, 2, 1], rx[:, 2, 2] = cos[:, 0], -sin[:, 0], sin[:, 0], cos[:, 0]
    ry[:, 0, 0], ry[:, 0, 2], ry[:, 2, 0], ry[:, 2, 2] = cos[:, 1], sin[:, 1], -sin[:, 1], cos[:, 1]
    rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1] = cos[:, 2], -sin[:, 2], sin[:, 2], cos[:, 2]
    return rx @ ry @ rz


def _affine_thetas(affines: Sequence[dict[str, Any]], spatial_shape: Sequence[int]) -> torch.Tensor:
    """Normalised-coordinate matrices ``(B, d+1, d+1)`` equal to MONAI ``Affine`` in pixels.

    MONAI composes ``rotate @ translate @ scale`` on centred pixel coordinates, with scale
    acting on the sampling grid (``1 / zoom`` enlarges the content by ``zoom``). With
    ``align_corners=False`` a centred pixel coordinate ``p`` is ``p * 2 / size`` normalised.
    """
    dims = len(spatial_shape)
    rotation = _rotations(np.asarray([a["rotate"] for a in affines], dtype=np.float64).reshape(len(affines), -1))
    zoom = np.asarray([a["scale"] for a in affines], dtype=np.float64)
    shift = np.asarray([a["translate"] for a in affines], dtype=np.float64) * np.asarray(
        spatial_shape, dtype=np.float64
    )
    to_normalised = 2.0 / np.asarray(spatial_shape, dtype=np.float64)
    linear = rotation / zoom[:, None, None]
    theta = np.tile(np.eye(dims + 1), (len(affines), 1, 1))
    theta[:, :dims, :dims] = to_normalised[None, :, None] * linear / to_normalised[None, None, :]
    theta[:, :dims, dims] = to_normalised[None, :] * np.einsum("bij,bj->bi", rotation, shift)
    return torch.as_tensor(theta, dtype=torch.float32)


def _spatial(x: torch.Tensor, params: Sequence[ViewParams], spatial_dims: int, mode: str) -> torch.Tensor:
    """Flip, rot90 and affine on ``x`` of shape ``(B, C, *spatial)``; returns a new tensor if changed."""
    copied = False

    def writable() -> torch.Tensor:
        nonlocal x, copied
        if not copied:
            x, copied = x.clone(), True
        return x

    for axis in range(spatial_dims):
        selected = [i for i, view in enumerate(params) if axis in view["flip"]]
        if selected:
            out = writable()
            out[selected] = out[selected].flip(2 + axis)
    for k in (1, 2, 3):
        selected = [i for i, view in enumerate(params) if view["rot90"] % 4 == k]
        if selected:
            if k % 2 and x.shape[-1] != x.shape[-2]:
                raise ValueError(
                    f"rot90 by {k} quarter turn(s) needs square images, got spatial shape {tuple(x.shape[2:])}"
                )
            out = writable()
            out[selected] = torch.rot90(out[selected], k, dims=(-2, -1))
    by_padding: dict[str, list[int]] = {}
    for i, view in enumerate(params):
        if view.get("affine"):
            by_padding.setdefault(view["affine"].get("padding_mode", "border"), []).append(i)
    if by_padding:
        from monai.networks.layers import AffineTransform

        out = writable()
        for padding_mode, selected in by_padding.items():
            theta = _affine_thetas([params[i]["affine"] for i in selected], tuple(x.shape[2:]))
            resample = AffineTransform(
                normalized=True, mode=mode, padding_mode=padding_mode, align_corners=False, reverse_indexing=True
            )
            source = out[selected]
            moved = resample(source.float(), theta)
            out[selected] = moved.to(source.dtype) if source.dtype.is_floating_point else moved.round().to(source.dtype)
    return x


def _intensity(x: torch.Tensor, params: Sequence[ViewParams]) -> torch.Tensor:
    gamma_rows = [i for i, view in enumerate(params) if view.get("gamma") is not None]
    noise_rows = [i for i, view in enumerate(params) if view.get("noise")]
    if not gamma_rows and not noise_rows:
        return x
    x = x.clone()
    if gamma_rows:
        selected = x[gamma_rows]
        flat = selected.reshape(len(gamma_rows), -1)
        low = flat.min(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
        span = flat.max(dim=1).values.view(-1, *([1] * (x.ndim - 1))) - low
        gamma = torch.tensor([params[i]["gamma"] for i in gamma_rows], dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
        x[gamma_rows] = ((selected - low) / (span + _GAMMA_EPSILON)) ** gamma * span + low
    for i in noise_rows:
        noise = params[i]["noise"]
        generator = torch.Generator().manual_seed(int(noise["seed"]))
        x[i] += torch.randn(x.shape[1:], generator=generator, dtype=x.dtype) * float(noise["std"])
    return x


def apply_view(images: torch.Tensor | np.ndarray, params: Sequence[ViewParams]) -> torch.Tensor | np.ndarray:
    """Apply one view per sample to ``images`` ``(B, C, *spatial)``; returns the input's type.

    Deterministic: the same images and views give the same output, bit for bit.
    """
    x, was_numpy = _as_tensor(images)
    spatial_dims = _check(x, params, "images", leading=2)
    if not x.dtype.is_floating_point:
        raise ValueError(f"images must be floating point (normalised), got {x.dtype}")
    out = _intensity(_spatial(x, params, spatial_dims, mode="bilinear"), params)
    return out.numpy() if was_numpy else out


def apply_view_to_masks(masks: torch.Tensor | np.ndarray, params: Sequence[ViewParams]) -> torch.Tensor | np.ndarray:
    """Apply the spatial part of each view to integer masks ``(B, *spatial)`` (nearest neighbour)."""
    m, was_numpy = _as_tensor(masks)
    spatial_dims = _check(m, params, "masks", leading=1)
    out = _spatial(m.unsqueeze(1), params, spatial_dims, mode="nearest")[:, 0]
    return out.numpy() if was_numpy else out


class Augmentation:
    """A random augmentation for training loops: ``images, masks = augment(images, masks)``.

    Each call draws one fresh view per sample (from its own seeded generator) and applies it to
    the images and, for segmentation, identically to the masks.
    """

    def __init__(
        self, spec: AugmentSpec, spatial_dims: int, task: str = "classification", seed: int | None = None
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
        self.spec = spec
        self.spatial_dims = spatial_dims
        self.task = task
        self.rng = np.random.default_rng(seed)

    def __call__(
        self, images: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray | None = None
    ) -> tuple[Any, Any]:
        if masks is not None and self.task != "segmentation":
            raise ValueError("masks are only augmented for segmentation; pass None for classification labels")
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"images must be (B, C, *spatial) with {self.spatial_dims} spatial dims, got shape {tuple(images.shape)}"
            )
        if not self.spec.enabled:
            return images, masks
        views = sample_view_params(
            self.spec, images.shape[0], self.rng, self.spatial_dims, spatial_shape=tuple(images.shape[2:])
        )
        out_masks = apply_view_to_masks(masks, views) if masks is not None else None
        return apply_view(images, views), out_masks

    def state_dict(self) -> dict[str, Any]:
        """The view sampler's position, so a resumed training draws the views it would have drawn.

        Examples:
            >>> augment = Augmentation(AugmentSpec(flip=True), spatial_dims=2, seed=0)
            >>> twin = Augmentation(AugmentSpec(flip=True), spatial_dims=2, seed=1)
            >>> twin.load_state_dict(augment.state_dict())
            >>> twin.rng.random() == augment.rng.random()
            True
        """
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]

    def __repr__(self) -> str:
        return f"Augmentation({self.spec!r}, spatial_dims={self.spatial_dims}, task={self.task!r})"


def build_augmentation(
    spec: AugmentSpec, spatial_dims: int, task: str = "classification", seed: int | None = None
) -> Augmentation:
    """The training-time augmentation of ``spec`` (see :class:`Augmentation`).

    Args:
        spec: the augmentation spec (everything off by default).
        spatial_dims: 2 or 3.
        task: ``classification`` or ``segmentation`` (masks follow the images).
        seed: seed of the view sampling; ``None`` draws fresh entropy.

    Examples:
        >>> augment = build_augmentation(AugmentSpec(flip=True), spatial_dims=2, task="segmentation", seed=0)
        >>> images, masks = augment(torch.zeros(8, 1, 16, 16), torch.zeros(8, 16, 16, dtype=torch.long))
    """
    return Augmentation(spec, spatial_dims, task, seed)
