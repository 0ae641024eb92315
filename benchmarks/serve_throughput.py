"""Serving throughput: JSON bodies one at a time vs NPY bodies with dynamic batching.

Deploys a tiny CNN (exported to ONNX here) twice on one local Ray Serve instance, then drives
each application with N concurrent keep-alive HTTP clients on 127.0.0.1 for a fixed time:

(a) ``json``: ``{"image": [[...floats...]]}`` bodies, ``max_batch_size=1`` (no batching);
(b) ``npy_batched``: NPY bodies, ``max_batch_size=16`` (dynamic batching across requests);
(c) ``npy_batch_route``: for reference, client-side batches of 16 images per request to
    ``/predict/batch`` (throughput in images/s).

    python -m benchmarks.serve_throughput [--clients 16] [--seconds 15]

Ends with ``RESULT serve_rps_json=… serve_rps_npy_batched=… speedup=… …``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


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


def drive(
    url: str, body: bytes, content_type: str, *, clients: int, seconds: float, route: str = "/predict", warmup_s: float = 2.0
) -> dict:
    """N threads, each with one keep-alive connection, POSTing ``body`` as fast as answered."""
    parsed = urllib.parse.urlsplit(url)
    path = parsed.path + route
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    start_measure = time.perf_counter() + warmup_s
    stop = start_measure + seconds

    def client() -> None:
        nonlocal failures
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        mine, bad = [], 0
        while True:
            sent = time.perf_counter()
            if sent >= stop:
                break
            connection.request("POST", path, body, {"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            done = time.perf_counter()
            if response.status != 200:
                bad += 1
            elif sent >= start_measure:
                mine.append(done - sent)
        connection.close()
        with lock:
            latencies.extend(mine)
            failures += bad

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests": len(latencies),
        "rps": len(latencies) / seconds,
        "p50_ms": quantiles[49] * 1000,
        "p95_ms": quantiles[94] * 1000,
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--replicas", type=int, default=1, help="min = max replicas of each application")
    args = parser.parse_args()

    import ray

    from medkd.serve.app import deploy, undeploy
    from medkd.serve.client import MedkdClient
    from medkd.serve.codecs import encode_npy
    from medkd.spec.serve import ServeConfig

    workdir = Path(tempfile.mkdtemp(prefix="medkd-serve-bench-"))
    model_dir = export_tiny_cnn(workdir / "model", args.image_size)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    base = ServeConfig(port=free_port(), min_replicas=args.replicas, max_replicas=args.replicas)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.image_size, args.image_size), dtype=np.uint8)
    stack = rng.integers(0, 256, (16, args.image_size, args.image_size), dtype=np.uint8)
    cases = {
        "json": (
            base.model_copy(update={"route_prefix": "/json", "max_batch_size": 1}),
            json.dumps({"image": (image / 255.0).tolist()}).encode(),
            "application/json",
            "/predict",
        ),
        "npy_batched": (
            base.model_copy(update={"route_prefix": "/npy", "max_batch_size": 16}),
            encode_npy(image),
            "application/x-npy",
            "/predict",
        ),
        "npy_batch_route": (
            base.model_copy(update={"route_prefix": "/npy", "max_batch_size": 16}),
            encode_npy(stack),
            "application/x-npy",
            "/predict/batch",
        ),
    }
    results = {}
    try:
        for name, (config, body, content_type, route) in cases.items():
            url = deploy(model_dir, config, app_name=f"bench-{name}")
            results[name] = drive(url, body, content_type, clients=args.clients, seconds=args.seconds, route=route)
            stats = MedkdClient(url).stats()
            mean_batch = stats["images"] / max(stats["batches"], 1)
            print(
                f"{name:16s} body={len(body):6d} B  {results[name]['rps']:7.1f} req/s  "
                f"p50={results[name]['p50_ms']:6.1f} ms  p95={results[name]['p95_ms']:6.1f} ms  "
                f"mean batch={mean_batch:4.1f}  largest={stats['largest_batch']}  "
                f"failures={results[name]['failures']}",
                flush=True,
            )
            undeploy(f"bench-{name}")
    finally:
        for name in cases:
            undeploy(f"bench-{name}")
        ray.shutdown()

    rps_json, rps_npy = results["json"]["rps"], results["npy_batched"]["rps"]
    print(
        f"RESULT serve_rps_json={rps_json:.1f} serve_rps_npy_batched={rps_npy:.1f} "
        f"speedup={rps_npy / rps_json:.2f} p50_ms_json={results['json']['p50_ms']:.1f} "
        f"p50_ms_npy_batched={results['npy_batched']['p50_ms']:.1f} "
        f"images_per_s_batch_route={results['npy_batch_route']['rps'] * len(stack):.0f} clients={args.clients}"
    )


if __name__ == "__main__":
    main()
