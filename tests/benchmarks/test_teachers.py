"""benchmarks.teachers.teacher_recipe: its teachers build on every MedMNIST shape (2D grey/RGB, 64 px, 3D)."""

from __future__ import annotations

import pytest

from benchmarks.teachers import teacher_recipe, vit_hidden_size
from medkd.data.meta import DatasetMeta
from medkd.spec.teachers import TeacherSpec
from medkd.teachers.train import check_teachers


@pytest.mark.parametrize(("image_size", "in_channels", "num_classes"), [
    ([28, 28], 1, 2),        # BreastMNIST
    ([28, 28], 3, 7),        # DermaMNIST
    ([64, 64], 1, 2),        # PneumoniaMNIST at 64 px
    ([28, 28, 28], 1, 11),   # OrganMNIST3D
], ids=["2d-grey", "2d-rgb", "2d-64", "3d"])
def test_recipe_teachers_build_for_the_data(image_size, in_channels, num_classes):
    teachers = teacher_recipe(n_train=240, class_names=[str(i) for i in range(num_classes)], image_size=image_size)
    meta = DatasetMeta(task="classification", multilabel=False, spatial_dims=len(image_size),
                       in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    check_teachers([TeacherSpec.model_validate(t) for t in teachers], meta)  # builds every model


def test_vit_width_is_unchanged_in_2d_and_fits_the_3d_sincos_embedding():
    assert vit_hidden_size(2) == 128  # BreastMNIST's recipe, as before
    width = vit_hidden_size(3)
    assert width % 6 == 0 and width % 4 == 0 and width >= 128
    vit = teacher_recipe(n_train=240, class_names=["a", "b"], image_size=[28, 28, 28])[1]
    assert vit["model_kwargs"]["hidden_size"] == width
    assert vit["model_kwargs"]["patch_size"] == 4  # 7x7x7 tokens


def test_epoch_budget_counts_images_in_28px_images():
    from benchmarks.teachers import auto_epochs, image_cost

    assert image_cost([28, 28]) == 1.0 and image_cost([28, 28, 28]) == 28.0
    assert auto_epochs(546, [28, 28]) == auto_epochs(546) == 40  # BreastMNIST: unchanged
    assert auto_epochs(5000, [28, 28]) == 8
    assert auto_epochs(546, [64, 64]) == 14  # 5.2x the pixels per image
    assert auto_epochs(972, [28, 28, 28]) == 8  # OrganMNIST3D: the floor, not 40 epochs of volumes
    assert teacher_recipe(n_train=972, class_names=["a", "b"], image_size=[28, 28, 28])[0]["epochs"] == 8
    with pytest.raises(ValueError, match="image_size"):
        image_cost([28, 0])
