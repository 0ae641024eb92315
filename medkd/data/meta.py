"""``DatasetMeta``: what code far from the data (Ray workers, trials, the export) needs to know
about a dataset to build and evaluate models on it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class DatasetMeta(BaseModel):
    """The shape of a dataset's task, small enough to ship to every Ray worker.

    Args:
        task: "classification" (multi-class or, with ``multilabel``, multi-label) or "segmentation".
        multilabel: one independent sigmoid output per label instead of a softmax over classes.
        spatial_dims: 2 or 3.
        in_channels: image channels (1 gray, 3 RGB).
        num_classes: classes (labels for multi-label; segmentation counts the background).
        image_size: one size per spatial axis.

    Examples:
        >>> meta = DatasetMeta(task="classification", spatial_dims=2, in_channels=1, num_classes=2,
        ...                    image_size=[28, 28])
        >>> meta.segmentation
        False
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: Literal["classification", "segmentation"]
    multilabel: bool = False
    spatial_dims: Literal[2, 3]
    in_channels: int = Field(ge=1)
    num_classes: int = Field(ge=1)
    image_size: list[int] = Field(min_length=2, max_length=3)

    @classmethod
    def of(cls, dataset: Any) -> DatasetMeta:
        """The meta of a :class:`medkd.data.Dataset` (or anything with the same attributes)."""
        return cls(
            task=dataset.task,
            multilabel=bool(dataset.multilabel),
            spatial_dims=int(dataset.spatial_dims),
            in_channels=int(dataset.in_channels),
            num_classes=int(dataset.num_classes),
            image_size=[int(s) for s in dataset.image_size],
        )

    @property
    def segmentation(self) -> bool:
        return self.task == "segmentation"
