"""Processes a killed driver leaves behind, found and ended by the next run of the same job.

A driver that starts its own local Ray cluster shares its fate with the raylet and GCS: they
die with it, even after SIGKILL. Ray's per-node agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) do not: on losing the raylet they try to report to the dead GCS
first, and outlive the driver for minutes or for good. Each run records its driver and the
local Ray session it started in ``OUTPUT_DIR/driver.json``; the next run of the job reads it,
and if that driver is dead, ends the processes that still hold files of its session (their
logs), by pid — never anything else.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from pydantic import BaseModel

DRIVER_FILE = "driver.json"


class DriverRecord(BaseModel):
    """The driver of a run and the local Ray session it started (None: it joined a cluster)."""

    pid: int
    start_ticks: int  # /proc/PID/stat field 22: tells a reused pid apart
    ray_session_dir: str | None


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


def record_driver(output_dir: Path, ray_session_dir: str | None) -> DriverRecord:
    """Writes this process's :class:`DriverRecord` to ``output_dir/driver.json``."""
    record = DriverRecord(pid=os.getpid(), start_ticks=_start_ticks(os.getpid()) or 0, ray_session_dir=ray_session_dir)
    path = Path(output_dir) / DRIVER_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(record.model_dump_json())
    tmp.replace(path)
    return record


def session_processes(session_dir: str, *, exclude: set[int] | None = None) -> list[int]:
    """Pids of live processes with a file open below ``session_dir`` (Ray's logs and sockets)."""
    root = os.path.realpath(session_dir).rstrip("/") + "/"
    if not session_dir or root.count("/") < 3:  # never "/" or "/tmp/": only a session's own directory
        raise ValueError(f"not a Ray session directory: {session_dir!r}")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (exclude or set()):
            continue
        try:
            targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:  # gone, or not ours to read
            continue
        if any(target.startswith(root) for target in targets) and _start_ticks(int(entry.name)) is not None:
            found.append(int(entry.name))
    return sorted(found)


def end_leftovers_of_dead_driver(output_dir: Path) -> tuple[DriverRecord, list[int]] | None:
    """If the job's last driver is dead, SIGKILL what is left of the Ray session it started.

    Args:
        output_dir: the job's output directory (holding ``driver.json``).

    Returns:
        The dead driver's record and the pids that were ended; None when there is no record,
        the driver is still alive (another run of the job) or it started no local Ray.

    Examples:
        >>> end_leftovers_of_dead_driver(Path("/nonexistent")) is None
        True
    """
    try:
        record = DriverRecord.model_validate_json((Path(output_dir) / DRIVER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if record.pid == os.getpid() or _start_ticks(record.pid) == record.start_ticks or not record.ray_session_dir:
        return None
    pids = session_processes(record.ray_session_dir, exclude={os.getpid()})
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return record, pids
