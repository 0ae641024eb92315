"""Augmentation: same results as MONAI's transforms, masks follow images, views are reproducible."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from medkd.data import (
    AugmentSpec,
    apply_view,
    apply_view_to_masks,
    build_augmentation,
    sample_view_params,
)
from medkd.data.augment import identity_view

warnings.filterwarnings("ignore", category=UserWarning)

SPATIAL_ONLY = AugmentSpec(
    flip=0.5, rotate90=0.5, affine={"prob": 1.0, "rotate_degrees": 20, "scale": (0.9, 1.2), "translate": 0.1}
)
EVERYTHING = AugmentSpec.model_validate(
    {**SPATIAL_ONLY.model_dump(), "intensity": {"prob": 1.0, "noise_std": 0.1, "gamma": (0.7, 1.5)}}
)


def random_masks(batch: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Blocky masks (classes 0..3) so nearest-neighbour resampling has clear regions."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 4, size=(batch,) + tuple(-(-s // 4) for s in shape))
    for axis in range(1, coarse.ndim):
        coarse = coarse.repeat(4, axis=axis)
    blocks = coarse[(slice(None),) + tuple(slice(0, s) for s in shape)]
    return torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.int64))


# ------------------------------------------------------------------ exact equivalence to MONAI


@pytest.mark.parametrize("shape", [(20, 20), (8, 10, 12)])
def test_affine_view_equals_monai_affine(shape):
    from monai.transforms import Affine

    dims = len(shape)
    images = torch.randn(2, 1, *shape)
    masks = random_masks(2, shape)
    view = identity_view()
    rotate = [0.3] if dims == 2 else [0.2, -0.1, 0.3]
    view["affine"] = {"rotate": rotate, "scale": 1.15, "translate": [0.1, -0.05, 0.0][:dims], "padding_mode": "border"}
    reference = Affine(
        rotate_params=rotate[0] if dims == 2 else rotate,
        translate_params=[t * s for t, s in zip(view["affine"]["translate"], shape)],
        scale_params=[1 / 1.15] * dims,
        padding_mode="border",
        image_only=True,
    )
    out = apply_view(images, [view, identity_view()])
    torch.testing.assert_close(
        out[0], torch.as_tensor(reference(images[0])).as_subclass(torch.Tensor), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(out[1], images[1])
    nearest = Affine(
        rotate_params=reference.affine_grid.rotate_params,
        translate_params=reference.affine_grid.translate_params,
        scale_params=reference.affine_grid.scale_params,
        padding_mode="border",
        mode="nearest",
        image_only=True,
    )
    out_masks = apply_view_to_masks(masks, [view, identity_view()])
    expected = torch.as_tensor(nearest(masks[0][None].float()))[0].round().long()
    assert torch.equal(out_masks[0], expected.as_subclass(torch.Tensor))
    assert torch.equal(out_masks[1], masks[1])


def test_flip_rot90_and_contrast_equal_monai():
    from monai.transforms import AdjustContrast, Flip, Rotate90

    images = torch.randn(1, 2, 12, 12)
    view = {**identity_view(), "flip": [1], "rot90": 3, "gamma": 1.4}
    expected = Flip(spatial_axis=1)(images[0])
    expected = Rotate90(k=3, spatial_axes=(0, 1))(expected)
    expected = AdjustContrast(gamma=1.4)(expected)
    torch.testing.assert_close(
        apply_view(images, [view])[0], torch.as_tensor(expected).as_subclass(torch.Tensor), atol=1e-5, rtol=0
    )


# ------------------------------------------------------------------------ masks follow images


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8)])
def test_flips_and_rotations_move_masks_exactly_like_images(shape):
    augment = build_augmentation(
        AugmentSpec(flip=0.5, rotate90=0.5), spatial_dims=len(shape), task="segmentation", seed=0
    )
    masks = random_masks(16, shape)
    images = masks[:, None].float()  # an image that *is* its mask
    out_images, out_masks = augment(images, masks)
    assert torch.equal(out_images[:, 0], out_masks.float())
    assert not torch.equal(out_masks, masks)  # something did move


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8)])
def test_affine_keeps_masks_aligned_with_images(shape):
    augment = build_augmentation(EVERYTHING, spatial_dims=len(shape), task="segmentation", seed=1)
    masks = random_masks(8, shape)
    onehot = torch.nn.functional.one_hot(masks, 4).movedim(-1, 1).float()  # (B, 4, *spatial)
    out_images, out_masks = augment(onehot * 10.0, masks)
    assert out_masks.dtype == torch.int64 and out_masks.shape == masks.shape
    assert set(out_masks.unique().tolist()) <= {0, 1, 2, 3}
    # The channel that is brightest after (bilinear, noisy) resampling is the mask's class almost everywhere.
    agreement = (out_images.argmax(dim=1) == out_masks).float().mean().item()
    assert agreement > 0.85


def test_classification_rejects_masks():
    augment = build_augmentation(SPATIAL_ONLY, spatial_dims=2, task="classification", seed=0)
    with pytest.raises(ValueError, match="only augmented for segmentation"):
        augment(torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))


# ----------------------------------------------------------------------- reproducible views


def test_views_are_reproducible_from_seed_and_from_stored_params():
    images = torch.randn(6, 1, 16, 16)
    views = sample_view_params(EVERYTHING, 6, rng=123)
    assert views == sample_view_params(EVERYTHING, 6, rng=123)
    assert views != sample_view_params(EVERYTHING, 6, rng=124)
    first = apply_view(images, views)
    stored = json.loads(json.dumps(views))  # e.g. next to cached teacher logits
    assert torch.equal(apply_view(images, stored), first)
    assert not torch.equal(first, images)


def test_view_k_of_a_sample_is_the_same_in_any_batch():
    """FKD: the view cached with a teacher's logits is rebuilt exactly in another batch order."""
    images = torch.randn(5, 1, 16, 16)
    views = sample_view_params(EVERYTHING, 5, rng=7)
    whole = apply_view(images, views)
    order = [3, 0, 4]
    part = apply_view(images[order], [views[i] for i in order])
    torch.testing.assert_close(part, whole[order], atol=1e-6, rtol=0)


def test_augmentation_seed_is_reproducible_and_advances():
    images = torch.randn(4, 1, 16, 16)
    a = build_augmentation(EVERYTHING, 2, seed=5)
    b = build_augmentation(EVERYTHING, 2, seed=5)
    first_a, _ = a(images)
    first_b, _ = b(images)
    assert torch.equal(first_a, first_b)
    second_a, _ = a(images)
    assert not torch.equal(first_a, second_a)


def test_numpy_in_numpy_out():
    images = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    out = apply_view(images, sample_view_params(SPATIAL_ONLY, 3, rng=0))
    assert isinstance(out, np.ndarray) and out.shape == images.shape


def test_disabled_spec_is_identity():
    images = torch.randn(3, 1, 8, 8)
    out, masks = build_augmentation(AugmentSpec(), 2, seed=0)(images)
    assert out is images and masks is None
    assert all(v == identity_view() for v in sample_view_params(AugmentSpec(), 3, rng=0))


def test_non_square_images_only_get_half_turns():
    views = sample_view_params(AugmentSpec(rotate90=1.0), 50, rng=0, spatial_shape=(8, 12))
    assert {v["rot90"] for v in views} == {2}
    out = apply_view(torch.randn(50, 1, 8, 12), views)
    assert out.shape == (50, 1, 8, 12)


def test_flip_axes_restricts_flips():
    views = sample_view_params(AugmentSpec(flip=1.0, flip_axes=[1]), 10, rng=0, spatial_dims=3)
    assert all(v["flip"] == [1] for v in views)


def test_probabilities_are_respected():
    views = sample_view_params(AugmentSpec(flip=0.25), 4000, rng=0)
    flipped = np.mean([0 in v["flip"] for v in views])
    assert 0.2 < flipped < 0.3


def test_bad_inputs():
    with pytest.raises(ValueError, match="views for a batch"):
        apply_view(torch.zeros(3, 1, 8, 8), [identity_view()] * 2)
    with pytest.raises(ValueError, match="floating point"):
        apply_view(torch.zeros(1, 1, 8, 8, dtype=torch.long), [identity_view()])
    with pytest.raises(ValueError, match="spatial dims"):
        apply_view(torch.zeros(8, 8), [])
    with pytest.raises(ValueError, match="spatial_dims"):
        build_augmentation(AugmentSpec(), spatial_dims=4)
    with pytest.raises(ValueError, match="task"):
        build_augmentation(AugmentSpec(), spatial_dims=2, task="detection")
    with pytest.raises(ValueError, match="square"):
        apply_view(torch.zeros(1, 1, 8, 12), [{**identity_view(), "rot90": 1}])
