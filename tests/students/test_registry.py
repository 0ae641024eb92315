"""Student zoo: registry behaviour, shapes in 2D/3D, size scaling, ONNX export and INT8 friendliness."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from medkd.students import (
    count_parameters,
    create_student,
    list_students,
    register_student,
    student_family,
    student_task,
)
from medkd.students.cnn import ConvNormAct, SqueezeExcite
from medkd.students.unet import max_unet_levels

CLASSIFIERS = ["mobilenet_tiny", "resnet_tiny", "vit_micro"]
SEGMENTERS = ["unet_small"]
RESNET18_PARAMS = 11_200_000


def build(name: str, spatial_dims: int = 2, size: int = 28, **kwargs) -> nn.Module:
    kwargs.setdefault("in_channels", 1)
    kwargs.setdefault("num_classes", 3)
    return create_student(name, spatial_dims=spatial_dims, image_size=size, **kwargs)


def _spread_head(model: nn.Module) -> None:
    """Give the last linear layer O(1) weights so outputs are not near zero by initialisation."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.normal_(0.0, 1.0 / math.sqrt(last.in_features) * 4)
        last.bias.normal_(0.0, 0.5)


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()


def test_registry_lists_families_and_tasks():
    assert set(CLASSIFIERS + SEGMENTERS) <= set(list_students())
    assert list_students("cnn") == ["mobilenet_tiny", "resnet_tiny"]
    assert list_students("vit") == ["vit_micro"]
    assert list_students("unet") == ["unet_small"]
    assert list_students("no-such-family") == []
    assert student_family("resnet_tiny") == "cnn"
    assert all(student_task(n) == "classification" for n in CLASSIFIERS)
    assert student_task("unet_small") == "segmentation"


@pytest.mark.parametrize("lookup", [student_family, student_task])
def test_unknown_student_lookups_name_the_registered_students(lookup):
    with pytest.raises(ValueError, match="unknown student 'resnet_huge'.*resnet_tiny"):
        lookup("resnet_huge")


def test_create_unknown_student_lists_names():
    with pytest.raises(ValueError, match="resnet_tiny") as info:
        build("efficientnet_b7")
    assert "efficientnet_b7" in str(info.value)


def test_registering_a_taken_name_is_refused():
    def resnet_tiny(**kwargs):  # same name as the built-in, different function
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="already registered"):
        register_student("cnn")(resnet_tiny)
    assert student_family("resnet_tiny") == "cnn"
    with pytest.raises(ValueError, match="task"):
        register_student("cnn", task="detection")


@pytest.mark.parametrize("arg", ["width", "depth"])
@pytest.mark.parametrize("value", [0, -0.5, float("nan"), float("inf"), "1.0"])
def test_bad_multipliers_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=arg):
        build("resnet_tiny", **{arg: value})


@pytest.mark.parametrize(
    ("overrides", "arg"),
    [
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"in_channels": 0}, "in_channels"),
        ({"num_classes": -2}, "num_classes"),
        ({"image_size": (28, 28, 28)}, "image_size"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_bad_shared_arguments_name_the_argument(overrides, arg):
    kwargs = {"spatial_dims": 2, "in_channels": 1, "num_classes": 2, "image_size": 28} | overrides
    with pytest.raises(ValueError, match=arg):
        create_student("resnet_tiny", **kwargs)


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_classifiers_build_and_give_logits(name, spatial_dims):
    size = 28 if spatial_dims == 2 else 16
    model = build(name, spatial_dims=spatial_dims, size=size, in_channels=2, num_classes=5, width=0.5)
    x = torch.randn(2, 2, *([size] * spatial_dims))
    out = model(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_builds_and_segments(spatial_dims):
    size = 32 if spatial_dims == 2 else 16
    model = build("unet_small", spatial_dims=spatial_dims, size=size, num_classes=4, width=0.5)
    out = model(torch.randn(2, 1, *([size] * spatial_dims)))
    assert out.shape == (2, 4, *([size] * spatial_dims))


def test_unet_levels_are_capped_by_image_size():
    assert max_unet_levels((28, 28)) == 3
    assert max_unet_levels((32, 48)) == 5
    deep = build("unet_small", size=28, depth=3.0, width=0.25)
    out = deep(torch.randn(1, 1, 28, 28))
    assert out.shape == (1, 3, 28, 28)
    with pytest.raises(ValueError, match="image_size"):
        build("unet_small", size=27)


@pytest.mark.parametrize("name", CLASSIFIERS + SEGMENTERS)
def test_params_grow_with_width_and_depth(name):
    size = 32
    widths = [count_parameters(build(name, size=size, width=w)) for w in (0.25, 0.5, 1.0, 1.5)]
    assert widths == sorted(widths) and len(set(widths)) == len(widths), widths
    depths = [count_parameters(build(name, size=size, depth=d)) for d in (0.5, 1.0, 2.0)]
    assert depths == sorted(depths) and depths[0] < depths[-1], depths


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifiers_are_a_tenth_of_resnet18_on_medmnist(name):
    full = count_parameters(build(name, num_classes=2))
    tiny = count_parameters(build(name, num_classes=2, width=0.25))
    assert full < RESNET18_PARAMS / 10
    assert full > 100_000, "width 1 should not be too weak for ResNet-18-level quality"
    assert tiny < min(full / 4, 50_000)


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_tiny"])
@pytest.mark.parametrize("width", [0.25, 0.6, 1.0])
def test_cnn_convs_are_conv_norm_act_with_channels_in_multiples_of_8(name, width):
    model = build(name, width=width)
    se_convs = {id(m) for se in model.modules() if isinstance(se, SqueezeExcite) for m in (se.reduce, se.expand)}
    units = [m for m in model.modules() if isinstance(m, ConvNormAct)]
    unit_convs = {id(u.conv) for u in units}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(id(c) in unit_convs or id(c) in se_convs for c in convs)
    assert all(u.conv.bias is None and isinstance(u.norm, nn.BatchNorm2d) for u in units)
    assert all(u.conv.out_channels % 8 == 0 for u in units)


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_tiny"])
@pytest.mark.parametrize(("size", "feature_size"), [(28, 7), (64, 8)])
def test_cnn_stem_keeps_small_inputs_at_full_resolution(name, size, feature_size):
    model = build(name, size=size).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 1, size, size))
    assert features.shape[-2:] == (feature_size, feature_size)


@pytest.mark.parametrize("width", [0.1, 0.3, 0.77, 1.0, 1.3])
def test_vit_hidden_size_stays_divisible_by_heads(width):
    model = build("vit_micro", width=width)
    assert model.hidden_size % 4 == 0 and model.hidden_size >= 4
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 3)


def test_vit_returns_unbounded_logits():
    model = build("vit_micro").eval()
    with torch.no_grad():
        model.vit.classification_head.bias.fill_(5.0)
        out = model(torch.randn(2, 1, 28, 28))
    assert out.abs().max() > 1.5  # no tanh squashing the head


def _export_onnx(model: nn.Module, x: torch.Tensor, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=True,
            opset_version=18,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},),
            verbose=False,
        )


@pytest.mark.slow  # an ONNX export per student: left out of make test-fast (make test runs it)
@pytest.mark.parametrize("name", CLASSIFIERS + SEGMENTERS)
def test_onnx_export_matches_torch(name, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    size = 32 if name in SEGMENTERS else 28
    model = build(name, size=size, num_classes=2, width=0.5)
    x = torch.randn(3, 1, size, size)
    _calibrate_batchnorm(model, x)
    if name in CLASSIFIERS:
        _spread_head(model)
    path = tmp_path / f"{name}.onnx"
    _export_onnx(model, x[:1], path)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]  # batch 3 through a graph exported at batch 1
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == expected.shape
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow  # export + static INT8 calibration per student: left out of make test-fast
@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_tiny"])
def test_cnn_quantizes_every_conv_to_int8(name, tmp_path):
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    torch.manual_seed(0)
    model = build(name, num_classes=2, width=0.5)
    _calibrate_batchnorm(model, torch.rand(16, 1, 28, 28))
    fp32, prepared, int8 = (tmp_path / f"{name}{suffix}.onnx" for suffix in ("", "_prep", "_int8"))
    _export_onnx(model, torch.rand(1, 1, 28, 28), fp32)
    quant_pre_process(str(fp32), str(prepared))

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"image": rng.random((1, 1, 28, 28), dtype=np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(prepared),
        str(int8),
        Calibration(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    graph = onnx.load(str(int8)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs and all(producers.get(node.input[0]) == "DequantizeLinear" for node in convs)
    assert all(producers.get(node.input[1]) == "DequantizeLinear" for node in convs)
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.random.default_rng(1).random((1, 1, 28, 28), dtype=np.float32)})[0].shape == (
        1,
        2,
    )
