"""Human progress output: stage banners, per-epoch and per-trial lines.

Events from Ray actors (the Train controller, Tune trials) reach the driver through a
``ray.util.queue.Queue`` that a background thread drains, so progress lines are printed by
the driver in order instead of being interleaved with Ray's own log prefixes.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, TextIO


class Progress:
    """Prints timestamped progress lines; thread safe."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self._stream = stream or sys.stdout
        self._quiet = quiet
        self._lock = threading.Lock()
        self._start = time.perf_counter()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment state; streams and locks don't pickle.
        return {"quiet": self._quiet, "start": self._start}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(quiet=state["quiet"])
        self._start = state["start"]

    def line(self, message: str) -> None:
        if self._quiet:
            return
        elapsed = time.perf_counter() - self._start
        with self._lock:
            print(f"[medkd {elapsed:7.1f}s] {message}", file=self._stream, flush=True)

    @contextmanager
    def stage(self, index: int, total: int, name: str) -> Iterator[None]:
        self.line(f"== stage {index}/{total}: {name} ==")
        yield

    def event(self, event: dict[str, Any]) -> None:
        """Format an event dict sent by a remote actor."""
        kind = event.get("kind")
        if kind == "teacher_epoch":
            metric = ", ".join(f"{k}={v:.4f}" for k, v in event["metrics"].items() if isinstance(v, float))
            self.line(f"  teacher {event['teacher']}: epoch {event['epoch']}/{event['epochs']} {metric}")
        elif kind == "trial_epoch":
            self.line(
                f"  trial {event['trial']}: epoch {event['epoch']}/{event['epochs']} "
                f"{event['metric']}={event['value']:.4f}"
            )
        else:
            self.line(str(event.get("message", event)))


class RemoteEvents:
    """A Ray queue that remote code writes progress events to and a driver thread prints."""

    def __init__(self, progress: Progress) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        self._progress = progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True, name="medkd-progress")
        self._thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                event = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue actor is gone (Ray shut down)
                return
            self._progress.event(event)

    def close(self) -> None:
        self._stop.set()
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
