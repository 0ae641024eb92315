"""Family "cnn": ResNet-10/18/34/50, DenseNet-121 and EfficientNet-B0 classifiers, 2D and 3D.

The networks are MONAI's (``monai.networks.nets.ResNet`` / ``DenseNet121``) rather than
torchvision's: MONAI builds every layer through ``Conv[Conv.CONV, spatial_dims]``, so one code
path serves 2D images and 3D volumes (MedMNIST ships both), whereas torchvision is 2D only and
its one advantage here, ImageNet weights, cannot be downloaded on the machines medkd targets.

The stem follows the input size. ImageNet-style stems (7x7 stride-2 conv + 3x3 stride-2 max
pool) divide the resolution by 4 before the first block, which would leave a 28x28 MedMNIST
image at 1x1 (ResNet) or nothing at all (DenseNet) by the last stage. For inputs of at most
``SMALL_INPUT_MAX_SIZE`` voxels along their shortest axis the stem is a 3x3 stride-1 conv without
max pool, as in CIFAR ResNets and the MedMNIST v2 baselines, so 28x28 ends at 4x4 (ResNet) or
3x3 (DenseNet). EfficientNet-B0 (32x downsampling with its stride-2 stem) keeps its stem conv
but at stride 1 for small inputs, so 28x28 ends at 2x2 instead of 1x1.

Examples::

    >>> from medkd.teachers import create_teacher
    >>> net = create_teacher("resnet18", spatial_dims=2, in_channels=1, num_classes=2, image_size=28)
    >>> net = create_teacher("densenet121", spatial_dims=3, in_channels=1, num_classes=11,
    ...                      image_size=64, dropout=0.2)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from monai.networks.layers.factories import Conv
from monai.networks.nets import DenseNet121, EfficientNet, ResNet
from monai.networks.nets.efficientnet import _make_same_padder, efficientnet_params
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck, get_inplanes
from torch import nn

from medkd.teachers.registry import check_choice, check_fraction, register_teacher

Stem = Literal["auto", "small", "imagenet"]
STEMS = ("auto", "small", "imagenet")
SMALL_INPUT_MAX_SIZE = 64


def resolve_stem(stem: str, image_size: tuple[int, ...]) -> Literal["small", "imagenet"]:
    """The concrete stem for ``image_size``: "small" up to ``SMALL_INPUT_MAX_SIZE``, else "imagenet"."""
    check_choice(stem, "stem", STEMS)
    if stem != "auto":
        return stem  # type: ignore[return-value]
    return "small" if min(image_size) <= SMALL_INPUT_MAX_SIZE else "imagenet"


def _halve_ceil(size: int) -> int:  # 3x3 (or 7x7) conv / max pool with stride 2 and "same" padding
    return math.ceil(size / 2)


def _halve_floor(size: int) -> int:  # DenseNet transition: 2x2 average pool with stride 2
    return size // 2


def _final_feature_size(image_size: tuple[int, ...], stem: str, stages: list[Callable[[int], int]]) -> tuple[int, ...]:
    sizes = list(image_size)
    reductions = ([] if stem == "small" else [_halve_ceil, _halve_ceil]) + stages
    for reduce in reductions:
        sizes = [reduce(s) for s in sizes]
    return tuple(sizes)


def _require_features(name: str, image_size: tuple[int, ...], stem: str, final: tuple[int, ...]) -> None:
    if min(final) < 1:
        raise ValueError(
            f"image_size {image_size} is too small for {name} with the {stem!r} stem "
            f"(the last stage would be {final}); use stem='small' or larger images"
        )


def _classifier(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    # Always a Sequential so checkpoint keys do not depend on the dropout rate.
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


def _resnet(
    name: str,
    block: type[ResNetBlock | ResNetBottleneck],
    layers: list[int],
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    dropout: float,
    stem: str,
) -> ResNet:
    dropout = check_fraction(dropout, "dropout")
    concrete = resolve_stem(stem, image_size)
    final = _final_feature_size(image_size, concrete, [_halve_ceil] * 3)
    _require_features(name, image_size, concrete, final)
    small = concrete == "small"
    model = ResNet(
        block,
        layers,
        get_inplanes(),
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=3 if small else 7,
        conv1_t_stride=1 if small else 2,
        no_max_pool=small,
        num_classes=num_classes,
    )
    model.fc = _classifier(model.fc.in_features, num_classes, dropout)
    return model


@register_teacher("cnn")
def resnet10(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    dropout: float = 0.0,
    stem: Stem = "auto",
) -> nn.Module:
    """ResNet-10 (basic blocks, 1-1-1-1): the cheapest CNN teacher.

    Args:
        dropout: dropout before the final linear layer.
        stem: "auto" (small stem up to 64 voxels along the shortest axis), "small" or "imagenet".
    """
    return _resnet(
        "resnet10",
        ResNetBlock,
        [1, 1, 1, 1],
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        dropout=dropout,
        stem=stem,
    )


@register_teacher("cnn")
def resnet18(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    dropout: float = 0.0,
    stem: Stem = "auto",
) -> nn.Module:
    """ResNet-18 (basic blocks, 2-2-2-2), the MedMNIST v2 reference baseline.

    Args:
        dropout: dropout before the final linear layer.
        stem: "auto" (small stem up to 64 voxels along the shortest axis), "small" or "imagenet".
    """
    return _resnet(
        "resnet18",
        ResNetBlock,
        [2, 2, 2, 2],
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        dropout=dropout,
        stem=stem,
    )


@register_teacher("cnn")
def resnet34(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    dropout: float = 0.0,
    stem: Stem = "auto",
) -> nn.Module:
    """ResNet-34 (basic blocks, 3-4-6-3).

    Args:
        dropout: dropout before the final linear layer.
        stem: "auto" (small stem up to 64 voxels along the shortest axis), "small" or "imagenet".
    """
    return _resnet(
        "resnet34",
        ResNetBlock,
        [3, 4, 6, 3],
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        dropout=dropout,
        stem=stem,
    )


@register_teacher("cnn")
def resnet50(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    dropout: float = 0.0,
    stem: Stem = "auto",
) -> nn.Module:
    """ResNet-50 (bottleneck blocks, 3-4-6-3).

    Args:
        dropout: dropout before the final linear layer.
        stem: "auto" (small stem up to 64 voxels along the shortest axis), "small" or "imagenet".
    """
    return _resnet(
        "resnet50",
        ResNetBottleneck,
        [3, 4, 6, 3],
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        dropout=dropout,
        stem=stem,
    )


@register_teacher("cnn")
def densenet121(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    dropout: float = 0.0,
    stem: Stem = "auto",
) -> nn.Module:
    """DenseNet-121 (growth rate 32, blocks 6-12-24-16).

    Args:
        dropout: dropout before the final linear layer.
        stem: "auto" (small stem up to 64 voxels along the shortest axis), "small" or "imagenet".
    """
    dropout = check_fraction(dropout, "dropout")
    concrete = resolve_stem(stem, image_size)
    final = _final_feature_size(image_size, concrete, [_halve_floor] * 3)
    _require_features("densenet121", image_size, concrete, final)
    model = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes)
    if concrete == "small":
        conv0 = model.features.conv0
        small_conv = Conv[Conv.CONV, spatial_dims](
            in_channels, conv0.out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        nn.init.kaiming_normal_(small_conv.weight)  # as DenseNet initialises its other convs
        model.features.conv0 = small_conv
        model.features.pool0 = nn.Identity()
    model.class_layers.out = _classifier(model.class_layers.out.in_features, num_classes, dropout)
    return model


# MONAI's EfficientNetBN hard-codes these block strings and builds its "same" padding for 224
# pixels; medkd builds the same B0 through EfficientNet so the padding follows the real input size.
EFFICIENTNET_B0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)
# PyTorch's BatchNorm momentum, as the other CNN teachers; MONAI's EfficientNet takes TensorFlow's
# 0.01, meant for ImageNet-length schedules (see efficientnet_b0's docstring).
EFFICIENTNET_BN = ("batch", {"eps": 1e-3, "momentum": 0.1})


def _init_depthwise_convs(model: nn.Module) -> None:
    """He init (fan-out) of depthwise convs counted per group, as the reference EfficientNet
    ports (geffnet, timm) do: MONAI counts every output channel, which starts a depthwise conv
    ``channels`` times too quiet."""
    for module in model.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups > 1:
            fan_out = math.prod(module.kernel_size) * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))


@register_teacher("cnn", revision=2)
def efficientnet_b0(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    dropout: float = 0.0,
    drop_connect: float = 0.2,
    stem: Stem = "auto",
) -> nn.Module:
    """EfficientNet-B0 (MBConv blocks with squeeze-excitation, 5.3 M parameters in 2D at 1000 classes).

    A different inductive bias from the ResNets and DenseNet (depthwise convs, SE attention,
    swish), which is what an ensemble gains from. Weights are freshly initialised (never
    downloaded). "Same" padding is computed for ``min(image_size)``: exact for square and cubic
    inputs (every MedMNIST size); on other shapes an odd axis may end one voxel shorter.

    Revision 2: depthwise convs start at the reference ports' scale and BatchNorm uses PyTorch's
    momentum 0.1. With MONAI's init and momentum 0.01, the running variances (which start at 1)
    stayed orders of magnitude above the activations' (10^2 to 10^6 after 11 BreastMNIST epochs,
    190 steps), so in eval mode every image got the same logits: val AUC 0.5 while the training
    loss fell.

    Args:
        dropout: dropout before the final linear layer (B0's ImageNet recipe uses 0.2).
        drop_connect: stochastic-depth rate of the last MBConv block (scaled linearly from 0 for
            the first), 0.2 as in B0.
        stem: "auto" (stride-1 stem up to 64 voxels along the shortest axis), "small" or "imagenet".

    Examples::

        >>> net = create_teacher("efficientnet_b0", spatial_dims=3, in_channels=1, num_classes=11,
        ...                      image_size=28, dropout=0.2)
    """
    dropout = check_fraction(dropout, "dropout")
    drop_connect = check_fraction(drop_connect, "drop_connect")
    concrete = resolve_stem(stem, image_size)
    width, depth, _imagenet_size, _dropout, _drop_connect = efficientnet_params["efficientnet-b0"]
    size = min(image_size)
    model = EfficientNet(
        list(EFFICIENTNET_B0_BLOCKS),
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        width_coefficient=width,
        depth_coefficient=depth,
        dropout_rate=0.0,
        # With the small stem, build for twice the size so that every block after the stem is
        # padded for the real feature size, then give the stem stride 1.
        image_size=2 * size if concrete == "small" else size,
        drop_connect_rate=drop_connect,
        norm=EFFICIENTNET_BN,
    )
    _init_depthwise_convs(model)
    if concrete == "small":
        model._conv_stem.stride = (1,) * spatial_dims
        model._conv_stem_padding = _make_same_padder(model._conv_stem, [size] * spatial_dims)
    # Plain swish: MONAI's memory-efficient one is a custom autograd Function ONNX cannot export.
    model.set_swish(memory_efficient=False)
    model._dropout = nn.Identity()
    model._fc = _classifier(model._fc.in_features, num_classes, dropout)
    nn.init.zeros_(model._fc[1].bias)
    return model
