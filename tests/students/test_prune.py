"""Unstructured and structured (channel) pruning on small nets defined here."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from medkd.students.compression import (
    UnsupportedModelError,
    count_parameters,
    prune_channels,
    prune_unstructured,
    sparsity,
)

X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def conv_bn_relu(cin: int, cout: int, **kwargs) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kwargs), nn.BatchNorm2d(cout), nn.ReLU())


def sequential_cnn(classes: int = 3) -> nn.Sequential:
    return nn.Sequential(
        conv_bn_relu(1, 16),
        conv_bn_relu(16, 32, stride=2),
        conv_bn_relu(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


class ResidualNet(nn.Module):
    """Stem, a residual block (the sum couples stem and block output channels), head."""

    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.stem = conv_bn_relu(1, width)
        self.block = nn.Sequential(
            conv_bn_relu(width, width), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


class DepthwiseNet(nn.Module):
    """MobileNet-style: pointwise expand, depthwise 3x3, pointwise project."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.expand = conv_bn_relu(1, 24)
        self.depthwise = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.ReLU())
        self.project = nn.Conv2d(24, 16, 1)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.project(self.depthwise(self.expand(x))).mean(dim=(2, 3)))


class HardCodedChannels(nn.Module):
    """forward() hard-codes the channel count: channel pruning cannot keep it working."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.conv(x)).reshape(x.shape[0], 8 * 16 * 16))


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(2))  # (B, C, 16) -> (B, C, 32)
        return self.head(self.attention(tokens, tokens, tokens)[0].mean(1))


def conv_linear_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# --------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("amount", [0.3, 0.8])
def test_unstructured_hits_target_sparsity(amount: float) -> None:
    model = sequential_cnn()
    total = sum(w.numel() for w in conv_linear_weights(model))
    pruned = prune_unstructured(model, amount)
    assert pruned is model
    assert sparsity(model) == pytest.approx(amount, abs=1.0 / total)
    assert model(X).shape == (2, 3)


def test_unstructured_is_permanent_and_keeps_state_dict_keys() -> None:
    model = ResidualNet()
    keys = set(model.state_dict())
    prune_unstructured(model, 0.5)
    assert set(model.state_dict()) == keys
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(isinstance(w, nn.Parameter) for w in conv_linear_weights(model))
    # Zeros survive an optimizer step only as values, but the masks are gone: nothing re-applies them.
    reloaded = ResidualNet()
    reloaded.load_state_dict(model.state_dict())
    assert sparsity(reloaded) == pytest.approx(sparsity(model))


def test_unstructured_ranking_is_global() -> None:
    model = sequential_cnn()
    big_layer = model[1][0]
    with torch.no_grad():
        big_layer.weight.mul_(100.0)  # much larger magnitudes: this layer should keep its weights
    prune_unstructured(model, 0.5)
    kept = float((big_layer.weight != 0).float().mean())
    assert kept > 0.95
    assert sparsity(model) == pytest.approx(0.5, abs=1e-3)


def test_unstructured_leaves_biases_and_norms_alone() -> None:
    model = ResidualNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 1e-4, 2e-4)  # tiny, but not a pruning target
    prune_unstructured(model, 0.9)
    assert all(bool((m.weight != 0).all()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bool((model.head.bias != 0).all())


def test_unstructured_zero_amount_is_a_no_op() -> None:
    model = sequential_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_unstructured(model, 0.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sparsity(model) == 0.0


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5])
def test_unstructured_rejects_amount_outside_unit_interval(amount: float) -> None:
    with pytest.raises(ValueError, match="amount"):
        prune_unstructured(sequential_cnn(), amount)


def test_unstructured_rejects_non_numeric_amount() -> None:
    with pytest.raises(TypeError, match="amount"):
        prune_unstructured(sequential_cnn(), "0.5")  # type: ignore[arg-type]


def test_unstructured_rejects_model_without_weights() -> None:
    with pytest.raises(ValueError, match="no Conv or Linear"):
        prune_unstructured(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), 0.5)


# --------------------------------------------------------------------------- channels


def test_channel_pruning_shrinks_sequential_cnn_and_keeps_classes() -> None:
    model = sequential_cnn(classes=3)
    pruned = prune_channels(model, 0.5, X)
    assert count_parameters(pruned) < 0.4 * count_parameters(model)
    assert pruned[0][0].out_channels == 8 and pruned[0][1].num_features == 8
    assert pruned[1][0].in_channels == 8
    assert pruned[-1].out_features == 3
    assert pruned(torch.randn(5, 1, 16, 16)).shape == (5, 3)
    # The caller's model is untouched.
    assert model[0][0].out_channels == 16


def test_channel_pruning_handles_residual_block() -> None:
    model = ResidualNet(width=16, classes=4)
    pruned = prune_channels(model, 0.25, X)
    assert count_parameters(pruned) < count_parameters(model)
    widths = {pruned.stem[0].out_channels, pruned.block[0][0].out_channels, pruned.block[1].out_channels}
    assert pruned.stem[0].out_channels == pruned.block[1].out_channels == 12  # coupled by the sum
    assert widths <= {12}
    assert pruned(X).shape == (2, 4)


def test_channel_pruning_handles_depthwise_conv() -> None:
    model = DepthwiseNet()
    pruned = prune_channels(model, 0.5, X)
    depthwise = pruned.depthwise[0]
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == 12
    assert pruned.expand[0].out_channels == 12
    assert count_parameters(pruned) < count_parameters(model)
    assert pruned(X).shape == (2, 2)


def test_channel_pruning_handles_monai_unet() -> None:
    model = UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    pruned = prune_channels(model, 0.5, X)
    assert count_parameters(pruned) < 0.5 * count_parameters(model)
    assert pruned(torch.randn(3, 1, 16, 16)).shape == (3, 3, 16, 16)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_channel_pruning_removes_smallest_norm_channels(norm: str) -> None:
    model = sequential_cnn()
    dead = torch.arange(0, 16, 2)  # even channels of the first conv carry (almost) nothing
    with torch.no_grad():
        model[0][0].weight[dead] *= 1e-6
        model[0][1].weight[dead] = 1e-6
        model[0][1].bias[dead] = 0.0
        model[1][0].weight[:, dead] *= 1e-6
    survivors = model[0][0].weight[1::2].clone()
    pruned = prune_channels(model, 0.5, X, norm=norm)
    assert torch.equal(pruned[0][0].weight, survivors)


def test_channel_pruning_round_to_and_zero_amount() -> None:
    model = sequential_cnn()
    assert count_parameters(prune_channels(model, 0.0, X)) == count_parameters(model)
    pruned = prune_channels(model, 0.3, X, round_to=4)
    assert all(m.out_channels % 4 == 0 for m in pruned.modules() if isinstance(m, nn.Conv2d))


def test_channel_pruning_keeps_train_mode_and_pruned_net_trains() -> None:
    model = sequential_cnn().train()
    pruned = prune_channels(model, 0.5, X)
    assert pruned.training
    loss = pruned(X).logsumexp(dim=1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in pruned.parameters())


def test_channel_pruning_refuses_hard_coded_channels() -> None:
    with pytest.raises(UnsupportedModelError, match="no longer runs"):
        prune_channels(HardCodedChannels(), 0.5, X)


def test_channel_pruning_refuses_attention() -> None:
    with pytest.raises(UnsupportedModelError, match="MultiheadAttention"):
        prune_channels(AttentionNet(), 0.5, torch.randn(2, 4, 4, 4))


def test_channel_pruning_refuses_model_with_nothing_to_prune() -> None:
    with pytest.raises(UnsupportedModelError, match="no prunable channel group"):
        prune_channels(nn.Sequential(nn.Flatten(), nn.Linear(256, 3)), 0.5, X)


@pytest.mark.parametrize("amount", [-0.5, 1.0])
def test_channel_pruning_rejects_bad_amount(amount: float) -> None:
    with pytest.raises(ValueError, match="amount"):
        prune_channels(sequential_cnn(), amount, X)


def test_channel_pruning_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="norm"):
        prune_channels(sequential_cnn(), 0.5, X, norm="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="round_to"):
        prune_channels(sequential_cnn(), 0.5, X, round_to=0)
    with pytest.raises(TypeError, match="example_input must be a torch.Tensor"):
        prune_channels(sequential_cnn(), 0.5, X.numpy())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not run through the model"):
        prune_channels(sequential_cnn(), 0.5, torch.randn(2, 3, 16, 16))
