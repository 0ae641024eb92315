"""Peak memory of a benchmark and everything it started (Ray's GCS, raylet and workers, redis-server).

:class:`PeakMemory` samples the benchmark's process tree from ``/proc`` in a background thread:
every ``interval_s`` it sums the proportional set size (PSS, ``/proc/PID/smaps_rollup``: shared
pages such as Ray's object store are split between the processes mapping them, so the sum is
not inflated by sharing) of the driver and all its descendants, and keeps the largest sum, the
largest single process, and the largest sum seen while each named phase ran. Linux only; on a
system without ``/proc`` it records nothing and says so.

Examples:
    >>> with PeakMemory(interval_s=0.1) as memory:
    ...     memory.phase("work")
    ...     data = bytearray(50_000_000)
    >>> memory.peak_total_mb > 0 and "work" in memory.by_phase_mb
    True
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

PROC = Path("/proc")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (from ``/proc``)."""
    children = _children_map()
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def memory_mb(pid: int) -> float:
    """The process's PSS in MB (its RSS where ``smaps_rollup`` cannot be read), 0 if it is gone."""
    for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            for line in (PROC / str(pid) / name).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError):
            continue
    return 0.0


class PeakMemory:
    """Samples the memory of this process and its descendants until the ``with`` block ends.

    Args:
        interval_s: seconds between samples.
        root: the process whose tree is measured (default: this one).
    """

    def __init__(self, interval_s: float = 2.0, root: int | None = None) -> None:
        self.interval_s = interval_s
        self.root = os.getpid() if root is None else root
        self.available = PROC.is_dir()
        self.peak_total_mb = 0.0
        self.peak_process_mb = 0.0
        self.peak_processes = 0
        self.by_phase_mb: dict[str, float] = {}
        self._phase: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def phase(self, name: str) -> None:
        """Attribute the samples from now on to ``name`` (e.g. a pipeline stage)."""
        self._phase = name
        self.by_phase_mb.setdefault(name, 0.0)
        self.sample()

    def sample(self) -> None:
        if not self.available:
            return
        sizes = [memory_mb(pid) for pid in process_tree(self.root)]
        total = sum(sizes)
        self.peak_total_mb = max(self.peak_total_mb, total)
        self.peak_process_mb = max([self.peak_process_mb, *sizes])
        self.peak_processes = max(self.peak_processes, len(sizes))
        if self._phase is not None:
            self.by_phase_mb[self._phase] = max(self.by_phase_mb[self._phase], total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def summary(self) -> dict[str, object]:
        """The figures, for a report: MB, rounded."""
        return {
            "measured": self.available,
            "interval_s": self.interval_s,
            "peak_total_mb": round(self.peak_total_mb),
            "peak_process_mb": round(self.peak_process_mb),
            "peak_processes": self.peak_processes,
            "by_phase_mb": {k: round(v) for k, v in self.by_phase_mb.items()},
            "sampled_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        }
