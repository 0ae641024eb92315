"""Where the CPU goes while a benchmark phase runs: CPU seconds per cluster node and process kind.

A background thread samples ``/proc`` every ``interval`` seconds: each process's CPU time
(``utime + stime``), its thread count and its network namespace (the namespace is the node of a
:class:`medkd.cli.cluster.NetnsCluster`; everything else on the machine is "outside"). Processes
are sorted into kinds by their command line (``trial`` = a Tune trial actor, ``raylet``,
``gcs``, ``dashboard``, ``agents``, ``driver`` = the job's ``medkd run``, ``redis``, ...).
A process that ends between two samples loses at most one interval of its CPU time. For each
trial process it also keeps the CPU time of every thread and the most CPU it used in any window of
at least 1 s (``peak_cores``): a trial that holds 1 CPU must stay near 1.

Examples:
    >>> census = CpuCensus({"head": "mkd64-n0", "worker1": "mkd64-n1"})  # doctest: +SKIP
    >>> census.start(); ...; report = census.stop()  # doctest: +SKIP
    >>> print(report.table())  # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
OUTSIDE = "outside"

#: (kind, substrings of the command line); first match wins.
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("trial", ("ray::ImplicitFunc", "ray::_Inner", "distill_trial", "ray::final_candidate")),
    ("gcs", ("gcs_server",)),
    ("raylet", ("raylet/raylet",)),
    ("agents", ("dashboard/agent.py", "runtime_env/agent", "ray::DashboardAgent", "log_monitor.py", "monitor.py")),
    ("dashboard", ("dashboard/dashboard.py", "ray::Dashboard", "ray-dashboard")),
    ("driver", ("medkd.cli.main", "medkd run", "ray::JobSupervisor", "ray::_StatsActor", "ray::_QueueActor")),
    ("redis", ("redis-server",)),
    ("ray workers (idle, other)", ("ray::", "default_worker.py", "setup_worker.py")),
]
IDLE_WORKER = KINDS[-1][0]


def _kind(cmdline: str) -> str:
    for kind, needles in KINDS:
        if any(needle in cmdline for needle in needles):
            return kind
    return "other"


def _namespace_inode(name: str) -> int | None:
    try:
        return os.stat(f"/var/run/netns/{name}").st_ino
    except OSError:
        return None


@dataclass
class _Proc:
    node: str
    kind: str
    title: str
    first_ticks: int
    last_ticks: int
    max_threads: int
    first_seen: float
    last_seen: float
    thread_ticks: dict[int, int] = field(default_factory=dict)
    thread_names: dict[int, str] = field(default_factory=dict)
    window: tuple[float, int] = (0.0, 0)  # (time, ticks) where the current >= 1 s window began
    peak_cores: float = 0.0  # the most CPU the process used in any such window, in cores


@dataclass
class TrialProcess:
    """One trial actor's process: its node, CPU seconds, seconds alive in the window, threads."""

    node: str
    cpu_s: float
    wall_s: float
    max_threads: int
    busiest_thread_cpu_s: float = 0.0
    other_threads_cpu_s: float = 0.0
    threads: list[tuple[str, float]] = field(default_factory=list)  # the busiest few: (name, CPU-s)
    peak_cores: float = 0.0  # the most it used in any window of >= 1 s (above 1: more than 1 CPU)
    title: str = ""


@dataclass
class CensusReport:
    """CPU seconds per (node, kind) over ``seconds`` of wall time, with the machine's load."""

    seconds: float
    started_at: float  # time.time() at start
    cpu: dict[tuple[str, str], float]
    max_threads: dict[tuple[str, str], int]
    processes: dict[tuple[str, str], int]
    load_1min: list[float] = field(default_factory=list)
    machine_busy_cpu_s: float = 0.0
    trials: list[TrialProcess] = field(default_factory=list)
    top: list[tuple[float, str, str]] = field(default_factory=list)

    def node_total(self, node: str) -> float:
        return sum(v for (n, _), v in self.cpu.items() if n == node)

    def kind_total(self, kind: str, *, inside_only: bool = True) -> float:
        return sum(v for (n, k), v in self.cpu.items() if k == kind and (n != OUTSIDE or not inside_only))

    def table(self) -> str:
        load = self.load_1min or [float("nan")]
        lines = [
            f"  {self.seconds:.0f} s wall; machine busy {self.machine_busy_cpu_s:.0f} CPU-s "
            f"({self.machine_busy_cpu_s / max(self.seconds, 1e-9):.2f} of {os.cpu_count()} cores); "
            f"1-min load min/mean/max {min(load):.1f}/{sum(load) / len(load):.1f}/{max(load):.1f}",
            f"  {'node':<10} {'kind':<26} {'CPU-s':>8} {'cores':>6} {'procs':>6} {'max thr':>8}",
        ]
        for (node, kind), value in sorted(self.cpu.items(), key=lambda item: (item[0][0] == OUTSIDE, -item[1])):
            if value < 0.05 * self.seconds / 100 and node != OUTSIDE:
                continue
            lines.append(
                f"  {node:<10} {kind:<26} {value:8.1f} {value / max(self.seconds, 1e-9):6.2f} "
                f"{self.processes[(node, kind)]:6d} {self.max_threads[(node, kind)]:8d}"
            )
        lines.append("  busiest processes in the cluster:")
        lines.extend(f"    {cpu_s:7.1f} CPU-s  {node:<8} {title}" for cpu_s, node, title in self.top)
        for trial in self.trials:
            lines.append(
                f"  trial process on {trial.node}: {trial.cpu_s:.1f} CPU-s in {trial.wall_s:.1f} s alive "
                f"({trial.cpu_s / max(trial.wall_s, 1e-9):.2f} cores, peak {trial.peak_cores:.2f} over 1 s), "
                f"max {trial.max_threads} threads; "
                f"busiest thread {trial.busiest_thread_cpu_s:.1f} CPU-s, all others {trial.other_threads_cpu_s:.1f} "
                f"({', '.join(f'{name} {cpu_s:.1f}' for name, cpu_s in trial.threads)})"
            )
        return "\n".join(lines)


class CpuCensus:
    """Sample ``/proc`` in a thread between :meth:`start` and :meth:`stop`.

    Args:
        nodes: node label -> network namespace name (``ip netns`` name).
        interval: seconds between samples.
    """

    def __init__(self, nodes: dict[str, str], interval: float = 0.5) -> None:
        self.inodes = {inode: label for label, name in nodes.items() if (inode := _namespace_inode(name)) is not None}
        self.interval = interval
        self._procs: dict[tuple[int, int], _Proc] = {}
        self._procs_seeded = False
        self._loads: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._busy0 = 0

    @staticmethod
    def _machine_busy_ticks() -> int:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait

    def _sample(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            now = time.monotonic()
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks, threads, started = int(stat[11]) + int(stat[12]), int(stat[17]), int(stat[19])
                key = (pid, started)
                known = self._procs.get(key)
                if known is None:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    inode = int(os.readlink(f"/proc/{pid}/ns/net").split("[")[1].rstrip("]"))
                    # A process that existed at start counts from there; a new one from zero.
                    first = ticks if not self._procs_seeded else 0
                    title = cmdline or stat[0]
                    self._procs[key] = _Proc(
                        self.inodes.get(inode, OUTSIDE),
                        _kind(title),
                        title.strip()[:120],
                        first,
                        ticks,
                        threads,
                        now,
                        now,
                    )
                else:
                    known.last_ticks, known.last_seen = ticks, now
                    known.max_threads = max(known.max_threads, threads)
                    if known.kind == IDLE_WORKER and known.node != OUTSIDE:
                        # A pooled Ray worker takes its task's title (ray::ImplicitFunc...) when it
                        # starts one: its whole life (start, imports) counts for that task.
                        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        known.kind, known.title = _kind(title), title.strip()[:120]
                proc = self._procs[key]
                if proc.kind == "trial":
                    self._sample_threads(pid, proc)
                    began, began_ticks = proc.window
                    if not began:
                        proc.window = (now, ticks)
                    elif now - began >= 1.0:
                        proc.peak_cores = max(proc.peak_cores, (ticks - began_ticks) / CLOCK_TICKS / (now - began))
                        proc.window = (now, ticks)
            except (OSError, IndexError, ValueError):
                continue  # ended while being read
        self._loads.append(os.getloadavg()[0])

    @staticmethod
    def _sample_threads(pid: int, proc: _Proc) -> None:
        """Per-thread CPU of a trial process: is its compute on one thread (its 1-CPU allotment)?"""
        for task in os.scandir(f"/proc/{pid}/task"):
            try:
                fields = Path(f"/proc/{pid}/task/{task.name}/stat").read_text().rsplit(")", 1)[1].split()
                tid = int(task.name)
                proc.thread_ticks[tid] = int(fields[11]) + int(fields[12])
                if tid not in proc.thread_names:
                    proc.thread_names[tid] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            except (OSError, IndexError, ValueError):
                continue

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> CpuCensus:
        self._procs_seeded = False
        self._sample()
        self._procs_seeded = True
        self._started = time.monotonic()
        self._started_at = time.time()
        self._busy0 = self._machine_busy_ticks()
        self._thread = threading.Thread(target=self._run, name="cpu-census", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> CensusReport:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        cpu: dict[tuple[str, str], float] = {}
        threads: dict[tuple[str, str], int] = {}
        count: dict[tuple[str, str], int] = {}
        for proc in self._procs.values():
            used = (proc.last_ticks - proc.first_ticks) / CLOCK_TICKS
            if used <= 0:
                continue
            key = (proc.node, proc.kind)
            cpu[key] = cpu.get(key, 0.0) + used
            threads[key] = max(threads.get(key, 0), proc.max_threads)
            count[key] = count.get(key, 0) + 1
        trials = []
        for p in self._procs.values():
            if p.kind != "trial" or p.last_ticks <= p.first_ticks:
                continue
            # Thread times are since each thread began: for a process older than the census they
            # would include what it did before, so they are only shown for processes born meanwhile.
            per_thread = sorted(p.thread_ticks.values(), reverse=True) if not p.first_ticks else []
            per_thread = per_thread or [0]
            named = sorted(p.thread_ticks.items(), key=lambda item: -item[1])[:4] if not p.first_ticks else []
            trials.append(
                TrialProcess(
                    p.node,
                    (p.last_ticks - p.first_ticks) / CLOCK_TICKS,
                    p.last_seen - p.first_seen,
                    p.max_threads,
                    per_thread[0] / CLOCK_TICKS,
                    sum(per_thread[1:]) / CLOCK_TICKS,
                    [(p.thread_names.get(tid, "?"), ticks / CLOCK_TICKS) for tid, ticks in named],
                    p.peak_cores,
                    p.title,
                )
            )
        inside = [p for p in self._procs.values() if p.node != OUTSIDE]
        top = sorted(inside, key=lambda p: p.first_ticks - p.last_ticks)[:12]
        return CensusReport(
            top=[((p.last_ticks - p.first_ticks) / CLOCK_TICKS, p.node, p.title) for p in top],
            seconds=time.monotonic() - self._started,
            started_at=self._started_at,
            cpu=cpu,
            max_threads=threads,
            processes=count,
            load_1min=self._loads,
            machine_busy_cpu_s=(self._machine_busy_ticks() - self._busy0) / CLOCK_TICKS,
            trials=sorted(trials, key=lambda t: t.node),
        )
