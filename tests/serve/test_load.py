"""The endpoint under load and faults, over real Serve and HTTP with a bounded asyncio client:
autoscaling 1 -> 2 -> 1 without one failed request, and a replica SIGKILLed mid-load costing at
most 1 % of the requests, with correct answers afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from medkd.serve.app import DEPLOYMENT_NAME, deploy, undeploy
from medkd.serve.codecs import encode_npy
from medkd.spec.serve import ServeConfig
from tests.conftest import free_port
from tests.serve.students import call, expected_probabilities, make_run, pid_alive, replica_pids, running_replicas

pytestmark = pytest.mark.slow

APP = "medkd-test-load"
PHASE_LIMIT_S = 90.0
IMAGE = np.random.default_rng(5).integers(0, 256, (28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    run_dir, ids = make_run(tmp_path_factory.mktemp("run"), 1)
    config = ServeConfig(
        port=free_port(),
        route_prefix="/load",
        min_replicas=1,
        max_replicas=2,
        cpus_per_replica=0.2,
        target_ongoing_requests=1,
        max_ongoing_requests=8,
        max_batch_size=4,
        batch_wait_timeout_s=0.002,
        upscale_delay_s=1,
        downscale_delay_s=3,
        metrics_interval_s=0.5,
        look_back_period_s=2,
    )
    url = deploy(run_dir, config, app_name=APP)
    try:
        yield url, run_dir / "models" / ids[0]
    finally:
        undeploy(APP)


class Load:
    """``clients`` keep-alive clients POSTing one image as fast as answered, in counted phases."""

    def __init__(self, url: str) -> None:
        self.url = url + "/predict"
        self.body = encode_npy(IMAGE)
        self.phase = "start"
        self.outcomes: dict[str, Counter] = {}
        self.clients = 0
        self.stop = False

    async def client(self, session: aiohttp.ClientSession, index: int) -> None:
        while not self.stop:
            if index >= self.clients:
                await asyncio.sleep(0.05)
                continue
            phase = self.phase
            try:
                async with session.post(
                    self.url, data=self.body, headers={"Content-Type": "application/x-npy"}
                ) as answer:
                    await answer.read()
                    outcome = answer.status
            except (TimeoutError, aiohttp.ClientError) as error:
                outcome = type(error).__name__
            self.outcomes.setdefault(phase, Counter())[outcome] += 1

    def failed(self, phase: str) -> int:
        return sum(count for outcome, count in self.outcomes.get(phase, Counter()).items() if outcome != 200)

    def total(self, phase: str) -> int:
        return sum(self.outcomes.get(phase, Counter()).values())


async def wait_for(predicate, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return True
        await asyncio.sleep(0.5)
    return False


async def drive(url: str, scenario) -> Load:
    load = Load(url)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        workers = [asyncio.create_task(load.client(session, index)) for index in range(8)]
        try:
            await scenario(load)
        finally:
            load.stop = True
            await asyncio.gather(*workers)
    return load


def assert_answers_right(url: str, model_dir: Path) -> None:
    expected = expected_probabilities(model_dir, IMAGE[np.newaxis])[0]
    for _ in range(4):
        status, body, _ = call(url + "/predict", body=encode_npy(IMAGE), content_type="application/x-npy")
        assert status == 200 and np.max(np.abs(np.array(json.loads(body)["probabilities"]) - expected)) < 1e-5


def test_autoscaling_up_to_two_replicas_and_back_without_a_failed_request(served):
    url, model_dir = served
    reached: dict[str, bool] = {}

    async def scenario(load: Load) -> None:
        load.phase, load.clients = "up", 8
        reached["two"] = await wait_for(lambda: running_replicas(APP, DEPLOYMENT_NAME) == 2, PHASE_LIMIT_S)
        await asyncio.sleep(2)
        load.phase, load.clients = "down", 1  # a trickle keeps flowing while a replica goes away
        reached["one"] = await wait_for(lambda: running_replicas(APP, DEPLOYMENT_NAME) == 1, PHASE_LIMIT_S)
        await asyncio.sleep(1)

    load = asyncio.run(drive(url, scenario))
    assert reached == {"two": True, "one": True}, (reached, load.outcomes)
    assert load.total("up") > 50 and load.total("down") > 5, load.outcomes
    assert load.failed("up") == 0 and load.failed("down") == 0, load.outcomes
    assert_answers_right(url, model_dir)


def test_a_replica_killed_under_load_costs_at_most_one_percent(served):
    url, model_dir = served
    killed: list[int] = []

    async def scenario(load: Load) -> None:
        load.phase, load.clients = "load", 4
        assert await wait_for(lambda: len(replica_pids(APP)) == 2, PHASE_LIMIT_S), "never scaled to 2 replicas"
        await asyncio.sleep(3)
        victim = replica_pids(APP)[0]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        assert await wait_for(lambda: not pid_alive(victim), 10)
        replaced = await wait_for(
            lambda: (
                len(pids := replica_pids(APP)) == 2
                and victim not in pids
                and running_replicas(APP, DEPLOYMENT_NAME) == 2
            ),
            PHASE_LIMIT_S,
        )
        assert replaced, "Serve did not replace the killed replica"
        await asyncio.sleep(3)

    load = asyncio.run(drive(url, scenario))
    assert killed and load.total("load") > 200, load.outcomes
    assert load.failed("load") <= 0.01 * load.total("load"), load.outcomes
    assert_answers_right(url, model_dir)
