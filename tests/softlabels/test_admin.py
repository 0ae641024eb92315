"""``medkd cache ls | stats | verify | purge`` against a real redis-server."""

from __future__ import annotations

import argparse
import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from medkd.cli import main as cli
from medkd.softlabels.admin import add_cache_parser, format_bytes, format_table, parse_duration, run_cache_command
from medkd.softlabels.redis_server import STATE_FILE
from medkd.softlabels.store import SoftLabelCache
from tests.conftest import free_port


@pytest.fixture
def namespace() -> str:
    return "adm" + uuid.uuid4().hex[:8]


@pytest.fixture
def filled(redis_url: str, namespace: str):
    cache = SoftLabelCache(redis_url, namespace=namespace)
    rng = np.random.default_rng(0)
    for teacher in ("teachA", "teachB"):
        for split in ("train", "val"):
            cache.publish(
                teacher,
                "data1",
                split,
                rng.normal(size=(40, 5)).astype(np.float32),
                teacher_spec={"name": f"net-{teacher}"},
            )
    yield cache
    cache.purge()
    cache.close()


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="medkd")
    add_cache_parser(root.add_subparsers(dest="command", required=True))
    return root


def run(argv: list[str]) -> tuple[int, str]:
    args = parser().parse_args(argv)
    out = io.StringIO()
    code = args.handler(args, out=out)
    return code, out.getvalue()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30m", 1800),
        ("12h", 43200),
        ("7d", 604800),
        ("2w", 1209600),
        ("1d12h", 129600),
        ("90", 90),
        ("1.5h", 5400),
        ("10s", 10),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "7x", "-1d", "1 d", "7days", "h1"])
def test_parse_duration_rejects_nonsense(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid duration"):
        parse_duration(text)


def test_formatting_helpers() -> None:
    assert format_bytes(512) == "512 B" and format_bytes(3 * 1024 * 1024) == "3.0 MiB"
    table = format_table(["NAME", "SIZE"], [["a", "10 KiB"], ["bbbb", "2.0 MiB"]]).splitlines()
    assert table[0].startswith("NAME") and len({len(line) for line in table}) == 1


def test_ls_lists_entries_as_table_and_json(filled: SoftLabelCache, redis_url: str, namespace: str) -> None:
    code, out = run(["cache", "--redis-url", redis_url, "--namespace", namespace, "ls"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["TEACHER", "NAME", "DATASET", "SPLIT"]
    assert sum("teachA" in line for line in lines) == 2 and "net-teachB" in out and "4 entries" in out
    code, out = run(
        ["cache", "--redis-url", redis_url, "--namespace", namespace, "--json", "ls", "--teacher", "teachB"]
    )
    rows = json.loads(out)
    assert code == 0 and [(r["teacher_fp"], r["split"]) for r in rows] == [("teachB", "train"), ("teachB", "val")]
    assert all(r["num_samples"] == 40 and r["sample_shape"] == [5] for r in rows)


def test_stats_reports_bytes_per_teacher_and_split(filled: SoftLabelCache, redis_url: str, namespace: str) -> None:
    filled.fetch_or_compute("teachA", "data1", "train", lambda: 1 / 0, teacher_spec={})
    code, out = run(["cache", "--redis-url", redis_url, "--namespace", namespace, "--json", "stats"])
    stats = json.loads(out)
    assert code == 0 and stats["entries"] == 4 and stats["hits"] == 1
    assert set(stats["by_teacher"]) == {"teachA", "teachB"}
    code, out = run(["cache", "--redis-url", redis_url, "--namespace", namespace, "stats"])
    assert code == 0 and "entries: 4" in out and "1 hits, 0 misses (100% hit rate)" in out and "volatile-lru" in out


def test_verify_exits_nonzero_on_a_corrupt_entry(filled: SoftLabelCache, redis_url: str, namespace: str) -> None:
    base = ["cache", "--redis-url", redis_url, "--namespace", namespace]
    code, out = run([*base, "verify"])
    assert code == 0 and "no problems" in out
    manifest = filled.manifest("teachB", "data1", "val")
    key = f"{filled.key_prefix('teachB', 'data1', 'val')}:g{manifest.generation}:c0"
    filled.client.set(key, filled.client.get(key)[:-3])
    code, out = run([*base, "verify"])
    assert code == 1 and "corrupt_chunk" in out and "teachB" in out
    code, out = run([*base, "verify", "--teacher", "teachA"])
    assert code == 0
    code, out = run([*base, "--json", "verify"])
    assert [p["kind"] for p in json.loads(out)] == ["corrupt_chunk"]


def test_purge_needs_a_filter_and_removes_what_matches(
    filled: SoftLabelCache, redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["cache", "--redis-url", redis_url, "--namespace", namespace]
    code, _ = run([*base, "purge"])
    assert code == 2 and "--all" in capsys.readouterr().err
    assert run([*base, "purge", "--older-than", "7d"]) == (0, "removed 0 entries\n")
    assert run([*base, "purge", "--teacher", "teachA"]) == (0, "removed 2 entries\n")
    assert [m.teacher_fp for m in filled.list_manifests()] == ["teachB", "teachB"]
    code, out = run([*base, "--json", "purge", "--all"])
    assert code == 0 and json.loads(out) == {"removed": 2}


def test_bad_duration_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["cache", "purge", "--older-than", "soon"])
    assert info.value.code == 2 and "invalid duration 'soon'" in capsys.readouterr().err


def test_unreachable_url_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(["cache", "--redis-url", f"redis://:pw@127.0.0.1:{free_port()}/0", "ls"])
    assert run_cache_command(args) == 1
    err = capsys.readouterr().err
    assert "cannot connect to Redis" in err and ":pw@" not in err


def test_without_url_it_uses_and_then_stops_the_managed_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDKD_HOME", str(tmp_path))
    code, out = run(["cache", "ls"])
    assert code == 0 and out == "no cached soft labels\n"
    assert (tmp_path / "redis" / "dump.rdb").exists()  # it ran there, saved, and stopped
    assert not (tmp_path / "redis" / STATE_FILE).exists()


def test_medkd_cli_dispatches_to_the_cache_command(
    filled: SoftLabelCache, redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["cache", "--redis-url", redis_url, "--namespace", namespace, "ls"]) == 0
    assert "teachA" in capsys.readouterr().out
