"""medkd.core.progress: plain lines when the output is not a terminal, live rich bars when it is."""

from __future__ import annotations

import io
import pickle
import re
import subprocess
import sys
import time

from ray.util.state import get_actor
from rich.console import Console

from medkd.core.progress import DRAIN_WAIT_S, Progress, RemoteEvents, TrialBoard, send_event


def _run_a_small_pipeline(progress: Progress) -> None:
    with progress.stage(1, 7, "teachers"):
        progress.event(
            {
                "kind": "teacher_epoch",
                "teacher": "cnn",
                "epoch": 1,
                "epochs": 3,
                "metrics": {"val_auc": 0.71, "train_loss": 0.5, "epoch": 1},
            }
        )
        progress.event(
            {
                "kind": "teacher_progress",
                "teacher": "cnn",
                "epoch": 2,
                "epochs": 3,
                "fraction": 0.25,
                "images": 8640,
                "total": 34561,
                "seconds": 90.0,
            }
        )
        progress.event(
            {"kind": "teacher_epoch", "teacher": "cnn", "epoch": 3, "epochs": 3, "metrics": {"val_auc": 0.88}}
        )
    with progress.stage(2, 7, "soft_labels"):
        progress.soft_labels("cnn", "computing", ["train", "val", "test"])
        progress.soft_labels("cnn", "cached")
        progress.soft_labels("vit", "skipped")
    with progress.stage(3, 7, "search"):
        progress.trials_started(4, metric="val_auc", mode="max")
        for trial in ("a_00000", "a_00001", "a_00002", "a_00003"):
            progress.trial_started(trial)
        progress.event(
            {
                "kind": "trial_epoch",
                "trial": "distill_trial_a_00000",
                "epoch": 1,
                "epochs": 2,
                "metric": "val_auc",
                "value": 0.6,
            }
        )
        progress.event(
            {
                "kind": "trial_epoch",
                "trial": "distill_trial_a_00001",
                "epoch": 2,
                "epochs": 2,
                "metric": "val_auc",
                "value": 0.7,
            }
        )
        progress.trial_finished("a_00000", "done", {"val_auc": 0.81, "size_mb": 0.2})
        progress.trial_finished("a_00001", "stopped", {"val_auc": 0.93})
        progress.trial_finished("a_00002", "failed", {})
        progress.event(
            {
                "kind": "trial_epoch",
                "trial": "distill_trial_a_00003",
                "epoch": 1,
                "epochs": 2,
                "metric": "val_auc",
                "value": 0.5,
            }
        )
    progress.event({"kind": "message", "message": "a message from a trial"})
    progress.close()
    progress.line("after close")
    progress.teacher_epoch("cnn", 4, 4, {})  # bars are gone: dropped, not an error


def test_plain_lines_when_the_stream_is_not_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(out)
    assert not progress.live
    _run_a_small_pipeline(progress)
    lines = [re.sub(r"^\[medkd +[0-9.]+s\] ", "", line) for line in out.getvalue().splitlines()]
    assert all(re.match(r"^\[medkd +[0-9.]+s\] ", line) for line in out.getvalue().splitlines())
    assert lines == [
        "== stage 1/7: teachers ==",
        "  teacher cnn: epoch 1/3 val_auc=0.7100, train_loss=0.5000",
        "  teacher cnn: epoch 2/3 at 25% (8,640 of 34,561 images in 1.5 min; ~4.5 min of training left in the epoch)",
        "  teacher cnn: epoch 3/3 val_auc=0.8800",
        "== stage 2/7: soft_labels ==",
        "  soft labels cnn: computing train, val, test (cache miss)",
        "  soft labels cnn: computed and cached",
        "  soft labels vit: skipped, all splits found in cache",
        "== stage 3/7: search ==",
        "  trial distill_trial_a_00000: epoch 1/2 val_auc=0.6000",
        "  trial distill_trial_a_00001: epoch 2/2 val_auc=0.7000",
        "  trial 1/4 finished (a_00000): val_auc=0.81, size_mb=0.2; best so far val_auc=0.81 (a_00000)",
        "  trial 2/4 stopped early (a_00001): val_auc=0.93; best so far val_auc=0.93 (a_00001)",
        "  trial 3/4 FAILED (a_00002): ; best so far val_auc=0.93 (a_00001)",
        "  trial distill_trial_a_00003: epoch 1/2 val_auc=0.5000",
        "a message from a trial",
        "after close",
        "  teacher cnn: epoch 4/4 ",
    ]


def test_live_bars_on_a_terminal_show_stage_teachers_trials_and_soft_labels() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=150, color_system=None)
    progress = Progress(console=console)
    assert progress.live
    _run_a_small_pipeline(progress)
    screen = buffer.getvalue()
    assert "stage 3/7 search" in screen
    assert "teacher cnn  val_auc=0.880" in screen and "3/3" in screen
    assert "teacher cnn  val_auc=0.710 train_loss=0.500" in screen  # one short line per bar
    assert "soft labels cnn: computing train,val,test" in screen and "soft labels cnn: published" in screen
    assert "trials: 1 done, 1 stopped, 1 failed, 1 running; best val_auc=0.93 (a_00001)" in screen and "3/4" in screen
    assert "distill_trial_a_00003  val_auc=0.5000" in screen
    assert "a message from a trial" in screen  # log lines are printed above the bars
    tail = re.sub(r"\[medkd +[0-9.]+s\] ", "", screen[screen.rindex("after close") - 20 :])
    assert not progress.live and tail.endswith("after close\n  teacher cnn: epoch 4/4 \n")  # plain lines below
    # Teacher epochs are bars, not log lines, on a terminal (until the bars are closed).
    assert screen.count("teacher cnn: epoch") == 1 and "teacher cnn: epoch 4/4" in screen


def test_board_ranks_by_the_objectives_mode_and_ignores_failed_or_missing_values() -> None:
    board = TrialBoard(total=5, metric="latency_ms", mode="min")
    board.start("distill_trial_x_00007")  # Tune's trial name; callbacks give the trial id "x_00007"
    board.finish("1", "done", 12.0)
    board.finish("2", "done", 9.0)
    board.finish("3", "done", float("nan"))
    board.finish("4", "failed", 1.0)
    assert board.best == ("2", 9.0)
    assert board.summary() == "3 done, 1 failed, 1 running; best latency_ms=9 (2)"
    assert TrialBoard(total=2).summary() == "waiting"
    board.finish("x_00007", "stopped", None)
    assert board.running == set() and board.ended == {"done": 3, "stopped": 1, "failed": 1}


def test_progress_pickles_to_a_plain_one() -> None:
    """Tune pickles its callbacks (and their Progress) into the experiment state."""
    progress = Progress(console=Console(file=io.StringIO(), force_terminal=True))
    copy = pickle.loads(pickle.dumps(progress))
    assert progress.live and not copy.live
    progress.close()


def test_live_bars_never_closed_still_restore_the_cursor_at_exit() -> None:
    code = (
        "from rich.console import Console; from medkd.core.progress import Progress; "
        "Progress(console=Console(force_terminal=True)).line('x')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "\x1b[?25l" in out and out.rindex("\x1b[?25h") > out.rindex("\x1b[?25l")  # hidden, then shown again


def test_live_bars_fit_an_80_column_terminal() -> None:
    buffer = io.StringIO()
    progress = Progress(console=Console(file=buffer, force_terminal=True, width=80, color_system=None))
    progress.trials_started(8, metric="val_auc")
    progress.soft_labels("a_teacher_with_a_long_name", "skipped")
    for trial in range(5):
        progress.trial_finished(f"trial_{trial:05d}_with_a_long_id", "done", {"val_auc": 0.5 + trial / 10})
    progress.close()
    last_frame = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue()).split("\r")[-1].splitlines()
    bars = [line for line in last_frame if "trials:" in line or "soft labels" in line]
    assert len(bars) == 2 and all(len(line) <= 80 for line in bars)
    assert all(re.search(r"━[━╸ ]* \d+/\d+$", line.rstrip()) for line in bars)  # bar and count visible
    assert "best val_auc=0.9" in bars[1] or "best val_auc=0.9" in bars[0]


def test_remote_events_reach_the_driver_in_order_and_close_without_waiting_out_the_drain(ray_session) -> None:
    ray = ray_session
    out = io.StringIO()
    events = RemoteEvents(Progress(out))

    @ray.remote(num_cpus=0)
    def report(queue, count: int) -> None:
        for index in range(count):
            send_event(queue, {"kind": "log", "message": f"event {index}"})

    ray.get(report.remote(events.queue, 3))
    actor_node = get_actor(events.queue.actor._actor_id.hex(), address=ray.get_runtime_context().gcs_address).node_id
    started = time.monotonic()
    events.close()
    closing_s = time.monotonic() - started

    lines = [re.sub(r"^\[medkd +[0-9.]+s\] ", "", line) for line in out.getvalue().splitlines()]
    assert lines == ["event 0", "event 1", "event 2"]
    assert closing_s < DRAIN_WAIT_S / 2, f"close took {closing_s:.1f} s: it waited for the drain's timeout"
    assert actor_node == ray.get_runtime_context().get_node_id(), "the queue actor is not on the driver's node"
