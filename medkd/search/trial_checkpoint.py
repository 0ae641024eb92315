"""A search trial's mid-training checkpoints, so a retried trial resumes instead of starting over.

After every epoch but the last, a trial reports its metrics to Tune together with a checkpoint of
its :class:`~medkd.students.training_state.TrainingState` (weights, optimiser, schedule, weight
average, random generators). Tune keeps the latest one (``CheckpointConfig(num_to_keep=1)``: the
final report's candidate replaces it) and hands it back through ``tune.get_checkpoint()`` when it
retries the trial after its process or node died (``FailureConfig(max_failures=...)``) or when
``medkd run --resume`` restores the search. The retried trial then continues with the next epoch,
and its reports carry ``resumed_from_epoch`` (0 when it started from scratch), which also reaches
``results.json`` (``trials[i].metrics.resumed_from_epoch``).

Tune restores a trial's ``training_iteration`` from the checkpoint's result, and since every epoch
is checkpointed, a resumed trial's next report is the next iteration: ASHA sees each epoch once.

Measured cost (``benchmarks/trial_checkpoint.py``): saving and reporting a tiny student's state takes
milliseconds per epoch, far below an epoch's training, so every epoch is checkpointed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from medkd.students.training_state import TrainingState

# Test-only fault hook (see die_if_a_test_asks): the epoch after which a trial's process exits, and
# the marker file that makes it happen once (the first trial to create it dies; retries do not).
KILL_AT_EPOCH_ENV = "MEDKD_TEST_KILL_TRIAL_AT_EPOCH"
KILL_MARKER_ENV = "MEDKD_TEST_KILL_TRIAL_MARKER"
KILLED_EXIT_CODE = 86


def restored_training_state() -> TrainingState | None:
    """The training state Tune restored this trial with, or ``None`` for a first attempt.

    A checkpoint without a training state (a finished trial's exported candidate) is not resumed
    from: there is nothing left to train.

    Examples:
        >>> resume = restored_training_state()  # inside a Tune trial
        >>> start = resume.epoch if resume is not None else 0
    """
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        if not TrainingState.exists(directory):
            return None
        return TrainingState.load(directory)


class EpochCheckpoints:
    """Holds the training state of the epoch just trained until that epoch's ``tune.report`` persists it.

    ``save`` is ``distill(on_state=...)``; ``report`` sends the epoch's metrics with the state as
    the checkpoint (Tune copies it to the trial's storage before ``report`` returns) and deletes
    the local copy. The last epoch's state is not kept: the final report's checkpoint is the
    exported candidate.

    Examples:
        >>> checkpoints = EpochCheckpoints()
        >>> distill(model, config, ..., on_state=checkpoints.save, on_epoch=lambda r: checkpoints.report(r))
    """

    def __init__(self) -> None:
        self.directory: Path | None = None

    def save(self, state: TrainingState) -> None:
        self.discard()
        if state.epoch < state.epochs:
            self.directory = state.save(Path(tempfile.mkdtemp(prefix="medkd-trial-state-")))

    def report(self, metrics: dict[str, Any]) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(self.directory)) if self.directory is not None else None
        try:
            tune.report(metrics, checkpoint=checkpoint)
        finally:
            self.discard()

    def discard(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def die_if_a_test_asks(epoch: int) -> None:
    """TEST-ONLY fault hook: the trial's process exits (``os._exit``) right after ``epoch`` was checkpointed.

    Active only when both ``MEDKD_TEST_KILL_TRIAL_AT_EPOCH`` (an epoch number) and
    ``MEDKD_TEST_KILL_TRIAL_MARKER`` (a file path) are set, and only for the first trial that
    creates the marker file: the retried trial, and every other trial, carries on. The process
    dies as on a lost node (no exception, no cleanup), so Tune retries the trial from its last
    checkpoint.

    Raises:
        ValueError: one variable is set without the other, or the epoch is not a whole number.

    Examples:
        >>> die_if_a_test_asks(2)  # nothing happens unless the variables are set
    """
    at, marker = os.environ.get(KILL_AT_EPOCH_ENV), os.environ.get(KILL_MARKER_ENV)
    if not at and not marker:
        return
    if not at or not marker:
        missing = KILL_AT_EPOCH_ENV if not at else KILL_MARKER_ENV
        raise ValueError(f"test fault hook: {missing} must be set too (both or neither)")
    try:
        kill_at = int(at)
    except ValueError:
        raise ValueError(f"{KILL_AT_EPOCH_ENV}={at!r}: expected an epoch number") from None
    if epoch != kill_at:
        return
    try:
        descriptor = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # an earlier attempt (or another trial) died already
    os.write(descriptor, f"pid {os.getpid()} exited after epoch {epoch}\n".encode())
    os.close(descriptor)
    os._exit(KILLED_EXIT_CODE)
