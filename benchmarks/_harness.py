"""What the benchmarks share: process set-up, the data path, a local Ray cluster, a managed
redis-server, interleaved timing, mean ± std, the RESULT line and the RESULTS.md section.

A benchmark imports this module (never another benchmark) for its set-up and calls
:func:`configure_local_ray` before it imports Ray::

    from benchmarks._harness import configure_local_ray, data_file, local_ray, print_result

    configure_local_ray()
    with local_ray(num_cpus=2):
        ...
    print_result({"speedup": 3.2, "wall_s": 41}, digits=2)

Every benchmark ends with one ``RESULT name=value …`` line (:func:`result_line`); figures,
commands and dates go in ``benchmarks/RESULTS.md`` (:func:`append_section`).
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO_ROOT / "benchmarks" / "RESULTS.md"
#: Environment variable naming the folder of shared data files (MedMNIST ``.npz`` files).
DATA_DIR_ENV = "MEDKD_DATA_DIR"
#: Environment variable through which a benchmark hands its managed redis-server's password to the
#: spec (``cache.password_env``) and to Ray workers, which inherit it; no password is in a spec.
PASSWORD_ENV = "MEDKD_BENCH_REDIS_PASSWORD"


# --------------------------------------------------------------------------- process and data


def configure_local_ray() -> None:
    """No token auth or usage stats for the private local cluster; quiet third-party deprecations.

    Call before importing Ray (its environment is read on import and on ``ray.init``).
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def data_dir() -> Path:
    """The shared data folder: ``$MEDKD_DATA_DIR``, by default ``../shared/data`` beside the checkout.

    Examples:
        >>> data_dir().name
        'data'
    """
    configured = os.environ.get(DATA_DIR_ENV)
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


def data_file(name: str) -> Path:
    """A file of the shared data folder, e.g. ``data_file("breastmnist.npz")`` (it may not exist).

    Examples:
        >>> data_file("breastmnist.npz").name
        'breastmnist.npz'
    """
    return data_dir() / name


# --------------------------------------------------------------------------- services


@contextmanager
def local_ray(num_cpus: int = 2, **init_kwargs: Any) -> Iterator[Any]:
    """A private local Ray cluster for the ``with`` block, shut down on the way out.

    The dashboard stays on (Train's clean-up of stopped trials needs its state API) and binds to
    127.0.0.1; driver logging is quiet. Extra keyword arguments go to ``ray.init``.

    Args:
        num_cpus: CPUs the cluster offers.

    Examples:
        >>> with local_ray(num_cpus=2) as ray:  # doctest: +SKIP
        ...     ray.get(ray.put(1))
    """
    import ray

    options: dict[str, Any] = {
        "address": "local",
        "num_cpus": num_cpus,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "log_to_driver": False,
        "configure_logging": False,
        "runtime_env": {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}},
    }
    options.update(init_kwargs)
    ray.init(**options)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def managed_redis(
    data_dir: Path, password: str | None = None, password_env: str | None = PASSWORD_ENV
) -> Iterator[Any]:
    """A medkd-managed redis-server on 127.0.0.1 for the ``with`` block, stopped on the way out.

    Its data lives in ``data_dir``, so a re-run finds the soft labels of an earlier one. With
    ``password_env``, the server's password is put in that environment variable before the block
    (Ray workers started later inherit it) — also when the server is one an earlier run left alive,
    which keeps its own password.

    Args:
        data_dir: the server's data folder (``dump.rdb``, log, state file).
        password: the password of a new server; ``None`` draws one.
        password_env: environment variable to publish the password in (``None``: not published).

    Examples:
        >>> with managed_redis(Path("runs/bench/redis")) as redis:  # doctest: +SKIP
        ...     spec_url = f"redis://127.0.0.1:{redis.port}/0"
    """
    import secrets

    from medkd.softlabels.redis_server import ManagedRedisServer

    password = password or secrets.token_urlsafe(24)
    if password_env:
        os.environ[password_env] = password
    server = ManagedRedisServer(data_dir=data_dir, password=password).start()
    try:
        if password_env and server.password != password:  # attached to a server a previous run left alive
            os.environ[password_env] = server.password or ""
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- timing and statistics


def take_turns(fns: Mapping[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """What each function returns over ``rounds`` rounds, the functions taking turns within a round.

    Taking turns spreads load from other processes over every variant alike, so comparing them is
    fairer than running one variant's repeats after the other's on a shared machine.

    Args:
        fns: name -> a function to call without arguments (e.g. one that measures a latency).
        rounds: rounds; each calls every function once, in ``fns``' order.

    Returns:
        name -> ``rounds`` return values, in round order.

    Examples:
        >>> take_turns({"a": lambda: 1, "b": lambda: 2}, rounds=2)
        {'a': [1, 1], 'b': [2, 2]}
    """
    if rounds <= 0:
        raise ValueError(f"rounds must be > 0, got {rounds}")
    results: dict[str, list[Any]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            results[name].append(fn())
    return results


def interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int, *, warm_up: bool = True) -> dict[str, list[float]]:
    """Seconds of each function over ``rounds`` rounds, the functions taking turns (:func:`take_turns`).

    Args:
        fns: name -> a function to time (called without arguments).
        rounds: timed rounds; each calls every function once.
        warm_up: call every function once before timing (connections, caches, lazy imports).

    Returns:
        name -> ``rounds`` durations in seconds, in round order.

    Examples:
        >>> times = interleaved({"a": lambda: None, "b": lambda: sum(range(100))}, rounds=3)
        >>> sorted(times), len(times["a"])
        (['a', 'b'], 3)
    """
    if rounds <= 0:
        raise ValueError(f"rounds must be > 0, got {rounds}")
    if warm_up:
        for fn in fns.values():
            fn()

    def timed(fn: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            fn()
            return time.perf_counter() - started

        return run

    return take_turns({name: timed(fn) for name, fn in fns.items()}, rounds)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Examples:
        >>> mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
        >>> mean_std([0.5])
        (0.5, 0.0)
    """
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± std"`` of ``values`` (just the value when there is one).

    Examples:
        >>> format_mean_std([0.9, 0.92, 0.94])
        '0.920 ± 0.020'
        >>> format_mean_std([0.9])
        '0.900'
    """
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# --------------------------------------------------------------------------- reporting


def result_line(fields: Mapping[str, Any], digits: int = 4) -> str:
    """The ``RESULT name=value …`` line a benchmark ends with.

    Floats are written with ``digits`` decimals, anything else as ``str(value)`` (pre-format a
    value to give it its own precision).

    Examples:
        >>> result_line({"auc": 0.91234, "params": 120000, "speedup": "3.2"})
        'RESULT auc=0.9123 params=120000 speedup=3.2'
    """
    if not fields:
        raise ValueError("a RESULT line needs at least one field")
    parts = []
    for name, value in fields.items():
        if not name or any(c.isspace() or c == "=" for c in name):
            raise ValueError(f"RESULT field name {name!r} must be one word without '='")
        parts.append(f"{name}={value:.{digits}f}" if isinstance(value, float) else f"{name}={value}")
    return "RESULT " + " ".join(parts)


def print_result(fields: Mapping[str, Any], digits: int = 4) -> str:
    """Print (and return) the :func:`result_line`, flushed: it is the benchmark's last line."""
    line = result_line(fields, digits)
    print(line, flush=True)
    return line


def utc_date() -> str:
    """Now, as the benchmarks date their results: ``2026-12-05 07:10 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def load_average() -> str:
    """The machine's 1/5/15-minute load averages, e.g. ``"3.1, 2.4, 1.9"`` (timings on a shared machine)."""
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def results_section(
    title: str, *, command: str, body: str, result: str, date: str | None = None, load: str | None = None
) -> str:
    """A ``benchmarks/RESULTS.md`` section: heading, command, date and load, the body, the RESULT line.

    Examples:
        >>> print(results_section("Cache", command="python -m benchmarks.x", body="| a |", result="RESULT a=1",
        ...                       date="2026-12-05 07:00 UTC", load="1.0, 1.0, 1.0"))
        ## Cache (2026-12-05 07:00 UTC)
        <BLANKLINE>
        - Command: `python -m benchmarks.x`
        - Load average (1, 5, 15 min): 1.0, 1.0, 1.0
        <BLANKLINE>
        | a |
        <BLANKLINE>
        ```
        RESULT a=1
        ```
        <BLANKLINE>
    """
    return "\n".join(
        [
            f"## {title} ({date or utc_date()})",
            "",
            f"- Command: `{command}`",
            f"- Load average (1, 5, 15 min): {load or load_average()}",
            "",
            body.rstrip("\n"),
            "",
            "```",
            result,
            "```",
            "",
        ]
    )


def append_section(text: str, path: Path = RESULTS_FILE) -> Path:
    """Append a section to ``RESULTS.md`` (or ``path``) after a blank line; never rewrites what is there."""
    with open(path, "a") as handle:
        handle.write("\n" + text)
    return path
