"""benchmarks.teachers: the teacher specs it trains for registry names, and how it scores them (val
decides which teachers stay, test is read after). The trainings run in the benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.teachers import parse_args, score_teachers, teacher_specs
from medkd.teachers.recipe import teacher_recipe

RECIPE_FACTS = {"n_train": 546, "class_names": ["malignant", "benign"], "image_size": [28, 28], "epochs": None}


def test_each_name_gets_its_familys_recipe_settings():
    cnn, vit = teacher_recipe(**{k: v for k, v in RECIPE_FACTS.items() if k != "epochs"})
    specs = teacher_specs(["resnet18", "efficientnet_b0", "vit"], **RECIPE_FACTS)
    assert [s["name"] for s in specs] == ["resnet18", "efficientnet_b0", "vit"]
    assert [s["model"] for s in specs] == ["resnet18", "efficientnet_b0", "vit"]
    # Only the architecture changes: the CNNs share the recipe CNN's training, the ViT keeps its own.
    strip = ("name", "model")
    assert {k: v for k, v in specs[1].items() if k not in strip} == {k: v for k, v in cnn.items() if k not in strip}
    assert specs[2]["lr"] == vit["lr"] and specs[2]["model_kwargs"] == vit["model_kwargs"]


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (["resnet18", "resnet18"], "named twice"),
        (["resnet18", "swin"], "'swin' is not a classification teacher"),
        (["unet"], "'unet' is not a classification teacher"),
    ],
)
def test_bad_model_names_are_refused_naming_them(models, message):
    with pytest.raises(SystemExit, match=message):
        teacher_specs(models, **RECIPE_FACTS)


def test_models_argument_is_a_list_and_must_name_one():
    assert parse_args(["--data", "x.npz", "--models", "resnet18, efficientnet_b0"]).models == [
        "resnet18",
        "efficientnet_b0",
    ]
    assert parse_args(["--data", "x.npz"]).models == ["resnet18", "vit"]
    with pytest.raises(SystemExit):
        parse_args(["--data", "x.npz", "--models", ","])


def _logits(labels: np.ndarray, margin: float, flip_every: int, rng: np.random.Generator) -> np.ndarray:
    """Logits that favour the label by ``margin`` (plus noise), wrong on every ``flip_every``-th sample."""
    shown = labels.copy()
    shown[::flip_every] = 1 - shown[::flip_every]
    logits = rng.normal(0, 0.3, (len(labels), 2))
    logits[np.arange(len(labels)), shown] += margin
    return logits


def test_val_keeps_the_teachers_that_help_and_test_is_scored_for_them():
    rng = np.random.default_rng(0)
    val_y, test_y = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    # "good" is right on all but 1 in 20, "poor" wrong on every third sample with a larger margin:
    # the ensemble without "poor" decides better beyond the val noise.
    val = {"good": _logits(val_y, 2.0, 20, rng), "poor": _logits(val_y, 4.0, 3, rng)}
    test = {"good": _logits(test_y, 2.0, 20, rng), "poor": _logits(test_y, 4.0, 3, rng)}
    scores = score_teachers(val, val_y, test, test_y)
    assert scores["kept"] == ["good"]
    assert scores["teachers"]["poor"]["contribution"]["acc"] < 0  # the ensemble is better without it
    assert scores["teachers"]["good"]["val_acc"] > scores["teachers"]["poor"]["val_acc"]
    # The kept ensemble is the good teacher alone; the whole one is pulled down by the poor one.
    assert scores["kept_ensemble"]["acc"] == pytest.approx(scores["teachers"]["good"]["test_acc"])
    assert scores["kept_ensemble"]["acc"] > scores["ensemble"]["test"]["acc"]
    assert scores["selection"]["dropped"] == ["poor"]
