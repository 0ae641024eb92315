"""The replica's model thread: ONNX Runtime calls queued and run back to back.

A replica runs its event loop (HTTP, decoding, answers) and ONNX Runtime in different threads;
ONNX Runtime releases the GIL while it computes, so one request's inference overlaps the next
request's decoding and the previous one's answer. What must not happen is the model thread
waiting for the event loop between two calls. With ``loop.run_in_executor`` it does, on every
call: after a call, the worker thread wakes the loop (a write to the loop's self-pipe, which
releases the GIL) and must then take the GIL back before it may fetch the next call, while the
woken loop holds it for the finished request's answer. CPython hands the GIL over only when the
holder blocks or after the 5 ms switch interval, and a 64-image batch of a small student takes
about 1.3 ms on 2 cores, so even a fraction of that wait leaves the model idle.

:class:`ModelRunner` keeps the model thread off that path: it hands each result to a second,
notifier thread through a queue (no system call, the GIL stays with it), takes the next queued
call at once and starts it; the notifier wakes the event loop. Per call the model thread takes
the GIL once (ONNX Runtime's own return from its computation), instead of twice.

Examples:
    >>> runner = ModelRunner("doc")
    >>> asyncio.run(runner.run(sum, [1, 2, 3]))
    6
    >>> runner.submit(max, 4, 2).result(timeout=5)
    4
    >>> runner.close()
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

_STOP = object()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class ModelRunner:
    """One thread that runs the model's calls in order, and one that reports their results.

    Args:
        name: prefix of the two threads' names (``<name>-model``, ``<name>-notify``).
    """

    def __init__(self, name: str = "medkd-onnx") -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-model", daemon=True),
            threading.Thread(target=self._notify, name=f"{name}-notify", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the model thread, after the calls queued before it.

        A caller cancelled (a request timeout) before its call started skips the call.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((fn, args, future, loop))
        return await future

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """``fn(*args)`` in the model thread, from any thread; its result as a ``concurrent.futures.Future``."""
        future: Future = Future()
        self._calls.put((fn, args, future, None))
        return future

    def close(self) -> None:
        """Stop both threads after the calls already queued."""
        self._calls.put(_STOP)

    def _work(self) -> None:
        while (call := self._calls.get()) is not _STOP:
            fn, args, future, loop = call
            if future.cancelled() if loop is not None else not future.set_running_or_notify_cancel():
                continue
            try:
                self._results.put((future, loop, fn(*args), None))
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                self._results.put((future, loop, None, error))
        self._results.put(_STOP)

    def _notify(self) -> None:
        while (done := self._results.get()) is not _STOP:
            future, loop, result, error = done
            if loop is None:
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
                continue
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop closed while the call ran: nobody waits for it
                pass
