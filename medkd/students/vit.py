"""``vit_micro``: a tiny Vision Transformer student (MONAI ``ViT``), 2D and 3D classification.

MONAI's ``ViT`` returns ``(logits, hidden_states)`` and by default squashes the classification
head through ``tanh``; :class:`ViTMicro` turns the head activation off and returns raw logits
only, as distillation needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import ViT
from torch import nn

from medkd.students.registry import register_student

# The default patch size keeps about this many tokens in total (8x8 in 2D, 4x4x4 in 3D).
TARGET_TOKENS = 64


def default_patch_size(image_size: Sequence[int]) -> tuple[int, ...]:
    """Per axis, the smallest patch dividing the axis that leaves at most ~TARGET_TOKENS tokens.

    Falls back to a non-dividing patch (the border is dropped by the strided patch conv) when
    the only dividing patch would leave fewer than half the wanted tokens per axis.
    """
    per_axis = max(1, round(TARGET_TOKENS ** (1 / len(image_size))))
    patches = []
    for size in image_size:
        divisor = next(p for p in range(1, size + 1) if size % p == 0 and size // p <= per_axis)
        patches.append(divisor if 2 * (size // divisor) >= per_axis else max(1, math.ceil(size / per_axis)))
    return tuple(patches)


class ViTMicro(nn.Module):
    """A small ViT classifier that returns logits only.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output logits.
        image_size: input size per axis; the model only accepts this size (learned positions).
        width: hidden-size multiplier, rounded to a multiple of ``num_heads``.
        depth: transformer-layer multiplier (at least one layer).
        hidden_size: hidden size at width 1.
        num_layers: transformer layers at depth 1.
        num_heads: attention heads.
        mlp_ratio: MLP hidden size relative to the hidden size.
        patch_size: patch size (int or per axis); default from :func:`default_patch_size`.
        dropout: dropout inside the transformer.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        image_size: Sequence[int],
        width: float = 1.0,
        depth: float = 1.0,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        patch_size: int | Sequence[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for arg, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        patches = default_patch_size(image_size) if patch_size is None else patch_size
        patches = (patches,) * spatial_dims if isinstance(patches, int) else tuple(patches)
        if len(patches) != spatial_dims or any(p <= 0 or p > s for p, s in zip(patches, image_size)):
            raise ValueError(
                f"patch_size must be positive and at most image_size {tuple(image_size)} per axis, got {patch_size!r}"
            )

        self.hidden_size = max(num_heads, round(hidden_size * width / num_heads) * num_heads)
        self.num_layers = max(1, round(num_layers * depth))
        self.patch_size = patches
        self.vit = ViT(
            in_channels=in_channels,
            img_size=tuple(image_size),
            patch_size=patches,
            hidden_size=self.hidden_size,
            mlp_dim=max(1, round(self.hidden_size * mlp_ratio)),
            num_layers=self.num_layers,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            classification=True,
            num_classes=num_classes,
            dropout_rate=dropout,
            spatial_dims=spatial_dims,
            post_activation=None,
            qkv_bias=True,
        )
        # MONAI keeps a cross-attention LayerNorm in every block even without cross-attention;
        # drop it so every parameter is used (DDP) and counted honestly.
        for block in self.vit.blocks:
            if not block.with_cross_attention:
                block.norm_cross_attn = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.vit(x)
        return logits


@register_student("vit")
def vit_micro(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: Sequence[int],
    width: float,
    depth: float,
    **kwargs,
) -> ViTMicro:
    """ViT-micro: hidden 128 x width (4 heads), 4 x depth layers, MLP ratio 2, ~64 tokens.

    Options: ``hidden_size``, ``num_layers``, ``num_heads``, ``mlp_ratio``, ``patch_size``,
    ``dropout`` (see :class:`ViTMicro`).
    """
    return ViTMicro(spatial_dims, in_channels, num_classes, image_size, width=width, depth=depth, **kwargs)
