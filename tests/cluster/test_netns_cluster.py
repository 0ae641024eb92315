"""The namespace cluster itself: nodes with their own addresses that meet only over the bridge,
the Redis beside the head, node and Redis faults, and a clean ``down``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from medkd.cli.cluster import REDIS_PASSWORD_ENV, ClusterError, ClusterSettings, LocalCluster
from tests.conftest import REPO_ROOT

# Each cluster start takes 40-60 s, and minutes on a loaded machine (Ray's own waits and restarts).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROBE = textwrap.dedent(
    """
    import json, os, ray
    ray.init()
    @ray.remote(num_cpus=1)
    def where(url):
        import redis
        # the password is in every node's environment; the URL comes from the driver
        client = redis.Redis.from_url(url, password=os.environ["MEDKD_REDIS_PASSWORD"], socket_connect_timeout=2)
        client.set("probe:" + ray.util.get_node_ip_address(), b"1")
        return ray.util.get_node_ip_address()
    print(json.dumps(sorted(set(ray.get([where.remote(os.environ['PROBE_REDIS_URL']) for _ in range(8)])))))
    """
)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _namespace_view(namespace: str) -> tuple[list[str], str]:
    links = json.loads(
        subprocess.run(["ip", "-j", "-n", namespace, "-4", "addr"], capture_output=True, text=True, check=True).stdout
    )
    routes = subprocess.run(["ip", "-n", namespace, "route"], capture_output=True, text=True, check=True).stdout
    addresses = [info["local"] for link in links for info in link.get("addr_info", [])]
    return addresses, routes


def test_each_node_has_its_own_address_and_no_way_out(netns_cluster):
    addresses = netns_cluster.node_addresses
    assert len(set(addresses)) == 3 and all(a.startswith("10.213.") for a in addresses)
    assert sorted(netns_cluster.alive_node_addresses()) == sorted(addresses)
    for node in netns_cluster.state.nodes:
        own, routes = _namespace_view(node.namespace)
        assert sorted(own) == sorted(["127.0.0.1", node.address])
        assert "default" not in routes  # nothing can leave the private subnet
    resources = {n["node_ip"]: n["resources_total"].get("CPU", 0) for n in netns_cluster.alive_nodes()}
    assert resources == {addresses[0]: 0, addresses[1]: 1, addresses[2]: 1}


def test_tasks_run_on_both_workers_and_reach_the_redis_over_the_bridge(netns_cluster, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = netns_cluster.run_on_node(
        0,
        [sys.executable, str(probe)],
        timeout=120,
        capture_output=True,
        text=True,
        env={"PROBE_REDIS_URL": netns_cluster.redis_url},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    workers = netns_cluster.node_addresses[1:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == sorted(workers)
    client = redis.Redis.from_url(netns_cluster.redis_url, password=netns_cluster.redis_password)
    assert {key.decode() for key in client.keys("probe:*")} == {f"probe:{w}" for w in workers}


def test_redis_listens_only_on_the_head_address(netns_cluster):
    """Inside a worker's namespace 127.0.0.1 is that worker's own loopback: nothing listens there."""
    script = (
        "import redis,sys\n"
        "try:\n redis.Redis(host='127.0.0.1', port=int(sys.argv[1]), socket_connect_timeout=2).ping()\n"
        "except redis.ConnectionError: print('refused')\n"
    )
    done = netns_cluster.run_on_node(
        1,
        [sys.executable, "-c", script, str(netns_cluster.state.redis.port)],
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert done.stdout.strip() == "refused", done.stderr
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(netns_cluster.redis_url, password="wrong").ping()
    config = redis.Redis.from_url(netns_cluster.redis_url, password=netns_cluster.redis_password).config_get("*")
    assert config["bind"] == netns_cluster.head_address
    assert config["maxmemory-policy"] == "volatile-lru" and int(config["maxmemory"]) > 0
    assert config["save"]  # persistence on


def test_dashboard_needs_the_token(netns_cluster):
    url = f"{netns_cluster.dashboard_url}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {netns_cluster.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert netns_cluster.client_env()["RAY_AUTH_TOKEN_PATH"] == str(netns_cluster.token_file)
    assert oct(netns_cluster.token_file.stat().st_mode & 0o777) == "0o600"
    assert netns_cluster.node_env()[REDIS_PASSWORD_ENV] == netns_cluster.redis_password


def test_killed_worker_leaves_the_cluster_and_comes_back(netns_cluster):
    # The package's cluster (no start of its own): the next test gets it whole again.
    cluster = netns_cluster
    worker = cluster.node_addresses[2]
    killed = cluster.kill_node(2)
    assert killed and not cluster.node_pids(2)
    assert cluster.node_pids(1)  # the other worker is untouched
    with pytest.raises(ClusterError, match="would kill the head"):
        cluster.kill_node(0)
    # Ray notices a lost node within its health-check period (bounded wait).
    import time

    deadline = time.monotonic() + 90
    while worker in cluster.alive_node_addresses() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert worker not in cluster.alive_node_addresses()
    cluster.restart_node(2)
    assert worker in cluster.alive_node_addresses()

    # The Redis: data written before a clean stop survives a restart; a SIGKILLed one restarts.
    client = redis.Redis.from_url(cluster.redis_url, password=cluster.redis_password)
    client.set("kept", b"yes")
    cluster.stop_redis()
    assert not cluster.redis_alive()
    cluster.restart_redis()
    assert client.get("kept") == b"yes"
    cluster.kill_redis()
    assert not cluster.redis_alive()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(cluster.redis_url, password=cluster.redis_password, socket_connect_timeout=2).ping()
    cluster.restart_redis()
    assert cluster.redis_alive()


def test_cli_up_status_down_removes_every_trace(tmp_path):
    state_dir = Path("/tmp") / f"mkdcli{os.getpid()}"
    medkd = [sys.executable, "-m", "medkd.cli.main", "cluster", "local"]
    up = subprocess.run(
        [*medkd, "up", "--netns", "--workers", "1", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        cluster = LocalCluster.from_state_dir(state_dir)
        assert f"export RAY_AUTH_TOKEN_PATH={state_dir}/auth_token" in up.stdout
        assert f"cache.redis_url:      {cluster.redis_url}" in up.stdout
        assert f"cache.password_env:   {REDIS_PASSWORD_ENV}" in up.stdout
        status = subprocess.run(
            [*medkd, "status", "--state-dir", str(state_dir)], capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0 and "ray: 2 node(s) alive" in status.stdout, status.stdout
        assert status.stdout.count("ray: ALIVE") == 2
        pids = cluster.node_pids(0) | cluster.node_pids(1)
        names = [node.namespace for node in cluster.state.nodes] + [cluster.state.bridge]
        assert pids
    finally:
        down = subprocess.run(
            [*medkd, "down", "--state-dir", str(state_dir)], capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in pids if _running(pid)]
    assert not any(Path("/var/run/netns", name).exists() for name in names[:-1])
    assert not Path("/sys/class/net", names[-1]).exists()
    assert not (state_dir / "cluster.json").exists()
    again = subprocess.run([*medkd, "down", "--state-dir", str(state_dir)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "not running" in again.stdout
    subprocess.run(["rm", "-rf", str(state_dir)], check=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "-1"], "workers: Input should be greater than or equal to 0"),
        (["--state-dir", "/tmp/" + "x" * 60], "is too long for Ray's unix socket paths"),
    ],
)
def test_cli_up_refuses_bad_settings_before_starting(args, message):
    done = subprocess.run(
        [sys.executable, "-m", "medkd.cli.main", "cluster", "local", "up", "--netns", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert not Path("/tmp/" + "x" * 60).exists()


def test_ports_in_rays_worker_range_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match="MEDKD_DASHBOARD_PORT=15000 lies in Ray's worker port range"):
        ClusterSettings(dashboard_port=15000)
    with pytest.raises(ClusterError, match="MEDKD_REDIS_PORT=12000 lies in Ray's worker port range"):
        LocalCluster.up(workers=1, netns=True, state_dir="/tmp/mkdnever", redis_port=12000)
    assert not Path("/tmp/mkdnever").exists()


def test_loopback_mode_runs_the_same_code_without_namespaces():
    """Without --netns every node is on 127.0.0.1 with its own ports; down ends every process."""
    state_dir = Path("/tmp") / f"mkdlo{os.getpid()}"
    cluster = LocalCluster.up(
        workers=1,
        netns=False,
        state_dir=state_dir,
        gcs_port=26579,
        dashboard_port=28465,
        base_port=26600,
        redis_port=26590,
    )
    try:
        assert cluster.node_addresses == ["127.0.0.1", "127.0.0.1"]
        assert cluster.state.subnet is None and all(node.namespace is None for node in cluster.state.nodes)
        assert len(cluster.alive_nodes()) == 2
        assert cluster.redis_url == "redis://127.0.0.1:26590/0" and cluster.redis_alive()
        pids = cluster.node_pids(0) | cluster.node_pids(1)
        assert cluster.node_pids(1) and not cluster.node_pids(1) & cluster.node_pids(0)
    finally:
        cluster.down()
    assert not [pid for pid in pids if _running(pid)]
    subprocess.run(["rm", "-rf", str(state_dir)], check=True)
