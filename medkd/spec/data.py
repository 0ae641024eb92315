"""Typed data specs: which data a job uses and how it is augmented.

The ``data`` section of a job spec is a union discriminated by ``kind``; every model forbids
unknown keys, so ``data.imag_size`` is an error naming the key, not a silently ignored typo.

Examples:
    >>> from pydantic import TypeAdapter
    >>> spec = TypeAdapter(DataSpec).validate_python({"kind": "synthetic", "num_classes": 3})
    >>> spec.num_classes, spec.image_size
    (3, 28)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medkd.core.errors import DataFileNotFoundError

MEDMNIST_DOWNLOAD_HINT = (
    "medkd never downloads data at run time: get the MedMNIST .npz from https://medmnist.com "
    "(28x28 files: https://zenodo.org/record/6496656, e.g. .../files/breastmnist.npz; larger "
    "sizes: MedMNIST+ on the same site) and give its local path as data.path"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _DataSpecBase(_Strict):
    name: str | None = Field(None, description="display name; defaults to the file or folder name")

    #: fields that locate the data but do not change its content (the content is hashed).
    LOCATION_FIELDS: ClassVar[frozenset[str]] = frozenset({"name"})

    def content_fields(self) -> dict[str, Any]:
        """The spec fields that shape the arrays (for the dataset fingerprint); paths excluded."""
        return self.model_dump(mode="json", exclude=set(self.LOCATION_FIELDS))

    def check_paths(self, field_prefix: str = "data") -> None:
        """Raise :class:`DataFileNotFoundError` naming the field if a referenced path is missing."""


def _require(path: Path, field: str, *, directory: bool = False, hint: str = "") -> None:
    exists = path.is_dir() if directory else path.is_file()
    if not exists:
        what = "folder" if directory else "file"
        found_other = path.exists()
        problem = f"is not a {what}" if found_other else f"{what} not found"
        message = f"{field}: {problem}: {path}"
        if hint:
            message += f". {hint}"
        raise DataFileNotFoundError(message)


class SyntheticDataSpec(_DataSpecBase):
    """Deterministic generated data; needs no files, so a fresh machine can run the pipeline.

    Classification images hold a lesion whose texture orientation depends on the class, with
    orientation jitter and noise set by ``difficulty`` (0 = clean, 1 = hard). Segmentation
    images hold several objects whose class sets their intensity and texture; masks are
    integer class maps (0 = background, so ``num_classes`` counts the background).
    """

    kind: Literal["synthetic"] = "synthetic"
    task: Literal["classification", "segmentation"] = "classification"
    spatial_dims: Literal[2, 3] = 2
    image_size: int = Field(28, ge=8, le=512)
    in_channels: int = Field(1, ge=1, le=8)
    num_classes: int = Field(2, ge=2, le=64)
    num_train: int = Field(512, gt=0)
    num_val: int = Field(128, gt=0)
    num_test: int = Field(128, gt=0)
    seed: int = Field(0, ge=0)
    difficulty: float = Field(0.5, ge=0, le=1)


class MedMNISTDataSpec(_DataSpecBase):
    """A local MedMNIST v2 ``.npz`` (``train_images``, ``train_labels``, ``val_*``, ``test_*``).

    2D files hold ``(N, H, W)`` or ``(N, H, W, 3)`` images, 3D files ``(N, D, H, W)``, at any
    MedMNIST resolution. Labels ``(N, 1)`` are single-label classes; labels ``(N, L>1)`` of
    0/1 values are detected as multi-label (e.g. ChestMNIST).
    """

    kind: Literal["medmnist"] = "medmnist"
    path: Path
    task: Literal["classification", "multilabel"] = Field(
        "classification", description="'classification' auto-detects multi-label; 'multilabel' requires it"
    )
    spatial_dims: Literal[2, 3] | None = Field(None, description="null: detected from the image shape")
    subsample_train: int | None = Field(None, gt=0, description="stratified subsample of the train split")
    seed: int = Field(0, ge=0, description="seed of subsample_train")
    class_names: list[str] | None = Field(None, min_length=1)

    LOCATION_FIELDS: ClassVar[frozenset[str]] = frozenset({"name", "path"})

    def check_paths(self, field_prefix: str = "data") -> None:
        _require(self.path, f"{field_prefix}.path", hint=MEDMNIST_DOWNLOAD_HINT)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 (got {val_fraction} + {test_fraction}); "
            "the rest is the train split"
        )


class FolderDataSpec(_DataSpecBase):
    """A folder with one sub-folder per class of PNG/JPEG (or DICOM ``.dcm``) images.

    If the folder instead holds ``train/``, ``val/`` and ``test/`` sub-folders (each with one
    sub-folder per class), those splits are used as given and the fractions are ignored.
    """

    kind: Literal["folder"] = "folder"
    task: Literal["classification"] = "classification"
    path: Path
    image_size: int = Field(gt=0, le=1024, description="images are resized to image_size x image_size")
    in_channels: Literal[1, 3] = 1
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = Field(0, ge=0)

    LOCATION_FIELDS: ClassVar[frozenset[str]] = frozenset({"name", "path"})

    @model_validator(mode="after")
    def _fractions(self) -> FolderDataSpec:
        _check_fractions(self.val_fraction, self.test_fraction)
        return self

    def check_paths(self, field_prefix: str = "data") -> None:
        _require(self.path, f"{field_prefix}.path", directory=True)


class DecathlonDataSpec(_DataSpecBase):
    """A Medical Segmentation Decathlon style datalist JSON of NIfTI image/label pairs.

    ``{"training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...]}``;
    optional ``"validation"`` / ``"test"`` lists with labels are used as those splits,
    otherwise they are carved out of ``training`` (by case, stratified by nothing, seeded).
    With ``spatial_dims: 2`` every volume contributes its axial slices (last axis).
    """

    kind: Literal["decathlon"] = "decathlon"
    task: Literal["segmentation"] = "segmentation"
    path: Path = Field(description="the datalist JSON")
    base_dir: Path | None = Field(None, description="root of the relative paths; default: the JSON's folder")
    image_size: list[int] = Field(min_length=2, max_length=3)
    spatial_dims: Literal[2, 3] = 3
    num_classes: int = Field(ge=2, le=255, description="label classes including background 0")
    in_channels: int | None = Field(None, ge=1, description="null: detected from the first image")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = Field(0, ge=0)
    intensity_percentiles: tuple[float, float] = Field(
        (0.5, 99.5), description="clip intensities to these train-split percentiles before scaling to [0, 1]"
    )
    slices: Literal["foreground", "all"] = Field(
        "foreground", description="spatial_dims 2: keep slices with foreground, or all slices"
    )
    class_names: list[str] | None = None

    LOCATION_FIELDS: ClassVar[frozenset[str]] = frozenset({"name", "path", "base_dir"})

    @field_validator("image_size")
    @classmethod
    def _positive_sizes(cls, value: list[int]) -> list[int]:
        if any(size < 4 for size in value):
            raise ValueError(f"every size must be >= 4, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DecathlonDataSpec:
        if len(self.image_size) != self.spatial_dims:
            raise ValueError(f"image_size has {len(self.image_size)} entries but spatial_dims is {self.spatial_dims}")
        low, high = self.intensity_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"intensity_percentiles must satisfy 0 <= low < high <= 100, got {[low, high]}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}")
        _check_fractions(self.val_fraction, self.test_fraction)
        return self

    @property
    def root(self) -> Path:
        return self.base_dir if self.base_dir is not None else self.path.parent

    def check_paths(self, field_prefix: str = "data") -> None:
        _require(self.path, f"{field_prefix}.path")
        if self.base_dir is not None:
            _require(self.base_dir, f"{field_prefix}.base_dir", directory=True)


DataSpec = Annotated[
    SyntheticDataSpec | MedMNISTDataSpec | FolderDataSpec | DecathlonDataSpec,
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------------------------
# Augmentation


def _probability(value: Any) -> Any:
    """``true`` means "sometimes" (0.5), ``false`` means never; numbers are probabilities."""
    if isinstance(value, bool):
        return 0.5 if value else 0.0
    return value


def _ordered_pair(value: tuple[float, float], name: str) -> tuple[float, float]:
    low, high = value
    if low > high:
        raise ValueError(f"{name}: low ({low}) must be <= high ({high})")
    return value


class AffineAugmentSpec(_Strict):
    """Random rotation / scaling / translation, resampled like MONAI ``Affine``."""

    prob: float = Field(0.5, ge=0, le=1)
    rotate_degrees: float = Field(15.0, ge=0, le=180, description="max |angle| about each rotation axis")
    scale: tuple[float, float] = Field((0.9, 1.1), description="isotropic zoom range; > 1 enlarges the content")
    translate: float = Field(0.0, ge=0, le=0.5, description="max shift as a fraction of each side")
    padding_mode: Literal["border", "zeros", "reflection"] = "border"

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] <= 0:
            raise ValueError(f"scale factors must be > 0, got {list(value)}")
        return _ordered_pair(value, "scale")


class IntensityAugmentSpec(_Strict):
    """Random gamma contrast (MONAI ``AdjustContrast``) and additive Gaussian noise."""

    prob: float = Field(0.5, ge=0, le=1)
    noise_std: float = Field(
        0.0, ge=0, description="max noise std in normalised units; each view draws std ~ U(0, noise_std)"
    )
    gamma: tuple[float, float] | None = Field(None, description="contrast gamma range, e.g. [0.7, 1.5]")

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is None:
            return value
        if value[0] <= 0:
            raise ValueError(f"gamma must be > 0, got {list(value)}")
        return _ordered_pair(value, "gamma")


class AugmentSpec(_Strict):
    """Training-time augmentation; everything is off unless set.

    Spatial transforms (flip, rot90, affine) move images and segmentation masks together;
    intensity transforms touch images only.

    Examples:
        >>> AugmentSpec(flip=True, rotate90=0.25).flip
        0.5
    """

    flip: float = Field(0.0, ge=0, le=1, description="probability of flipping each spatial axis (true = 0.5)")
    flip_axes: list[int] | None = Field(None, description="spatial axes that may flip; default all")
    rotate90: float = Field(
        0.0, ge=0, le=1, description="probability of a k*90 degree rotation in the last two spatial axes"
    )
    affine: AffineAugmentSpec | None = None
    intensity: IntensityAugmentSpec | None = None

    @field_validator("flip", "rotate90", mode="before")
    @classmethod
    def _bool_as_probability(cls, value: Any) -> Any:
        return _probability(value)

    @field_validator("flip_axes")
    @classmethod
    def _axes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (any(a < 0 or a > 2 for a in value) or len(set(value)) != len(value)):
            raise ValueError(f"flip_axes must be distinct spatial axes in 0..2, got {value}")
        return value

    @property
    def enabled(self) -> bool:
        return bool(
            self.flip > 0
            or self.rotate90 > 0
            or (self.affine is not None and self.affine.prob > 0)
            or (self.intensity is not None and self.intensity.prob > 0)
        )
