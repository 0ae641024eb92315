"""Ray Serve's high-throughput mode (HAProxy + direct ingress), medkd's default when ``haproxy`` is on PATH.

Serve's default HTTP proxy is a Python actor: every request crosses it and one more Ray call before
it reaches the replica, 8–10 ms per request on a 2-core machine and the bottleneck at concurrency 8
(``benchmarks/RESULTS.md``, serve_throughput). Ray 2.60 can put Debian's ``haproxy`` in front
instead and let it talk HTTP straight to each replica's own server (``RAY_SERVE_ENABLE_HA_PROXY=1``,
which implies direct ingress) and can drop the per-request extras (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``:
user code on the replica's main loop, buffered request logs, no log copy to stderr).

Both are read from the environment when Serve's controller, proxies and replicas start, so they must
be set **before Ray starts**, as must medkd's hook for the prediction routes' deadline
(:data:`HTTP_CALLBACK_ENV`) and :data:`HAPROXY_METRICS_ENV`: :func:`enable` sets them in
``os.environ`` for the Ray instance that ``medkd serve`` starts itself. On a cluster that is already running, whoever runs ``ray start`` sets
them (:data:`CLUSTER_HINT`).

HAProxy's admin socket path must stay under 97 bytes, and its stats and Prometheus ports are fixed
by default (8404, 9101), so two endpoints on one machine would collide: :func:`environment` puts the
sockets in a short ``/tmp/hap…`` directory of their own and picks free ports. Replica ports of direct
ingress lie in 30000–31000 and listen on all interfaces (so HAProxy on another node reaches them);
with ``serve.auth_token_env`` set they require the token like the front port.

Examples:
    >>> setup = enable()  # doctest: +SKIP
    >>> print(setup.message)  # doctest: +SKIP
    medkd: Serve's fast path: HAProxy (/usr/sbin/haproxy) with direct ingress and RAY_SERVE_THROUGHPUT_OPTIMIZED=1
    >>> setup.close()  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

OPT_OUT_ENV = "MEDKD_SERVE_HA_PROXY"
"""Set to ``0`` to keep Serve's Python proxy although ``haproxy`` is installed."""
SBIN_DIRS = ("/usr/sbin", "/sbin")
SWITCHES = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
DRAIN_S = 2.0
"""Direct ingress keeps a stopping replica registered 30 s by default so that a remote load balancer
notices; medkd's HAProxy is told at once, so a drain (SIGTERM) need not wait that long."""
WORKER_NICENESS_ENV = "RAY_worker_niceness"
"""Ray starts every worker process, Serve's replicas and HAProxy among them, at niceness 15 so that
tasks cannot starve the raylet; a serving replica is then pre-empted by every normal process on
its node (the client, a log shipper). Measured on 2 loaded cores at concurrency 8: 890-919 req/s
at 15, 965-1,138 at 0; /predict/batch 14-19k vs 19-22k images/s. medkd serve's own Ray instance
runs them at 0, unless the caller set the variable."""
HAPROXY_METRICS_ENV = "RAY_SERVE_HAPROXY_METRICS_ENABLED"
"""``0`` (medkd's default; a caller's value is kept): Serve's HTTP request metrics
(``serve_num_http_requests`` etc.) are recorded by the replica, in its cached in-process counters,
instead of HAProxy logging every request as a syslog line to HAProxyManager, which parses it in
Python: per 64-image ``/predict/batch`` request 0.11 ms less CPU in HAProxyManager and Ray's other
processes and 0.03 ms less in HAProxy, the replica unchanged within the noise (serve_throughput (6)).
HAProxy's own Prometheus exporter (its port is ``RAY_SERVE_HAPROXY_METRICS_PORT``) still counts
what HAProxy answers itself."""
HTTP_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
HTTP_CALLBACK = "medkd.serve.deadline:middlewares"
"""Serve's hook for middlewares around every HTTP server it starts: in each direct-ingress replica
medkd keeps the prediction routes' deadline itself instead of Serve's per-request task and
disconnect watcher (:mod:`medkd.serve.deadline`; a string here: importing Serve would read its
switches before :func:`enable` sets them)."""
CLUSTER_HINT = (
    "on an existing cluster set RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_worker_niceness=0 "
    "RAY_SERVE_HAPROXY_BINARY_PATH=$(command -v haproxy) "
    f"{HTTP_CALLBACK_ENV}={HTTP_CALLBACK} in the environment of `ray start` on every node "
    "(Debian: apt-get install haproxy)"
)


def haproxy_threads() -> int:
    """HAProxy threads for this machine: one per four CPUs this process may use, 1 to 4.

    Serve starts 4 by default; on a small machine those threads compete with the replica they
    serve (2 cores, concurrency 8: 4 threads gave 665-735 requests/s, 1 thread 785-810, under
    load). One HAProxy thread forwards tens of thousands of requests a second.

    Examples:
        >>> 1 <= haproxy_threads() <= 4
        True
    """
    return max(1, min(4, len(os.sched_getaffinity(0)) // 4))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_haproxy() -> str | None:
    """``haproxy`` on PATH, or in ``/usr/sbin`` where Debian installs it (not on a user's PATH).

    Examples:
        >>> find_haproxy()  # doctest: +SKIP
        '/usr/sbin/haproxy'
    """
    return shutil.which("haproxy", path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS]))


def environment(haproxy: str, state_dir: Path) -> dict[str, str]:
    """The variables that switch Serve to HAProxy + direct ingress + throughput-optimized mode.

    Args:
        haproxy: path of the ``haproxy`` binary.
        state_dir: a short directory (HAProxy's socket paths must stay under 97 bytes) for its
            config, admin socket and server state.

    Examples:
        >>> env = environment("/usr/sbin/haproxy", Path("/tmp/hap1"))
        >>> env["RAY_SERVE_ENABLE_HA_PROXY"], env["RAY_SERVE_HAPROXY_SOCKET_PATH"]
        ('1', '/tmp/hap1/admin.sock')
    """
    return {
        **SWITCHES,
        "RAY_SERVE_HAPROXY_BINARY_PATH": haproxy,
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state_dir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DRAIN_S),
        "RAY_SERVE_HAPROXY_NBTHREAD": os.environ.get("RAY_SERVE_HAPROXY_NBTHREAD") or str(haproxy_threads()),
        HTTP_CALLBACK_ENV: os.environ.get(HTTP_CALLBACK_ENV) or HTTP_CALLBACK,
        HAPROXY_METRICS_ENV: os.environ.get(HAPROXY_METRICS_ENV) or "0",
    }


@dataclass
class FastPathSetup:
    """What :func:`enable` did: whether the fast path is on, the message to print, what to clean up."""

    enabled: bool
    message: str
    state_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        """Remove HAProxy's state directory (after Ray has stopped)."""
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def enable(*, own_ray: bool = True) -> FastPathSetup:
    """Switch the Ray instance about to start to Serve's fast path when ``haproxy`` is on PATH.

    Whenever the caller starts its own Ray instance, its workers (the replicas) also run at normal
    CPU priority (:data:`WORKER_NICENESS_ENV` = 0) and Serve's HTTP servers get medkd's middlewares
    (:data:`HTTP_CALLBACK_ENV`), unless the caller set them.

    Args:
        own_ray: the caller is about to start its own Ray instance. When False (joining a running
            cluster) nothing is changed and the message says what the cluster's owner sets.

    Returns:
        The setup; ``message`` says which path is taken and why. Call ``close()`` after Ray stops.

    Examples:
        >>> setup = enable()  # doctest: +SKIP
        >>> setup.enabled  # doctest: +SKIP
        True
    """
    if not own_ray:
        return FastPathSetup(False, f"medkd: Serve uses the cluster's HTTP proxy; for the fast path {CLUSTER_HINT}")
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")
    # On either path: Serve's Python proxy (the only one, or HAProxy's backup) must not take its
    # timeout from a client's header (medkd.serve.deadline.ClientOverridesDropped).
    os.environ.setdefault(HTTP_CALLBACK_ENV, HTTP_CALLBACK)
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return FastPathSetup(True, "medkd: Serve's fast path: RAY_SERVE_ENABLE_HA_PROXY=1 set by the caller")
    if os.environ.get(OPT_OUT_ENV) == "0":
        return FastPathSetup(False, f"medkd: Serve's Python HTTP proxy ({OPT_OUT_ENV}=0)")
    haproxy = find_haproxy()
    if haproxy is None:
        return FastPathSetup(
            False,
            "medkd: haproxy not found on PATH: Serve falls back to its Python HTTP proxy (about 2.5x fewer "
            "requests/s at concurrency 8); install Debian's haproxy (sh scripts/ensure_haproxy.sh) for the fast path",
        )
    state_dir = Path(tempfile.mkdtemp(prefix="hap", dir="/tmp"))
    env = environment(haproxy, state_dir)
    os.environ.update(env)
    return FastPathSetup(
        True,
        f"medkd: Serve's fast path: HAProxy ({haproxy}) with direct ingress and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 "
        f"({OPT_OUT_ENV}=0 turns it off)",
        state_dir,
        env,
    )
