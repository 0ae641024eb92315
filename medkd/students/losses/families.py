"""Which distillation loss a task may use, checked before training starts.

The search's ``loss`` dimension (``search.space.loss``) names a family of logit losses for
single-label classification; multi-label and segmentation tasks keep their own loss. Mistakes
(DKD on a multi-label task, logit standardization of binary logits) are refused here with a
message naming the setting, instead of failing inside a trial.
"""

from __future__ import annotations

from medkd.students.losses import dist, dkd  # noqa: F401  (registers the single-label losses)
from medkd.students.losses.kd import default_loss_name
from medkd.students.losses.registry import LOSSES
from medkd.students.losses.standardization import check_standardizable

# The logit losses the search may choose from for single-label classification.
CLASSIFICATION_LOSSES: tuple[str, ...] = tuple(LOSSES.names(applies_to="single_label"))


def resolve_loss_name(
    task: str, multilabel: bool, num_classes: int, *, loss: str | None = None, logit_standardization: bool = False
) -> str:
    """The registered loss a student of this task trains with, after checking the choice.

    Args:
        task: "classification" or "segmentation".
        multilabel: the classification labels are independent (sigmoid per label).
        num_classes: classes (labels) of the task.
        loss: a family from :data:`CLASSIFICATION_LOSSES`, or None for the task's default.
        logit_standardization: whether the KD term z-scores the logits.

    Raises:
        ValueError: the loss does not apply to the task, or the logits cannot be standardised;
            the message names ``loss`` or ``logit_standardization``.

    Examples:
        >>> resolve_loss_name("classification", False, 8, loss="dkd", logit_standardization=True)
        'dkd'
        >>> resolve_loss_name("segmentation", False, 3)
        'pixel_kd'
    """
    default = default_loss_name(task, multilabel)
    if loss is None or loss == default:
        name = default
    elif default != "hinton_kd":
        kind = "multi-label classification" if multilabel else task
        raise ValueError(f"loss {loss!r} is for single-label classification; {kind} distils with {default!r}")
    elif loss not in CLASSIFICATION_LOSSES:
        raise ValueError(f"loss must be one of {list(CLASSIFICATION_LOSSES)}, got {loss!r}")
    else:
        name = loss
    if logit_standardization:
        if multilabel:
            raise ValueError(
                "logit_standardization needs a softmax over classes; multi-label tasks use one sigmoid per label"
            )
        check_standardizable(num_classes)
    return name


def check_loss_space(
    losses: list[str] | None, standardization: list[bool] | None, *, task: str, multilabel: bool, num_classes: int
) -> None:
    """Check every combination a search may draw (``search.space.loss`` x ``logit_standardization``).

    Raises:
        ValueError: ``search.space.loss`` / ``search.space.logit_standardization`` offers a choice the
            task cannot train with.

    Examples:
        >>> check_loss_space(["hinton_kd", "dkd"], [False, True], task="classification", multilabel=False,
        ...                  num_classes=8)
    """
    for loss in losses or [None]:
        for standardize in standardization or [False]:
            try:
                resolve_loss_name(task, multilabel, num_classes, loss=loss, logit_standardization=standardize)
            except ValueError as error:
                field = "logit_standardization" if standardize and "logit_standardization" in str(error) else "loss"
                raise ValueError(f"search.space.{field}: {error}") from None
