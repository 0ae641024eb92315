"""Fixtures for tests on a multi-node cluster whose nodes meet only over the network.

``netns_cluster`` is one head and two 1-CPU worker nodes, each in its own network namespace with
its own address on a private bridge, plus the cluster's Redis beside the head
(:class:`medkd.cli.cluster.NetnsCluster`), shared by every test of ``tests/cluster`` (it starts
with the first that asks for it and is taken down after the package's last test: a start costs
15-25 s). Each test gets it whole: what an earlier test killed (a worker node, the Redis) is
restarted first.

A machine that refuses network namespaces fails these tests with the reason; they do not skip.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medkd.cli.cluster import LocalCluster, NetnsCluster, namespaces_available
from tests.cluster.netns_faults import make_whole


def _short_state_dir() -> Path:
    # Ray's unix socket paths live below the state dir and are limited to 107 bytes, so it
    # cannot be pytest's tmp_path.
    return Path(tempfile.mkdtemp(prefix="mkdc", dir="/tmp"))


def _up(**kwargs: Any) -> LocalCluster:
    reason = namespaces_available()
    if reason is not None:
        pytest.fail(f"this machine refuses network namespaces: {reason}")
    return NetnsCluster.up(state_dir=kwargs.pop("state_dir", None) or _short_state_dir(), **kwargs)


def _down(cluster: LocalCluster) -> None:
    try:
        cluster.down()
    finally:
        shutil.rmtree(cluster.state_dir, ignore_errors=True)


@pytest.fixture(scope="package")
def shared_netns_cluster() -> Iterator[LocalCluster]:
    """Head (0 CPUs) + 2 worker nodes (1 CPU each), each in its own namespace, with the Redis."""
    cluster = _up(workers=2, cpus_per_worker=1)
    try:
        yield cluster
    finally:
        _down(cluster)


@pytest.fixture
def netns_cluster(shared_netns_cluster: LocalCluster) -> LocalCluster:
    """The shared cluster, with every node and the Redis alive (restarted if a test killed them)."""
    make_whole(shared_netns_cluster)
    return shared_netns_cluster
