"""benchmarks._harness: the RESULT line, RESULTS.md sections, interleaved timing, mean ± std, the
data path and the managed redis-server the benchmarks share."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import redis

from benchmarks import _harness as harness


def test_result_line_formats_floats_and_keeps_the_rest():
    line = harness.result_line({"auc": 0.912345, "params": 12_000, "ratio": f"{1.23456:.2f}", "ok": True}, digits=3)
    assert line == "RESULT auc=0.912 params=12000 ratio=1.23 ok=True"
    assert re.fullmatch(r"RESULT( \w+=\S+)+", line)


@pytest.mark.parametrize("name", ["two words", "a=b", ""])
def test_result_line_rejects_names_that_would_break_parsing(name):
    with pytest.raises(ValueError, match="RESULT field name"):
        harness.result_line({name: 1.0})
    with pytest.raises(ValueError, match="at least one field"):
        harness.result_line({})


def test_print_result_prints_the_line_last(capsys):
    print("table")
    harness.print_result({"x": 2.0}, digits=1)
    assert capsys.readouterr().out.splitlines() == ["table", "RESULT x=2.0"]


def test_mean_std_is_the_sample_standard_deviation():
    assert harness.mean_std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) == pytest.approx((5.0, 2.138089935))
    assert harness.mean_std([3.0]) == (3.0, 0.0)
    assert harness.format_mean_std([0.91, 0.93], digits=2) == "0.92 ± 0.01"
    with pytest.raises(ValueError):
        harness.mean_std([])


def test_interleaved_takes_turns_within_each_round_after_a_warm_up():
    calls: list[str] = []

    def slow() -> None:
        calls.append("slow")
        time.sleep(0.02)

    times = harness.interleaved({"fast": lambda: calls.append("fast"), "slow": slow}, rounds=3)
    assert calls == ["fast", "slow"] * 4  # one warm-up round, then three timed ones
    assert len(times["fast"]) == len(times["slow"]) == 3
    assert min(times["slow"]) >= 0.02 > max(times["fast"])
    with pytest.raises(ValueError, match="rounds"):
        harness.interleaved({"fast": lambda: None}, rounds=0)


def test_data_dir_follows_medkd_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDKD_DATA_DIR", str(tmp_path))
    assert harness.data_file("breastmnist.npz") == tmp_path / "breastmnist.npz"
    monkeypatch.delenv("MEDKD_DATA_DIR")
    repo = Path(__file__).resolve().parents[2]
    assert harness.data_dir() == repo.parent / "shared" / "data"


def test_results_section_is_appended_after_what_is_there(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Earlier section\nkept\n")
    section = harness.results_section(
        "Cache speed-up",
        command="python -m benchmarks.cache_speedup",
        body="| a | b |\n",
        result="RESULT a=1",
        date="2026-12-05 07:00 UTC",
        load="1.0, 0.5, 0.2",
    )
    harness.append_section(section, results)
    text = results.read_text()
    assert text.startswith("# Results\n\n## Earlier section\nkept\n\n## Cache speed-up (2026-12-05 07:00 UTC)\n")
    assert "Command: `python -m benchmarks.cache_speedup`" in text and "1.0, 0.5, 0.2" in text
    assert text.rstrip().endswith("```\nRESULT a=1\n```")


@pytest.mark.integration  # a real redis-server
def test_managed_redis_publishes_its_password_and_stops(tmp_path, monkeypatch):
    monkeypatch.delenv(harness.PASSWORD_ENV, raising=False)
    with harness.managed_redis(tmp_path / "redis") as server:
        password = os.environ[harness.PASSWORD_ENV]
        client = redis.Redis(host="127.0.0.1", port=server.port, password=password)
        assert client.ping() is True
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, password="wrong").ping()
        client.close()
        port = server.port
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=port, password=password, socket_connect_timeout=1).ping()
