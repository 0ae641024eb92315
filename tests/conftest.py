"""Shared fixtures: one real local Ray cluster and one real redis-server per test session.

Tests that are not about Ray's token authentication run their cluster with auth disabled
(token auth is on by default in ray 2.60).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from medkd.serve.ha_proxy import HTTP_CALLBACK, HTTP_CALLBACK_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = Path(os.environ.get("MEDKD_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


#: Fixtures that start or need a real service or a data file: a test using one is an integration test.
INTEGRATION_FIXTURES = frozenset({"ray_session", "redis_server", "redis_url", "breastmnist_path"})
#: pytest-timeout limit of a test marked ``slow`` without a ``timeout`` mark of its own (the
#: default for every other test is ``timeout`` in pyproject.toml).
SLOW_TEST_TIMEOUT_S = 900


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses a real-service fixture ``integration`` (``make test-fast`` leaves
    those and ``slow`` tests out; tests that start a service themselves carry the mark explicitly),
    and give ``slow`` tests without a ``timeout`` mark the longer :data:`SLOW_TEST_TIMEOUT_S`."""
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every socket stays bound until all are picked (separate
    :func:`free_port` calls may hand out the same just-released port twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster (2 CPUs, dashboard on) shared by the whole test session."""
    import ray

    if not ray.is_initialized():
        # As `medkd serve` starts its own Ray: Serve's HTTP servers get medkd's middlewares.
        os.environ.setdefault(HTTP_CALLBACK_ENV, HTTP_CALLBACK)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server started and owned by medkd, on 127.0.0.1 with a password."""
    from medkd.softlabels.redis_server import ManagedRedisServer

    server = ManagedRedisServer(data_dir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def breastmnist_path() -> Path:
    return shared_data_file("breastmnist.npz")


def shared_data_file(name: str, data_dir: Path | None = None) -> Path:
    """A real data file of the shared data folder. CI has the folder (``CI`` set): there a missing
    file fails the test that needs it; a developer's machine without the data skips the test."""
    path = (data_dir or SHARED_DATA_DIR) / name
    if not path.exists():
        message = f"real data file not found at {path} (set MEDKD_DATA_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
