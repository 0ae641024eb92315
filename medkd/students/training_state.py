"""A student's training state between two epochs, on disk, so a lost training resumes where it was.

A search trial saves one after every epoch (see ``medkd.search.trial_checkpoint``); a trial that
Tune retries after its node died, or that ``medkd run --resume`` restores, hands it back to
:func:`medkd.students.distill.distill`, which continues from that epoch instead of epoch 0.

The state holds everything the rest of the training depends on: the weights, the optimiser and its
schedule, the weight average, and every random generator the loop draws from (the data-order
generator, torch's global generator for dropout, the augmentation's view sampler). With all of
them restored, a resumed run trains exactly as an uninterrupted one from that epoch on.

Tensors and generator states go to ``training_state.pt``, loaded with ``weights_only=True`` (nothing
is unpickled); the epoch, the configuration and the epoch records go to ``training_state.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

TENSORS_FILE = "training_state.pt"
META_FILE = "training_state.json"


class TrainingState(BaseModel):
    """Where a distillation run stands after ``epoch`` of its ``epochs`` epochs.

    Args:
        epoch: epochs completed; a resumed run starts with epoch ``epoch + 1`` (1-based).
        epochs: the run's total number of epochs.
        config: the run's ``DistillConfig`` as a dict; a state only resumes the same configuration.
        history: the records of the completed epochs.
        tensors: model, optimiser, scheduler, weight average and generator states (not in the JSON).

    Examples:
        >>> state = TrainingState(epoch=2, epochs=5, config={"seed": 0}, tensors={"x": torch.zeros(1)})
        >>> directory = state.save(tmp_path / "state")
        >>> TrainingState.load(directory).epoch
        2
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    epoch: int = Field(ge=0)
    epochs: int = Field(gt=0)
    config: dict[str, Any]
    history: list[dict[str, Any]] = Field(default_factory=list)
    tensors: dict[str, Any] = Field(default_factory=dict, exclude=True)

    def save(self, directory: Path | str) -> Path:
        """Write the state into ``directory`` (created if missing); returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.tensors, directory / TENSORS_FILE)
        (directory / META_FILE).write_text(self.model_dump_json())
        return directory

    @staticmethod
    def exists(directory: Path | str) -> bool:
        """Whether ``directory`` holds a saved training state (a checkpoint may hold something else)."""
        return (Path(directory) / META_FILE).is_file()

    @classmethod
    def load(cls, directory: Path | str) -> TrainingState:
        """Read a state :meth:`save` wrote.

        Raises:
            FileNotFoundError: a file of the state is missing (named).
            ValueError: a file is not a valid state (named).
        """
        directory = Path(directory)
        meta_path, tensors_path = directory / META_FILE, directory / TENSORS_FILE
        for path in (meta_path, tensors_path):
            if not path.is_file():
                raise FileNotFoundError(f"training state incomplete: {path} is missing")
        try:
            state = cls.model_validate(json.loads(meta_path.read_text()))
        except (ValueError, ValidationError) as error:
            raise ValueError(f"{meta_path} is not a training state: {error}") from None
        try:
            state.tensors = torch.load(tensors_path, weights_only=True, map_location="cpu")
        except Exception as error:  # noqa: BLE001  (torch raises several kinds for a damaged file)
            raise ValueError(f"{tensors_path} is not a readable training state: {error}") from None
        return state

    def check_resumes(self, config: dict[str, Any], epochs: int) -> None:
        """Refuse to resume a run of another configuration or length (it would silently train something else).

        Raises:
            ValueError: naming the fields that differ.
        """
        differing = sorted(k for k in set(config) | set(self.config) if config.get(k) != self.config.get(k))
        if differing:
            shown = ", ".join(f"{k}: saved {self.config.get(k)!r}, now {config.get(k)!r}" for k in differing)
            raise ValueError(f"training state was saved for another configuration ({shown})")
        if epochs != self.epochs:
            raise ValueError(f"training state was saved for a run of {self.epochs} epochs, this run has {epochs}")
        if self.epoch > epochs:
            raise ValueError(f"training state is at epoch {self.epoch}, past the run's {epochs} epochs")
