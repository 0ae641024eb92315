"""Family "vit": MONAI Vision Transformer classifiers, 2D and 3D.

``monai.networks.nets.ViT(classification=True)`` returns ``(logits, hidden_states)`` and by
default squashes the logits through ``tanh``; :class:`ViTClassifier` builds it without that
activation (logits bounded to [-1, 1] could never express a confident softmax, and distillation
needs raw logits) and returns the logits tensor only.

Variants (hidden size / depth / heads / MLP size):

- ``vit``: 192 / 6 / 3 / 768, every one overridable — sized to train on CPU at 28x28.
- ``vit_tiny``: 192 / 12 / 3 / 768 (DeiT-Ti).
- ``vit_small``: 384 / 12 / 6 / 1536 (DeiT-S).

The patch size defaults to the smallest of 4, 8, 16, 32 that divides every axis of the image
and yields at most 256 tokens in 2D (512 in 3D): 4 for 28x28 (7x7 tokens), 8 for 64^3, 16 for
224x224.

Examples::

    >>> from medkd.teachers import create_teacher
    >>> net = create_teacher("vit", spatial_dims=2, in_channels=3, num_classes=9, image_size=28)
    >>> net = create_teacher("vit_small", spatial_dims=3, in_channels=1, num_classes=2,
    ...                      image_size=64, patch_size=16, dropout=0.1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets import ViT
from torch import nn

from medkd.teachers.registry import (
    check_choice,
    check_fraction,
    check_int_sequence,
    check_positive_int,
    register_teacher,
)

AUTO_PATCH_SIZES = (4, 8, 16, 32)
MAX_AUTO_TOKENS = {2: 256, 3: 512}
POSITION_EMBEDDINGS = ("learnable", "sincos", "none")


def auto_patch_size(image_size: tuple[int, ...]) -> int:
    """The default patch size for ``image_size`` (see the module docstring)."""
    budget = MAX_AUTO_TOKENS[len(image_size)]
    for patch in AUTO_PATCH_SIZES:
        if all(size % patch == 0 for size in image_size) and math.prod(s // patch for s in image_size) <= budget:
            return patch
    raise ValueError(
        f"no patch size among {AUTO_PATCH_SIZES} divides image_size {image_size} with at most {budget} tokens; "
        "pass patch_size explicitly"
    )


def _patch_size(patch_size: int | Sequence[int] | None, image_size: tuple[int, ...]) -> tuple[int, ...]:
    if patch_size is None:
        return (auto_patch_size(image_size),) * len(image_size)
    patches = (
        (check_positive_int(patch_size, "patch_size"),) * len(image_size)
        if isinstance(patch_size, int)
        else check_int_sequence(patch_size, "patch_size")
    )
    if len(patches) != len(image_size):
        raise ValueError(f"patch_size must have {len(image_size)} entries, got {patch_size!r}")
    if any(size % patch for size, patch in zip(image_size, patches)):
        # MONAI's conv patch embedding would silently drop the border that does not fill a patch.
        raise ValueError(f"patch_size {patches} must divide image_size {image_size} along every axis")
    return patches


def freeze_unused_cross_attention_norms(model: nn.Module) -> nn.Module:
    """Stop training the LayerNorm MONAI builds in every ``TransformerBlock`` for cross-attention.

    Without cross-attention that norm never enters the forward pass, so its parameters never get
    a gradient, and DistributedDataParallel (``ray.train.torch.prepare_model``) fails on
    parameters that require grad but receive none.
    """
    for block in model.modules():
        if isinstance(block, TransformerBlock) and not block.with_cross_attention:
            block.norm_cross_attn.requires_grad_(False)
    return model


class ViTClassifier(nn.Module):
    """A MONAI ``ViT`` with a linear classification head on the class token; returns logits only."""

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, ...],
        patch_size: tuple[int, ...],
        hidden_size: int,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
        dropout: float,
        pos_embed_type: str,
        qkv_bias: bool,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.vit = ViT(
            in_channels=in_channels,
            img_size=image_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            pos_embed_type=pos_embed_type,
            classification=True,
            num_classes=num_classes,
            dropout_rate=dropout,
            spatial_dims=spatial_dims,
            post_activation=None,
            qkv_bias=qkv_bias,
        )
        freeze_unused_cross_attention_norms(self.vit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _hidden_states = self.vit(x)
        return logits


def _vit(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    patch_size: int | Sequence[int] | None,
    hidden_size: int,
    mlp_dim: int,
    num_layers: int,
    num_heads: int,
    dropout: float,
    pos_embed_type: str,
    qkv_bias: bool,
) -> ViTClassifier:
    if not isinstance(qkv_bias, bool):
        raise ValueError(f"qkv_bias must be true or false, got {qkv_bias!r}")
    return ViTClassifier(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        patch_size=_patch_size(patch_size, image_size),
        hidden_size=check_positive_int(hidden_size, "hidden_size"),
        mlp_dim=check_positive_int(mlp_dim, "mlp_dim"),
        num_layers=check_positive_int(num_layers, "num_layers"),
        num_heads=check_positive_int(num_heads, "num_heads"),
        dropout=check_fraction(dropout, "dropout"),
        pos_embed_type=check_choice(pos_embed_type, "pos_embed_type", POSITION_EMBEDDINGS),
        qkv_bias=qkv_bias,
    )


@register_teacher("vit")
def vit(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    patch_size: int | Sequence[int] | None = None,
    hidden_size: int = 192,
    mlp_dim: int = 768,
    num_layers: int = 6,
    num_heads: int = 3,
    dropout: float = 0.0,
    pos_embed_type: str = "learnable",
    qkv_bias: bool = True,
) -> nn.Module:
    """Configurable ViT; the defaults suit 28x28 inputs on CPU.

    Args:
        patch_size: int or one per axis, must divide ``image_size``; None picks it (module docs).
        hidden_size: token width; must be divisible by ``num_heads``.
        mlp_dim: width of each transformer block's MLP.
        num_layers: number of transformer blocks.
        num_heads: attention heads per block.
        dropout: dropout in the patch embedding, attention and MLP.
        pos_embed_type: "learnable", "sincos" or "none".
        qkv_bias: bias on the query/key/value projection.
    """
    return _vit(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        dropout=dropout,
        pos_embed_type=pos_embed_type,
        qkv_bias=qkv_bias,
    )


@register_teacher("vit")
def vit_tiny(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    patch_size: int | Sequence[int] | None = None,
    dropout: float = 0.0,
    pos_embed_type: str = "learnable",
) -> nn.Module:
    """DeiT-Tiny sized ViT: hidden 192, 12 layers, 3 heads, MLP 768.

    Args:
        patch_size: int or one per axis, must divide ``image_size``; None picks it (module docs).
        dropout: dropout in the patch embedding, attention and MLP.
        pos_embed_type: "learnable", "sincos" or "none".
    """
    return _vit(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=192,
        mlp_dim=768,
        num_layers=12,
        num_heads=3,
        dropout=dropout,
        pos_embed_type=pos_embed_type,
        qkv_bias=True,
    )


@register_teacher("vit")
def vit_small(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, ...],
    patch_size: int | Sequence[int] | None = None,
    dropout: float = 0.0,
    pos_embed_type: str = "learnable",
) -> nn.Module:
    """DeiT-Small sized ViT: hidden 384, 12 layers, 6 heads, MLP 1536.

    Args:
        patch_size: int or one per axis, must divide ``image_size``; None picks it (module docs).
        dropout: dropout in the patch embedding, attention and MLP.
        pos_embed_type: "learnable", "sincos" or "none".
    """
    return _vit(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=384,
        mlp_dim=1536,
        num_layers=12,
        num_heads=6,
        dropout=dropout,
        pos_embed_type=pos_embed_type,
        qkv_bias=True,
    )
