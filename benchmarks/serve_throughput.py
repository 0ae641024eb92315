"""Serving throughput: medkd on Ray Serve against raw ONNX Runtime and a minimal FastAPI server.

The same exported student, the same cores, one run, interleaved (every concurrency level drives
each server in turn, so drifting machine load hits all of them alike):

(a) ``raw_ort``: ONNX Runtime in this process, one thread (the limit);
(b) ``plain``: a minimal FastAPI + uvicorn + ONNX Runtime process (what a user would write);
(c) ``medkd_py``: ``medkd.serve`` behind Serve's Python HTTP proxy (``MEDKD_SERVE_HA_PROXY=0``, or no
    ``haproxy`` installed: the fallback);
(d) ``medkd``: ``medkd.serve`` as shipped, as ``medkd serve`` starts it: with ``haproxy`` on PATH
    (``scripts/ensure_haproxy.sh``), Ray 2.60's high-throughput mode (``RAY_SERVE_ENABLE_HA_PROXY=1``,
    direct ingress, ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``; see :mod:`medkd.serve.ha_proxy`).

Single NPY images to ``/predict`` from aiohttp clients on 127.0.0.1 at concurrency 1, 8 and 64
(req/s, p50, p99), then ``/predict/batch`` with 64 images from 4 clients against in-process ORT
at batch 64 measured right before and after it (images/s). Where the time goes is printed too: the replica's own latency
(``latency_ms`` in each answer) against what the client saw (the proxy hop and HTTP), and the CPU the load
client (this process) and each server's process tree used per request.

What the arms do, for a fair ratio: (a) runs the model on an input already decoded and normalised, in one
ONNX Runtime thread, with nothing else running: the limit, as issue 15 defines it. Every HTTP arm is driven
by aiohttp clients in this process, on the same 2 cores as the server; the clients read each answer's bytes
and take ``latency_ms`` from its end without parsing the JSON (until 2026-12-05 they parsed the first 2,000
answers of every arm with ``json``: ~0.15 ms for a 64-image answer under load, client CPU on the server's
cores that (a) never pays and the plain server's answers never cost). The batch route runs with only medkd's
own instance up: the plain server and (c)'s Ray instance (0.08 cores when idle) are stopped first, and (c)'s
batch route is measured before them.

    python -m benchmarks.serve_throughput [--seconds 10] [--model-dir DIR] [--skip-python-proxy]

Ends with ``RESULT serve_vs_plain=… batch_images_vs_raw_ort=… p50_ms_c8=… p99_ms_c64=…
rps_c64_vs_c8=… ha_proxy=0|1`` (medkd as shipped, (d)).
"""

# No `from __future__ import annotations`: FastAPI reads the plain server's signatures at runtime.
import argparse
import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from benchmarks._memory import process_tree  # noqa: E402
from medkd.core.onnx_session import X64_QUANT_PRECISION  # noqa: E402

CONCURRENCY = (1, 8, 64)
BATCH_IMAGES, BATCH_CLIENTS = 64, 4
ORT_THREADS = 1
"""ONNX Runtime intra-op threads of (a) in-process ORT, (b) the plain server and medkd's replica
(``serve.ort_threads``, medkd's default): the same CPU allowance for the model on every side."""
START_LIMIT_S = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_tiny_cnn(directory: Path, image_size: int) -> Path:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 2),
    ).eval()
    directory.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        net,
        (torch.randn(2, 1, image_size, image_size),),
        str(directory / "model.onnx"),
        dynamo=True,
        external_data=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        verbose=False,
    )
    metadata = {
        "model_id": "bench-tiny-cnn",
        "task": "classification",
        "class_names": ["malignant", "benign"],
        "num_classes": 2,
        "input": {
            "in_channels": 1,
            "spatial_dims": 2,
            "image_size": [image_size, image_size],
            "scale": 1 / 255,
            "mean": [0.5],
            "std": [0.5],
        },
    }
    (directory / "metadata.json").write_text(json.dumps(metadata))
    return directory


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` used so far; gone ones count 0."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def replica_latency_ms(payload: bytes) -> float | None:
    """The ``latency_ms`` a medkd answer ends with, read without parsing the whole JSON.

    Examples:
        >>> replica_latency_ms(b'{"count":2,"predictions":[],"latency_ms":1.25}')
        1.25
        >>> replica_latency_ms(b'{"probabilities":[0.5,0.5]}') is None
        True
    """
    start = payload.rfind(b'"latency_ms":')
    if start < 0:
        return None
    value = payload[start + 13 :].split(b",", 1)[0].split(b"}", 1)[0]
    try:
        return float(value)
    except ValueError:
        return None


def summarize(latencies: list[float], seconds: float, failures: int = 0) -> dict:
    values = np.sort(np.asarray(latencies)) * 1000.0 if latencies else np.array([np.nan])
    return {
        "requests": len(latencies),
        "rps": len(latencies) / seconds,
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "failures": failures,
    }


# ----------------------------------------------------------------------------- (a) raw ORT


def raw_ort(
    model_dir: Path, image: np.ndarray, stack: np.ndarray, seconds: float, cases: tuple[str, ...] = ("single", "batch")
) -> dict:
    from medkd.serve.model_store import create_session

    session = create_session((model_dir / "model.onnx").read_bytes(), threads=ORT_THREADS)
    results = {}
    for name, batch in (("single", image[None, None]), ("batch", stack[:, None])):
        if name not in cases:
            continue
        inputs = ((batch.astype(np.float32) / 255.0 - 0.5) / 0.5).astype(np.float32)
        latencies, stop = [], time.perf_counter() + seconds
        while time.perf_counter() < stop:
            started = time.perf_counter()
            session.run(None, {"image": inputs})
            latencies.append(time.perf_counter() - started)
        results[name] = summarize(latencies, seconds)
    if "batch" in results:
        results["batch_images_per_s"] = results["batch"]["rps"] * len(stack)
    return results


# ----------------------------------------------------------------------------- (b) plain


def plain_server(model_dir: str, port: int) -> None:
    """What a user would write instead of medkd: FastAPI + uvicorn + ONNX Runtime, one process."""
    import onnxruntime as ort
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    options = ort.SessionOptions()
    options.intra_op_num_threads = ORT_THREADS
    # The same INT8 arithmetic as medkd's sessions (exact on CPUs without VNNI, where it is slower),
    # so that the comparison measures the serving stacks, not two different kernels.
    options.add_session_config_entry(X64_QUANT_PRECISION, "1")
    session = ort.InferenceSession(
        str(Path(model_dir) / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request):
        image = np.load(io.BytesIO(await request.body()), allow_pickle=False)
        batch = ((image.astype(np.float32) / 255.0 - 0.5) / 0.5).reshape(1, 1, *image.shape[-2:])
        logits = session.run(None, {"image": batch})[0][0].astype(np.float64)
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        return JSONResponse({"probabilities": probabilities.tolist(), "predicted_class": int(probabilities.argmax())})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ----------------------------------------------------------------------------- (c), (d) medkd


def medkd_server(model_dir: str, port: int) -> None:
    """medkd as `medkd serve` runs it, in its own Ray instance (ends it on SIGTERM): the fast path
    when haproxy is on PATH, unless MEDKD_SERVE_HA_PROXY=0."""
    import ray
    from ray import serve

    from medkd.serve import ha_proxy
    from medkd.serve.app import deploy, serve_until_stopped
    from medkd.spec.serve import ServeConfig

    fast_path = ha_proxy.enable()
    print(fast_path.message, file=sys.stderr, flush=True)

    for attempt in range(3):  # on a loaded machine the raylet may miss Ray's fixed 30 s start-up window
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    config = ServeConfig(
        port=port,
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=0.5,
        max_ongoing_requests=64,
        max_batch_size=BATCH_IMAGES,  # /predict/batch runs at the batch size in-process ORT is timed at
        max_queued_requests=1024,
        ort_threads=ORT_THREADS,
    )
    for attempt in range(3):  # Serve kills a proxy not ready within 60 s, which a loaded machine can miss
        try:
            url = deploy(model_dir, config, app_name="bench")
            break
        except Exception as error:
            print(
                f"medkd-server: Serve did not start ({type(error).__name__}); attempt {attempt + 1}/3", file=sys.stderr
            )
            serve.shutdown()
            if attempt == 2:
                raise
    print(f"READY {url} ha_proxy={int(fast_path.enabled)}", flush=True)
    try:
        serve_until_stopped("bench", shutdown_ray=True)
    finally:
        fast_path.close()


def start(role: str, model_dir: Path, port: int, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Start a server process (``--plain-server`` / ``--medkd-server``) and wait until it answers."""
    log = Path(tempfile.mkstemp(prefix=f"medkd-bench-{role}-", suffix=".log")[1])
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.serve_throughput", f"--{role}", str(model_dir), str(port)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_LIMIT_S
    if role == "medkd-server":
        for line in process.stdout:
            if line.startswith("READY "):
                _, url, ha = line.split()
                return process, url + ("#ha" if ha == "ha_proxy=1" else "")
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"{role} did not start; the end of its log ({log}):\n" + log.read_text()[-3000:])
    import urllib.request

    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/docs", timeout=2)
            return process, url
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{role} did not start")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


# ----------------------------------------------------------------------------- load


async def drive(
    url: str, body: bytes, *, clients: int, seconds: float, warmup_s: float = 1.0, server_pid: int | None = None
) -> dict:
    """Drive ``url`` from ``clients`` aiohttp clients; latencies, failures, and the CPU this process (the
    clients) and the server's process tree (``server_pid`` and its descendants) used in the timed window."""
    import aiohttp

    latencies: list[float] = []
    server_ms: list[float] = []
    failures = 0
    begin = time.perf_counter() + warmup_s
    end = begin + seconds
    server_pids = process_tree(server_pid) if server_pid else []
    cpu: dict[str, float] = {}

    async def census() -> None:
        await asyncio.sleep(max(0.0, begin - time.perf_counter()))
        client_cpu, server_cpu = time.process_time(), cpu_seconds(server_pids)
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        cpu["client"] = time.process_time() - client_cpu
        cpu["server"] = cpu_seconds(server_pids) - server_cpu

    async def client(session) -> None:
        nonlocal failures
        while (sent := time.perf_counter()) < end:
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/x-npy"}) as answer:
                    payload = await answer.read()
                    ok = answer.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok, payload = False, b""
            if sent < begin:
                continue
            if not ok:
                failures += 1
                continue
            latencies.append(time.perf_counter() - sent)
            if (replica_ms := replica_latency_ms(payload)) is not None:
                server_ms.append(replica_ms)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(census(), *(client(session) for _ in range(clients)))
    result = summarize(latencies, seconds, failures)
    result["server_p50_ms"] = float(np.median(server_ms)) if server_ms else float("nan")
    for side in ("client", "server"):
        result[f"{side}_cores"] = cpu[side] / seconds
        result[f"{side}_cpu_ms"] = 1000.0 * cpu[side] / max(len(latencies) + failures, 1)
    return result


def line(name: str, result: dict, unit: str = "req/s") -> str:
    text = (
        f"{name:28s} {result['rps']:8.1f} {unit}  p50={result['p50_ms']:7.2f} ms  p99={result['p99_ms']:8.2f} ms"
        f"  in-replica p50={result.get('server_p50_ms', float('nan')):6.2f} ms  failures={result['failures']}"
    )
    if "client_cores" in result:  # a driven server (not in-process ORT)
        text += (
            f"  CPU: clients {result['client_cores']:.2f} cores ({result['client_cpu_ms']:.3f} ms/req), server "
            f"{result['server_cores']:.2f} cores ({result['server_cpu_ms']:.3f} ms/req)"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--model-dir", type=Path, help="an exported student (default: a tiny CNN exported here)")
    parser.add_argument("--skip-python-proxy", action="store_true", help="leave out (c)")
    parser.add_argument("--plain-server", nargs=2, metavar=("MODEL_DIR", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--medkd-server", nargs=2, metavar=("MODEL_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_server:
        return plain_server(args.plain_server[0], int(args.plain_server[1]))
    if args.medkd_server:
        return medkd_server(args.medkd_server[0], int(args.medkd_server[1]))

    from medkd.serve.codecs import encode_npy

    workdir = Path(tempfile.mkdtemp(prefix="medkd-serve-bench-"))
    model_dir = args.model_dir or export_tiny_cnn(workdir / "model", args.image_size)
    size = json.loads((model_dir / "metadata.json").read_text())["input"]["image_size"]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size, dtype=np.uint8)
    stack = rng.integers(0, 256, (BATCH_IMAGES, *size), dtype=np.uint8)

    raw = raw_ort(model_dir, image, stack, args.seconds)
    print(line("(a) raw ORT, 1 image", raw["single"]), flush=True)
    print(f"(a) raw ORT, batch {BATCH_IMAGES}: {raw['batch_images_per_s']:.0f} images/s", flush=True)
    print(
        f"ONNX Runtime intra-op threads: {ORT_THREADS} in (a), (b) and medkd's replica; one replica, one plain "
        f"uvicorn process; load average before the servers start: {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    results: dict[tuple[str, int], dict] = {}
    try:
        servers["plain"] = start("plain-server", model_dir, free_port(), {})
        servers["medkd"] = start("medkd-server", model_dir, free_port(), {})
        ha = servers["medkd"][1].endswith("#ha")
        servers["medkd"] = (servers["medkd"][0], servers["medkd"][1].removesuffix("#ha"))
        print(f"(d) medkd as shipped: {'HAProxy fast path' if ha else 'Python proxy (no haproxy on PATH)'}", flush=True)
        if not args.skip_python_proxy:
            process, url = start("medkd-server", model_dir, free_port(), {"MEDKD_SERVE_HA_PROXY": "0"})
            servers["medkd_py"] = (process, url.removesuffix("#ha"))
        body = encode_npy(image)
        for clients in CONCURRENCY:
            for name, (_, url) in servers.items():
                results[(name, clients)] = asyncio.run(
                    drive(
                        url + "/predict", body, clients=clients, seconds=args.seconds, server_pid=servers[name][0].pid
                    )
                )
                print(line(f"({name}) c={clients}", results[(name, clients)]), flush=True)
        import urllib.request

        for name in ("medkd", "medkd_py"):
            if name in servers:  # natural batching: batch_wait_timeout_s is 0, batches form under load
                stats = json.loads(urllib.request.urlopen(servers[name][1] + "/stats", timeout=30).read())
                print(
                    f"({name}) single-image requests: {stats['images']} images in {stats['batches']} model calls, "
                    f"largest batch {stats['largest_batch']}",
                    flush=True,
                )
        batch_body = encode_npy(stack)

        def batch_route(name: str) -> dict:
            process, url = servers[name]
            result = asyncio.run(
                drive(
                    url + "/predict/batch",
                    batch_body,
                    clients=BATCH_CLIENTS,
                    seconds=args.seconds,
                    server_pid=process.pid,
                )
            )
            result["images_per_s"] = result["rps"] * BATCH_IMAGES
            print(
                line(f"({name}) batch {BATCH_IMAGES} x{BATCH_CLIENTS}", result)
                + f"  = {result['images_per_s']:.0f} images/s",
                flush=True,
            )
            return result

        # Only the server under test runs while a batch route is timed: the others go first.
        stop(servers.pop("plain")[0])
        if "medkd_py" in servers:
            results[("medkd_py", "batch")] = batch_route("medkd_py")
            stop(servers.pop("medkd_py")[0])
        # The batch ratio compares the batch route with in-process ORT measured right before and
        # right after it (their mean): the machine's load drifts, and the first ORT figure above is
        # minutes older.
        adjacent = [raw_ort(model_dir, image, stack, args.seconds, cases=("batch",))["batch_images_per_s"]]
        results[("medkd", "batch")] = batch_route("medkd")
        adjacent.append(raw_ort(model_dir, image, stack, args.seconds, cases=("batch",))["batch_images_per_s"])
        print(
            f"(a) raw ORT, batch {BATCH_IMAGES}, right before and after (d)'s batch route: "
            f"{adjacent[0]:.0f} and {adjacent[1]:.0f} images/s",
            flush=True,
        )
        raw["batch_images_per_s"] = sum(adjacent) / len(adjacent)
    finally:
        for process, _ in servers.values():
            stop(process)
        shutil.rmtree(workdir, ignore_errors=True)

    shipped = {clients: results[("medkd", clients)] for clients in CONCURRENCY}
    c1 = shipped[1]
    print(
        f"where the time goes at c=1: client p50 {c1['p50_ms']:.2f} ms, in the replica {c1['server_p50_ms']:.2f} ms "
        f"(decode, batch wait, ORT, JSON), proxy hop + HTTP {c1['p50_ms'] - c1['server_p50_ms']:.2f} ms",
        flush=True,
    )
    if ("medkd_py", 8) in results:
        print(f"(d) shipped vs (c) Python proxy at c=8: {shipped[8]['rps'] / results[('medkd_py', 8)]['rps']:.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}", flush=True)
    print(
        f"RESULT serve_vs_plain={shipped[8]['rps'] / results[('plain', 8)]['rps']:.2f} "
        f"batch_images_vs_raw_ort={results[('medkd', 'batch')]['images_per_s'] / raw['batch_images_per_s']:.2f} "
        f"p50_ms_c8={shipped[8]['p50_ms']:.1f} p99_ms_c64={shipped[64]['p99_ms']:.1f} "
        f"rps_c64_vs_c8={shipped[64]['rps'] / shipped[8]['rps']:.2f} ha_proxy={int(ha)}"
    )


if __name__ == "__main__":
    main()
