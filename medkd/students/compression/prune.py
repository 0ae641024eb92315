"""Pruning: global unstructured magnitude pruning and structured channel pruning.

Unstructured pruning zeroes individual weights (the tensors keep their shapes; the gain is in
compressibility and in sparse kernels). Channel pruning removes whole filters and the matching
inputs of every coupled layer, so the network really gets smaller and faster.

Channel pruning uses the dependency graph of `torch-pruning` (DepGraph, Fang et al., CVPR 2023):
coupled layers (a conv and its BatchNorm, the two branches of a residual sum, a depthwise conv
and its producer, the channels of a concatenation) are found by tracing the autograd graph and
are pruned together.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Literal

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import prune

__all__ = [
    "UnsupportedModelError",
    "count_prunable_weights",
    "prune_channels",
    "prune_unstructured",
    "sparsity",
]

logger = logging.getLogger(__name__)

PRUNABLE_WEIGHT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)

# Module types whose parameters torch-pruning shrinks consistently along the channel dimension.
# A parameter owned by anything else (nn.Embedding, nn.MultiheadAttention, nn.LSTM, a bare
# nn.Parameter such as a ViT position embedding) would be guessed at, so it is refused.
_CHANNEL_PRUNABLE_OWNERS: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.PReLU,
)

_ROOT_TYPES = (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.DEPTHWISE_CONV, tp.ops.OPTYPE.LINEAR)

Norm = Literal["l1", "l2"]
_NORM_DEGREE: dict[str, int] = {"l1": 1, "l2": 2}


class UnsupportedModelError(ValueError):
    """The model has a structure that channel pruning cannot shrink safely."""


def _check_amount(amount: float) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"amount must be a float in [0, 1), got {type(amount).__name__}")
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    return float(amount)


def _prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every Conv/Linear weight, each shared parameter once."""
    seen: set[int] = set()
    targets: list[tuple[nn.Module, str]] = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_WEIGHT_TYPES):
            continue
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"module {name or type(module).__name__!r} has no initialised weight parameter; "
                "run one forward pass before pruning a lazy module"
            )
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        targets.append((module, "weight"))
    return targets


def count_prunable_weights(model: nn.Module) -> int:
    """Number of Conv/Linear weight elements (the population that pruning acts on)."""
    return sum(getattr(module, name).numel() for module, name in _prunable_weights(model))


def sparsity(model: nn.Module) -> float:
    """Fraction of Conv/Linear weight elements that are exactly zero (0.0 when there are none).

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> _ = nn.init.zeros_(net[0].weight)
        >>> sparsity(net)
        1.0
    """
    targets = _prunable_weights(model)
    total = sum(getattr(m, n).numel() for m, n in targets)
    if total == 0:
        return 0.0
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in targets)
    return zeros / total


def prune_unstructured(model: nn.Module, amount: float) -> nn.Module:
    """Zero the ``amount`` fraction of Conv/Linear weights with the smallest magnitude, globally.

    The ranking is global over all Conv/Linear weights (layers that matter less lose more), and
    the result is made permanent: no ``weight_orig``/``weight_mask`` entries and no forward
    pre-hooks remain, so the state dict keeps its usual keys and exports cleanly. Biases and
    normalisation parameters are left untouched. The model is modified in place and returned.

    Args:
        model: any module containing Conv (1D/2D/3D, transposed) or Linear layers.
        amount: fraction of the Conv/Linear weight elements to zero, in [0, 1).

    Returns:
        ``model``, pruned.

    Raises:
        ValueError: ``amount`` is outside [0, 1) or the model has no Conv/Linear weights.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 26 * 26, 2))
        >>> round(sparsity(prune_unstructured(net, 0.5)), 2)
        0.5
    """
    amount = _check_amount(amount)
    targets = _prunable_weights(model)
    if not targets:
        raise ValueError(f"model {type(model).__name__} has no Conv or Linear weights to prune")
    if amount == 0.0:
        return model
    with torch.no_grad():
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
        for module, name in targets:
            prune.remove(module, name)
    return model


def _output_layers(graph: tp.DependencyGraph) -> list[nn.Module]:
    """Conv/Linear layers whose output channels reach a model output without another Conv/Linear.

    Their output channels are the model's outputs (class logits, segmentation classes), so they
    must never be pruned.
    """
    found: list[nn.Module] = []
    stack = [node for node in graph.module2node.values() if node.type == tp.ops.OPTYPE.OUTPUT or not node.outputs]
    visited: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if node.type in _ROOT_TYPES:
            found.append(node.module)
            continue
        stack.extend(node.inputs)
    return found


def _check_supported(model: nn.Module) -> None:
    for module_name, module in model.named_modules():
        if isinstance(module, _CHANNEL_PRUNABLE_OWNERS):
            continue
        for param_name, _ in module.named_parameters(recurse=False):
            qualified = f"{module_name}.{param_name}" if module_name else param_name
            raise UnsupportedModelError(
                f"channel pruning supports parameters of Conv, Linear and normalisation layers "
                f"only; parameter {qualified!r} belongs to {type(module).__name__}. "
                "Use prune_unstructured for this model."
            )


class _PReLUPruner(tp.pruner.function.PReLUPruner):
    """torch-pruning's PReLU pruner, but knowing the channel count of single-parameter PReLUs.

    A PReLU with one shared slope (MONAI's default activation) has no channel count of its own,
    and torch-pruning's shape inference then fails on a following ``torch.cat`` (U-Net skip
    connections). The counts are read from a forward pass instead.
    """

    def __init__(self, model: nn.Module, example_input: Tensor) -> None:
        super().__init__()
        self._channels: dict[int, int] = {}

        def record(module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            self._channels[id(module)] = int(inputs[0].shape[1]) if inputs[0].dim() > 1 else 1

        hooks = [m.register_forward_hook(record) for m in model.modules() if type(m) is nn.PReLU]
        try:
            with torch.no_grad():
                model(example_input)
        finally:
            for hook in hooks:
                hook.remove()

    def get_out_channels(self, layer: nn.PReLU) -> int | None:
        if layer.num_parameters > 1:
            return layer.num_parameters
        return self._channels.get(id(layer))

    def get_in_channels(self, layer: nn.PReLU) -> int | None:
        return self.get_out_channels(layer)


def _output_shapes(output: object) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tp.utils.flatten_as_list(output) if isinstance(t, Tensor)]


def prune_channels(
    model: nn.Module,
    amount: float,
    example_input: Tensor,
    *,
    norm: Norm = "l2",
    round_to: int | None = None,
) -> nn.Module:
    """Remove the ``amount`` fraction of channels of every prunable layer group, by filter norm.

    Coupled layers are pruned together (a conv's output channels with its BatchNorm and the next
    layer's input channels; both operands of a residual sum; a depthwise conv with its producer),
    so parameters, FLOPs and latency really drop. Layers that produce the model's outputs keep
    their output channels, so the number of classes is unchanged. The pruned network is checked
    by a forward pass on ``example_input``: it must produce outputs of the original shapes.

    The input model is left untouched; a pruned copy (in the input's train/eval mode) is
    returned. Its parameters are new tensors, so build the optimizer after pruning.

    Args:
        model: a CNN built from Conv/Linear/normalisation/PReLU layers and parameter-free ops.
        amount: fraction of channels to remove from each group, in [0, 1). The number removed
            is rounded down per group, and at least one channel always remains.
        example_input: a batch the model accepts, used to trace the dependency graph.
        norm: ``"l1"`` or ``"l2"``: the norm of each channel's weights (summed over the coupled
            layers of its group) that ranks channels; the smallest are removed.
        round_to: keep each group's channel count a multiple of this (e.g. 8 for SIMD kernels).

    Returns:
        The pruned copy.

    Raises:
        ValueError: bad ``amount``, ``norm`` or ``round_to``, or ``example_input`` does not run
            through the model.
        TypeError: ``example_input`` is not a tensor.
        UnsupportedModelError: the model has parameters outside Conv/Linear/normalisation layers
            (embeddings, attention, bare parameters), nothing prunable, or the pruned network
            no longer runs or changes its output shapes (e.g. hard-coded channel counts in
            ``forward``).

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
        ...                     nn.Conv2d(16, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(16, 3))
        >>> small = prune_channels(net, 0.5, torch.randn(2, 1, 16, 16))
        >>> small[0].out_channels, small[-1].out_features
        (8, 3)
    """
    amount = _check_amount(amount)
    if norm not in _NORM_DEGREE:
        raise ValueError(f"norm must be one of {sorted(_NORM_DEGREE)}, got {norm!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    _check_supported(model)

    was_training = model.training
    pruned = copy.deepcopy(model).eval()
    device = next((p.device for p in pruned.parameters()), torch.device("cpu"))
    example_input = example_input.to(device)

    with torch.no_grad():
        try:
            reference_shapes = _output_shapes(pruned(example_input))
        except Exception as exc:
            raise ValueError(
                f"example_input of shape {tuple(example_input.shape)} does not run through the model: {exc}"
            ) from exc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        customized = {nn.PReLU: _PReLUPruner(pruned, example_input)}
        try:
            graph = tp.DependencyGraph().build_dependency(
                pruned, example_inputs=example_input, customized_pruners=customized
            )
            pruner = tp.pruner.BasePruner(
                pruned,
                example_input,
                importance=tp.importance.MagnitudeImportance(p=_NORM_DEGREE[norm]),
                pruning_ratio=amount,
                ignored_layers=_output_layers(graph),
                round_to=round_to,
                customized_pruners=customized,
            )
        except Exception as exc:
            raise UnsupportedModelError(
                f"could not trace the channel dependencies of {type(model).__name__}: {exc}"
            ) from exc
        if pruner.initial_total_channels == 0:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no prunable channel group: every Conv/Linear layer "
                "feeds a model output directly"
            )
        if amount > 0.0:
            try:
                pruner.step()
            except Exception as exc:
                raise UnsupportedModelError(f"torch-pruning could not prune {type(model).__name__}: {exc}") from exc

    with torch.no_grad():
        try:
            shapes = _output_shapes(pruned(example_input))
        except Exception as exc:
            raise UnsupportedModelError(
                f"the channel-pruned {type(model).__name__} no longer runs ({exc}); its forward "
                "probably hard-codes channel counts. Use prune_unstructured for this model."
            ) from exc
    if shapes != reference_shapes:
        raise UnsupportedModelError(
            f"channel pruning changed the output shapes of {type(model).__name__} from {reference_shapes} to {shapes}"
        )
    for param in pruned.parameters():
        param.grad = None
    logger.debug(
        "channel pruning (amount=%s, norm=%s): %d -> %d parameters",
        amount,
        norm,
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in pruned.parameters()),
    )
    return pruned.train(was_training)
