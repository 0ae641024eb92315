"""A multi-node Ray cluster on this machine: ``medkd cluster local up | down | status``.

Why one module (for now): every step of the cluster's lifecycle (addresses, namespaces, Ray
nodes, the shared Redis, the kill/restart hooks that fault tests use, teardown) reads and writes
one state file under one lock; it was written and proven as one piece. Splitting the process and
network helpers from :class:`LocalCluster` is the next clean-up.

Two modes share one implementation (:class:`LocalCluster`):

* **loopback** (default): the head and each worker node are separate ``ray start``
  processes on 127.0.0.1, each with its own ports, temp dir and process session. Cheap, but the
  nodes share one network: a server bound to 127.0.0.1 "works" for all of them.
* **netns** (``--netns``, root only): the head and each worker run in a **network namespace of
  their own** with their own address on a private bridge, so nodes meet only over the network
  the way separate hosts do. The code picks a free ``10.213.X.0/24`` (checked against every
  address and route on the machine), creates the bridge ``mkdXbr`` (the root namespace gets
  ``10.213.X.254`` on it so that clients here reach the dashboard), one namespace ``mkdX-nI``
  and one veth pair per node (head ``.1``, worker ``i`` ``.(i+1)``), and removes all of it on
  ``down``. The namespaces get no default route: traffic can only go to 127.0.0.1 or to the
  addresses this code created.

Beside the head runs the cluster's shared soft-label **Redis**: the managed server's
configuration (:class:`medkd.softlabels.redis_server.ManagedRedisServer`: password in a 0600
config file, RDB persistence, the same ``maxmemory`` and ``volatile-lru`` eviction), bound to the
head's address (netns) or 127.0.0.1 (loopback). Its password is in ``STATE/redis_password`` and in
every node's environment as ``MEDKD_REDIS_PASSWORD``, so a job only names it:
``--set cache.redis_url=redis://HEAD:26390/0 --set cache.password_env=MEDKD_REDIS_PASSWORD``.

Token authentication is on: the token is ``STATE/auth_token``; clients find it through
``RAY_AUTH_TOKEN_PATH``. Every port is explicit and outside Ray's worker port range
(10002-19999). Every process is recorded in ``STATE/cluster.json`` and ended by pid (SIGTERM,
then SIGKILL for Ray's agents, which outlive SIGTERM); ``ray stop`` is never used.

Examples:
    >>> cluster = LocalCluster.up(workers=2, cpus_per_worker=1, netns=True)  # doctest: +SKIP
    >>> cluster.dashboard_url, cluster.redis_url                            # doctest: +SKIP
    ('http://10.213.64.1:28265', 'redis://10.213.64.1:26390/0')
    >>> cluster.kill_node(2)                                                # doctest: +SKIP
    >>> cluster.down()                                                      # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from medkd.softlabels.redis_server import ManagedRedisServer

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
REDIS_PASSWORD_FILE = "redis_password"
REDIS_PASSWORD_ENV = "MEDKD_REDIS_PASSWORD"
DEFAULT_STATE_DIR = Path("/tmp/medkd-local-cluster")
SUBNET_PREFIX = "10.213"
#: Third octets tried for the private /24, in order (10.213.0.x is left to hand-made probes).
SUBNET_OCTETS = range(64, 250)
#: Bridge side of the subnet (the root namespace's own address on the bridge).
BRIDGE_HOST = 254
_LOCK_PATH = Path("/tmp/medkd-netns.lock")
_RAY_WORKER_PORTS = range(10002, 20000)
_NODE_TIMEOUT_S = 120.0
_START_ATTEMPTS = 5
_JOIN_GRACE_S = 60.0
_REDIS_TIMEOUT_S = 20.0
_TERM_GRACE_S = 5.0
#: Ray keeps unix sockets below ``TEMP/session_<date>_<pid>/sockets/``; their paths are limited
#: to 107 bytes, so the per-node temp dirs must be short.
_MAX_TEMP_DIR_CHARS = 48


class ClusterError(RuntimeError):
    """The local cluster could not be started, reached or stopped; the message says why."""


# --------------------------------------------------------------------------------------------
# Settings and recorded state


class ClusterSettings(BaseModel):
    """How to start a local cluster (the ``up`` flags; ``MEDKD_*`` environment variables)."""

    model_config = {"extra": "forbid"}

    workers: int = Field(2, ge=0, le=32)
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: list[int] = Field(default_factory=list, description="declared GPUs of worker i (missing: 0)")
    head_cpus: float = Field(0.0, ge=0)
    netns: bool = False
    state_dir: Path = DEFAULT_STATE_DIR
    shared_dir: Path | None = Field(None, description="outputs every node sees; default STATE/shared")
    gcs_port: int = 26379
    dashboard_port: int = 28265
    base_port: int = Field(26400, description="node i's services use BASE+10*i .. BASE+10*i+9 (netns: BASE..BASE+9)")
    redis_port: int = 26390
    redis: bool = True
    object_store_bytes: int = Field(200_000_000, ge=78_643_200)
    auth: Literal["token", "disabled"] = "token"

    @model_validator(mode="after")
    def _ports_outside_worker_range(self) -> ClusterSettings:
        last_node = self.base_port + 9 + (0 if self.netns else 10 * self.workers)
        for name, port in (
            ("gcs_port", self.gcs_port),
            ("dashboard_port", self.dashboard_port),
            ("redis_port", self.redis_port),
            ("base_port", self.base_port),
            ("the last node port", last_node),
        ):
            if not 0 < port < 65536:
                raise ValueError(f"{_setting_name(name)}={port} is not a valid port")
            if port in _RAY_WORKER_PORTS:
                raise ValueError(
                    f"{_setting_name(name)}={port} lies in Ray's worker port range 10002-19999; choose another"
                )
        if self.base_port < _RAY_WORKER_PORTS.start <= last_node:
            raise ValueError(f"node ports {self.base_port}..{last_node} overlap Ray's worker port range 10002-19999")
        return self


#: The environment variables ``from_env`` reads (the settings of ``cluster/local_cluster.sh``).
ENV_SETTINGS = {
    "MEDKD_CLUSTER_DIR": "state_dir",
    "MEDKD_CLUSTER_PORT": "gcs_port",
    "MEDKD_DASHBOARD_PORT": "dashboard_port",
    "MEDKD_CLUSTER_BASE_PORT": "base_port",
    "MEDKD_REDIS_PORT": "redis_port",
    "MEDKD_HEAD_CPUS": "head_cpus",
    "MEDKD_WORKER_CPUS": "cpus_per_worker",
    "MEDKD_OBJECT_STORE_BYTES": "object_store_bytes",
    "MEDKD_AUTH": "auth",
}


def _setting_name(field: str) -> str:
    """The environment variable of a setting when it has one (errors name what the user set)."""
    names = {value: key for key, value in ENV_SETTINGS.items()}
    return names.get(field, field)


class NodeState(BaseModel):
    index: int
    role: str  # head | workerI
    address: str
    namespace: str | None = None
    veth: str | None = None
    pid: int | None = None  # the node's `ray start` (its session leader; it exits once the node runs)
    temp_dir: str
    log: str
    num_cpus: float
    num_gpus: int = 0


class RedisState(BaseModel):
    address: str
    port: int
    data_dir: str
    config: str
    log: str
    pid: int | None = None


class ClusterState(BaseModel):
    """What ``up`` created, written to ``STATE/cluster.json`` after every step, so ``down`` removes
    exactly that even after a partial start."""

    settings: ClusterSettings
    subnet: str | None = None
    bridge: str | None = None
    bridge_address: str | None = None
    nodes: list[NodeState] = Field(default_factory=list)
    redis: RedisState | None = None
    shared_dir: str


# --------------------------------------------------------------------------------------------
# Processes


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process, from /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def _session_tree(leader: int) -> set[int]:
    """The processes of ``leader``'s session and all their descendants (Ray job drivers start
    sessions of their own, so the session alone is not enough)."""
    table = _proc_table()
    found = {pid for pid, (_, sid) in table.items() if sid == leader}
    if leader in table:
        found.add(leader)
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap(pids: set[int]) -> None:
    """Collect exit statuses of our own children among ``pids`` (no zombies left behind)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _terminate(list_pids: Any, grace_s: float = _TERM_GRACE_S) -> None:
    """SIGTERM what ``list_pids()`` returns, wait up to ``grace_s``, then SIGKILL what is left
    (Ray's dashboard agent and runtime-env agent outlive SIGTERM). Bounded: a few rounds."""
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        pids = list_pids()
        if not pids:
            return
        _signal_all(pids, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            _reap(pids)
            if not any(_alive(pid) for pid in pids):
                break
            time.sleep(0.1)
    left = [pid for pid in list_pids() if _alive(pid)]
    if left:
        raise ClusterError(f"processes {sorted(left)} did not exit after SIGKILL")


def _run(argv: Sequence[str]) -> str:
    """Run a short command (``ip ...``); a failure is a :class:`ClusterError` naming it."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise ClusterError(f"{argv[0]}: command not found (Debian: apt-get install -y iproute2)") from None
    if done.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _disable_ipv6(interface: str, namespace: str | None = None) -> None:
    """No IPv6 on our links: no link-local addresses, router solicitations or MLD reports, so the
    nodes' only traffic is IPv4 to the addresses this module assigned."""
    setting = f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6"
    if namespace is None:
        with contextlib.suppress(OSError):
            Path(setting).write_text("1\n")
        return
    subprocess.run(
        ["ip", "netns", "exec", namespace, "sh", "-c", f"test ! -e {setting} || echo 1 > {setting}"],
        capture_output=True,
        timeout=30,
    )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


# --------------------------------------------------------------------------------------------
# The private network


def namespaces_available() -> str | None:
    """None when this process may create network namespaces, else the reason it may not."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return (
            "creating network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); run as root or use loopback mode"
        )
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed: apt-get install -y iproute2"
    return None


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network of an address or a route on this machine (the default route aside)."""
    networks = []
    for entry in json.loads(_run(["ip", "-j", "-4", "addr"]) or "[]"):
        for info in entry.get("addr_info", []):
            networks.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]) or "[]"):
        dst = route.get("dst", "default")
        if dst == "default":
            continue
        with contextlib.suppress(ValueError):
            networks.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return networks


def _names_in_use() -> set[str]:
    links = {entry["ifname"] for entry in json.loads(_run(["ip", "-j", "link"]) or "[]")}
    spaces = {line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()}
    return links | spaces


def _free_subnet_octet() -> int:
    """A third octet X such that 10.213.X.0/24 overlaps no address or route here and none of our
    names for it exist. Call with :data:`_LOCK_PATH` held."""
    used_networks, used_names = _networks_in_use(), _names_in_use()
    for octet in SUBNET_OCTETS:
        subnet = ipaddress.ip_network(f"{SUBNET_PREFIX}.{octet}.0/24")
        if any(subnet.overlaps(net) for net in used_networks):
            continue
        if any(name.startswith(f"mkd{octet}") for name in used_names):
            continue
        return octet
    raise ClusterError(
        f"no free {SUBNET_PREFIX}.X.0/24 subnet for X in {SUBNET_OCTETS.start}..{SUBNET_OCTETS.stop - 1}"
    )


@contextlib.contextmanager
def _network_lock() -> Iterator[None]:
    """One cluster at a time chooses and creates its subnet (several may be up at once)."""
    fd = os.open(_LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# --------------------------------------------------------------------------------------------
# The cluster


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise ClusterError("ray not found: install the project (make setup)")
    return found


def _http_json(url: str, token: str | None, timeout: float = 5.0) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        return json.load(response)


class LocalCluster:
    """A running (or partly started) local cluster, described by its state directory.

    Start one with :meth:`up`; attach to one started by another process with
    :meth:`from_state_dir`. Node 0 is the head, node ``i`` (1..workers) worker ``i``.

    Examples:
        >>> cluster = LocalCluster.up(workers=2, netns=True, state_dir=Path("/tmp/mkd"))  # doctest: +SKIP
        >>> cluster.node_addresses                                                        # doctest: +SKIP
        ['10.213.64.1', '10.213.64.2', '10.213.64.3']
        >>> sorted(cluster.alive_node_addresses())                                        # doctest: +SKIP
        ['10.213.64.1', '10.213.64.2', '10.213.64.3']
        >>> cluster.down()                                                                # doctest: +SKIP
    """

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.state_dir = Path(state.settings.state_dir)
        self._launchers: dict[int, subprocess.Popen] = {}  # `ray start` processes started here

    # ------------------------------------------------------------------ construction
    @classmethod
    def up(
        cls,
        workers: int = 2,
        cpus_per_worker: float = 1.0,
        *,
        netns: bool = False,
        state_dir: Path | str | None = None,
        **settings: Any,
    ) -> LocalCluster:
        """Start a head, ``workers`` worker nodes and the Redis; wait until every node is alive.

        Args:
            workers: number of worker nodes.
            cpus_per_worker: CPUs each worker node declares to Ray.
            netns: one network namespace per node on a private bridge (needs root).
            state_dir: pids, token, logs, Ray temp dirs (keep it short: unix socket paths).
            settings: further :class:`ClusterSettings` fields (``gpus_per_worker``, ports, ...).

        Raises:
            ClusterError: a setting is invalid, namespaces are refused, or a node did not start
                (everything already started is removed again).

        Examples:
            >>> cluster = LocalCluster.up(workers=1, netns=True)  # doctest: +SKIP
        """
        try:
            config = ClusterSettings(
                workers=workers,
                cpus_per_worker=cpus_per_worker,
                netns=netns,
                **({"state_dir": Path(state_dir)} if state_dir is not None else {}),
                **settings,
            )
        except ValidationError as error:
            raise ClusterError(_validation_message(error)) from None
        return cls.start(config)

    @classmethod
    def start(cls, config: ClusterSettings) -> LocalCluster:
        """:meth:`up` from a :class:`ClusterSettings`."""
        state_dir = Path(config.state_dir).resolve()
        if len(str(state_dir / "nXX")) > _MAX_TEMP_DIR_CHARS:
            raise ClusterError(
                f"state_dir {state_dir} is too long for Ray's unix socket paths; use a path under "
                f"{_MAX_TEMP_DIR_CHARS - 4} characters such as {DEFAULT_STATE_DIR}"
            )
        if config.netns and (reason := namespaces_available()):
            raise ClusterError(f"cannot create network namespaces: {reason}")
        existing = cls.from_state_dir(state_dir)
        if existing is not None and existing.any_alive():
            raise ClusterError(
                f"a cluster is already running from {state_dir}; run `medkd cluster local down "
                f"--state-dir {state_dir}` first"
            )
        if existing is not None:
            existing.down()
        state_dir.mkdir(parents=True, exist_ok=True)
        config = config.model_copy(update={"state_dir": state_dir})
        shared = Path(config.shared_dir).resolve() if config.shared_dir else state_dir / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        cluster = cls(ClusterState(settings=config, shared_dir=str(shared)))
        cluster._save()
        try:
            cluster._start_all()
        except BaseException:
            with contextlib.suppress(Exception):
                cluster.down()
            raise
        return cluster

    @classmethod
    def from_state_dir(cls, state_dir: Path | str = DEFAULT_STATE_DIR) -> LocalCluster | None:
        """The cluster recorded in ``state_dir``, or None when nothing is recorded there."""
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            return None
        try:
            return cls(ClusterState.model_validate_json(path.read_text()))
        except ValidationError as error:
            raise ClusterError(f"{path}: not a medkd cluster state file: {_validation_message(error)}") from None

    # ------------------------------------------------------------------ what clients need
    @property
    def settings(self) -> ClusterSettings:
        return self.state.settings

    @property
    def netns(self) -> bool:
        return self.settings.netns

    @property
    def head_address(self) -> str:
        """The head node's IP address (its namespace's address, or 127.0.0.1)."""
        return self.state.nodes[0].address if self.state.nodes else self._address(0)

    @property
    def gcs_address(self) -> str:
        """``HEAD:PORT`` for ``ray start --address`` / ``RAY_ADDRESS`` inside the cluster."""
        return f"{self.head_address}:{self.settings.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard / Jobs API URL, reachable from this (the root) namespace."""
        return f"http://{self.head_address}:{self.settings.dashboard_port}"

    @property
    def token_file(self) -> Path | None:
        """The token file (export it as ``RAY_AUTH_TOKEN_PATH``); None with auth disabled."""
        return self.state_dir / TOKEN_FILE if self.settings.auth == "token" else None

    @property
    def token(self) -> str | None:
        return self.token_file.read_text().strip() if self.token_file else None

    @property
    def redis_url(self) -> str:
        """``cache.redis_url`` for job specs (no password in it; see :attr:`redis_password_env`)."""
        if self.state.redis is None:
            raise ClusterError("this cluster was started without its Redis (redis=False)")
        return f"redis://{self.state.redis.address}:{self.state.redis.port}/0"

    @property
    def redis_password_env(self) -> str:
        """``cache.password_env`` for job specs; every node has it in its environment."""
        return REDIS_PASSWORD_ENV

    @property
    def redis_password_file(self) -> Path:
        return self.state_dir / REDIS_PASSWORD_FILE

    @property
    def redis_password(self) -> str:
        return self.redis_password_file.read_text().strip()

    @property
    def shared_dir(self) -> Path:
        """A directory every node sees (the same filesystem here; NFS/EFS on real hosts)."""
        return Path(self.state.shared_dir)

    @property
    def node_addresses(self) -> list[str]:
        return [node.address for node in self.state.nodes]

    @property
    def num_workers(self) -> int:
        return len(self.state.nodes) - 1

    def job_overrides(self) -> list[str]:
        """``--set`` arguments that point a job at this cluster's Redis."""
        return [f"cache.redis_url={self.redis_url}", f"cache.password_env={REDIS_PASSWORD_ENV}"]

    def client_env(self) -> dict[str, str]:
        """Environment for a client in the root namespace (``medkd submit``, ``status``, ``logs``)."""
        env = {"RAY_API_SERVER_ADDRESS": self.dashboard_url}
        if self.token_file:
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        if self.state.redis is not None:
            env[REDIS_PASSWORD_ENV] = self.redis_password
        return env

    def node_env(self) -> dict[str, str]:
        """Environment of every process started on a node (the caller's ``RAY_*`` left out)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        env.update(
            RAY_AUTH_MODE=self.settings.auth,
            RAY_USAGE_STATS_ENABLED="0",
            # Every node of a local cluster sees the whole machine's memory: Ray's memory monitor
            # would kill this cluster's tasks for what other programs use. The kernel still guards.
            RAY_memory_monitor_refresh_ms="0",
            PATH=f"{Path(_ray_executable()).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        if self.token_file:
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        if self.state.redis is not None and self.redis_password_file.is_file():
            env[REDIS_PASSWORD_ENV] = self.redis_password
        return env

    # ------------------------------------------------------------------ nodes
    def node_pids(self, index: int) -> set[int]:
        """Every live process of node ``index`` (0 = head): all processes in its namespace, or its
        ``ray start`` session and descendants in loopback mode. The Redis counts as the head's."""
        node = self._node(index)
        if node.namespace is not None:
            if not self._namespace_exists(node.namespace):
                return set()
            out = _run(["ip", "netns", "pids", node.namespace])
            return {int(pid) for pid in out.split() if _alive(int(pid))}
        pids = {pid for pid in _session_tree(node.pid) if _alive(pid)} if node.pid else set()
        if index == 0 and self.state.redis is not None and _alive(self.state.redis.pid):
            pids.add(self.state.redis.pid)
        return pids

    def kill_node(self, index: int, sig: int = signal.SIGKILL) -> set[int]:
        """Kill every process of node ``index`` (default SIGKILL: a host lost without warning).

        Returns:
            The pids signalled.
        """
        if index == 0:
            raise ClusterError("kill_node(0) would kill the head; kill worker nodes 1..N")
        pids = self.node_pids(index)
        _signal_all(pids, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            _reap(pids)
            time.sleep(0.05)
        return pids

    def restart_node(self, index: int) -> None:
        """Start worker node ``index`` again (after :meth:`kill_node`) and wait until it is alive."""
        if index == 0:
            raise ClusterError("restart_node(0): the head cannot be restarted into a running cluster")
        if self.node_pids(index):
            raise ClusterError(f"worker {index} still has processes {sorted(self.node_pids(index))}")
        self._start_ray_node(index)
        self._wait_for_nodes([index])

    def alive_nodes(self) -> list[dict[str, Any]]:
        """Ray's view: one dict per node (``node_ip``, ``state``, ``resources_total``, ...)."""
        url = f"{self.dashboard_url}/api/v0/nodes?detail=true&limit=1000"
        return [node for node in _http_json(url, self.token)["data"]["result"]["result"] if node["state"] == "ALIVE"]

    def alive_node_addresses(self) -> list[str]:
        return [node["node_ip"] for node in self.alive_nodes()]

    def popen_on_node(
        self, index: int, argv: Sequence[str], *, env: dict[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen:
        """Start ``argv`` on node ``index`` (in its namespace), with the node's environment plus
        ``RAY_ADDRESS`` of the cluster (a Ray driver there joins the cluster), plus ``env``."""
        node = self._node(index)
        full_env = {**self.node_env(), "RAY_ADDRESS": self.gcs_address, **(env or {})}
        prefix = ["ip", "netns", "exec", node.namespace] if node.namespace else []
        return subprocess.Popen([*prefix, *argv], env=full_env, **kwargs)

    def run_on_node(
        self, index: int, argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None, **kwargs: Any
    ) -> subprocess.CompletedProcess:
        """:meth:`popen_on_node` and wait (at most ``timeout`` seconds; then kill it and raise)."""
        if kwargs.pop("capture_output", False):
            kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process = self.popen_on_node(index, argv, env=env, **kwargs)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise ClusterError(f"{' '.join(argv)} on node {index} did not finish within {timeout:g} s") from None
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    # ------------------------------------------------------------------ redis
    def kill_redis(self) -> None:
        """SIGKILL the cluster's Redis (no save: what was written since the last snapshot is lost)."""
        redis_state = self._redis()
        if _alive(redis_state.pid):
            os.kill(redis_state.pid, signal.SIGKILL)
            self._wait_dead({redis_state.pid}, 10)

    def stop_redis(self) -> None:
        """``SHUTDOWN SAVE``: the data is on disk when this returns."""
        redis_state = self._redis()
        if not _alive(redis_state.pid):
            return
        client = self._redis_client()
        with contextlib.suppress(Exception):
            client.shutdown(save=True)
        self._wait_dead({redis_state.pid}, 30)

    def restart_redis(self) -> None:
        """Start the Redis again with the same config, port and data (its last RDB snapshot)."""
        if _alive(self._redis().pid):
            raise ClusterError(f"the cluster's Redis still runs (pid {self._redis().pid})")
        self._launch_redis()

    def redis_alive(self) -> bool:
        if self.state.redis is None or not _alive(self.state.redis.pid):
            return False
        try:
            return bool(self._redis_client().ping())
        except Exception:  # noqa: BLE001 - any failure means "not serving"
            return False

    # ------------------------------------------------------------------ state
    def any_alive(self) -> bool:
        nodes = any(self.node_pids(node.index) for node in self.state.nodes)
        return nodes or (self.state.redis is not None and _alive(self.state.redis.pid))

    def status(self) -> str:
        """A few lines for people: each node's address, processes and Ray state, and the Redis."""
        lines = [f"local cluster ({'netns' if self.netns else 'loopback'}) in {self.state_dir}"]
        try:
            ray_nodes = _http_json(f"{self.dashboard_url}/api/v0/nodes?detail=false&limit=1000", self.token)
            ray_view: list[dict[str, Any]] | None = ray_nodes["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            ray_view = None
        for node in self.state.nodes:
            pids = self.node_pids(node.index)
            if ray_view is None:
                ray_state = "dashboard unreachable"
            elif self.netns:
                states = [n["state"] for n in ray_view if n.get("node_ip") == node.address]
                ray_state = "ALIVE" if "ALIVE" in states else (states[-1] if states else "not in Ray")
            else:
                ray_state = "-"
            where = f"{node.namespace} " if node.namespace else ""
            lines.append(f"  {node.role:8s} {where}{node.address}  {len(pids)} process(es)  ray: {ray_state}")
        if ray_view is not None:
            lines.append(f"  ray: {sum(n['state'] == 'ALIVE' for n in ray_view)} node(s) alive")
        if self.state.redis is not None:
            lines.append(f"  redis    {self.redis_url}  {'alive' if self.redis_alive() else 'NOT RUNNING'}")
        lines.append(f"  dashboard / Jobs API: {self.dashboard_url}")
        return "\n".join(lines)

    def instructions(self) -> str:
        """What to type to use the cluster (printed by ``up``)."""
        lines = [
            f"local Ray cluster up: 1 head + {self.num_workers} worker node(s) "
            f"({'one network namespace each' if self.netns else 'on 127.0.0.1'}); state in {self.state_dir}",
            f"  dashboard / Jobs API: {self.dashboard_url}",
            f"  shared output dir:    {self.shared_dir}",
        ]
        if self.token_file:
            lines.append(f"  export RAY_AUTH_TOKEN_PATH={self.token_file}")
        submit = (
            f"  medkd submit examples/quickstart.yaml --address {self.dashboard_url} --run-args \\\n"
            f"      --set output_dir={self.shared_dir}/runs/quickstart"
        )
        if self.state.redis is not None:
            lines += [
                f"  cache.redis_url:      {self.redis_url}",
                f"  cache.password_env:   {REDIS_PASSWORD_ENV} (set on every node; the password is in "
                f"{self.redis_password_file})",
            ]
            submit += " " + " ".join(f"--set {item}" for item in self.job_overrides())
        lines += [submit, f"  medkd cluster local status|down --state-dir {self.state_dir}"]
        return "\n".join(lines)

    def down(self) -> None:
        """Stop every recorded process (workers, then the head and its Redis), delete the
        namespaces, veths and the bridge, and forget the cluster. Logs stay in the state dir."""
        errors: list[str] = []
        for node in reversed(self.state.nodes):
            try:
                if node.index == 0 and self.state.redis is not None:
                    self.stop_redis()
                _terminate(lambda index=node.index: self.node_pids(index))
            except (ClusterError, OSError) as error:
                errors.append(f"{node.role}: {error}")
        if self.state.redis is not None and _alive(self.state.redis.pid):
            with contextlib.suppress(ClusterError):
                _terminate(lambda: {self.state.redis.pid} if _alive(self.state.redis.pid) else set())
        for node in self.state.nodes:
            if node.namespace and self._namespace_exists(node.namespace):
                try:
                    _run(["ip", "netns", "del", node.namespace])
                except ClusterError as error:
                    errors.append(str(error))
        if self.state.bridge and self._link_exists(self.state.bridge):
            try:
                _run(["ip", "link", "del", self.state.bridge])
            except ClusterError as error:
                errors.append(str(error))
        if errors:
            raise ClusterError("down left things behind: " + "; ".join(errors))
        for node in self.state.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / STATE_FILE).unlink()

    # ------------------------------------------------------------------ internals
    def _save(self) -> None:
        path = self.state_dir / STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.state.model_dump_json(indent=2))
        tmp.replace(path)

    def _node(self, index: int) -> NodeState:
        if not 0 <= index < len(self.state.nodes):
            raise ClusterError(f"no node {index}: this cluster has nodes 0 (head) .. {len(self.state.nodes) - 1}")
        return self.state.nodes[index]

    def _redis(self) -> RedisState:
        if self.state.redis is None:
            raise ClusterError("this cluster was started without its Redis (redis=False)")
        return self.state.redis

    def _redis_client(self):
        import redis

        redis_state = self._redis()
        return redis.Redis(
            host=redis_state.address,
            port=redis_state.port,
            password=self.redis_password,
            socket_timeout=5,
            socket_connect_timeout=2,
        )

    def _address(self, index: int) -> str:
        if not self.netns:
            return "127.0.0.1"
        return str(ipaddress.ip_network(self.state.subnet)[index + 1])

    @staticmethod
    def _namespace_exists(name: str) -> bool:
        return Path("/var/run/netns", name).exists()

    @staticmethod
    def _link_exists(name: str) -> bool:
        return Path("/sys/class/net", name).exists()

    def _wait_dead(self, pids: set[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            _reap(pids)
            time.sleep(0.05)

    def _start_all(self) -> None:
        config = self.settings
        if config.auth == "token" and not (self.state_dir / TOKEN_FILE).is_file():
            _write_private(self.state_dir / TOKEN_FILE, secrets.token_hex(32) + "\n")
        if config.redis and not self.redis_password_file.is_file():
            _write_private(self.redis_password_file, secrets.token_urlsafe(32) + "\n")
        if config.netns:
            self._create_network()
        for index in range(config.workers + 1):
            role = "head" if index == 0 else f"worker{index}"
            gpus = config.gpus_per_worker[index - 1] if 0 < index <= len(config.gpus_per_worker) else 0
            namespace = f"mkd{self._octet()}-n{index}" if config.netns else None
            self.state.nodes.append(
                NodeState(
                    index=index,
                    role=role,
                    address=self._address(index),
                    namespace=namespace,
                    veth=f"mkd{self._octet()}n{index}" if config.netns else None,
                    temp_dir=str(self.state_dir / f"n{index}"),
                    log=str(self.state_dir / f"{role}.log"),
                    num_cpus=config.head_cpus if index == 0 else config.cpus_per_worker,
                    num_gpus=gpus,
                )
            )
        if config.netns:
            for node in self.state.nodes:
                self._create_node_namespace(node)
        self._save()
        if config.redis:
            self.state.redis = RedisState(
                address=self.head_address,
                port=config.redis_port,
                data_dir=str(self.state_dir / "redis"),
                config=str(self.state_dir / "redis" / "medkd-redis.conf"),
                log=str(self.state_dir / "redis" / "redis.log"),
            )
            self._launch_redis()
        self._start_ray_node(0)
        self._wait_for_nodes([0])
        # One node at a time: on a loaded machine, start-ups side by side push each other past
        # the raylet's fixed 15 s wait for its dashboard agent (ray-project/ray#65983).
        for index in range(1, config.workers + 1):
            self._start_ray_node(index)
            self._wait_for_nodes([index])

    def _octet(self) -> int:
        return int(self.state.subnet.split(".")[2])

    def _create_network(self) -> None:
        with _network_lock():
            octet = _free_subnet_octet()
            self.state.subnet = f"{SUBNET_PREFIX}.{octet}.0/24"
            self.state.bridge = f"mkd{octet}br"
            self.state.bridge_address = f"{SUBNET_PREFIX}.{octet}.{BRIDGE_HOST}"
            self._save()
            _run(["ip", "link", "add", self.state.bridge, "type", "bridge"])
        _disable_ipv6(self.state.bridge)
        _run(["ip", "addr", "add", f"{self.state.bridge_address}/24", "dev", self.state.bridge])
        _run(["ip", "link", "set", self.state.bridge, "up"])

    def _create_node_namespace(self, node: NodeState) -> None:
        bridge_side = f"{node.veth}b"
        _run(["ip", "netns", "add", node.namespace])
        _run(["ip", "link", "add", node.veth, "type", "veth", "peer", "name", bridge_side])
        _run(["ip", "link", "set", node.veth, "netns", node.namespace])
        _disable_ipv6(bridge_side)
        _disable_ipv6("all", node.namespace)
        _run(["ip", "link", "set", bridge_side, "master", self.state.bridge, "up"])
        _run(["ip", "-n", node.namespace, "link", "set", "lo", "up"])
        _run(["ip", "-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", node.veth])
        _run(["ip", "-n", node.namespace, "link", "set", node.veth, "up"])

    def _node_ports(self, index: int) -> list[str]:
        base = self.settings.base_port + (0 if self.netns else 10 * index)
        return [
            f"--node-manager-port={base}",
            f"--object-manager-port={base + 1}",
            f"--dashboard-agent-listen-port={base + 2}",
            f"--dashboard-agent-grpc-port={base + 3}",
            f"--metrics-export-port={base + 4}",
            f"--runtime-env-agent-port={base + 5}",
        ]

    def _start_ray_node(self, index: int) -> None:
        node, config = self._node(index), self.settings
        argv = [
            _ray_executable(),
            "start",
            f"--temp-dir={node.temp_dir}",
            "--disable-usage-stats",
            f"--node-ip-address={node.address}",
            f"--num-cpus={node.num_cpus:g}",
            f"--num-gpus={node.num_gpus}",
            f"--object-store-memory={config.object_store_bytes}",
            *self._node_ports(index),
        ]
        if index == 0:
            argv += [
                "--head",
                f"--port={config.gcs_port}",
                f"--dashboard-host={node.address}",
                f"--dashboard-port={config.dashboard_port}",
                "--include-dashboard=true",
                f"--ray-client-server-port={config.base_port + 9}",
            ]
        else:
            argv += [f"--address={self.gcs_address}"]
        self._launchers[index] = self._spawn(node, argv, Path(node.log))
        node.pid = self._launchers[index].pid
        self._save()

    def _spawn(self, node: NodeState, argv: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        prefix = ["ip", "netns", "exec", node.namespace] if node.namespace else []
        env = self.node_env()
        if node.veth:
            # The namespaces share the machine's hostname, which resolves to 127.0.0.1 here: torch's
            # gloo (Ray Train's CPU process group) would listen there, out of reach of the workers on
            # other nodes. It listens on the node's own interface, as on a host whose name resolves.
            env["GLOO_SOCKET_IFNAME"] = node.veth
        with open(log, "ab") as out:
            # A session of its own: a Ctrl-C in the terminal of `up` does not reach the node, and
            # loopback mode finds the node's processes by session.
            process = subprocess.Popen(
                [*prefix, *argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
            )
        return process

    def _launch_redis(self) -> None:
        redis_state = self._redis()
        data_dir = Path(redis_state.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        # The managed server's configuration (persistence, maxmemory, eviction, password in a 0600
        # file), bound to the head's address instead of 127.0.0.1.
        managed = ManagedRedisServer(data_dir=data_dir, port=redis_state.port, password=self.redis_password)
        text = managed._config_text(redis_state.port, self.redis_password)
        text = text.replace("bind 127.0.0.1", f"bind {redis_state.address}")
        _write_private(Path(redis_state.config), text)
        executable = shutil.which("redis-server")
        if executable is None:
            raise ClusterError(
                "redis-server not found on PATH (Debian: apt-get install -y redis-server; "
                "`make setup` runs scripts/ensure_redis.sh)"
            )
        redis_state.pid = self._spawn(
            self._node(0), [executable, redis_state.config], Path(redis_state.log), cwd=data_dir
        ).pid
        self._save()
        deadline = time.monotonic() + _REDIS_TIMEOUT_S
        while not self.redis_alive():
            if not _alive(redis_state.pid):
                raise ClusterError(
                    f"redis-server exited while starting; log {redis_state.log}:\n" + _tail(Path(redis_state.log))
                )
            if time.monotonic() > deadline:
                raise ClusterError(f"redis-server did not answer at {self.redis_url} within {_REDIS_TIMEOUT_S:g} s")
            time.sleep(0.1)

    def _ray_pids(self, index: int) -> set[int]:
        """The node's processes except the Redis (which lives in the head's namespace)."""
        redis_pid = self.state.redis.pid if self.state.redis is not None else None
        return self.node_pids(index) - {redis_pid}

    def _raylet_alive(self, index: int) -> bool:
        """Whether node ``index`` still has a raylet (without one it can never join)."""
        for pid in self._ray_pids(index):
            try:
                if b"/raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                continue
        return False

    def _wait_for_nodes(self, starting: Sequence[int]) -> None:
        """Wait until Ray reports the nodes in ``starting`` (and those already up) alive.

        ``ray start`` runs without ``--block``: it gives up after a fixed 30 s when the raylet is
        slow to register (a loaded machine), but the processes it started keep running and the
        node often joins a little later. On a loaded machine the raylet may also exit because its
        dashboard agent took longer than a fixed 15 s to start (ray-project/ray#65983). A node
        whose ``ray start`` failed and that has no raylet left, or has not joined
        :data:`_JOIN_GRACE_S` later, is cleaned up and started again, at most
        :data:`_START_ATTEMPTS` times in all; the whole wait is bounded.
        """
        wanted = 1 + sum(1 for node in self.state.nodes[1:] if node.index in starting or self._ray_pids(node.index))
        attempts = dict.fromkeys(starting, 1)
        failed_at: dict[int, float] = {}
        deadline = time.monotonic() + _NODE_TIMEOUT_S * _START_ATTEMPTS
        alive, last_error = [], ""
        while time.monotonic() < deadline:
            try:
                alive = self.alive_node_addresses()
                if len(alive) >= wanted:
                    return
            except (OSError, ValueError, KeyError) as error:
                last_error = str(error)
            for index in starting:
                node, launcher = self._node(index), self._launchers.get(index)
                if launcher is None or launcher.poll() in (None, 0) or (self.netns and node.address in alive):
                    continue
                failed_at.setdefault(index, time.monotonic())
                if time.monotonic() - failed_at[index] < _JOIN_GRACE_S and self._raylet_alive(index):
                    continue
                if attempts[index] >= _START_ATTEMPTS:
                    raise ClusterError(
                        f"{node.role} ({node.address}) did not start ({attempts[index]} attempts); "
                        f"log {node.log}:\n" + _tail(Path(node.log))
                    )
                _terminate(lambda index=index: self._ray_pids(index))
                attempts[index] += 1
                del failed_at[index]
                self._start_ray_node(index)
            time.sleep(1)
        raise ClusterError(
            f"only {len(alive)} of {wanted} Ray nodes alive after {_NODE_TIMEOUT_S * _START_ATTEMPTS:g} s "
            f"(dashboard {self.dashboard_url}: {last_error or 'answers'}; logs in {self.state_dir})"
        )


class NetnsCluster(LocalCluster):
    """A :class:`LocalCluster` whose nodes each run in their own network namespace.

    Examples:
        >>> cluster = NetnsCluster.up(workers=2, cpus_per_worker=1)  # doctest: +SKIP
        >>> cluster.kill_node(1); cluster.kill_redis(); cluster.restart_redis()  # doctest: +SKIP
        >>> cluster.down()  # doctest: +SKIP
    """

    @classmethod
    def up(
        cls,
        workers: int = 2,
        cpus_per_worker: float = 1.0,
        *,
        netns: bool = True,
        state_dir: Path | str | None = None,
        **settings: Any,
    ) -> LocalCluster:
        if not netns:
            raise ClusterError("NetnsCluster.up(netns=False): use LocalCluster.up for a loopback cluster")
        return super().up(workers, cpus_per_worker, netns=True, state_dir=state_dir, **settings)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{_setting_name(field)}: {message}" if field else message)
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Command line


def settings_from_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The :class:`ClusterSettings` fields set through ``MEDKD_*`` environment variables."""
    environ = os.environ if environ is None else environ
    return {field: environ[name] for name, field in ENV_SETTINGS.items() if environ.get(name)}


def cmd_up(args: argparse.Namespace) -> int:
    values: dict[str, Any] = settings_from_env()
    for field in ("workers", "cpus_per_worker", "head_cpus", "state_dir", "shared_dir"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    if args.gpus_per_worker:
        values["gpus_per_worker"] = args.gpus_per_worker
    values["netns"] = args.netns
    values["redis"] = not args.no_redis
    try:
        config = ClusterSettings(**values)
    except ValidationError as error:
        raise ClusterError(_validation_message(error)) from None
    cluster = LocalCluster.start(config)
    print(cluster.instructions(), flush=True)
    return 0


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or settings_from_env().get("state_dir") or DEFAULT_STATE_DIR)


def cmd_down(args: argparse.Namespace) -> int:
    cluster = LocalCluster.from_state_dir(_state_dir(args))
    if cluster is None:
        print(f"not running (no {_state_dir(args) / STATE_FILE})")
        return 0
    cluster.down()
    print(f"stopped; logs kept in {cluster.state_dir} (*.log)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cluster = LocalCluster.from_state_dir(_state_dir(args))
    if cluster is None:
        print(f"not running (no {_state_dir(args) / STATE_FILE})")
        return 0
    print(cluster.status())
    return 0


def add_cluster_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cluster local up | down | status`` on the ``medkd`` command line."""
    cluster = subparsers.add_parser("cluster", help="a multi-node Ray cluster on this machine")
    kinds = cluster.add_subparsers(dest="cluster_kind", required=True, metavar="KIND")
    local = kinds.add_parser("local", help="head + worker nodes on this machine (loopback, or --netns)")
    actions = local.add_subparsers(dest="cluster_action", required=True, metavar="ACTION")

    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"pids, token, logs, Ray temp dirs (default $MEDKD_CLUSTER_DIR or {DEFAULT_STATE_DIR})",
    )

    up = actions.add_parser("up", parents=[state], help="start the cluster and its Redis; print how to use it")
    up.add_argument("--netns", action="store_true", help="one network namespace per node on a private bridge (root)")
    up.add_argument("--workers", type=int, default=None, help="worker nodes (default 2)")
    up.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per worker node (default 1)")
    up.add_argument(
        "--gpus-per-worker",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="declared GPUs of worker 1, 2, ... (default 0)",
    )
    up.add_argument("--head-cpus", type=float, default=None, help="CPUs of the head (default 0: drivers only)")
    up.add_argument("--shared-dir", type=Path, default=None, help="outputs every node sees (default STATE/shared)")
    up.add_argument("--no-redis", action="store_true", help="do not start the soft-label Redis")
    up.set_defaults(handler=cmd_up)
    actions.add_parser("down", parents=[state], help="stop every node and the Redis; remove the network").set_defaults(
        handler=cmd_down
    )
    actions.add_parser("status", parents=[state], help="nodes alive, Redis, dashboard").set_defaults(handler=cmd_status)
