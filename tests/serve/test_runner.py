"""The replica's model thread (medkd.serve.runner.ModelRunner): order, errors, cancellation."""

from __future__ import annotations

import asyncio
import threading

import pytest

from medkd.serve.runner import ModelRunner


@pytest.fixture
def runner():
    runner = ModelRunner("test")
    yield runner
    runner.close()


def test_calls_run_in_one_thread_in_the_order_they_were_queued(runner):
    seen: list[tuple[int, int]] = []

    def call(index: int) -> int:
        seen.append((index, threading.get_ident()))
        return index * index

    async def main() -> list[int]:
        return await asyncio.gather(*(runner.run(call, index) for index in range(20)))

    assert asyncio.run(main()) == [index * index for index in range(20)]
    assert [index for index, _ in seen] == list(range(20))
    assert len({thread for _, thread in seen}) == 1 and seen[0][1] != threading.get_ident()


def test_an_error_in_a_call_reaches_its_caller_and_the_next_call_still_runs(runner):
    def fail() -> None:
        raise ValueError("bad batch")

    async def main() -> int:
        with pytest.raises(ValueError, match="bad batch"):
            await runner.run(fail)
        return await runner.run(len, [1, 2])

    assert asyncio.run(main()) == 2
    with pytest.raises(ValueError, match="bad batch"):
        runner.submit(fail).result(timeout=5)


def test_a_call_whose_caller_gave_up_before_it_started_is_skipped(runner):
    release = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        blocker = runner.submit(release.wait, 5)  # holds the model thread
        waiting = asyncio.ensure_future(runner.run(ran.append, "late"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiting), timeout=0.05)
        waiting.cancel()  # a request timeout cancels the caller
        await asyncio.sleep(0)
        release.set()
        assert blocker.result(timeout=5) is True
        assert await runner.run(ran.append, "next") is None

    asyncio.run(main())
    assert ran == ["next"]
