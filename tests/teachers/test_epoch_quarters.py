"""medkd.teachers.loop.EpochQuarters: a long teacher epoch reports each quarter; a short one stays quiet."""

from __future__ import annotations

import queue

import pytest

from medkd.teachers import loop
from medkd.teachers.loop import EpochQuarters


def _events(sent: queue.Queue) -> list[dict]:
    return [sent.get_nowait() for _ in range(sent.qsize())]


def test_a_long_epoch_sends_one_event_at_each_quarter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "PROGRESS_AFTER_S", 0.0)
    sent: queue.Queue = queue.Queue()
    quarters = EpochQuarters(sent, "cnn", 2, 3, batches=10, images=640)
    for done in range(1, 11):
        quarters(done)
    events = _events(sent)
    assert [event["fraction"] for event in events] == [0.3, 0.5, 0.8]  # batches 3, 5, 8 cross 1/4, 2/4, 3/4
    assert [event["images"] for event in events] == [192, 320, 512]
    assert {(event["kind"], event["teacher"], event["epoch"], event["epochs"]) for event in events} == {
        ("teacher_progress", "cnn", 2, 3)
    }


def test_a_short_epoch_or_no_queue_sends_nothing() -> None:
    sent: queue.Queue = queue.Queue()
    quarters = EpochQuarters(sent, "cnn", 1, 3, batches=8, images=512)
    for done in range(1, 9):
        quarters(done)
    assert sent.empty()  # every quarter came sooner than PROGRESS_AFTER_S
    EpochQuarters(None, "cnn", 1, 3, batches=8, images=512)(4)  # rank > 0: no queue, no error
