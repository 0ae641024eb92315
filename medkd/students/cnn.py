"""Small CNN students for 2D and 3D classification: ``resnet_tiny`` and ``mobilenet_tiny``.

Both are built for small inputs (MedMNIST's 28x28 / 28^3) and stay deploy-friendly:

* every convolution is ``Conv -> BatchNorm -> activation`` (:class:`ConvNormAct`, no conv bias),
  which ONNX Runtime folds and quantizes to INT8 as one unit;
* channel counts are multiples of 8 (after the ``width`` multiplier) and every block has
  regular conv/bn structure, so structured channel pruning can shrink the inner channels of a
  block (``conv1``/``expand``/``dw``) without touching the residual path;
* only standard ops are used (Conv, BatchNormalization, Relu, HardSwish, HardSigmoid, Add, Mul,
  GlobalAveragePool, Gemm).

The stem downsamples only when the input is large (>= 56 per axis), so 28x28 images keep their
resolution in the first stage. Layer types follow ``spatial_dims`` through MONAI's layer
factories, so the same code builds the 2D and the 3D network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

from medkd.students.registry import register_student

ActName = Literal["relu", "hardswish"]
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "hardswish": lambda: nn.Hardswish(inplace=True),
}

# Inputs at least this large per axis get a stride-2 stem (at most two of them).
STEM_DOWNSAMPLE_FROM = 56
MAX_STEM_DOWNSAMPLES = 2


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing more than 10% of it."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def scaled_repeats(repeats: int, depth: float) -> int:
    """Blocks in a stage after the ``depth`` multiplier (at least one)."""
    return max(1, round(repeats * depth))


def stem_downsamples(image_size: Sequence[int]) -> int:
    """How many stride-2 stem convolutions bring ``image_size`` near MedMNIST resolution."""
    size, count = min(image_size), 0
    while size >= STEM_DOWNSAMPLE_FROM and count < MAX_STEM_DOWNSAMPLES:
        size //= 2
        count += 1
    return count


def _activation(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}") from None


class ConvNormAct(nn.Sequential):
    """``conv -> norm -> act`` with "same" padding; the unit ONNX Runtime fuses and quantizes."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "relu",
    ) -> None:
        super().__init__()
        self.conv = Conv[Conv.CONV, spatial_dims](
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.norm = Norm[Norm.BATCH, spatial_dims](out_channels)
        self.act = _activation(act)


class ClassifierHead(nn.Sequential):
    """Global average pooling, dropout and a linear layer."""

    def __init__(self, spatial_dims: int, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)


def _check_dropout(dropout: float) -> float:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


def _build_stem(
    spatial_dims: int, in_channels: int, out_channels: int, image_size: Sequence[int], act: str
) -> nn.Sequential:
    downsamples = stem_downsamples(image_size)
    layers = [ConvNormAct(spatial_dims, in_channels, out_channels, 3, stride=2 if downsamples else 1, act=act)]
    for _ in range(downsamples - 1):
        layers.append(ConvNormAct(spatial_dims, out_channels, out_channels, 3, stride=2, act=act))
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


class _Classifier(nn.Module):
    """``stem -> stages -> head``; ``forward_features`` gives the last feature map."""

    stem: nn.Module
    stages: nn.Sequential
    head: ClassifierHead

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# --------------------------------------------------------------------------- ResNet-tiny


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 ConvNormAct, projection shortcut when the shape changes.

    ``conv1``'s output channels are internal to the block (prunable without touching the
    residual sum); ``conv2`` and ``shortcut`` must keep ``out_channels``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(spatial_dims, in_channels, out_channels, 3, stride=stride, act="relu")
        self.conv2 = ConvNormAct(spatial_dims, out_channels, out_channels, 3, act=None)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ConvNormAct(spatial_dims, in_channels, out_channels, 1, stride=stride, act=None)
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetTiny(_Classifier):
    """A narrow, shallow ResNet for small medical images.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output logits.
        image_size: input size per axis (picks the stem stride).
        channels: channels per stage before the width multiplier.
        blocks: basic blocks per stage before the depth multiplier.
        width: channel multiplier (channels rounded to multiples of 8).
        depth: blocks-per-stage multiplier (at least one block per stage).
        dropout: dropout before the final linear layer.

    The first stage keeps the stem resolution; every later stage halves it.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        image_size: Sequence[int],
        channels: Sequence[int] = (32, 64, 128),
        blocks: Sequence[int] = (2, 2, 2),
        width: float = 1.0,
        depth: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(channels) == 0 or len(channels) != len(blocks):
            raise ValueError(
                f"channels and blocks must be non-empty and of equal length, got {channels!r} and {blocks!r}"
            )
        if any(c <= 0 for c in channels) or any(b <= 0 for b in blocks):
            raise ValueError(f"channels and blocks must be positive, got {channels!r} and {blocks!r}")
        widths = [make_divisible(c * width) for c in channels]
        self.stem = _build_stem(spatial_dims, in_channels, widths[0], image_size, act="relu")
        stages, prev = [], widths[0]
        for index, (out_ch, repeats) in enumerate(zip(widths, blocks)):
            stage = [
                BasicBlock(spatial_dims, prev if i == 0 else out_ch, out_ch, stride=2 if (index > 0 and i == 0) else 1)
                for i in range(scaled_repeats(repeats, depth))
            ]
            stages.append(nn.Sequential(*stage))
            prev = out_ch
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.head = ClassifierHead(spatial_dims, prev, num_classes, _check_dropout(dropout))
        _init_weights(self)


# --------------------------------------------------------------------------- MobileNet-tiny


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with a hard-sigmoid gate (MobileNetV3)."""

    def __init__(self, spatial_dims: int, channels: int, reduced_channels: int) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.reduce = conv(channels, reduced_channels, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = conv(reduced_channels, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand -> depthwise kxk -> [SE] -> 1x1 linear projection.

    The expanded channels (``expand``/``dw``/``se``) are internal to the block and prunable;
    ``project`` must keep ``out_channels`` when the block is residual.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        expanded_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        use_se: bool,
        act: str,
    ) -> None:
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        if expanded_channels != in_channels:
            self.expand: nn.Module = ConvNormAct(spatial_dims, in_channels, expanded_channels, 1, act=act)
        else:
            self.expand = nn.Identity()
        self.dw = ConvNormAct(
            spatial_dims, expanded_channels, expanded_channels, kernel_size, stride, groups=expanded_channels, act=act
        )
        self.se: nn.Module = (
            SqueezeExcite(spatial_dims, expanded_channels, make_divisible(expanded_channels / 4))
            if use_se
            else nn.Identity()
        )
        self.project = ConvNormAct(spatial_dims, expanded_channels, out_channels, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        return out + x if self.use_residual else out


# (kernel, expansion ratio, out channels, squeeze-excite, MobileNetV3 activation, stride, repeats)
MOBILENET_TINY_STAGES: tuple[tuple[int, float, int, bool, str, int, int], ...] = (
    (3, 1.0, 16, True, "relu", 1, 1),
    (3, 4.0, 24, False, "relu", 2, 2),
    (5, 4.0, 40, True, "hardswish", 2, 2),
    (3, 4.0, 64, True, "hardswish", 1, 2),
)


class MobileNetTiny(_Classifier):
    """A MobileNetV3-style network of inverted residuals for small medical images.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output logits.
        image_size: input size per axis (picks the stem stride).
        width: channel multiplier (channels rounded to multiples of 8).
        depth: blocks-per-stage multiplier (at least one block per stage).
        activation: "hardswish" follows MobileNetV3 (ReLU early, hard-swish late); "relu" uses
            ReLU everywhere, which ONNX Runtime quantizes end to end.
        se: use squeeze-and-excitation where MobileNetV3 does.
        head_expansion: channels of the last 1x1 conv relative to the last stage.
        dropout: dropout before the final linear layer.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        image_size: Sequence[int],
        width: float = 1.0,
        depth: float = 1.0,
        activation: ActName = "hardswish",
        se: bool = True,
        head_expansion: float = 4.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if head_expansion <= 0:
            raise ValueError(f"head_expansion must be > 0, got {head_expansion!r}")
        stem_channels = make_divisible(16 * width)
        self.stem = _build_stem(spatial_dims, in_channels, stem_channels, image_size, act=activation)
        stages, prev = [], stem_channels
        for kernel, ratio, out, use_se, mnv3_act, stride, repeats in MOBILENET_TINY_STAGES:
            act = "relu" if activation == "relu" else mnv3_act
            out_ch = make_divisible(out * width)
            blocks = []
            for i in range(scaled_repeats(repeats, depth)):
                expanded = make_divisible(prev * ratio)
                blocks.append(
                    InvertedResidual(
                        spatial_dims, prev, expanded, out_ch, kernel, stride if i == 0 else 1, use_se and se, act
                    )
                )
                prev = out_ch
            stages.append(nn.Sequential(*blocks))
        head_channels = make_divisible(prev * head_expansion)
        stages.append(ConvNormAct(spatial_dims, prev, head_channels, 1, act=activation))
        self.stages = nn.Sequential(*stages)
        self.num_features = head_channels
        self.head = ClassifierHead(spatial_dims, head_channels, num_classes, _check_dropout(dropout))
        _init_weights(self)


# --------------------------------------------------------------------------- registration


@register_student("cnn")
def resnet_tiny(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: Sequence[int],
    width: float,
    depth: float,
    **kwargs,
) -> ResNetTiny:
    """ResNet-tiny: stages of (32, 64, 128) x width channels, 2 x depth basic blocks each.

    About 0.7M parameters at width 1 (2D), 45K at width 0.25. Options: ``channels``,
    ``blocks``, ``dropout`` (see :class:`ResNetTiny`).
    """
    return ResNetTiny(spatial_dims, in_channels, num_classes, image_size, width=width, depth=depth, **kwargs)


@register_student("cnn")
def mobilenet_tiny(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: Sequence[int],
    width: float,
    depth: float,
    **kwargs,
) -> MobileNetTiny:
    """MobileNetV3-tiny: inverted residuals with depthwise convs, hard-swish and SE.

    Options: ``activation`` ("hardswish" | "relu"), ``se``, ``head_expansion``, ``dropout``
    (see :class:`MobileNetTiny`).
    """
    return MobileNetTiny(spatial_dims, in_channels, num_classes, image_size, width=width, depth=depth, **kwargs)
