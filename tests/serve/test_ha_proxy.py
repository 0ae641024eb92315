"""medkd serve's choice between Serve's HAProxy fast path and its Python proxy (no Ray started here;
tests/serve/test_lifecycle.py runs the fast path for real)."""

from __future__ import annotations

import os

import pytest

from medkd.serve import ha_proxy

HAPROXY_SOCKET_LIMIT = 97  # bytes; HAProxy refuses longer unix socket paths


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        *ha_proxy.SWITCHES,
        ha_proxy.OPT_OUT_ENV,
        "RAY_SERVE_HAPROXY_BINARY_PATH",
        "RAY_SERVE_HAPROXY_NBTHREAD",
        ha_proxy.HTTP_CALLBACK_ENV,
        ha_proxy.HAPROXY_METRICS_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    saved = dict(os.environ)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_enable_sets_the_switches_before_ray_starts_with_short_paths_and_free_ports(clean_env):
    assert ha_proxy.find_haproxy(), "no haproxy: run `sh scripts/ensure_haproxy.sh` (make test does)"
    setup = ha_proxy.enable(own_ray=True)
    try:
        assert setup.enabled and "fast path: HAProxy" in setup.message
        for name, value in setup.env.items():
            assert os.environ[name] == value
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert os.access(os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
        assert len(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"]) < HAPROXY_SOCKET_LIMIT - 20
        assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] != os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]
        # Serve's default of 4 HAProxy threads competes with the replica on a small machine.
        assert os.environ[ha_proxy.WORKER_NICENESS_ENV] == "0"  # replicas at normal CPU priority, not Ray's 15
        assert 1 <= int(os.environ["RAY_SERVE_HAPROXY_NBTHREAD"]) <= max(1, len(os.sched_getaffinity(0)) // 4)
        # medkd keeps the prediction routes' deadline in each replica (medkd.serve.deadline), and the
        # replica records Serve's HTTP metrics instead of HAProxy logging each request to HAProxyManager.
        assert os.environ[ha_proxy.HTTP_CALLBACK_ENV] == "medkd.serve.deadline:middlewares"
        assert os.environ[ha_proxy.HAPROXY_METRICS_ENV] == "0"
        assert setup.state_dir is not None and setup.state_dir.is_dir()
    finally:
        setup.close()
    assert not setup.state_dir.exists()


def test_opt_out_and_a_running_cluster_leave_the_environment_alone(clean_env):
    clean_env.setenv(ha_proxy.OPT_OUT_ENV, "0")
    opted_out = ha_proxy.enable(own_ray=True)
    assert not opted_out.enabled and f"{ha_proxy.OPT_OUT_ENV}=0" in opted_out.message
    # Serve's Python proxy drops a client's timeout header on the prediction routes (medkd.serve.deadline).
    assert os.environ[ha_proxy.HTTP_CALLBACK_ENV] == "medkd.serve.deadline:middlewares"
    clean_env.delenv(ha_proxy.OPT_OUT_ENV)
    cluster = ha_proxy.enable(own_ray=False)
    assert not cluster.enabled
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in cluster.message and "ray start" in cluster.message
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
    assert os.environ[ha_proxy.WORKER_NICENESS_ENV] == "0"  # set for the own Ray instance opted out above
    clean_env.setenv(ha_proxy.WORKER_NICENESS_ENV, "7")
    ha_proxy.enable(own_ray=True).close()
    assert os.environ[ha_proxy.WORKER_NICENESS_ENV] == "7"  # the caller's choice stays


def test_without_haproxy_the_fallback_says_how_to_get_the_fast_path(clean_env, tmp_path):
    clean_env.setenv("PATH", str(tmp_path))
    clean_env.setattr(ha_proxy, "SBIN_DIRS", ())
    setup = ha_proxy.enable(own_ray=True)
    assert not setup.enabled
    assert "haproxy not found" in setup.message and "scripts/ensure_haproxy.sh" in setup.message
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ


def test_a_caller_that_set_the_switch_is_respected(clean_env):
    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    setup = ha_proxy.enable(own_ray=True)
    assert setup.enabled and setup.state_dir is None and "set by the caller" in setup.message
