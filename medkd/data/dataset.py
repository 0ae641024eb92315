"""In-memory datasets: normalised numpy splits, their preprocessing and a content fingerprint.

Adapters (one per data ``kind``) return a :class:`RawData` with channel-first raw arrays;
:func:`build_dataset` checks it, normalises it and fingerprints it, the same way for all kinds.

Normalisation (recorded in ``Dataset.preprocessing`` so serving can replicate it)::

    x = (clip(raw, *clip) - offset) * scale        # raw intensities (clip/offset set, e.g. CT)
    x = raw * scale                                # integer pixels (8-bit: scale 1/255)
    x = raw                                        # float pixels: already in [0, 1]
    x = (x - mean[c]) / std[c]                     # per channel; mean/std of the TRAIN split only

Both steps are :mod:`medkd.data.preprocess`'s, the functions serving calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from medkd.core.errors import DataValidationError
from medkd.core.fingerprint import array_digest, fingerprint
from medkd.data.preprocess import rescale_intensities, standardise
from medkd.data.splitting import stratified_sample

SPLITS: tuple[str, ...] = ("train", "val", "test")
Task = Literal["classification", "segmentation"]
_MIN_STD = 1e-6


@dataclass(eq=False)
class Split:
    """One split's arrays.

    ``images``: float32 ``(N, C, *spatial)``. ``labels``: int64 ``(N,)`` (classification),
    float32 ``(N, L)`` of 0/1 (multi-label) or int64 ``(N, *spatial)`` (segmentation).
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataValidationError(f"split has {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def take(self, indices: np.ndarray) -> Split:
        return Split(self.images[indices], self.labels[indices])


@dataclass(eq=False)
class Dataset:
    """A normalised, fingerprinted dataset with ``train``, ``val`` and ``test`` splits."""

    name: str
    task: Task
    multilabel: bool
    spatial_dims: int
    in_channels: int
    num_classes: int
    image_size: tuple[int, ...]
    class_names: list[str]
    splits: dict[str, Split]
    preprocessing: dict[str, Any]
    fingerprint: str
    kind: str = "unknown"

    def __getitem__(self, split: str) -> Split:
        return self._split(split)

    def _split(self, split: str) -> Split:
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; this dataset has {sorted(self.splits)}")
        return self.splits[split]

    def arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{split: (images, labels)}`` — the plain form shipped to Ray workers."""
        return {name: (s.images, s.labels) for name, s in self.splits.items()}

    def class_counts(self, split: str = "train") -> list[int]:
        """Samples per class (positives per label for multi-label; pixels per class for segmentation)."""
        labels = self._split(split).labels
        if self.multilabel:
            return [int(c) for c in labels.sum(axis=0)]
        return [int(c) for c in np.bincount(labels.ravel(), minlength=self.num_classes)]

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable description: shapes, class names, split sizes and class counts."""
        return {
            "name": self.name,
            "kind": self.kind,
            "task": self.task,
            "multilabel": self.multilabel,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
            "class_names": list(self.class_names),
            "fingerprint": self.fingerprint,
            "preprocessing": self.preprocessing,
            "splits": {
                name: {"size": len(split), "class_counts": self.class_counts(name)}
                for name, split in self.splits.items()
            },
        }

    def subset(
        self,
        sizes: Mapping[str, int] | None = None,
        *,
        indices: Mapping[str, Sequence[int] | np.ndarray] | None = None,
        seed: int = 0,
    ) -> Dataset:
        """A smaller dataset (e.g. for a quick run); other splits are kept whole.

        The preprocessing is kept as is (so a model trained on the subset serves with the same
        normalisation) and the fingerprint is derived from this one and the chosen indices.

        Args:
            sizes: ``{split: n}``; a stratified (single-label classification) or random sample.
            indices: ``{split: indices}``; explicit samples (exclusive with ``sizes``).
            seed: seed of the sampling.

        Examples:
            >>> small = dataset.subset({"train": 100})  # doctest: +SKIP
        """
        if (sizes is None) == (indices is None):
            raise ValueError("subset: give exactly one of sizes or indices")
        chosen: dict[str, np.ndarray] = {}
        if sizes is not None:
            for name, size in sizes.items():
                split = self._split(name)
                if size <= 0:
                    raise ValueError(f"subset: sizes[{name!r}] must be > 0, got {size}")
                strata = split.labels if self.task == "classification" and not self.multilabel else None
                chosen[name] = stratified_sample(strata, len(split), size, seed)
        else:
            for name, picked in (indices or {}).items():
                split = self._split(name)
                picked = np.asarray(picked, dtype=np.int64)
                if picked.ndim != 1 or len(picked) == 0:
                    raise ValueError(f"subset: indices[{name!r}] must be a non-empty 1-D sequence")
                if picked.min() < -len(split) or picked.max() >= len(split):
                    raise ValueError(f"subset: indices[{name!r}] out of range for {len(split)} samples")
                chosen[name] = picked
        splits = {name: split.take(chosen[name]) if name in chosen else split for name, split in self.splits.items()}
        digest = {name: array_digest(idx) for name, idx in sorted(chosen.items())}
        return replace(self, splits=splits, fingerprint=fingerprint("subset", self.fingerprint, digest))


@dataclass
class RawData:
    """What an adapter returns: channel-first raw arrays and how to scale them to ~[0, 1].

    ``splits[name].images`` is ``(N, C, *spatial)`` in raw units (uint8 pixels, or e.g. CT
    Hounsfield units with ``clip``/``offset``/``scale`` set by the adapter); labels are already
    in their final dtype/shape (see :class:`Split`).
    """

    name: str
    task: Task
    spatial_dims: int
    num_classes: int
    splits: dict[str, Split]
    source: str
    multilabel: bool = False
    class_names: list[str] | None = None
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    clip: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def apply_preprocessing(raw: np.ndarray, preprocessing: Mapping[str, Any], channel_axis: int = 1) -> np.ndarray:
    """Normalise raw images exactly as the dataset was normalised (returns float32).

    Args:
        raw: raw images, ``(N, C, *spatial)`` by default (``channel_axis`` says where C is).
        preprocessing: ``Dataset.preprocessing``.
        channel_axis: the channel axis of ``raw``.

    Examples:
        >>> pre = {"clip": None, "offset": 0.0, "scale": 1 / 255, "mean": [0.5], "std": [0.25]}
        >>> float(apply_preprocessing(np.full((1, 1, 2, 2), 255, np.uint8), pre)[0, 0, 0, 0])
        2.0
    """
    return _standardise(_rescale(raw, preprocessing), preprocessing, channel_axis)


def _rescale(raw: np.ndarray, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """``InputMeta``'s intensity mapping (:func:`medkd.data.preprocess.rescale_intensities`) as a
    new C-contiguous float32 array."""
    return rescale_intensities(
        raw,
        scale=float(preprocessing["scale"]),
        offset=float(preprocessing.get("offset", 0.0)),
        clip=preprocessing.get("clip"),
    )


def _standardise(out: np.ndarray, preprocessing: Mapping[str, Any], channel_axis: int = 1) -> np.ndarray:
    """``(x - mean[c]) / std[c]`` in place."""
    return standardise(out, preprocessing["mean"], preprocessing["std"], channel_axis)


def _check_structure(raw: RawData) -> None:
    source = raw.source
    missing = [name for name in SPLITS if name not in raw.splits]
    if missing:
        raise DataValidationError(f"{source}: missing split(s) {missing}")
    reference = raw.splits["train"].images
    for name in SPLITS:
        split = raw.splits[name]
        images, labels = split.images, split.labels
        if len(images) == 0:
            raise DataValidationError(f"{source}: the {name} split is empty")
        if len(images) != len(labels):
            raise DataValidationError(f"{source}: the {name} split has {len(images)} images but {len(labels)} labels")
        if images.ndim != 2 + raw.spatial_dims:
            raise DataValidationError(
                f"{source}: {name} images have shape {images.shape}; expected (N, C, *spatial) with "
                f"{raw.spatial_dims} spatial dims"
            )
        if images.shape[1:] != reference.shape[1:]:
            raise DataValidationError(
                f"{source}: {name} images have shape {images.shape[1:]} per sample but train images have "
                f"{reference.shape[1:]}"
            )
        if raw.task == "segmentation" and labels.shape[1:] != images.shape[2:]:
            raise DataValidationError(
                f"{source}: {name} masks have spatial shape {labels.shape[1:]} but images have {images.shape[2:]}"
            )


def build_dataset(raw: RawData, kind: str, content: Mapping[str, Any]) -> Dataset:
    """Check, normalise (train-split statistics) and fingerprint an adapter's raw data.

    Args:
        raw: the adapter's output.
        kind: the data spec's ``kind``.
        content: the spec fields that shape the arrays (``DataSpec.content_fields()``).
    """
    _check_structure(raw)
    preprocessing: dict[str, Any] = {
        "clip": None if raw.clip is None else [float(raw.clip[0]), float(raw.clip[1])],
        "offset": float(raw.offset),
        "scale": float(raw.scale),
    }
    train = _rescale(raw.splits["train"].images, preprocessing)
    axes = (0,) + tuple(range(2, train.ndim))
    std = train.std(axis=axes, dtype=np.float64)
    preprocessing["mean"] = [float(m) for m in train.mean(axis=axes, dtype=np.float64)]
    preprocessing["std"] = [float(s) if s >= _MIN_STD else 1.0 for s in std]
    # Same arithmetic as apply_preprocessing (so serving reproduces it bit for bit), reusing
    # the rescaled train copy instead of making another.
    splits = {"train": Split(_standardise(train, preprocessing), raw.splits["train"].labels)}
    for name in SPLITS[1:]:
        splits[name] = Split(apply_preprocessing(raw.splits[name].images, preprocessing), raw.splits[name].labels)
    digests = {name: [array_digest(s.images), array_digest(s.labels)] for name, s in splits.items()}
    in_channels = int(splits["train"].images.shape[1])
    class_names = list(raw.class_names) if raw.class_names else [str(i) for i in range(raw.num_classes)]
    if len(class_names) != raw.num_classes:
        raise DataValidationError(
            f"{raw.source}: {len(class_names)} class names for {raw.num_classes} classes: {class_names}"
        )
    return Dataset(
        name=raw.name,
        task=raw.task,
        multilabel=raw.multilabel,
        spatial_dims=raw.spatial_dims,
        in_channels=in_channels,
        num_classes=raw.num_classes,
        image_size=tuple(int(s) for s in splits["train"].images.shape[2:]),
        class_names=class_names,
        splits=splits,
        preprocessing=preprocessing,
        fingerprint=fingerprint("dataset", kind, dict(content), digests, preprocessing),
        kind=kind,
    )
