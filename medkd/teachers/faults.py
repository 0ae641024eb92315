"""What a teacher's training does when a node it runs on is lost, and what it says when it cannot go on.

Ray Train restarts a lost worker group from the last registered checkpoint. With elastic
workers (``min_workers``) it restarts with as many workers as the remaining nodes place; with a
fixed ``num_workers`` it retries the placement forever (Ray's default), which waits forever
for a node that is not coming back. :class:`LostNodeDeadline` bounds that wait: once a node
that was alive when the run started is gone and the run has not been running again for
``wait_s``, the run fails, and :func:`training_failure_message` names the lost node and the
checkpoint a re-run resumes from. A teacher that merely queues behind others (no node lost)
keeps waiting, as before.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import ray

# An internal Ray Train hook (ray==2.60.0 is pinned): RunConfig(callbacks=...) passes
# non-UserCallback callbacks to the controller; a hook that raises fails the run with a
# non-retryable ControllerError.
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import RunningState

CHECKPOINT_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's registry of reported checkpoints
LOST_NODE_WAIT_ENV = "MEDKD_LOST_NODE_WAIT_S"
DEFAULT_LOST_NODE_WAIT_S = 120.0
NODE_POLL_INTERVAL_S = 1.0


class TeacherTrainingError(RuntimeError):
    """A teacher's training failed; the message names the nodes lost and the checkpoint to resume from."""


class NodeLostError(RuntimeError):
    """The nodes left after a node loss could not run a teacher's workers within the deadline."""


def alive_nodes() -> dict[str, str]:
    """``{node id: address}`` of the cluster's live nodes (needs a connected Ray)."""
    return {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}


def lost_node_wait_s() -> float:
    """How long a run may stay unplaced after losing a node: ``$MEDKD_LOST_NODE_WAIT_S`` or 120 s."""
    value = os.environ.get(LOST_NODE_WAIT_ENV)
    if value is None:
        return DEFAULT_LOST_NODE_WAIT_S
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{LOST_NODE_WAIT_ENV}={value!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{LOST_NODE_WAIT_ENV}={value!r}: must be positive")
    return seconds


def describe_nodes(nodes: dict[str, str]) -> str:
    """``"ADDRESS (node ID12…), …"`` — nodes on one host share an address, the id tells them apart."""
    ordered = sorted(nodes.items(), key=lambda kv: kv[::-1])
    return ", ".join(f"{address} (node {node_id[:12]})" for node_id, address in ordered)


class LostNodeDeadline(ControllerCallback):
    """Fails a Train run that has not been running again within ``wait_s`` of losing a node.

    Runs inside Ray Train's controller: after every state update that is not "running", it
    checks (at most once per second) whether a node of ``nodes`` is gone. The clock starts at
    the first such check and is reset whenever the run is running again (e.g. an elastic
    restart on fewer workers), taking the nodes alive then as the new reference.

    Args:
        nodes: ``{node id: address}`` alive when the run started (:func:`alive_nodes`).
        wait_s: how long the run may stay unplaced after a node loss.
        what: the run's name in the error message, e.g. ``"teacher 'vit'"``.

    Examples:
        >>> deadline = LostNodeDeadline({"a" * 56: "10.0.0.2"}, wait_s=60, what="teacher 'vit'")
        >>> deadline.wait_s
        60
    """

    def __init__(self, nodes: dict[str, str], *, wait_s: float, what: str) -> None:
        self.nodes, self.wait_s, self.what = dict(nodes), wait_s, what
        self.lost: dict[str, str] = {}
        self.lost_since: float | None = None
        self.checked_at = 0.0

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        if isinstance(current_state, RunningState):
            if self.lost_since is not None:
                self.nodes, self.lost, self.lost_since = alive_nodes(), {}, None
            return
        if current_state.is_terminal():
            return
        now = time.monotonic()
        if now - self.checked_at < NODE_POLL_INTERVAL_S:
            return
        self.checked_at = now
        if self.lost_since is None:
            alive = alive_nodes()
            self.lost = {node_id: address for node_id, address in self.nodes.items() if node_id not in alive}
            if self.lost:
                self.lost_since = now
            return
        if now - self.lost_since > self.wait_s:
            raise NodeLostError(
                f"{self.what} lost node(s) {describe_nodes(self.lost)} and the nodes left could not run its "
                f"workers within {self.wait_s:g}s"
            )


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The last checkpoint Ray Train registered for a run (a re-run resumes from it) and its epoch.

    Args:
        run_dir: the run's directory in Train's storage (``storage_path / run name``).

    Returns:
        ``(checkpoint directory, epoch)``, or None when no checkpoint is registered (or the
        storage is not a local path).

    Examples:
        >>> latest_checkpoint(Path("/nonexistent")) is None
        True
    """
    try:
        snapshot = json.loads((Path(run_dir) / CHECKPOINT_SNAPSHOT_FILE).read_text())
        latest = snapshot["latest_checkpoint_result"]
        return Path(run_dir) / latest["checkpoint_dir_name"], int(latest["metrics"].get("epoch", 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def training_failure_message(teacher: Any, error: BaseException, *, lost: dict[str, str], run_dir: Path) -> str:
    """What failed, which nodes were lost during the run, and where (and how) it resumes.

    Args:
        teacher: the teacher's spec (its name, workers and CPUs are named).
        error: the error Ray Train raised (``TrainingFailedError``).
        lost: ``{node id: address}`` of the nodes that died while the teacher trained.
        run_dir: the run's directory in Train's storage.

    Examples:
        >>> from medkd.spec.teachers import TeacherSpec
        >>> teacher = TeacherSpec(name="vit", model="vit", num_workers=2)
        >>> message = training_failure_message(teacher, RuntimeError("boom"), lost={"ab" * 28: "10.0.0.3"},
        ...                                    run_dir=Path("/nonexistent"))
        >>> "10.0.0.3" in message and "min_workers" in message
        True
    """
    cause = getattr(error, "controller_failure", None) or error
    text = str(cause).strip()
    first_line = text.splitlines()[0] if text else type(cause).__name__
    parts = [f"teacher {teacher.name!r} failed: {type(cause).__name__}: {first_line}"]
    if lost:
        if not isinstance(cause, NodeLostError):  # that one names them already
            parts.append(f"node(s) lost during its training: {describe_nodes(lost)}")
        if teacher.min_workers is None or teacher.min_workers >= teacher.num_workers:
            parts.append(
                f"the nodes left cannot place its {teacher.num_workers} worker(s) of "
                f"{teacher.cpus_per_worker:g} CPU: add a node, or set min_workers below num_workers "
                "to go on with fewer workers"
            )
        else:
            parts.append(
                f"the nodes left cannot place even min_workers={teacher.min_workers} worker(s) of "
                f"{teacher.cpus_per_worker:g} CPU: add a node"
            )
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        parts.append(
            f"its last checkpoint (epoch {checkpoint[1]}) is {checkpoint[0]}; run the job again "
            "(`medkd run JOB.yaml`, or re-submit it) and this teacher resumes from there"
        )
    else:
        parts.append(
            f"no checkpoint is registered in {run_dir}; running the job again starts this teacher from scratch"
        )
    return "; ".join(parts)
