"""A redis-server started and owned by medkd (connecting to any Redis by URL is :mod:`medkd.softlabels.redis_client`).

When a job spec gives no ``cache.redis_url``, medkd runs its own redis-server, the way
``ray.init()`` starts a local cluster:

* It binds ``127.0.0.1`` only, with ``protected-mode yes`` and a password generated with
  :func:`secrets.token_urlsafe`. The password lives in a ``0600`` config file handed to
  redis-server (never on its command line, where ``ps`` would show it) and in a ``0600``
  state file next to it.
* ``--dir data_dir`` makes the data outlive the process: an RDB snapshot is written on
  shutdown (``SHUTDOWN SAVE``) and periodically (``save 3600 1 300 100 60 10000``). The
  default ``data_dir`` is ``default_home() / "redis"``.
* **Eviction.** ``maxmemory-policy volatile-lru``: only keys that carry a TTL can be
  evicted. The soft-label cache gives its data chunks a (long) TTL and its manifests none,
  so under memory pressure Redis evicts chunks and never a manifest. A reader that meets a
  manifest whose chunks were evicted gets a ``CacheIntegrityError`` and recomputes (see
  :mod:`medkd.softlabels.store`). ``maxmemory`` defaults to half of physical memory.
* **One server per data_dir.** Starting takes an exclusive ``flock`` on
  ``data_dir/medkd-redis.lock`` for the duration of the decision. If the state file names a
  live server that answers PING with its password, this instance *attaches* to it instead of
  starting a second one. Only the owner stops the server; an attached instance's ``stop()``
  just drops its connection. If the owner process died and left the server running, the
  next instance adopts it (becomes owner).

Examples:
    >>> with ManagedRedisServer(data_dir=tmp_dir) as server:   # doctest: +SKIP
    ...     client = connect(server.url)
    ...     client.set("k", b"v")
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from medkd.softlabels.redis_client import connect

logger = logging.getLogger(__name__)

STATE_FILE = "medkd-redis.json"
CONFIG_FILE = "medkd-redis.conf"
LOCK_FILE = "medkd-redis.lock"
LOG_FILE = "redis.log"
RDB_FILE = "dump.rdb"

_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 30.0
_PORT_ATTEMPTS = 3


class RedisServerError(RuntimeError):
    """The managed redis-server could not be started, reached or stopped."""


class RedisServerNotFound(RedisServerError):
    """The redis-server executable is not installed."""


def default_home() -> Path:
    """medkd's per-user state directory: ``$MEDKD_HOME`` or ``~/.cache/medkd``."""
    env = os.environ.get("MEDKD_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medkd"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid_alive(pid: int | None) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (it holds a password)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _default_maxmemory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 0


def _probe_client(port: int, password: str | None, timeout: float = 1.0) -> redis.Redis:
    """A client for health checks and SHUTDOWN: no retries (the caller polls or waits)."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=1.0,
        retry=Retry(EqualJitterBackoff(), 0),
    )


class ManagedRedisServer:
    """A local redis-server owned by medkd (see the module docstring for the design).

    Args:
        data_dir: where the RDB snapshot, log, config and state files live. Default
            ``default_home() / "redis"``.
        port: TCP port on 127.0.0.1; default: a free port.
        password: default: generated with ``secrets.token_urlsafe(32)``.
        executable: the redis-server binary (name on ``$PATH`` or a path).
        maxmemory: bytes (int) or a Redis size string such as ``"2gb"``; default half of
            physical memory. ``0`` means no limit.
        save_points: RDB snapshot rules, ``(seconds, changes)`` pairs.

    Examples:
        >>> server = ManagedRedisServer(data_dir=Path("/tmp/x")).start()  # doctest: +SKIP
        >>> server.url                                                  # doctest: +SKIP
        'redis://:...@127.0.0.1:40213/0'
        >>> server.stop()                                               # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        port: int | None = None,
        password: str | None = None,
        executable: str = "redis-server",
        *,
        maxmemory: int | str | None = None,
        save_points: tuple[tuple[int, int], ...] = ((3600, 1), (300, 100), (60, 10000)),
    ) -> None:
        if port is not None and not (0 < int(port) < 65536):
            raise ValueError(f"port must be in 1..65535, got {port!r}")
        if password is not None and (not password or any(c.isspace() for c in password)):
            raise ValueError("password must be a non-empty string without whitespace")
        if not executable:
            raise ValueError("executable must name the redis-server binary")
        # Absolute: redis-server changes into --dir before it opens the log file named in its config.
        self.data_dir = (Path(data_dir).expanduser() if data_dir is not None else default_home() / "redis").resolve()
        self._requested_port = int(port) if port is not None else None
        self._requested_password = password
        self.executable = executable
        self.maxmemory = _default_maxmemory() if maxmemory is None else maxmemory
        self.save_points = save_points
        self.port: int | None = None
        self.password: str | None = None
        self.owner = False
        self._pid: int | None = None
        self._process: subprocess.Popen | None = None

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/0`` (contains the password; do not log it)."""
        if self.port is None:
            raise RedisServerError("the managed redis-server is not started; call start() first")
        return f"redis://:{urllib.parse.quote(self.password or '', safe='')}@127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Process id of the redis-server (owned or attached), None before start()."""
        return self._pid

    @property
    def running(self) -> bool:
        return self._pid is not None and _pid_alive(self._pid)

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def __repr__(self) -> str:
        state = "owner" if self.owner else ("attached" if self._pid else "stopped")
        return f"ManagedRedisServer(data_dir={str(self.data_dir)!r}, port={self.port}, {state})"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ManagedRedisServer:
        """Start redis-server, or attach to the live one that already owns ``data_dir``."""
        if self._pid is not None and self.running:
            return self
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise RedisServerError(f"data_dir {self.data_dir} exists and is not a directory")
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RedisServerError(f"cannot create data_dir {self.data_dir}: {error}") from error
        with self._locked():
            state = self._read_state()
            if state is not None and self._attach(state):
                return self
            executable = self._resolve_executable()
            last_error: Exception | None = None
            for _ in range(_PORT_ATTEMPTS if self._requested_port is None else 1):
                try:
                    self._launch(executable)
                    break
                except _PortInUse as error:
                    last_error = error
            else:
                raise RedisServerError(f"could not bind a free port for redis-server: {last_error}")
            self._write_state()
        return self

    def stop(self) -> None:
        """Owner: ``SHUTDOWN SAVE`` and wait for exit. Attached: just forget the server."""
        if self._pid is None:
            return
        if not self.owner:
            self._forget()
            return
        with self._locked():
            if _pid_alive(self._pid):
                try:
                    _probe_client(self.port, self.password, timeout=_STOP_TIMEOUT_S).shutdown(save=True)
                except redis.RedisError as error:
                    logger.warning("SHUTDOWN SAVE failed (%s); terminating redis-server pid %s", error, self._pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self._pid, 15)  # SIGTERM also saves the RDB when save points are set
                self._wait_exit(_STOP_TIMEOUT_S)
            state = self._read_state()
            if state is None or state.get("pid") == self._pid:
                for name in (STATE_FILE, CONFIG_FILE):
                    with contextlib.suppress(FileNotFoundError):
                        (self.data_dir / name).unlink()
        self._forget()

    def kill(self) -> None:
        """SIGKILL the server without saving (for fault-injection tests)."""
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, 9)
            self._wait_exit(10.0)

    def __enter__(self) -> ManagedRedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this server (with retry/backoff)."""
        return connect(self.url, **kwargs)

    # ------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read_state(self) -> dict[str, Any] | None:
        path = self.data_dir / STATE_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable redis state file %s: %s", path, error)
            return None

    def _write_state(self) -> None:
        state = {
            "pid": self._pid,
            "port": self.port,
            "password": self.password,
            "url": self.url,
            "owner_pid": os.getpid(),
            "started_at": time.time(),
        }
        _write_private(self.data_dir / STATE_FILE, json.dumps(state, indent=2))

    def _attach(self, state: dict[str, Any]) -> bool:
        pid, port, password = state.get("pid"), state.get("port"), state.get("password")
        if not _pid_alive(pid) or not port:
            return False
        try:
            _probe_client(port, password).ping()
        except redis.RedisError:
            return False
        if self._requested_port not in (None, port):
            logger.warning(
                "redis-server for %s already runs on port %s; ignoring requested port %s",
                self.data_dir,
                port,
                self._requested_port,
            )
        self._pid, self.port, self.password = pid, port, password
        self.owner = not _pid_alive(state.get("owner_pid"))
        if self.owner:
            logger.info("adopting orphaned redis-server pid %s for %s", pid, self.data_dir)
            self._write_state()
        else:
            logger.info("attached to redis-server pid %s (owned by pid %s)", pid, state.get("owner_pid"))
        return True

    def _resolve_executable(self) -> str:
        found = shutil.which(self.executable)
        if found is None:
            raise RedisServerNotFound(
                f"redis-server executable {self.executable!r} not found on PATH. Install it "
                "(Debian/Ubuntu: `apt-get install -y redis-server`); without root, ask an "
                "administrator, or point medkd at an existing server with cache.redis_url "
                "in the job spec."
            )
        return found

    def _config_text(self, port: int, password: str) -> str:
        save = " ".join(f"{seconds} {changes}" for seconds, changes in self.save_points) or '""'
        return "\n".join(
            [
                "# generated by medkd; contains the password, mode 0600",
                "bind 127.0.0.1",
                f"port {port}",
                "protected-mode yes",
                f'requirepass "{password}"',
                f'dir "{self.data_dir.resolve()}"',
                f"dbfilename {RDB_FILE}",
                f"logfile {LOG_FILE}",
                "daemonize no",
                f"save {save}",
                "rdbcompression yes",
                "rdbchecksum yes",
                "stop-writes-on-bgsave-error yes",
                "appendonly no",
                f"maxmemory {self.maxmemory}",
                "maxmemory-policy volatile-lru",
                "tcp-keepalive 60",
                "timeout 0",
                "databases 16",
                "",
            ]
        )

    def _launch(self, executable: str) -> None:
        port = self._requested_port or _free_port()
        password = self._requested_password or secrets.token_urlsafe(32)
        config = self.data_dir / CONFIG_FILE
        _write_private(config, self._config_text(port, password))
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        process = subprocess.Popen(
            [executable, str(config)],
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C in the terminal must not kill it mid-save
        )
        self._process, self._pid, self.port, self.password = process, process.pid, port, password
        client = _probe_client(port, password)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            code = process.poll()
            if code is not None:
                stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                log = self._log_since(log_offset)
                self._forget()
                message = f"{stderr}\n{log}".strip()
                if "Address already in use" in message and self._requested_port is None:
                    raise _PortInUse(message)
                raise RedisServerError(
                    f"redis-server exited with code {code} while starting (data_dir={self.data_dir}).\n"
                    f"Last log lines:\n{message or '(empty)'}"
                )
            try:
                client.ping()
                break
            except redis.BusyLoadingError:
                pass  # loading a large RDB; keep waiting
            except redis.RedisError:
                pass
            if time.monotonic() > deadline and process.poll() is None:
                self.kill()
                log = self._log_since(log_offset)
                self._forget()
                raise RedisServerError(
                    f"redis-server did not answer PING within {_START_TIMEOUT_S:.0f}s "
                    f"(data_dir={self.data_dir}).\nLast log lines:\n{log}"
                )
            time.sleep(0.05)
        if process.stderr:
            process.stderr.close()
        self.owner = True
        logger.info("started redis-server pid %s on 127.0.0.1:%s (data_dir=%s)", process.pid, port, self.data_dir)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(offset)
                text = handle.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-20:]) or "(no log)"

    def _wait_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=timeout)
                return
        while _pid_alive(self._pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(self._pid):
            raise RedisServerError(f"redis-server pid {self._pid} did not exit within {timeout:.0f}s")

    def _forget(self) -> None:
        self._pid = None
        self._process = None
        self.owner = False


class _PortInUse(RedisServerError):
    pass
