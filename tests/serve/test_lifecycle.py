"""`medkd serve` stopped with SIGTERM drains, exits 0 and leaves no process of its Ray instance
behind (GCS, raylet, dashboard, agents, workers, replicas, HAProxy).

`make test` installs haproxy (scripts/ensure_haproxy.sh), so this runs Serve's fast path, medkd's
default: HAProxy + direct ingress + RAY_SERVE_THROUGHPUT_OPTIMIZED (medkd.serve.ha_proxy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from medkd.serve.codecs import encode_npy
from medkd.serve.ha_proxy import find_haproxy
from tests.conftest import REPO_ROOT, free_port
from tests.serve.students import call, make_run, pid_alive

pytestmark = pytest.mark.slow

START_LIMIT_S = 240.0
STOP_LIMIT_S = 90.0


def descendants(root: int) -> dict[int, str]:
    """Every live process below ``root`` with its command line, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found: dict[int, str] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        stack.extend(children.get(pid, []))
    return found


def test_sigterm_drains_and_leaves_no_ray_process_behind(tmp_path):
    assert find_haproxy(), "no haproxy: run `sh scripts/ensure_haproxy.sh` (make test does)"
    run_dir, _ = make_run(tmp_path / "run", 1)
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    for name in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY", "MEDKD_SERVE_HA_PROXY"):
        env.pop(name, None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medkd.cli.main",
            "serve",
            str(run_dir),
            "--port",
            str(port),
            "--max-replicas",
            "1",
            "--set",
            "cpus_per_replica=0.25",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ray_processes: dict[int, str] = {}
    output: list[str] = []
    try:
        reader = threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + START_LIMIT_S
        while not any("serving " in line and f":{port}" in line for line in output):
            assert process.poll() is None, "".join(output[-40:])
            assert time.monotonic() < deadline, "medkd serve did not start:\n" + "".join(output[-40:])
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        image = encode_npy(np.zeros((28, 28), np.uint8))
        assert call(url + "/predict", body=image, content_type="application/x-npy")[0] == 200
        # Serve's timeout header from a client is not obeyed: medkd keeps the prediction routes'
        # deadline (medkd.serve.deadline); Serve alone would answer this 408 at once.
        short = {"x-request-timeout-seconds": "0.000001"}
        status, body = call(url + "/predict", body=image, content_type="application/x-npy", headers=short)[:2]
        assert status == 200, f"{status} {body!r}\n" + "".join(output[-40:])
        ray_processes = descendants(process.pid)
        names = " ".join(ray_processes.values())
        assert "raylet" in names and "gcs_server" in names, names
        assert any("fast path: HAProxy" in line for line in output), "".join(output[-40:])
        assert "haproxy" in names, names  # HAProxy fronts the replica (a child of Serve's proxy actor)

        # A request in flight while SIGTERM arrives is answered (Serve drains before it stops).
        in_flight: list[int] = []
        batch = encode_npy(np.zeros((200, 28, 28), np.uint8))
        sender = threading.Thread(
            target=lambda: in_flight.append(
                call(url + "/predict/batch", body=batch, content_type="application/x-npy", timeout=60)[0]
            )
        )
        sender.start()
        time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_LIMIT_S) == 0, "".join(output[-40:])
        sender.join(timeout=60)
        assert in_flight in ([200], [503]), in_flight  # answered, or refused cleanly while shutting down

        deadline = time.monotonic() + 30
        while any(pid_alive(pid) for pid in ray_processes) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {pid: cmd[:120] for pid, cmd in ray_processes.items() if pid_alive(pid)}
        assert not left, f"processes of medkd serve's Ray instance still alive: {json.dumps(left, indent=1)}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        for pid in ray_processes:  # only the processes this test started
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
