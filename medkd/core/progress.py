"""Progress a person can follow: stages, teacher epochs, trials and soft-label publishing.

One :class:`Progress` receives what the pipeline does and shows it in one of two ways:

* **live** (stdout is a terminal): ``rich`` bars that update in place -- the stage (3/7), one
  bar per teacher (epoch and validation metrics, from the Ray Train reports), the search
  (trials done / running / stopped / failed and the best so far, plus one bar per running
  trial) and one line per teacher whose soft labels are being published -- with the log lines
  printed above them;
* **plain** (not a terminal: CI, ``medkd logs``, a file): one timestamped line per event,
  ``[medkd   12.3s] message``, the same text in the same order, so logs stay greppable.

Events from Ray actors (the Train controller, Tune trials) reach the driver through a
``ray.util.queue.Queue`` (:class:`RemoteEvents`, :func:`send_event`) that a background thread
drains into :meth:`Progress.event`, so lines are printed by the driver in order instead of
being interleaved with Ray's own log prefixes.

Examples:
    >>> import io
    >>> progress = Progress(io.StringIO())          # not a terminal: plain lines
    >>> with progress.stage(1, 7, "teachers"):
    ...     progress.teacher_epoch("cnn", 1, 5, {"val_auc": 0.81})
    >>> progress.close()
"""

from __future__ import annotations

import atexit
import math
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn
from rich.progress import Progress as RichProgress
from rich.table import Column

TrialEnd = Literal["done", "stopped", "failed"]
SoftLabelStatus = Literal["computing", "cached", "skipped"]
_TRIAL_WORDS = {"done": "finished", "stopped": "stopped early", "failed": "FAILED"}


@dataclass
class TrialBoard:
    """The search as a person wants to see it: counts, what runs, the best trial so far.

    Args:
        total: trials the search will run.
        metric: the metric that ranks trials (the first objective), if known.
        mode: "max" or "min" for ``metric``.

    Examples:
        >>> board = TrialBoard(total=3, metric="val_auc")
        >>> board.finish("t1", "done", 0.8); board.finish("t2", "stopped", 0.9)
        >>> board.summary()
        '1 done, 1 stopped; best val_auc=0.9 (t2)'
    """

    total: int = 0
    metric: str | None = None
    mode: Literal["max", "min"] = "max"
    running: set[str] = field(default_factory=set)
    ended: dict[str, int] = field(default_factory=lambda: {"done": 0, "stopped": 0, "failed": 0})
    best: tuple[str, float] | None = None

    @property
    def finished(self) -> int:
        return sum(self.ended.values())

    def start(self, trial: str) -> None:
        self.running.add(trial)

    def finish(self, trial: str, status: TrialEnd, value: float | None = None) -> None:
        """Count ``trial`` as ended; ``value`` of the ranking metric updates the best so far."""
        self.running = {name for name in self.running if not _same_trial(name, trial)}
        self.ended[status] += 1
        if status == "failed" or value is None or not math.isfinite(value):
            return
        if self.best is None or (value > self.best[1] if self.mode == "max" else value < self.best[1]):
            self.best = (trial, float(value))

    def summary(self) -> str:
        """Short enough for one bar on an 80-column terminal: non-zero counts and the best so far."""
        counts = [f"{count} {name}" for name, count in (*self.ended.items(), ("running", len(self.running))) if count]
        text = ", ".join(counts) or "waiting"
        if self.best is not None and self.metric:
            text += f"; best {self.metric}={self.best[1]:.4g} ({self.best[0]})"
        return text


def _same_trial(name: str, trial_id: str) -> bool:
    """Tune names a trial ``<trainable>_<trial_id>`` in its context and ``<trial_id>`` in callbacks."""
    return name == trial_id or name.endswith(f"_{trial_id}")


def _format_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


class Progress:
    """Shows pipeline progress live (rich) on a terminal, as plain lines elsewhere; thread safe.

    Args:
        stream: where plain lines go (default: stdout).
        quiet: show nothing.
        console: render live to this ``rich`` console (e.g. one writing to a ``StringIO`` with
            ``force_terminal=True`` in tests) instead of deciding from ``stream``.
        live: force live (True) or plain (False) output; default: live when the console or
            ``stream`` is a terminal.

    Examples:
        >>> import io
        >>> out = io.StringIO()
        >>> progress = Progress(out)
        >>> progress.trials_started(2, metric="val_auc")
        >>> progress.trial_finished("a1", "done", {"val_auc": 0.9})
        >>> "trial 1/2 finished (a1): val_auc=0.9" in out.getvalue()
        True
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        quiet: bool = False,
        *,
        console: Console | None = None,
        live: bool | None = None,
    ) -> None:
        self._stream = stream or sys.stdout
        self._quiet = quiet
        self._lock = threading.RLock()
        self._start = time.perf_counter()
        if live is None:
            live = console.is_terminal if console is not None else _is_terminal(self._stream)
        self._bars: RichProgress | None = None
        self._console: Console | None = None  # live mode: lines go here, also after close()
        if live and not quiet:
            self._console = console or Console(file=self._stream)
            self._bars = RichProgress(
                # Descriptions are cut (…) to leave room for the bar and the count, even at 80 columns;
                # the log lines above carry the times.
                TextColumn(
                    "{task.description}",
                    table_column=Column(max_width=max(30, self._console.width - 20), no_wrap=True, overflow="ellipsis"),
                ),
                BarColumn(bar_width=12),
                MofNCompleteColumn(),
                console=self._console,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
        self._started = False
        self._teacher_tasks: dict[str, TaskID] = {}
        self._soft_label_tasks: dict[str, TaskID] = {}
        self._trial_tasks: dict[str, TaskID] = {}
        self._search_tasks: dict[str, TaskID] = {}
        self._stage_tasks: dict[str, TaskID] = {}
        self.trials = TrialBoard()

    @property
    def live(self) -> bool:
        """Whether progress is rendered as live bars (else as plain lines)."""
        return self._bars is not None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment state; streams, locks and consoles don't pickle.
        return {"quiet": self._quiet, "start": self._start}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(quiet=state["quiet"], live=False)
        self._start = state["start"]

    # ------------------------------------------------------------------ output
    def line(self, message: str) -> None:
        """One timestamped log line (above the bars when live)."""
        if self._quiet:
            return
        elapsed = time.perf_counter() - self._start
        text = f"[medkd {elapsed:7.1f}s] {message}"
        with self._lock:
            if self._console is not None:
                self._ensure_started()
                self._console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                print(text, file=self._stream, flush=True)

    def _ensure_started(self) -> None:
        if self._bars is not None and not self._started:
            self._bars.start()
            self._started = True
            atexit.register(self.close)  # a caller that never closes must not leave the cursor hidden

    def _show(self, tasks: dict[str, TaskID], key: str, description: str, completed: float, total: float) -> None:
        """Create or update the live bar for ``key`` (nothing when not live); call under the lock."""
        if self._bars is None:
            return
        self._ensure_started()
        if key in tasks:
            self._bars.update(tasks[key], description=description, completed=completed, total=total)
        else:
            tasks[key] = self._bars.add_task(description, completed=completed, total=total)

    def close(self) -> None:
        """Stop the live display (it stays on screen as last drawn); later lines are printed
        below it and bar updates are dropped. Safe to call twice."""
        with self._lock:
            if self._bars is not None and self._started:
                self._bars.stop()
            self._bars = None

    # ------------------------------------------------------------------ stages
    @contextmanager
    def stage(self, index: int, total: int, name: str) -> Iterator[None]:
        """Stage ``index`` of ``total`` runs inside the block."""
        self.line(f"== stage {index}/{total}: {name} ==")
        with self._lock:
            self._show(self._stage_tasks, "stage", f"stage {index}/{total} {name}", index - 1, total)
        yield
        with self._lock:
            self._show(self._stage_tasks, "stage", f"stage {index}/{total} {name}", index, total)

    # ------------------------------------------------------------------ teachers
    def teacher_epoch(self, teacher: str, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
        """A teacher reported ``epoch`` of ``epochs`` (from its Ray Train report)."""
        shown = _format_metrics(metrics)
        if self._bars is None:
            self.line(f"  teacher {teacher}: epoch {epoch}/{epochs} {shown}")
            return
        # A bar has one line: the quality metric and the training loss (val_loss and val_acc stay in the logs).
        brief = {
            k: v
            for k, v in metrics.items()
            if k == "train_loss" or (k.startswith("val_") and k not in ("val_loss", "val_acc"))
        }
        text = " ".join(f"{k}={v:.3f}" for k, v in brief.items() if isinstance(v, float))
        with self._lock:
            self._show(self._teacher_tasks, teacher, f"  teacher {teacher}  {text}", epoch, epochs)

    def teacher_progress(
        self, teacher: str, epoch: int, epochs: int, *, fraction: float, images: int, total: int, seconds: float
    ) -> None:
        """A teacher is ``fraction`` of the way through ``epoch`` (``images`` of ``total`` in ``seconds``).

        Examples:
            >>> import io
            >>> stream = io.StringIO()
            >>> Progress(stream).teacher_progress("cnn", 1, 3, fraction=0.5, images=17280, total=34561, seconds=240.0)
            >>> stream.getvalue().split("] ", 1)[1].rstrip()
            '  teacher cnn: epoch 1/3 at 50% (17,280 of 34,561 images in 4.0 min; ~4.0 min of training left in the epoch)'
        """
        if self._bars is None:
            rest = seconds * (1 - fraction) / max(fraction, 1e-9) / 60
            self.line(
                f"  teacher {teacher}: epoch {epoch}/{epochs} at {fraction:.0%} ({images:,} of {total:,} images in "
                f"{seconds / 60:.1f} min; ~{rest:.1f} min of training left in the epoch)"
            )
            return
        with self._lock:
            if teacher in self._teacher_tasks:
                self._bars.update(self._teacher_tasks[teacher], completed=epoch - 1 + fraction)
            else:
                self._show(self._teacher_tasks, teacher, f"  teacher {teacher}", epoch - 1 + fraction, epochs)

    # ------------------------------------------------------------------ soft labels
    def soft_labels(self, teacher: str, status: SoftLabelStatus, splits: tuple[str, ...] | list[str] = ()) -> None:
        """Soft labels of ``teacher``: ``computing`` (splits), then ``cached`` or ``skipped`` (all found)."""
        if status == "computing":
            text = f"computing {', '.join(splits)} (cache miss)"
        elif status == "cached":
            text = "computed and cached"
        else:
            text = "skipped, all splits found in cache"
        self.line(f"  soft labels {teacher}: {text}")
        brief = {"computing": f"computing {','.join(splits)}", "cached": "published", "skipped": "found in cache"}
        with self._lock:
            self._show(
                self._soft_label_tasks,
                teacher,
                f"  soft labels {teacher}: {brief[status]}",
                0 if status == "computing" else 1,
                1,
            )

    # ------------------------------------------------------------------ trials
    def trials_started(self, total: int, *, metric: str | None = None, mode: Literal["max", "min"] = "max") -> None:
        """A search of ``total`` trials starts; ``metric`` (``mode``) ranks them for "best so far"."""
        with self._lock:
            self.trials = TrialBoard(total=total, metric=metric, mode=mode)
            self._update_search()

    def trial_started(self, trial: str) -> None:
        """A trial (its id) started running."""
        with self._lock:
            self.trials.start(trial)
            self._update_search()

    def trial_epoch(self, trial: str, epoch: int, epochs: int, metric: str, value: float) -> None:
        """A running trial (or the final training) finished ``epoch`` of ``epochs`` with ``metric`` = ``value``."""
        if self._bars is None:
            self.line(f"  trial {trial}: epoch {epoch}/{epochs} {metric}={value:.4f}")
            return
        with self._lock:
            self._show(self._trial_tasks, trial, f"    {trial}  {metric}={value:.4f}", epoch, epochs)

    def trial_finished(
        self, trial: str, status: TrialEnd, metrics: dict[str, Any], *, value: float | None = None
    ) -> None:
        """A trial ended (``done``, ``stopped`` early, or ``failed``) with its last ``metrics``.

        Args:
            trial: the trial id.
            status: how it ended.
            metrics: the objectives to show (numbers only are shown).
            value: the ranking metric; default ``metrics[board.metric]``.
        """
        with self._lock:
            if value is None and self.trials.metric is not None:
                number = metrics.get(self.trials.metric)
                value = float(number) if isinstance(number, (int, float)) else None
            self.trials.finish(trial, status, value)
            for name in [n for n in self._trial_tasks if _same_trial(n, trial)]:
                if self._bars is not None:
                    self._bars.remove_task(self._trial_tasks.pop(name))
            self._update_search()
            board = self.trials
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        best = ""
        if board.best is not None and board.metric:
            best = f"; best so far {board.metric}={board.best[1]:.4g} ({board.best[0]})"
        self.line(f"  trial {board.finished}/{board.total} {_TRIAL_WORDS[status]} ({trial}): {shown}{best}")

    def _update_search(self) -> None:
        self._show(
            self._search_tasks, "search", f"  trials: {self.trials.summary()}", self.trials.finished, self.trials.total
        )

    # ------------------------------------------------------------------ remote events
    def event(self, event: dict[str, Any]) -> None:
        """Show an event dict sent by a remote actor (see :func:`send_event`)."""
        kind = event.get("kind")
        if kind == "teacher_epoch":
            self.teacher_epoch(event["teacher"], event["epoch"], event["epochs"], event["metrics"])
        elif kind == "teacher_progress":
            self.teacher_progress(
                event["teacher"],
                event["epoch"],
                event["epochs"],
                fraction=event["fraction"],
                images=event["images"],
                total=event["total"],
                seconds=event["seconds"],
            )
        elif kind == "trial_epoch":
            self.trial_epoch(event["trial"], event["epoch"], event["epochs"], event["metric"], event["value"])
        else:
            self.line(str(event.get("message", event)))


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


#: Seconds the driver's drain thread waits for an event in one call to the queue actor. Each call
#: wakes the actor and the driver; at 0.5 s the waiting cost ~2 CPU-s per 2-minute search on the node
#: that held the actor. ``close`` does not wait this long: it queues a sentinel behind the last event.
DRAIN_WAIT_S = 10.0
_CLOSE_SENTINEL = "__medkd_progress_closed__"


class RemoteEvents:
    """A Ray queue that remote code writes progress events to and a driver thread shows.

    The queue's actor lives on the driver's node: its only reader is the driver, and on a worker
    node it would take CPU from the trials and teachers there. The affinity is hard: that node
    exists while the driver does, and a soft one was not kept (on a netns cluster with a 0-CPU
    head, a soft affinity put the actor on a worker node while the hard one put it on the head).

    Examples:
        >>> events = RemoteEvents(progress)  # doctest: +SKIP
        >>> send_event(events.queue, {"kind": "log", "message": "hello"}); events.close()  # doctest: +SKIP
    """

    def __init__(self, progress: Progress) -> None:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        self.queue = Queue(
            maxsize=10_000,
            actor_options={
                "num_cpus": 0,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=here, soft=False),
            },
        )
        self._progress = progress
        self._thread = threading.Thread(target=self._drain, daemon=True, name="medkd-progress")
        self._thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                event = self.queue.get(timeout=DRAIN_WAIT_S)
            except Empty:
                continue
            except Exception:  # the queue actor is gone (Ray shut down)
                return
            if event == _CLOSE_SENTINEL:
                return
            self._progress.event(event)

    def close(self) -> None:
        """Show the events sent so far, stop the drain thread and end the queue's actor."""
        try:
            self.queue.put_nowait(_CLOSE_SENTINEL)
        except Exception:
            pass  # the actor is gone: the drain thread has returned or returns on its next call
        self._thread.join(timeout=5)
        try:
            import ray

            ray.kill(self.queue.actor)
        except Exception:
            pass


def send_event(queue: Any, event: dict[str, Any]) -> None:
    """Best-effort: progress must never fail training."""
    if queue is None:
        return
    try:
        queue.put_nowait(event)
    except Exception:
        pass
