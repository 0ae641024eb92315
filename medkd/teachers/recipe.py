"""The teacher recipe: two teacher specs (a CNN and a ViT) for a classification set, from its facts.

The recipe is a method, not numbers tuned to one file: it is the same for every MedMNIST set and
reads only properties of the data (training-split size, image size, class names):

- budget: ``epochs = clamp(SAMPLE_BUDGET / n, scaled_floor(MIN_EPOCHS, n), MAX_EPOCHS)`` with
  ``n = n_train * image_cost`` — about the same compute for every set up to ``SCALE_FROM`` (5,000)
  images (a 5,000-image split at 28x28 gets 8 epochs, BreastMNIST's 546 images 40), where
  :func:`image_cost` counts an image in 28x28 images (1 at 28x28, 5.2 at 64x64, 28 for a 28^3
  volume: convolutions cost per pixel). Above 5,000 images the 8-epoch floor shrinks with the
  square root of the split (:func:`scaled_floor`), so the images seen grow as ``sqrt(n)``, not
  ``n``: OrganAMNIST's 34,561 images get 3 epochs (104k images seen, 2.6x the 5,000-image
  budget for 6.9x the data) instead of 8 (276k). Early stopping after
  ``patience = max(5, epochs // 4)`` epochs without a better validation AUC, and the
  best-validation-AUC checkpoint is the teacher;
- precision: splits of at least ``BF16_FROM`` (2,000) images train and infer under bfloat16
  autocast on CPU (``cpu_precision: bf16``: ~2x faster per image for both teachers at 28 px,
  validation quality measured equal, ``benchmarks/RESULTS.md`` "scale"); smaller splits, whose
  teachers train in minutes, stay fp32 (and keep their fingerprints); so does every split on a CPU
  without native bf16 kernels (AVX2-only), where bf16 autocast is over 10x slower than fp32;
- weight averaging: an exponential moving average of the weights over the last
  ``max(1, epochs / 10)`` epochs is what is validated, selected and used as the teacher (on a
  few dozen validation images, picking among raw per-epoch weights is mostly picking noise);
- AdamW (weight decay 0.05, none on biases / norms), cosine decay, label smoothing 0.1, plain
  (unweighted) cross-entropy, batch 32 — inverse-frequency class weights move the decision
  threshold towards the minority class, which costs accuracy and calibration (the ablation in
  ``benchmarks/RESULTS.md``); ``class_weighting: true`` in a spec turns them on;
- augmentation: random flips of every spatial axis — except when a class name is laterality
  specific ("left"/"right", e.g. OrganMNIST's kidney-left), where a flip would change the
  label — plus a small random affine (±10°, zoom 0.9–1.1, shift ≤ 5 %);
- models: ``resnet18`` (small stem at 28 px, as the MedMNIST v2 baseline) and a small ``vit``
  (4 blocks, width 128 — 132 in 3D, see :func:`vit_hidden_size` —, 4 heads, fixed sin-cos
  position embedding) on fine patches: the smallest patch giving at most 256 tokens
  (:func:`vit_patch_size`: 2 at 28 px, 14x14 tokens).

``python -m benchmarks.teachers`` measures the recipe's teachers on a MedMNIST file and
``python -m benchmarks.students`` uses it for the whole pipeline. The specs it returns are part
of the teachers' fingerprints: changing a value here retrains every recipe teacher.

Examples:
    >>> teachers = teacher_recipe(n_train=546, class_names=["malignant", "benign"], image_size=[28, 28])
    >>> [(t["name"], t["model"], t["epochs"]) for t in teachers]
    [('cnn', 'resnet18', 40), ('vit', 'vit', 40)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from medkd.core.cpu_features import cpu_has_native_bf16

SAMPLE_BUDGET = 40_000  # training samples seen per teacher (before early stopping), up to SCALE_FROM images
MIN_EPOCHS = 8
MAX_EPOCHS = 40
SCALE_FROM = 5_000  # 28x28 images: above this, epoch floors shrink as sqrt(SCALE_FROM / n)
BF16_FROM = 2_000  # 28x28 images: from this split size on, the recipe's teachers use cpu_precision bf16
REFERENCE_PIXELS = 28 * 28  # budgets are counted in 28x28 images
VIT_HEADS = 4
VIT_WIDTH = 128


def image_cost(image_size: Sequence[int] | None) -> float:
    """What one image costs to train on, in 28x28 images: 1 at 28x28, 5.2 at 64x64, 28 for 28^3.

    Args:
        image_size: the spatial size of one image (2 or 3 sides); ``None`` counts as 28x28.

    Raises:
        ValueError: if a side is not positive.

    Examples:
        >>> image_cost([64, 64])
        5.224489795918367
    """
    if image_size is None:
        return 1.0
    if not image_size or any(int(side) <= 0 for side in image_size):
        raise ValueError(f"image_size must be positive sides, got {list(image_size)}")
    return math.prod(int(side) for side in image_size) / REFERENCE_PIXELS


def auto_epochs(n_train: int, image_size: Sequence[int] | None = None) -> int:
    """Epochs for a training split of ``n_train`` images of ``image_size`` (see the module docstring).

    Args:
        n_train: images in the training split.
        image_size: their spatial size (``None``: 28x28).

    Examples:
        >>> auto_epochs(546), auto_epochs(5_000), auto_epochs(34_561), auto_epochs(972, [28, 28, 28])
        (40, 8, 3, 3)
    """
    if n_train <= 0:
        raise ValueError(f"n_train must be > 0, got {n_train}")
    size = n_train * image_cost(image_size)
    return int(min(MAX_EPOCHS, max(1, round(scaled_floor(MIN_EPOCHS, size)), round(SAMPLE_BUDGET / size))))


def scaled_floor(floor: float, train_size: float, scale_from: float = SCALE_FROM) -> float:
    """An epoch floor for a split of ``train_size`` 28x28 images: ``floor`` up to ``scale_from``
    images, then ``floor * sqrt(scale_from / train_size)``, so that the images seen at the floor,
    ``epochs * train_size``, grow as the square root of the split rather than linearly (a larger
    split needs more optimisation steps, not proportionally more: its images are more alike).

    Args:
        floor: the epoch floor of splits up to ``scale_from`` images.
        train_size: the training split, in 28x28 images (see :func:`image_cost`).
        scale_from: where the floor starts to shrink.

    Examples:
        >>> scaled_floor(8, 5_000), round(scaled_floor(8, 34_561), 2), round(scaled_floor(6, 34_561), 2)
        (8.0, 3.04, 2.28)
    """
    if train_size <= 0:
        raise ValueError(f"train_size must be > 0, got {train_size}")
    return float(floor) * math.sqrt(min(1.0, scale_from / train_size))


def laterality_specific(class_names: Sequence[str]) -> bool:
    """Whether a class name says left or right, so mirroring an image could change its label.

    Examples:
        >>> laterality_specific(["kidney-left", "liver"]), laterality_specific(["leftover"])
        (True, False)
    """
    words = " ".join(class_names).lower().replace("-", " ").replace("_", " ").split()
    return any(word in ("left", "right") for word in words)


def vit_patch_size(image_size: Sequence[int]) -> int:
    """The smallest patch in (2, 4, 8, 16, 32) that divides every axis and gives at most 256 tokens
    in 2D (512 in 3D): 2 for 28x28 (14x14 tokens), 4 for 64x64 or 28^3, 16 for 224x224.

    Small images need small patches: a 4x4 patch leaves a 28x28 image 49 tokens and a ViT
    trained from scratch on a few hundred images then barely leaves chance level (measured on
    BreastMNIST: val AUC 0.70 after 17 epochs with patch 4, 0.85 with patch 2).

    Examples:
        >>> vit_patch_size([28, 28]), vit_patch_size([224, 224])
        (2, 16)
    """
    budget = 256 if len(image_size) == 2 else 512
    for patch in (2, 4, 8, 16, 32):
        if all(size % patch == 0 for size in image_size) and math.prod(size // patch for size in image_size) <= budget:
            return patch
    raise ValueError(f"no patch size in (2, 4, 8, 16, 32) fits image_size {list(image_size)}")


def vit_hidden_size(spatial_dims: int, width: int = VIT_WIDTH, heads: int = VIT_HEADS) -> int:
    """The recipe ViT's token width: ``width`` rounded up to a multiple of the heads and of the
    sin-cos position embedding's ``2 * spatial_dims`` (a sin and a cos per axis): 128 in 2D,
    132 in 3D (MONAI's 3D sin-cos embedding needs a width divisible by 6).

    Examples:
        >>> vit_hidden_size(2), vit_hidden_size(3)
        (128, 132)
    """
    step = math.lcm(heads, 2 * spatial_dims)
    return -(-width // step) * step


def trains_in_bf16(train_size: float, bf16: bool | None = None) -> bool:
    """The recipe's precision rule, for its teachers and (``benchmarks.students``) its students: bf16 on
    CPU from ``BF16_FROM`` training images (counted in 28x28 images, :func:`image_cost`) where ``bf16``
    allows it; None: where this CPU has native bf16 kernels (:func:`cpu_has_native_bf16`).

    Examples:
        >>> trains_in_bf16(2_000, bf16=True), trains_in_bf16(546, bf16=True), trains_in_bf16(2_000, bf16=False)
        (True, False, False)
    """
    allowed = cpu_has_native_bf16() if bf16 is None else bf16
    return allowed and train_size >= BF16_FROM


def teacher_recipe(
    *,
    n_train: int,
    class_names: Sequence[str],
    image_size: Sequence[int],
    epochs: int | None = None,
    cnn: str = "resnet18",
    vit: str = "vit",
    cpus_per_worker: float = 1.0,
    bf16: bool | None = None,
) -> list[dict[str, Any]]:
    """The two teacher specs (``teachers:`` entries of a job spec) for a classification set.

    Args:
        n_train: size of the training split (sets the epoch budget when ``epochs`` is None).
        class_names: the dataset's class names (laterality-specific names disable flips).
        image_size: the images' spatial size (sets the ViT's patch size and, with ``n_train``,
            the epoch budget).
        epochs: fixed epochs instead of :func:`auto_epochs`.
        cnn: registry name of the CNN teacher.
        vit: registry name of the ViT teacher (its size is set here when it is ``vit``).
        cpus_per_worker: CPUs of each teacher's single Ray Train worker.
        bf16: whether splits from ``BF16_FROM`` images on train in bfloat16 on CPU; None: where this
            CPU has native bf16 kernels (:func:`medkd.core.cpu_features.cpu_has_native_bf16`), since
            without them bf16 autocast is many times slower than float32.

    Returns:
        ``[cnn, vit]`` as plain dicts, ready for ``JobSpec``'s ``teachers`` list.

    Examples:
        >>> cnn, vit = teacher_recipe(n_train=240, class_names=["a", "b"], image_size=[28, 28, 28], bf16=True)
        >>> vit["model_kwargs"]["patch_size"], vit["model_kwargs"]["hidden_size"], cnn["cpu_precision"]
        (4, 132, 'bf16')
    """
    epochs = auto_epochs(n_train, image_size) if epochs is None else epochs
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    augment: dict[str, Any] = {
        "flip": 0.0 if laterality_specific(class_names) else 0.5,
        "affine": {"prob": 0.5, "rotate_degrees": 10, "scale": [0.9, 1.1], "translate": 0.05},
    }
    common = {
        "epochs": epochs,
        "batch_size": 32,
        "optimizer": "adamw",
        "weight_decay": 0.05,
        "scheduler": "cosine",
        "label_smoothing": 0.1,
        "class_weighting": False,
        "patience": max(5, epochs // 4),
        "ema_epochs": max(1.0, epochs / 10),
        "augment": augment,
        "cpus_per_worker": cpus_per_worker,
    }
    if trains_in_bf16(n_train * image_cost(image_size), bf16):
        common["cpu_precision"] = "bf16"
    vit_kwargs: dict[str, Any] = {"patch_size": vit_patch_size(image_size), "pos_embed_type": "sincos"}
    if vit == "vit":  # a small, fine-grained ViT: many tokens, few layers (CPU-sized)
        vit_kwargs.update(
            {"hidden_size": vit_hidden_size(len(image_size)), "mlp_dim": 256, "num_layers": 4, "num_heads": VIT_HEADS}
        )
    return [
        {"name": "cnn", "model": cnn, "lr": 1e-3, **common},
        {"name": "vit", "model": vit, "model_kwargs": vit_kwargs, "lr": 5e-4, **common},
    ]
