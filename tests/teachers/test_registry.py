"""The teacher zoo: every registered teacher builds, runs, trains a step and exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medkd.teachers import (
    create_teacher,
    list_teachers,
    register_teacher,
    teacher_family,
    teacher_options,
    teacher_task,
)

NUM_CLASSES = 3
REQUIRED = {
    "cnn": {"resnet18", "resnet34", "resnet50", "densenet121"},
    "vit": {"vit", "vit_tiny", "vit_small"},
    "unet": {"unet", "basicunet", "unetr", "segresnet"},
}
# (spatial_dims, image_size, in_channels): 2D grey and RGB MedMNIST-sized, a tiny 3D volume.
SHAPES = [(2, 28, 1), (2, 28, 3), (3, 16, 1)]


def _expected_shape(name: str, batch: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
    if teacher_task(name) == "segmentation":
        return (batch, NUM_CLASSES, *spatial)
    return (batch, NUM_CLASSES)


def _build(name: str, spatial_dims: int, image_size, in_channels: int = 1, **kwargs) -> nn.Module:
    return create_teacher(
        name,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=NUM_CLASSES,
        image_size=image_size,
        **kwargs,
    )


def _spatial_output(model: nn.Module, module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """Spatial size of ``module``'s output when ``model`` runs on ``x``."""
    seen: list[tuple[int, ...]] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[2:])))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    return seen[0]


def test_every_family_has_its_required_teachers():
    for family, names in REQUIRED.items():
        assert names <= set(list_teachers(family))
        for name in names:
            assert teacher_family(name) == family
            assert teacher_task(name) == ("segmentation" if family == "unet" else "classification")
    assert sorted(list_teachers()) == list_teachers()
    assert set(list_teachers()) == set().union(*(list_teachers(f) for f in REQUIRED))


@pytest.mark.parametrize("spatial_dims,size,in_channels", SHAPES, ids=["2d-grey", "2d-rgb", "3d"])
@pytest.mark.parametrize("name", list_teachers())
def test_teacher_forward_backward_shapes(name, spatial_dims, size, in_channels):
    torch.manual_seed(0)
    model = _build(name, spatial_dims, size, in_channels)
    spatial = (size,) * spatial_dims
    x = torch.randn(2, in_channels, *spatial)
    logits = model(x)
    assert isinstance(logits, torch.Tensor)  # ViT/UNETR tuples are unwrapped
    assert logits.shape == _expected_shape(name, 2, spatial)
    assert torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("name", list_teachers("unet"))
def test_segmentation_teachers_accept_sizes_their_network_cannot(name):
    # 20x36 is not a multiple of any network's downsampling; 2D and anisotropic 3D.
    for spatial in ((20, 36), (12, 20, 8)):
        model = _build(name, len(spatial), spatial)
        with torch.no_grad():
            logits = model.eval()(torch.randn(1, 1, *spatial))
        assert logits.shape == (1, NUM_CLASSES, *spatial)


def test_unetr_only_accepts_the_size_it_was_built_for():
    model = _build("unetr", 2, 28).eval()
    with pytest.raises(ValueError, match=r"built for spatial size \(28, 28\)"):
        model(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("name", ["resnet10", "resnet18", "resnet34", "resnet50"])
def test_small_resnet_stem_keeps_resolution(name):
    model = _build(name, 2, 28)
    x = torch.randn(1, 1, 28, 28)
    assert isinstance(model.maxpool, nn.Module) and model.no_max_pool
    assert _spatial_output(model, model.conv1, x) == (28, 28)
    final = _spatial_output(model, model.layer4, x)
    assert min(final) >= 2, final


def test_small_densenet_stem_keeps_resolution():
    model = _build("densenet121", 2, 28)
    x = torch.randn(1, 1, 28, 28)
    assert _spatial_output(model, model.features.conv0, x) == (28, 28)
    assert min(_spatial_output(model, model.features, x)) >= 2


def test_small_stem_in_3d():
    model = _build("resnet18", 3, 16)
    x = torch.randn(1, 1, 16, 16, 16)
    assert _spatial_output(model, model.conv1, x) == (16, 16, 16)
    assert min(_spatial_output(model, model.layer4, x)) >= 2


def test_large_inputs_get_the_imagenet_stem():
    model = _build("resnet18", 2, 128)
    x = torch.randn(1, 1, 128, 128)
    assert not model.no_max_pool
    assert _spatial_output(model, model.conv1, x) == (64, 64)
    assert _spatial_output(model, model.layer4, x) == (4, 4)
    densenet = _build("densenet121", 2, 128)
    assert _spatial_output(densenet, densenet.features.conv0, x) == (64, 64)


def test_stem_can_be_forced():
    small = _build("resnet18", 2, 128, stem="small")
    assert _spatial_output(small, small.conv1, torch.randn(1, 1, 128, 128)) == (128, 128)
    with pytest.raises(ValueError, match=r"too small for densenet121 with the 'imagenet' stem"):
        _build("densenet121", 2, 28, stem="imagenet")
    with pytest.raises(ValueError, match="stem must be one of"):
        _build("resnet18", 2, 28, stem="tiny")


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_cnn_dropout_is_applied_and_keeps_checkpoint_keys(name):
    plain = _build(name, 2, 28)
    dropped = _build(name, 2, 28, dropout=0.3)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in dropped.modules())
    assert plain.state_dict().keys() == dropped.state_dict().keys()


@pytest.mark.parametrize("name", ["resnet18", "vit", "unet", "unetr"])
def test_rebuilt_teacher_loads_a_saved_state_dict(name, tmp_path):
    torch.manual_seed(0)
    original = _build(name, 2, 28).eval()
    torch.save(original.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)
    rebuilt = _build(name, 2, 28).eval()
    rebuilt.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original(x))


def test_vit_head_is_linear_and_options_reach_monai():
    model = _build("vit", 2, 28, hidden_size=64, num_heads=4, num_layers=2, mlp_dim=128, patch_size=7)
    assert not any(isinstance(m, nn.Tanh) for m in model.modules())  # MONAI's default post-activation
    assert len(model.vit.blocks) == 2
    assert model.vit.patch_embedding.n_patches == 16  # (28 / 7) ** 2
    assert model.vit.classification_head.out_features == NUM_CLASSES
    # auto patch size: 4 at 28x28 (49 tokens), 8 for a 64^3 volume (512 tokens)
    assert _build("vit", 2, 28).vit.patch_embedding.n_patches == 49
    assert _build("vit", 3, 64, num_layers=1).vit.patch_embedding.n_patches == 512


def test_unet_options_reach_monai():
    model = _build("unet", 2, 32, channels=[8, 16, 32], strides=[2, 2], num_res_units=0)
    assert model.divisor == 4
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in model.modules())
    batch_normed = _build("unet", 2, 32, channels=[8, 16, 32], strides=[2, 2], norm="batch")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in batch_normed.modules())
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in batch_normed.modules())
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, NUM_CLASSES, 32, 32)


def test_unknown_teacher_lists_available_names():
    with pytest.raises(ValueError, match=r"unknown teacher 'resnet19'.*resnet18.*unetr"):
        _build("resnet19", 2, 28)
    for lookup in (teacher_family, teacher_task, teacher_options):
        with pytest.raises(ValueError, match="unknown teacher 'nope'"):
            lookup("nope")
    with pytest.raises(ValueError, match="family must be one of"):
        list_teachers("transformer")


def test_unknown_options_are_named():
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['bogus', 'depth'\] for teacher 'resnet18'.*dropout, stem"
    ):
        _build("resnet18", 2, 28, bogus=1, depth=3)
    with pytest.raises(ValueError, match=r"\['hidden_size'\] for teacher 'vit_tiny'"):
        _build("vit_tiny", 2, 28, hidden_size=64)
    assert "patch_size" in teacher_options("vit")


@pytest.mark.parametrize("spatial_dims", [1, 4, "2", 2.0, True, None])
def test_unsupported_spatial_dims(spatial_dims):
    with pytest.raises(ValueError, match=r"supports spatial_dims \(2, 3\)"):
        _build("resnet18", spatial_dims, 28)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"in_channels": 0}, "in_channels must be a positive integer"),
        ({"num_classes": 0}, "num_classes must be a positive integer"),
        ({"num_classes": 2.5}, "num_classes must be a positive integer"),
        ({"image_size": (28, 28, 28)}, "image_size must have 2 entries"),
        ({"image_size": (28, 0)}, "image_size entries must be positive integers"),
    ],
)
def test_bad_core_arguments(overrides, message):
    arguments = {"spatial_dims": 2, "in_channels": 1, "num_classes": 2, "image_size": 28} | overrides
    with pytest.raises(ValueError, match=message):
        create_teacher("resnet18", **arguments)


def test_segmentation_needs_a_background_class():
    with pytest.raises(ValueError, match="num_classes must be >= 2 for segmentation teacher 'unet'"):
        create_teacher("unet", spatial_dims=2, in_channels=1, num_classes=1, image_size=28)


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("resnet18", {"dropout": 1.5}, r"cannot build teacher 'resnet18'.*dropout must be a number in \[0, 1\)"),
        ("vit", {"hidden_size": 100, "num_heads": 3}, r"hidden_size \(100\) must be divisible by num_heads \(3\)"),
        ("vit", {"patch_size": 5}, r"patch_size \(5, 5\) must divide image_size \(28, 28\)"),
        ("vit", {"pos_embed_type": "rope"}, "pos_embed_type must be one of"),
        ("unet", {"channels": [8, 16, 32], "strides": [2]}, r"strides needs len\(channels\) - 1 = 2 entries"),
        ("unet", {"channels": "abc"}, "channels must be a sequence"),
        ("unet", {"norm": "group"}, r"norm must be one of \['instance', 'batch'\]"),
        ("basicunet", {"features": [8, 8, 16]}, "features must be a sequence of at least 6"),
        ("segresnet", {"init_filters": 12}, "init_filters must be a multiple of 8"),
        ("unetr", {"hidden_size": 96, "num_heads": 5}, r"hidden_size \(96\) must be divisible by num_heads \(5\)"),
    ],
)
def test_bad_options_are_named(name, options, message):
    with pytest.raises(ValueError, match=message):
        _build(name, 2, 28, **options)


def test_vit_without_a_valid_auto_patch_asks_for_one():
    with pytest.raises(ValueError, match="pass patch_size explicitly"):
        _build("vit", 2, 29)


def test_register_teacher_rejects_bad_builders():
    with pytest.raises(ValueError, match="family must be one of"):
        register_teacher("gan")
    with pytest.raises(ValueError, match="revision must be an int >= 1"):
        register_teacher("cnn", revision=0)
    with pytest.raises(ValueError, match="spatial_dims must be a non-empty subset"):
        register_teacher("cnn", spatial_dims=(1,))

    def missing_core(*, spatial_dims, in_channels, num_classes):  # no image_size
        return nn.Identity()

    with pytest.raises(ValueError, match=r"must accept keyword arguments \['image_size'\]"):
        register_teacher("cnn")(missing_core)

    def open_ended(*, spatial_dims, in_channels, num_classes, image_size, **kwargs):
        return nn.Identity()

    with pytest.raises(ValueError, match="must list its options explicitly"):
        register_teacher("cnn")(open_ended)

    def resnet18(*, spatial_dims, in_channels, num_classes, image_size):  # clashes with the real one
        return nn.Identity()

    with pytest.raises(ValueError, match="'resnet18' is already registered by medkd.teachers.cnn"):
        register_teacher("cnn")(resnet18)
    assert teacher_family("resnet18") == "cnn" and "missing_core" not in list_teachers()


@pytest.mark.slow  # ONNX export of full-size teachers: the heaviest unit test (make test runs it)
@pytest.mark.parametrize("name,dynamic_batch", [("resnet18", True), ("unet", False)])
def test_onnx_export_matches_torch(name, dynamic_batch, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _build(name, 2, 28).eval()
    example = torch.randn(2, 1, 28, 28)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        external_data=False,
        dynamic_shapes=({0: "batch"},) if dynamic_batch else None,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3 if dynamic_batch else 2, 1, 28, 28)
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch_logits = model(x).numpy()
    assert onnx_logits.shape == torch_logits.shape
    np.testing.assert_allclose(onnx_logits, torch_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "vit", "unetr"])
def test_teacher_trains_under_ddp(name, tmp_path):
    # Ray Train wraps teachers in DistributedDataParallel, which fails on the second step if a
    # parameter requires grad but never receives one (MONAI's unused cross-attention norms).
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(_build(name, 2, 28))
        probe = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            before = model.module.eval()(probe).clone()
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(2):  # DDP's unused-parameter check fails on the second step
            optimizer.zero_grad()
            model(torch.randn(2, 1, 28, 28)).square().mean().backward()
            optimizer.step()
        trainable = {key: p for key, p in model.module.named_parameters() if p.requires_grad}
        assert trainable and [key for key, p in trainable.items() if p.grad is None] == []
        with torch.no_grad():
            after = model.module.eval()(probe)
        assert not torch.allclose(before, after)  # the steps changed the model
    finally:
        dist.destroy_process_group()


def test_a_fixed_builders_revision_enters_the_fingerprint_and_revision_1_leaves_it_alone():
    from medkd.core.fingerprint import fingerprint
    from medkd.spec.teachers import TeacherSpec
    from medkd.teachers.registry import teacher_revision
    from medkd.teachers.train import teacher_fingerprint

    assert teacher_revision("resnet18") == 1 and teacher_revision("efficientnet_b0") == 2
    for model, revision in (("resnet18", 1), ("efficientnet_b0", 2)):
        spec = TeacherSpec.model_validate({"name": "t", "model": model})
        fields = spec.training_fingerprint_fields()
        before = fingerprint("teacher", fields, "data-fp", 0, "classification")
        now = teacher_fingerprint(spec, "data-fp", 0, "classification")
        # Revision 1: the fingerprint every earlier run has (BreastMNIST's pinned ones stay, too);
        # a fixed builder's teachers are trained again rather than reused.
        assert (now == before) == (revision == 1)
        if revision > 1:
            assert now == fingerprint("teacher", {**fields, "model_revision": revision}, "data-fp", 0, "classification")
