"""medkd.teachers.recipe: the epoch budget, the ViT's patch and width, flips, and that its teachers
are valid specs whose models run on every MedMNIST shape (2D grey/RGB, 64 px, 3D)."""

from __future__ import annotations

import pytest
import torch

from medkd.spec.teachers import TeacherSpec
from medkd.teachers import create_teacher, recipe
from medkd.teachers.recipe import (
    BF16_FROM,
    auto_epochs,
    image_cost,
    laterality_specific,
    scaled_floor,
    teacher_recipe,
    vit_hidden_size,
    vit_patch_size,
)


@pytest.mark.parametrize(
    ("image_size", "in_channels", "num_classes"),
    [
        ([28, 28], 1, 2),  # BreastMNIST
        ([28, 28], 3, 7),  # DermaMNIST
        ([64, 64], 1, 2),  # PneumoniaMNIST at 64 px
        ([28, 28, 28], 1, 11),  # OrganMNIST3D
    ],
    ids=["2d-grey", "2d-rgb", "2d-64", "3d"],
)
def test_recipe_teachers_are_valid_specs_whose_models_run_on_the_data(image_size, in_channels, num_classes):
    teachers = teacher_recipe(n_train=240, class_names=[str(i) for i in range(num_classes)], image_size=image_size)
    specs = [TeacherSpec.model_validate(t) for t in teachers]
    assert [(s.name, s.model) for s in specs] == [("cnn", "resnet18"), ("vit", "vit")]
    x = torch.randn(1, in_channels, *image_size)
    for spec in specs:
        model = create_teacher(
            spec.model,
            spatial_dims=len(image_size),
            in_channels=in_channels,
            num_classes=num_classes,
            image_size=image_size,
            **spec.model_kwargs,
        ).eval()
        with torch.no_grad():
            assert model(x).shape == (1, num_classes), spec.name


def test_vit_width_and_patch_fit_2d_and_the_3d_sincos_embedding():
    assert vit_hidden_size(2) == 128  # BreastMNIST's recipe, as before
    assert vit_hidden_size(3) == 132  # divisible by 6 (3D sin-cos) and by the 4 heads
    assert (vit_patch_size([28, 28]), vit_patch_size([64, 64]), vit_patch_size([28, 28, 28])) == (2, 4, 4)
    assert vit_patch_size([224, 224]) == 16  # 14x14 tokens
    vit = teacher_recipe(n_train=240, class_names=["a", "b"], image_size=[28, 28, 28])[1]
    assert vit["model_kwargs"]["hidden_size"] == 132
    assert vit["model_kwargs"]["patch_size"] == 4  # 7x7x7 tokens
    with pytest.raises(ValueError, match="image_size"):
        vit_patch_size([27, 27])


def test_epoch_budget_counts_images_in_28px_images():
    assert image_cost([28, 28]) == 1.0 and image_cost([28, 28, 28]) == 28.0
    assert image_cost([64, 64]) == pytest.approx(4096 / 784)
    assert auto_epochs(546, [28, 28]) == auto_epochs(546) == 40  # BreastMNIST: unchanged
    assert auto_epochs(5000, [28, 28]) == 8
    assert auto_epochs(546, [64, 64]) == 14  # 40,000 / (546 * 5.2) = 14.0
    # OrganMNIST3D (972 volumes = 27,216 images): the floor shrunk by sqrt(5,000 / 27,216), not 40 epochs of volumes
    assert auto_epochs(972, [28, 28, 28]) == 3
    assert auto_epochs(1_000) == 40 and auto_epochs(1_600) == 25  # 40,000 / 1,600
    assert teacher_recipe(n_train=972, class_names=["a", "b"], image_size=[28, 28, 28])[0]["epochs"] == 3
    with pytest.raises(ValueError, match="image_size"):
        image_cost([28, 0])
    with pytest.raises(ValueError, match="n_train"):
        auto_epochs(0)


def test_patience_and_weight_averaging_follow_the_epochs():
    for epochs, patience, ema in ((40, 10, 4.0), (8, 5, 1.0), (25, 6, 2.5)):
        cnn, vit = teacher_recipe(n_train=546, class_names=["a", "b"], image_size=[28, 28], epochs=epochs)
        assert (cnn["epochs"], cnn["patience"], cnn["ema_epochs"]) == (epochs, patience, ema)
        assert (vit["epochs"], vit["patience"], vit["ema_epochs"]) == (epochs, patience, ema)
    with pytest.raises(ValueError, match="epochs"):
        teacher_recipe(n_train=546, class_names=["a", "b"], image_size=[28, 28], epochs=0)


def test_flips_are_off_only_for_left_right_class_names():
    assert laterality_specific(["kidney-left", "liver"]) and laterality_specific(["femur_right"])
    assert not laterality_specific(["leftover", "bright"])
    organ = teacher_recipe(n_train=546, class_names=["liver", "kidney-right", "kidney-left"], image_size=[28, 28])
    breast = teacher_recipe(n_train=546, class_names=["malignant", "normal, benign"], image_size=[28, 28])
    assert [t["augment"]["flip"] for t in organ] == [0.0, 0.0]
    assert [t["augment"]["flip"] for t in breast] == [0.5, 0.5]


def test_images_seen_grow_as_the_square_root_of_the_split_above_5000():
    seen = {n: auto_epochs(n) * n for n in (5_000, 8_000, 20_000, 34_561, 80_000)}
    assert auto_epochs(5_000) == 8 and auto_epochs(34_561) == 3  # OrganAMNIST: 3 epochs, not 8
    for n, images in seen.items():  # within rounding of 40,000 * sqrt(n / 5,000)
        assert images == pytest.approx(40_000 * (n / 5_000) ** 0.5, rel=0.2), n
    assert seen[80_000] <= 2 * seen[20_000]  # 4x the data, 2x the images seen
    assert auto_epochs(10_000_000) == 1  # never below one epoch
    assert scaled_floor(6, 1_000) == 6.0  # below 5,000 images the floors are the old ones
    with pytest.raises(ValueError, match="train_size"):
        scaled_floor(8, 0)


def test_bf16_from_2000_images_small_splits_keep_fp32_and_their_fingerprints():
    small = teacher_recipe(n_train=546, class_names=["a", "b"], image_size=[28, 28], bf16=True)
    assert all("cpu_precision" not in t for t in small)  # BreastMNIST: the pinned fingerprints
    large = teacher_recipe(n_train=BF16_FROM, class_names=["a", "b"], image_size=[28, 28], bf16=True)
    assert [t["cpu_precision"] for t in large] == ["bf16", "bf16"]
    # 400 images of 64x64 count as ~2,090 of 28x28
    wide = teacher_recipe(n_train=400, class_names=["a", "b"], image_size=[64, 64], bf16=True)
    assert wide[0]["cpu_precision"] == "bf16"


def test_bf16_only_where_the_cpu_has_native_kernels(monkeypatch):
    # On an AVX2-only CPU bf16 autocast was 16x slower than fp32 (benchmarks/RESULTS.md, stop 28).
    for native in (False, True):
        monkeypatch.setattr(recipe, "cpu_has_native_bf16", lambda native=native: native)
        large = teacher_recipe(n_train=BF16_FROM, class_names=["a", "b"], image_size=[28, 28])
        assert [t.get("cpu_precision", "fp32") for t in large] == ["bf16" if native else "fp32"] * 2
