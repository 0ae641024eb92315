"""Deterministic synthetic data: classification and segmentation, 2D and 3D (vectorised numpy).

Classification: every image shows a soft-edged lesion on a smooth, noisy background. The
lesion carries a striped texture whose orientation encodes the class (class ``c`` of ``K`` is
centred on ``pi * c / K``), jittered per image so neighbouring classes overlap. The overlap
makes the task learnable but not trivial, and gives teachers' soft labels real information
(how ambiguous an image is) for a student to learn from. ``difficulty`` scales the jitter and
the pixel noise.

Segmentation: every image holds up to three ellipses/ellipsoids whose class (1..K-1) sets their
intensity and texture orientation; the mask is the integer class map (0 = background).

Same spec -> the same bytes: every split has its own generator seeded by ``(seed, split)``, and
all random parameters are drawn before rendering (rendering is chunked to bound memory).
"""

from __future__ import annotations

import numpy as np

from medkd.data.dataset import RawData, Split
from medkd.data.registry import register_adapter
from medkd.spec.data import SyntheticDataSpec

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_TASK_IDS = {"classification": 0, "segmentation": 1}
_RENDER_CHUNK_PIXELS = 1 << 22  # samples per chunk * pixels per sample stays below ~4M floats
_COARSE_GRID = 4
_TEXTURE_PERIODS_PER_IMAGE = 5.0
_SEGMENTATION_SLOTS = 3
# Orientation jitter (std, in units of the class spacing pi/K) at difficulty 1. At the default
# difficulty 0.5 about 1 image in 10 looks like a neighbouring class: a small CNN reaches a
# test AUC of ~0.95 in a few epochs on 512 images, and soft labels carry that ambiguity.
_JITTER = 0.6


def _interpolation_matrix(size: int, coarse: int) -> np.ndarray:
    """``(size, coarse)`` linear interpolation weights (corner-aligned)."""
    positions = np.linspace(0, coarse - 1, size)
    low = np.clip(np.floor(positions).astype(int), 0, coarse - 2)
    frac = positions - low
    weights = np.zeros((size, coarse), dtype=np.float32)
    weights[np.arange(size), low] = 1 - frac
    weights[np.arange(size), low + 1] = frac
    return weights


def _smooth_field(coarse_values: np.ndarray, size: int) -> np.ndarray:
    """Upsample ``(n, g, g[, g])`` coarse noise to ``(n, size, ...)`` by separable interpolation."""
    weights = _interpolation_matrix(size, coarse_values.shape[1])
    if coarse_values.ndim == 3:
        return np.einsum("ya,nab,xb->nyx", weights, coarse_values, weights, optimize=True)
    return np.einsum("za,yb,nabc,xc->nzyx", weights, weights, coarse_values, weights, optimize=True)


def _coordinates(spatial_dims: int, size: int) -> np.ndarray:
    """``(spatial_dims, *spatial)`` pixel-centre coordinates."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    return np.stack(np.meshgrid(*([axis] * spatial_dims), indexing="ij"))


def _broadcast(values: np.ndarray, spatial_dims: int) -> np.ndarray:
    """Per-sample values ``(n,)`` -> ``(n, 1, ..., 1)`` for broadcasting over pixels (floats as float32)."""
    if values.dtype.kind == "f":
        values = values.astype(np.float32, copy=False)
    return values.reshape(values.shape + (1,) * spatial_dims)


def _texture_direction(theta: np.ndarray, tilt: np.ndarray | None, spatial_dims: int) -> np.ndarray:
    """Unit vectors ``(n, spatial_dims)``: angle ``theta`` in the (H, W) plane, 3D tilted by ``tilt``."""
    if spatial_dims == 2:
        return np.stack([np.sin(theta), np.cos(theta)], axis=1)
    assert tilt is not None
    return np.stack([np.sin(tilt), np.cos(tilt) * np.sin(theta), np.cos(tilt) * np.cos(theta)], axis=1)


def _ellipse_radius(coords: np.ndarray, centre: np.ndarray, radii: np.ndarray, angle: np.ndarray | None) -> np.ndarray:
    """Normalised radius ``(n, *spatial)``: < 1 inside each sample's ellipse/ellipsoid."""
    spatial_dims = coords.shape[0]
    offsets = [coords[d][None] - _broadcast(centre[:, d], spatial_dims) for d in range(spatial_dims)]
    if angle is not None:  # 2D: rotate the ellipse
        cos, sin = _broadcast(np.cos(angle), 2), _broadcast(np.sin(angle), 2)
        offsets = [cos * offsets[0] + sin * offsets[1], -sin * offsets[0] + cos * offsets[1]]
    squared = sum((offsets[d] / _broadcast(radii[:, d], spatial_dims)) ** 2 for d in range(spatial_dims))
    return np.sqrt(squared)


def _stripes(coords: np.ndarray, direction: np.ndarray, phase: np.ndarray, period: float) -> np.ndarray:
    spatial_dims = coords.shape[0]
    projection = sum(coords[d][None] * _broadcast(direction[:, d], spatial_dims) for d in range(spatial_dims))
    return np.cos(np.float32(2 * np.pi / period) * projection + _broadcast(phase, spatial_dims))


def _chunks(n: int, size: int, spatial_dims: int) -> list[slice]:
    step = max(1, _RENDER_CHUNK_PIXELS // (size**spatial_dims))
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def _to_channels(image: np.ndarray, in_channels: int, rng_noise: np.ndarray) -> np.ndarray:
    """``(n, *spatial)`` in ~[0, 1] -> uint8 ``(n, C, *spatial)``; extra channels are re-weighted copies."""
    channels = [image]
    for channel in range(1, in_channels):
        channels.append(image * (1.0 - 0.15 * channel) + 0.1 * channel * rng_noise[channel - 1])
    stacked = np.stack(channels, axis=1)
    return np.clip(np.rint(stacked * 255.0), 0, 255).astype(np.uint8)


def _classification_split(spec: SyntheticDataSpec, n: int, rng: np.random.Generator) -> Split:
    dims, size, k = spec.spatial_dims, spec.image_size, spec.num_classes
    labels = rng.permutation(np.arange(n) % k).astype(np.int64)
    # All random parameters first, so chunked rendering cannot change the result.
    jitter = rng.normal(0.0, spec.difficulty * _JITTER * np.pi / k, size=n)
    theta = np.pi * labels / k + jitter
    tilt = rng.normal(0.0, 0.25, size=n) if dims == 3 else None
    phase = rng.uniform(0, 2 * np.pi, size=n)
    centre = rng.uniform(0.3, 0.7, size=(n, dims)) * size
    radii = rng.uniform(0.2, 0.32, size=(n, dims)) * size
    angle = rng.uniform(0, np.pi, size=n) if dims == 2 else None
    contrast = rng.uniform(0.15, 0.3, size=n)
    background = rng.normal(0.0, 1.0, size=(n,) + (_COARSE_GRID,) * dims).astype(np.float32)
    noise_std = 0.04 + 0.2 * spec.difficulty
    noise_seed = int(rng.integers(2**63))

    coords = _coordinates(dims, size)
    period = size / _TEXTURE_PERIODS_PER_IMAGE
    direction = _texture_direction(theta, tilt, dims)
    images = np.empty((n, spec.in_channels) + (size,) * dims, dtype=np.uint8)
    noise_rng = np.random.default_rng(noise_seed)
    for part in _chunks(n, size, dims):
        count = part.stop - part.start
        radius = _ellipse_radius(coords, centre[part], radii[part], None if angle is None else angle[part])
        lesion = 1.0 / (1.0 + np.exp(np.clip((radius - 1.0) * np.float32(10.0), -30, 30)))
        texture = _stripes(coords, direction[part], phase[part], period)
        image = np.float32(0.35) + np.float32(0.08) * _smooth_field(background[part], size)
        image += lesion * (_broadcast(contrast[part], dims) + np.float32(0.18) * texture)
        image += np.float32(noise_std) * noise_rng.standard_normal(image.shape, dtype=np.float32)
        extra = noise_rng.standard_normal((spec.in_channels - 1, count) + (size,) * dims, dtype=np.float32)
        images[part] = _to_channels(image.astype(np.float32), spec.in_channels, extra)
    return Split(images, labels)


def _segmentation_split(spec: SyntheticDataSpec, n: int, rng: np.random.Generator) -> Split:
    dims, size, k = spec.spatial_dims, spec.image_size, spec.num_classes
    slots = _SEGMENTATION_SLOTS
    present = rng.random((n, slots)) < 0.8
    present[:, 0] = True
    classes = rng.integers(1, k, size=(n, slots))
    centre = rng.uniform(0.2, 0.8, size=(n, slots, dims)) * size
    radii = rng.uniform(0.1, 0.22, size=(n, slots, dims)) * size
    angle = rng.uniform(0, np.pi, size=(n, slots)) if dims == 2 else None
    level = 0.3 + 0.5 * classes / max(k - 1, 1) + rng.normal(0.0, 0.03 + 0.05 * spec.difficulty, size=(n, slots))
    phase = rng.uniform(0, 2 * np.pi, size=(n, slots))
    tilt = rng.normal(0.0, 0.25, size=(n, slots)) if dims == 3 else None
    background = rng.normal(0.0, 1.0, size=(n,) + (_COARSE_GRID,) * dims).astype(np.float32)
    noise_std = 0.03 + 0.15 * spec.difficulty
    noise_seed = int(rng.integers(2**63))

    coords = _coordinates(dims, size)
    period = size / _TEXTURE_PERIODS_PER_IMAGE
    images = np.empty((n, spec.in_channels) + (size,) * dims, dtype=np.uint8)
    masks = np.zeros((n,) + (size,) * dims, dtype=np.int64)
    noise_rng = np.random.default_rng(noise_seed)
    for part in _chunks(n, size, dims):
        count = part.stop - part.start
        image = np.float32(0.15) + np.float32(0.06) * _smooth_field(background[part], size)
        mask = np.zeros((count,) + (size,) * dims, dtype=np.int64)
        for slot in range(slots):
            radius = _ellipse_radius(
                coords, centre[part, slot], radii[part, slot], None if angle is None else angle[part, slot]
            )
            inside = (radius <= 1.0) & _broadcast(present[part, slot], dims)
            theta = np.pi * classes[part, slot] / k
            direction = _texture_direction(theta, None if tilt is None else tilt[part, slot], dims)
            texture = _stripes(coords, direction, phase[part, slot], period)
            value = _broadcast(level[part, slot], dims) + np.float32(0.06) * texture
            image = np.where(inside, value, image)
            mask = np.where(inside, _broadcast(classes[part, slot], dims), mask)
        image += np.float32(noise_std) * noise_rng.standard_normal(image.shape, dtype=np.float32)
        extra = noise_rng.standard_normal((spec.in_channels - 1, count) + (size,) * dims, dtype=np.float32)
        images[part] = _to_channels(image.astype(np.float32), spec.in_channels, extra)
        masks[part] = mask
    return Split(images, masks)


_GENERATORS = {"classification": _classification_split, "segmentation": _segmentation_split}


def generate_split(spec: SyntheticDataSpec, split: str) -> Split:
    """Raw uint8 images ``(N, C, *spatial)`` and labels of one split of a synthetic spec."""
    n = {"train": spec.num_train, "val": spec.num_val, "test": spec.num_test}[split]
    rng = np.random.default_rng([spec.seed, _TASK_IDS[spec.task], spec.spatial_dims, _SPLIT_IDS[split]])
    return _GENERATORS[spec.task](spec, n, rng)


@register_adapter("synthetic")
def load_synthetic(spec: SyntheticDataSpec) -> RawData:
    task_name = "cls" if spec.task == "classification" else "seg"
    if spec.task == "classification":
        class_names = [f"orientation_{round(180 * c / spec.num_classes)}deg" for c in range(spec.num_classes)]
    else:
        class_names = ["background"] + [f"object_{c}" for c in range(1, spec.num_classes)]
    return RawData(
        name=spec.name or f"synthetic-{task_name}-{spec.spatial_dims}d",
        task=spec.task,
        spatial_dims=spec.spatial_dims,
        num_classes=spec.num_classes,
        splits={split: generate_split(spec, split) for split in _SPLIT_IDS},
        source=f"synthetic data (seed {spec.seed})",
        class_names=class_names,
    )
