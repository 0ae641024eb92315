"""The managed redis-server (real processes) and connect()."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from medkd.softlabels.redis_client import RedisConnectionError, connect, redact_url
from medkd.softlabels.redis_server import (
    CONFIG_FILE,
    STATE_FILE,
    ManagedRedisServer,
    RedisServerError,
    RedisServerNotFound,
    default_home,
)
from tests.conftest import REPO_ROOT, free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_session_server_is_local_password_protected_and_persistent(redis_server: ManagedRedisServer) -> None:
    client = connect(redis_server.url)
    config = client.config_get("*")
    assert config["bind"] == "127.0.0.1"
    assert config["protected-mode"] == "yes"
    assert config["maxmemory-policy"] == "volatile-lru"
    assert config["appendonly"] == "no" and config["save"]  # RDB snapshots configured
    assert Path(config["dir"]).resolve() == redis_server.data_dir.resolve()
    assert redis_server.url.startswith("redis://:") and f"@127.0.0.1:{redis_server.port}/0" in redis_server.url
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_server.port).ping()


def test_secrets_are_private_and_not_on_the_command_line(redis_server: ManagedRedisServer) -> None:
    for name in (STATE_FILE, CONFIG_FILE):
        mode = stat.S_IMODE((redis_server.data_dir / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    cmdline = Path(f"/proc/{redis_server.pid}/cmdline").read_bytes().decode(errors="replace")
    assert redis_server.password and redis_server.password not in cmdline
    state = json.loads((redis_server.data_dir / STATE_FILE).read_text())
    assert state["url"] == redis_server.url and state["pid"] == redis_server.pid


def test_data_survives_stop_and_start(tmp_path: Path) -> None:
    with ManagedRedisServer(data_dir=tmp_path) as server:
        first_pid = server.pid
        connect(server.url).set("kept", b"across restarts")
    assert not _alive(first_pid)
    assert not (tmp_path / STATE_FILE).exists() and (tmp_path / "dump.rdb").exists()
    with ManagedRedisServer(data_dir=tmp_path) as server:
        assert server.pid != first_pid
        assert connect(server.url).get("kept") == b"across restarts"


def test_a_relative_data_dir_starts_and_keeps_its_files_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with ManagedRedisServer(data_dir=Path("run") / "redis") as server:
        assert server.data_dir == tmp_path / "run" / "redis"
        connect(server.url).set("k", b"v")
        assert (tmp_path / "run" / "redis" / "redis.log").is_file()


def test_second_instance_attaches_and_only_the_owner_stops(tmp_path: Path) -> None:
    owner = ManagedRedisServer(data_dir=tmp_path).start()
    try:
        other = ManagedRedisServer(data_dir=tmp_path).start()
        assert other.pid == owner.pid and other.url == owner.url
        assert owner.owner and not other.owner
        other.stop()
        assert _alive(owner.pid)
        connect(owner.url).ping()
    finally:
        pid = owner.pid
        owner.stop()
    assert not _alive(pid)


def test_orphaned_server_is_adopted_by_the_next_instance(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os
        from medkd.softlabels.redis_server import ManagedRedisServer
        server = ManagedRedisServer(data_dir={str(tmp_path)!r}).start()
        print(server.pid, flush=True)
        os._exit(0)  # die without stopping it
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    orphan_pid = int(result.stdout.split()[0])
    assert _alive(orphan_pid)
    adopter = ManagedRedisServer(data_dir=tmp_path).start()
    try:
        assert adopter.pid == orphan_pid and adopter.owner
    finally:
        adopter.stop()
    assert not _alive(orphan_pid)


def test_missing_executable_gives_install_hint(tmp_path: Path) -> None:
    with pytest.raises(RedisServerNotFound, match="apt-get install -y redis-server") as info:
        ManagedRedisServer(data_dir=tmp_path, executable="no-such-redis-server").start()
    assert "cache.redis_url" in str(info.value)


def test_a_server_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RedisServerError, match="(?s)exited with code.*Last log lines"):
            ManagedRedisServer(data_dir=tmp_path, port=port).start()
    assert not (tmp_path / STATE_FILE).exists()


def test_bad_constructor_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        ManagedRedisServer(data_dir=tmp_path, port=70000)
    with pytest.raises(ValueError, match="password"):
        ManagedRedisServer(data_dir=tmp_path, password="has space")
    with pytest.raises(RedisServerError, match="not started"):
        _ = ManagedRedisServer(data_dir=tmp_path).url


def test_default_home_follows_medkd_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDKD_HOME", str(tmp_path))
    assert default_home() == tmp_path
    assert ManagedRedisServer().data_dir == tmp_path / "redis"
    monkeypatch.delenv("MEDKD_HOME")
    assert default_home() == Path.home() / ".cache" / "medkd"


def test_connect_takes_the_password_from_an_env_var(
    redis_server: ManagedRedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = f"redis://127.0.0.1:{redis_server.port}/0"
    monkeypatch.setenv("MEDKD_TEST_REDIS_PASSWORD", redis_server.password)
    assert connect(bare, password_env="MEDKD_TEST_REDIS_PASSWORD").ping()
    monkeypatch.setenv("MEDKD_TEST_REDIS_PASSWORD", "wrong-password")
    with pytest.raises(RedisConnectionError, match="rejected the credentials") as info:
        connect(bare, password_env="MEDKD_TEST_REDIS_PASSWORD")
    assert "wrong-password" not in str(info.value)
    monkeypatch.delenv("MEDKD_TEST_REDIS_PASSWORD")
    with pytest.raises(ValueError, match="MEDKD_TEST_REDIS_PASSWORD"):
        connect(bare, password_env="MEDKD_TEST_REDIS_PASSWORD")


def test_connect_rejects_bad_urls_clearly() -> None:
    with pytest.raises(ValueError, match="redis://, rediss:// or unix://"):
        connect("http://127.0.0.1:6379")
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisConnectionError, match="cannot connect to Redis at redis://:\\*\\*\\*@127.0.0.1") as info:
        connect(url, retries=1)
    assert "s3cret" not in str(info.value)


def test_rediss_url_is_accepted_without_connecting() -> None:
    client = connect("rediss://:pw@cache.example:6380/2", check=False)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["host"] == "cache.example" and kwargs["port"] == 6380 and kwargs["db"] == 2
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"


def test_unix_socket_url(tmp_path: Path) -> None:
    with pytest.raises(RedisConnectionError, match="unix://"):
        connect(f"unix://{tmp_path}/missing.sock", retries=0)


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://user:pw@h/0") == "rediss://user:***@h/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
