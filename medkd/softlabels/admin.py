"""``medkd cache ls | stats | verify | purge``: inspect and manage the soft-label cache.

Without ``--redis-url`` the commands use medkd's managed redis-server in
``$MEDKD_HOME/redis`` (attaching to it when a pipeline already runs it, starting it
otherwise; its data persists between runs).

Examples::

    medkd cache ls
    medkd cache stats --json
    medkd cache verify --teacher 3f2a9c0d1e4b5a67
    medkd cache purge --older-than 7d
    medkd cache --redis-url rediss://cache.internal:6380/0 --password-env MEDKD_REDIS_PASSWORD ls
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import redis

from medkd.softlabels.manifest import Manifest
from medkd.softlabels.redis_client import RedisConnectionError
from medkd.softlabels.redis_server import ManagedRedisServer, RedisServerError
from medkd.softlabels.store import SoftLabelCache

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


ADMIN_RETRIES = 2


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``30m``, ``12h``, ``7d``, ``2w``, ``1d12h``, or plain seconds ``90``.

    Raises:
        argparse.ArgumentTypeError: anything else (argparse turns it into a usage error).
    """
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    if not value or not re.fullmatch(f"(?:{_DURATION.pattern})+", value):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number with a unit s/m/h/d/w, e.g. 30m, 12h, 7d, 1d12h"
        )
    return float(sum(float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION.findall(value)))


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover


def format_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; numeric-looking columns are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [
        bool(cells) and all(re.fullmatch(r"[\d.,]+( \w+)?", r[i] or "0") for r in cells) for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def add_cache_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``cache`` (with ``ls``, ``stats``, ``verify``, ``purge``) on a sub-parsers object."""
    cache = subparsers.add_parser(
        "cache",
        help="inspect and manage the soft-label cache",
        description="Inspect and manage the soft-label cache (teacher logits in Redis).",
    )
    cache.add_argument(
        "--redis-url",
        default=None,
        help="redis://, rediss:// or unix:// URL (default: medkd's managed server in $MEDKD_HOME/redis)",
    )
    cache.add_argument("--password-env", default=None, metavar="VAR", help="environment variable holding the password")
    cache.add_argument("--namespace", default="medkd", help="key namespace (default: medkd)")
    cache.add_argument("--json", action="store_true", help="machine-readable JSON output")
    actions = cache.add_subparsers(dest="cache_action", required=True, metavar="ACTION")

    ls = actions.add_parser("ls", help="list cached entries")
    ls.add_argument("--teacher", metavar="FP", help="only this teacher fingerprint")
    actions.add_parser("stats", help="hits, misses, bytes per teacher and split, Redis memory")
    verify = actions.add_parser("verify", help="read every chunk and check its checksum (exit 1 on problems)")
    verify.add_argument("--teacher", metavar="FP", help="only this teacher fingerprint")
    purge = actions.add_parser("purge", help="delete entries")
    purge.add_argument("--teacher", metavar="FP", help="only this teacher fingerprint")
    purge.add_argument(
        "--older-than", type=parse_duration, metavar="D", help="only entries older than D (30m, 12h, 7d)"
    )
    purge.add_argument("--all", action="store_true", help="required to purge everything (no --teacher/--older-than)")
    for sub in (cache, ls, verify, purge):
        sub.set_defaults(handler=run_cache_command)
    return cache


@contextlib.contextmanager
def _open_cache(args: argparse.Namespace) -> Iterator[SoftLabelCache]:
    server: ManagedRedisServer | None = None
    url = args.redis_url
    if url is None:
        server = ManagedRedisServer().start()
        url = server.url
    try:
        # A person at a terminal wants an answer in seconds: few retries (trials keep the long policy
        # that rides out a redis-server restart).
        cache = SoftLabelCache(
            url, namespace=args.namespace, password_env=args.password_env, lru_bytes=0, retries=ADMIN_RETRIES
        )
        try:
            yield cache
        finally:
            cache.close()
    finally:
        if server is not None:
            server.stop()  # only stops it if this command started it


def run_cache_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``medkd cache <action>``; returns the exit code (0 ok, 1 problems/errors, 2 usage)."""
    out = out or sys.stdout
    action = getattr(args, "cache_action", None)
    handler = _ACTIONS.get(action or "")
    if handler is None:
        print(f"error: unknown cache action {action!r}; choose from {sorted(_ACTIONS)}", file=sys.stderr)
        return 2
    if action == "purge" and not (args.all or args.teacher or args.older_than is not None):
        print("error: purge needs --teacher FP and/or --older-than D, or --all to delete every entry", file=sys.stderr)
        return 2
    try:
        with _open_cache(args) as cache:
            return handler(cache, args, out)
    except (RedisServerError, RedisConnectionError, redis.RedisError, ValueError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _emit_json(out: TextIO, payload: Any) -> None:
    out.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def _manifest_row(m: Manifest, now: float) -> dict[str, Any]:
    return {
        "teacher_fp": m.teacher_fp,
        "dataset_fp": m.dataset_fp,
        "split": m.split,
        "view": m.view,
        "num_samples": m.num_samples,
        "sample_shape": list(m.sample_shape),
        "encoding": m.encoding,
        "topk": m.topk,
        "compression": m.compression,
        "nbytes": m.nbytes,
        "num_chunks": m.num_chunks,
        "created_at": m.created_at,
        "age_s": round(now - m.created_at, 1),
        "generation": m.generation,
        "teacher": m.teacher_spec.get("name") or m.teacher_spec.get("model"),
    }


def _ls(cache: SoftLabelCache, args: argparse.Namespace, out: TextIO) -> int:
    now = time.time()
    rows = [_manifest_row(m, now) for m in cache.list_manifests() if not args.teacher or m.teacher_fp == args.teacher]
    if args.json:
        _emit_json(out, rows)
        return 0
    if not rows:
        out.write("no cached soft labels\n")
        return 0
    table = [
        [
            r["teacher_fp"],
            r["teacher"] or "",
            r["dataset_fp"],
            r["split"],
            "-" if r["view"] is None else r["view"],
            r["num_samples"],
            "x".join(map(str, r["sample_shape"])),
            r["encoding"]
            + (f"/top{r['topk']}" if r["topk"] else "")
            + (f"/{r['compression']}" if r["compression"] else ""),
            format_bytes(r["nbytes"]),
            format_age(r["age_s"]),
        ]
        for r in rows
    ]
    out.write(
        format_table(
            ["TEACHER", "NAME", "DATASET", "SPLIT", "VIEW", "SAMPLES", "SHAPE", "ENCODING", "SIZE", "AGE"], table
        )
        + "\n"
    )
    out.write(f"{len(rows)} entries, {format_bytes(sum(r['nbytes'] for r in rows))}\n")
    return 0


def _stats(cache: SoftLabelCache, args: argparse.Namespace, out: TextIO) -> int:
    stats = cache.stats()
    if args.json:
        _emit_json(out, stats)
        return 0
    lookups = stats["hits"] + stats["misses"]
    rate = f" ({stats['hits'] / lookups:.0%} hit rate)" if lookups else ""
    redis_info = stats["redis"]
    limit = format_bytes(redis_info["maxmemory"]) if redis_info["maxmemory"] else "no limit"
    out.write(f"entries: {stats['entries']}, {format_bytes(stats['bytes'])} of soft labels\n")
    out.write(f"lookups: {stats['hits']} hits, {stats['misses']} misses{rate}\n")
    out.write(
        f"redis:   {format_bytes(redis_info['used_memory'])} used of {limit}, policy {redis_info['maxmemory_policy']}\n"
    )
    rows = [
        [teacher, split, format_bytes(nbytes)]
        for teacher, info in sorted(stats["by_teacher"].items())
        for split, nbytes in sorted(info["splits"].items())
    ]
    if rows:
        out.write("\n" + format_table(["TEACHER", "SPLIT", "BYTES"], rows) + "\n")
    return 0


def _verify(cache: SoftLabelCache, args: argparse.Namespace, out: TextIO) -> int:
    problems = cache.verify(teacher_fp=args.teacher)
    if args.json:
        _emit_json(out, [p.model_dump() for p in problems])
    elif problems:
        rows = [[p.kind, p.prefix, "" if p.chunk is None else p.chunk, p.message] for p in problems]
        out.write(format_table(["PROBLEM", "ENTRY", "CHUNK", "DETAIL"], rows) + "\n")
        out.write(
            f"{len(problems)} problem(s); `medkd cache purge --teacher FP` removes an entry, "
            "the next run recomputes it\n"
        )
    else:
        out.write("all entries verified: no problems\n")
    return 1 if problems else 0


def _purge(cache: SoftLabelCache, args: argparse.Namespace, out: TextIO) -> int:
    removed = cache.purge(teacher_fp=args.teacher, older_than_s=args.older_than)
    if args.json:
        _emit_json(out, {"removed": removed})
    else:
        out.write(f"removed {removed} entr{'y' if removed == 1 else 'ies'}\n")
    return 0


_ACTIONS: dict[str, Callable[[SoftLabelCache, argparse.Namespace, TextIO], int]] = {
    "ls": _ls,
    "stats": _stats,
    "verify": _verify,
    "purge": _purge,
}
