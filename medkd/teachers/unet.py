"""Family "unet": MONAI segmentation networks, 2D and 3D.

- ``unet``: ``monai.networks.nets.UNet`` with residual units.
- ``basicunet``: ``monai.networks.nets.BasicUNet`` (two convs per level, five levels).
- ``unetr``: ``monai.networks.nets.UNETR``, a ViT encoder (16^d patches, 12 layers) with a
  convolutional decoder; small defaults so it trains on CPU.
- ``segresnet``: ``monai.networks.nets.SegResNet`` (residual encoder, light decoder).

Each takes ``(N, in_channels, *spatial)`` and returns ``(N, num_classes, *spatial)`` logits
(background included). The networks only accept sizes divisible by their total downsampling,
and instance-normalised bottlenecks need more than one voxel; rather than reject a 28x28 image
or a 40x40x20 volume, :class:`PadToMultiple` zero-pads the input up to the next valid size and
crops the logits back, the way nnU-Net pads patches. UNETR's position embedding fixes its
input size at build time, so a UNETR teacher accepts exactly ``image_size``.

Examples::

    >>> from medkd.teachers import create_teacher
    >>> net = create_teacher("unet", spatial_dims=2, in_channels=1, num_classes=3, image_size=28)
    >>> net = create_teacher("unetr", spatial_dims=3, in_channels=1, num_classes=4,
    ...                      image_size=(32, 32, 32), hidden_size=96, num_heads=4)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import UNETR, BasicUNet, SegResNet, UNet
from torch import nn

from medkd.teachers.registry import (
    check_choice,
    check_fraction,
    check_int_sequence,
    check_positive_int,
    register_teacher,
)
from medkd.teachers.vit import freeze_unused_cross_attention_norms


class PadToMultiple(nn.Module):
    """Runs ``net`` on the input zero-padded (at the end of each axis) to a size it accepts.

    Args:
        net: a segmentation network whose output has the spatial size of its input.
        divisor: every padded axis is a multiple of this (the network's total downsampling).
        min_bottleneck_voxels: pad further, to twice ``divisor`` on every axis, if the deepest
            level would have fewer voxels than this (instance norm needs at least 2).
        fixed_size: if set, the only input size accepted (UNETR); it must be a valid size.
    """

    def __init__(
        self,
        net: nn.Module,
        divisor: int,
        *,
        min_bottleneck_voxels: int = 1,
        fixed_size: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.divisor = divisor
        self.min_bottleneck_voxels = min_bottleneck_voxels
        self.fixed_size = fixed_size

    def padded_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """The size ``net`` is run at for an input of spatial ``size``."""
        d = self.divisor
        target = [-(-s // d) * d for s in size]
        if math.prod(t // d for t in target) < self.min_bottleneck_voxels:
            target = [max(t, 2 * d) for t in target]
        return tuple(target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        if self.fixed_size is not None and size != self.fixed_size:
            raise ValueError(f"this network was built for spatial size {self.fixed_size}, got input of size {size}")
        target = self.padded_size(size)
        if target == size:
            return self.net(x)
        padding: list[int] = []
        for s, t in reversed(list(zip(size, target))):  # F.pad lists the last axis first
            padding += [0, t - s]
        logits = self.net(F.pad(x, padding))
        return logits[(slice(None), slice(None), *(slice(0, s) for s in size))]


UNET_NORMS = ("instance", "batch")


@register_teacher("unet")
def unet(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    dropout: float = 0.0,
    norm: str = "instance",
) -> nn.Module:
    """MONAI ``UNet`` (residual units, PReLU).

    Args:
        channels: feature channels per level, at least 2 levels.
        strides: downsampling stride between consecutive levels (``len(channels) - 1`` ints).
        num_res_units: residual units per level (0: plain convolutions).
        dropout: dropout in every convolution block.
        norm: ``instance`` (per image: robust to scanner intensity shifts) or ``batch`` (keeps
            absolute intensity, which carries the class in e.g. CT Hounsfield units).
    """
    if norm not in UNET_NORMS:
        raise ValueError(f"norm must be one of {list(UNET_NORMS)}, got {norm!r}")
    channels = check_int_sequence(channels, "channels", min_length=2)
    strides = check_int_sequence(strides, "strides")
    if len(strides) != len(channels) - 1:
        raise ValueError(f"strides needs len(channels) - 1 = {len(channels) - 1} entries, got {list(strides)}")
    if isinstance(num_res_units, bool) or not isinstance(num_res_units, int) or num_res_units < 0:
        raise ValueError(f"num_res_units must be a non-negative integer, got {num_res_units!r}")
    net = UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=channels,
        strides=strides,
        num_res_units=num_res_units,
        dropout=check_fraction(dropout, "dropout"),
        norm=norm,
    )
    return PadToMultiple(net, math.prod(strides), min_bottleneck_voxels=2)


@register_teacher("unet")
def basicunet(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    features: Sequence[int] = (32, 32, 64, 128, 256, 32),
    dropout: float = 0.0,
    upsample: str = "deconv",
) -> nn.Module:
    """MONAI ``BasicUNet`` (four 2x downsamplings, instance norm, LeakyReLU).

    Args:
        features: six ints, channels of the five encoder levels and of the last decoder level.
        dropout: dropout in every convolution block.
        upsample: "deconv", "pixelshuffle" or "nontrainable".
    """
    features = check_int_sequence(features, "features", min_length=6)
    if len(features) != 6:
        raise ValueError(f"features must have exactly 6 entries, got {list(features)}")
    net = BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        features=features,
        dropout=check_fraction(dropout, "dropout"),
        upsample=check_choice(upsample, "upsample", ("deconv", "pixelshuffle", "nontrainable")),
    )
    return PadToMultiple(net, 16, min_bottleneck_voxels=2)


@register_teacher("unet")
def unetr(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    feature_size: int = 16,
    hidden_size: int = 192,
    mlp_dim: int = 768,
    num_heads: int = 3,
    dropout: float = 0.0,
    norm_name: str = "instance",
) -> nn.Module:
    """MONAI ``UNETR``: 12-layer ViT encoder on 16^d patches, convolutional decoder.

    The ViT is built for ``image_size`` padded up to a multiple of 16 on every axis; the
    teacher only accepts inputs of exactly ``image_size``.

    Args:
        feature_size: channels of the first decoder stage (doubling per stage).
        hidden_size: ViT token width; must be divisible by ``num_heads``.
        mlp_dim: width of each transformer block's MLP.
        num_heads: attention heads per block.
        dropout: dropout in the ViT.
        norm_name: "instance" or "batch" normalisation in the decoder.
    """
    hidden_size = check_positive_int(hidden_size, "hidden_size")
    num_heads = check_positive_int(num_heads, "num_heads")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    wrapper = PadToMultiple(nn.Identity(), 16, fixed_size=image_size)
    padded = wrapper.padded_size(image_size)
    wrapper.net = UNETR(
        in_channels=in_channels,
        out_channels=num_classes,
        img_size=padded,
        feature_size=check_positive_int(feature_size, "feature_size"),
        hidden_size=hidden_size,
        mlp_dim=check_positive_int(mlp_dim, "mlp_dim"),
        num_heads=num_heads,
        dropout_rate=check_fraction(dropout, "dropout"),
        norm_name=check_choice(norm_name, "norm_name", ("instance", "batch")),
        spatial_dims=spatial_dims,
    )
    freeze_unused_cross_attention_norms(wrapper.net)
    return wrapper


@register_teacher("unet")
def segresnet(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    init_filters: int = 16,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] = (1, 1, 1),
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI ``SegResNet`` (group norm with 8 groups, trilinear/bilinear upsampling).

    Args:
        init_filters: channels of the first level, a multiple of 8 (group norm); doubles per level.
        blocks_down: residual blocks per encoder level.
        blocks_up: residual blocks per decoder level (``len(blocks_down) - 1`` ints).
        dropout: dropout after the initial convolution.
    """
    init_filters = check_positive_int(init_filters, "init_filters")
    if init_filters % 8:
        raise ValueError(f"init_filters must be a multiple of 8 (group norm with 8 groups), got {init_filters}")
    blocks_down = check_int_sequence(blocks_down, "blocks_down")
    blocks_up = check_int_sequence(blocks_up, "blocks_up")
    if len(blocks_up) != len(blocks_down) - 1:
        raise ValueError(
            f"blocks_up needs len(blocks_down) - 1 = {len(blocks_down) - 1} entries, got {list(blocks_up)}"
        )
    dropout = check_fraction(dropout, "dropout")
    net = SegResNet(
        spatial_dims=spatial_dims,
        init_filters=init_filters,
        in_channels=in_channels,
        out_channels=num_classes,
        dropout_prob=dropout or None,
        blocks_down=blocks_down,
        blocks_up=blocks_up,
    )
    return PadToMultiple(net, 2 ** (len(blocks_down) - 1))
