"""``unet_small``: a small MONAI ``UNet`` student for 2D and 3D segmentation.

``width`` scales the channels of every level, ``depth`` the number of levels. A U-Net with
``L`` levels halves the input ``L - 1`` times and concatenates skip connections, so every
axis of ``image_size`` must be divisible by ``2 ** (L - 1)``; the number of levels is capped
at what ``image_size`` allows (a 28x28 input gets at most 3 levels) instead of failing, so a
depth multiplier drawn by the search always gives a valid network.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNet

from medkd.students.cnn import make_divisible
from medkd.students.registry import register_student


def max_unet_levels(image_size: Sequence[int]) -> int:
    """The most levels a U-Net can have on ``image_size`` (1 + times every axis halves evenly)."""
    halvings = []
    for size in image_size:
        count = 0
        while size % 2 == 0 and size > 1:
            size //= 2
            count += 1
        halvings.append(count)
    return 1 + min(halvings)


@register_student("unet", task="segmentation")
def unet_small(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: Sequence[int],
    width: float,
    depth: float,
    base_channels: int = 16,
    levels: int = 4,
    num_res_units: int = 1,
    norm: str | tuple = "batch",
    act: str | tuple = "relu",
    dropout: float = 0.0,
) -> UNet:
    """Small U-Net: channels ``base_channels * 2**i * width`` for ``levels * depth`` levels.

    Output is ``(N, num_classes, *spatial)`` logits (class 0 is background).

    Args:
        base_channels: channels of the first level at width 1.
        levels: levels at depth 1 (at least 2 after the multiplier; capped by ``image_size``).
        num_res_units: residual units per level (MONAI ``UNet``).
        norm: MONAI norm name; batch norm folds into the convolutions on export.
        act: MONAI activation name.
        dropout: dropout probability inside the blocks.

    Raises:
        ValueError: when ``image_size`` has an odd axis (no level can be added) or an option
            is out of range.
    """
    if isinstance(base_channels, bool) or not isinstance(base_channels, int) or base_channels <= 0:
        raise ValueError(f"base_channels must be a positive integer, got {base_channels!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
    if isinstance(num_res_units, bool) or not isinstance(num_res_units, int) or num_res_units < 0:
        raise ValueError(f"num_res_units must be a non-negative integer, got {num_res_units!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    allowed = max_unet_levels(image_size)
    if allowed < 2:
        raise ValueError(f"image_size {tuple(image_size)} must be even along every axis for a U-Net")
    n_levels = min(allowed, max(2, round(levels * depth)))
    channels = tuple(make_divisible(base_channels * width * 2**i) for i in range(n_levels))
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=channels,
        strides=(2,) * (n_levels - 1),
        num_res_units=num_res_units,
        norm=norm,
        act=act,
        dropout=dropout,
    )
