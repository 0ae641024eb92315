"""Distillation epoch time with cached teacher logits vs online teacher forward passes.

    python -m benchmarks.cache_speedup [--num-train 1000] [--epochs 2] [--threads 2]
                                       [--sizes 28 64] [--data PATH.npz ...] [--trials 20]

One student (``resnet_tiny``) is distilled for the same number of epochs from three teachers —
a CNN, a ViT and a second CNN (``resnet18``, ``vit_tiny``, ``resnet34``; randomly initialised:
only the cost of their forward passes matters here, not their accuracy) — on the same data,
from the same initial weights, with the same seed and the same torch thread count, four ways:

* ``online``: every batch runs the three teachers (eval mode, ``torch.no_grad``);
* ``cache/batch``: every batch reads its logits from the real :class:`SoftLabelCache` on a real
  redis-server with ``fetch(..., indices=batch)`` (the way a segmentation trial reads them;
  in-process LRU on, as trials run it);
* ``cache/batch-nolru``: the same with the LRU off, so every batch is a Redis round trip;
* ``cache/split``: the whole split is fetched once per trial (the way a classification trial
  reads them), then indexed in memory; the fetch is timed and added to the trial's cost.

The machine may be shared, so the four runs are **interleaved step by step**: each runs in its
own thread, and a round-robin baton lets exactly one of them compute at a time, handing over at
every training step; time spent waiting for the baton is subtracted from the epoch times. Load
from other processes thus hits all variants alike, within seconds.

The one-off cost of the cache — each teacher's inference over the training split (batch 256)
and publishing the logits — is measured too (before the runs, not interleaved) and amortised
over one trial and over ``--trials`` trials of a search. The students' final logits on the
validation split are compared across variants (float16 cached logits ⇒ small differences from
online; the cached variants must agree exactly with each other).

Data: synthetic (``SyntheticDataSpec(image_size=s)``) for each of ``--sizes``, or a MedMNIST
``.npz`` given with ``--data`` (its image size replaces the synthetic data of that size).
Ends with one line ``RESULT cache_speedup_28=<online / slowest cached epoch time> cache_speedup_64=…``
(target >= 3).
"""

from __future__ import annotations

import argparse
import copy
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medkd.core.fingerprint import fingerprint
from medkd.data import Dataset, MedMNISTDataSpec, SyntheticDataSpec, load_dataset
from medkd.data.meta import DatasetMeta
from medkd.softlabels.redis_server import ManagedRedisServer
from medkd.softlabels.store import SoftLabelCache
from medkd.students.distill import (
    DistillConfig,
    TeacherLogitsFn,
    array_teacher_logits,
    build_student,
    distill,
    predict_logits,
)
from medkd.students.registry import count_parameters
from medkd.teachers.registry import create_teacher

TEACHERS = ("resnet18", "vit_tiny", "resnet34")
NAMESPACE = "bench-speedup"
SPLIT = "train"
INFERENCE_BATCH = 256


# --------------------------------------------------------------------------- round-robin baton


class RoundRobin:
    """Lets registered threads run one at a time, in turn: ``wait_turn`` blocks until it is the
    caller's turn, ``pass_turn`` hands over to the next participant still running."""

    def __init__(self, names: list[str]) -> None:
        self._order = list(names)
        self._active = set(names)
        self._turn = 0
        self._cond = threading.Condition()

    def wait_turn(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._order[self._turn] == name)

    def pass_turn(self, name: str) -> None:
        with self._cond:
            self._advance(name)

    def finish(self, name: str) -> None:
        with self._cond:
            self._active.discard(name)
            self._advance(name)

    def _advance(self, name: str) -> None:
        if self._order[self._turn] != name or not self._active:
            self._cond.notify_all()
            return
        for step in range(1, len(self._order) + 1):
            candidate = (self._turn + step) % len(self._order)
            if self._order[candidate] in self._active:
                self._turn = candidate
                break
        self._cond.notify_all()


@dataclass
class Variant:
    name: str
    make_logits: Callable[[], TeacherLogitsFn]  # called in the variant's thread, timed as per-trial setup
    setup_seconds: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)  # training time, baton waits excluded
    logits_seconds: list[float] = field(default_factory=list)  # of which: getting the teacher logits
    student: nn.Module | None = None
    error: BaseException | None = None

    @property
    def total_seconds(self) -> float:
        return sum(self.epoch_seconds)


def run_interleaved(
    variants: list[Variant],
    base_student: nn.Module,
    config: DistillConfig,
    *,
    threads: int,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    meta: DatasetMeta,
) -> None:
    """Distill a copy of ``base_student`` per variant, interleaved step by step.

    Each variant trains in its own thread; before every step's teacher logits it hands the baton
    to the next variant and waits for its turn again, so exactly one variant computes at any time
    and they alternate every step. The time spent waiting is subtracted from the epoch times.
    """
    baton = RoundRobin([v.name for v in variants])

    def work(variant: Variant) -> None:
        torch.set_num_threads(threads)  # per thread: OpenMP's thread count is a per-thread setting
        baton.wait_turn(variant.name)
        try:
            start = time.perf_counter()
            teacher_logits = variant.make_logits()
            variant.setup_seconds = time.perf_counter() - start
            variant.student = copy.deepcopy(base_student)
            waited = fetching = 0.0

            def gated_logits(indices: np.ndarray) -> np.ndarray:
                nonlocal waited, fetching
                start = time.perf_counter()
                baton.pass_turn(variant.name)
                baton.wait_turn(variant.name)
                resumed = time.perf_counter()
                waited += resumed - start
                logits = teacher_logits(indices)
                fetching += time.perf_counter() - resumed
                return logits

            def end_of_epoch(record: dict[str, Any]) -> None:
                nonlocal waited, fetching
                variant.epoch_seconds.append(record["epoch_seconds"] - waited)
                variant.logits_seconds.append(fetching)
                waited = fetching = 0.0

            distill(
                variant.student,
                config,
                train_images=train_images,
                train_labels=train_labels,
                teacher_logits=gated_logits,
                meta=meta,
                on_epoch=end_of_epoch,
            )
        except BaseException as error:  # re-raised by the main thread
            variant.error = error
        finally:
            baton.finish(variant.name)

    workers = [threading.Thread(target=work, args=(v,), name=f"distill:{v.name}", daemon=True) for v in variants]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for variant in variants:
        if variant.error is not None:
            raise RuntimeError(f"variant {variant.name} failed: {variant.error}") from variant.error


# --------------------------------------------------------------------------- data and teachers


def load_data(size: int, num_train: int, num_val: int, files: dict[int, Path], seed: int) -> tuple[Dataset, str]:
    if size in files:
        dataset = load_dataset(MedMNISTDataSpec(path=files[size]))
        if len(dataset.splits["train"]) > num_train:
            dataset = dataset.subset({"train": num_train}, seed=seed)
        return dataset, f"MedMNIST {files[size].name}"
    spec = SyntheticDataSpec(image_size=size, num_train=num_train, num_val=num_val, num_test=16, seed=seed)
    return load_dataset(spec), "synthetic"


def medmnist_sizes(paths: list[Path]) -> dict[int, Path]:
    files: dict[int, Path] = {}
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--data: file not found: {path}")
        with np.load(path) as npz:
            if "train_images" not in npz:
                raise SystemExit(f"--data: {path} is not a MedMNIST .npz (no train_images array)")
            shape = npz["train_images"].shape
        if len(shape) not in (3, 4) or shape[1] != shape[2]:
            raise SystemExit(f"--data: {path} holds images of shape {shape[1:]}; expected square 2D images")
        files[int(shape[1])] = path
    return files


def build_teachers(meta: DatasetMeta, seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    teachers = {}
    for name in TEACHERS:
        teacher = create_teacher(
            name,
            spatial_dims=meta.spatial_dims,
            in_channels=meta.in_channels,
            num_classes=meta.num_classes,
            image_size=tuple(meta.image_size),
        )
        teachers[name] = teacher.eval()
    return teachers


def online_teacher_logits(teachers: list[nn.Module], images: np.ndarray) -> TeacherLogitsFn:
    """Run every teacher on the batch (eval mode, no autograd): what distillation without a cache does."""

    def logits(indices: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(images[indices])
        with torch.no_grad():
            return np.stack([teacher(batch).float().numpy() for teacher in teachers])

    return logits


def cached_batch_logits(cache: SoftLabelCache, fps: list[str], dataset_fp: str) -> TeacherLogitsFn:
    """Per batch from Redis, as ``medkd.search.run`` reads segmentation logits."""
    return lambda indices: np.stack([cache.fetch(fp, dataset_fp, SPLIT, indices=indices) for fp in fps])


def in_worker_thread(fn: Callable[[], Any], threads: int) -> Any:
    """Run ``fn`` in a fresh thread with ``threads`` torch threads: the conditions the variants train in."""
    result: dict[str, Any] = {}

    def work() -> None:
        torch.set_num_threads(threads)
        try:
            result["value"] = fn()
        except BaseException as error:
            result["error"] = error

    worker = threading.Thread(target=work, name="one-off", daemon=True)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def warm_up(teachers: list[nn.Module], student: nn.Module, images: np.ndarray, batch_size: int) -> None:
    """First calls pay for lazy initialisation (oneDNN primitives, allocator); keep that out of the timings."""
    batch = torch.from_numpy(images[:batch_size])
    with torch.no_grad():
        for teacher in teachers:
            teacher(batch)
    scratch = copy.deepcopy(student).train()
    scratch(batch).float().sum().backward()


# --------------------------------------------------------------------------- one size


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    scale = float(np.abs(reference).max()) or 1.0
    return {
        "max_abs": float(np.abs(other - reference).max()),
        "max_rel": float(np.abs(other - reference).max()) / scale,
        "argmax": float((other.argmax(1) == reference.argmax(1)).mean()),
    }


def benchmark_size(
    server: ManagedRedisServer, size: int, args: argparse.Namespace, files: dict[int, Path]
) -> dict[str, Any]:
    dataset, source = load_data(size, args.num_train, args.num_val, files, args.seed)
    meta = DatasetMeta.of(dataset)
    train, val = dataset.splits["train"], dataset.splits["val"]
    config = DistillConfig(
        student=args.student, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, temperature=4.0, alpha=0.5
    )
    teachers = build_teachers(meta, args.seed)
    torch.manual_seed(args.seed)
    base_student = build_student(meta, config)
    print(
        f"\n== {size}x{size}: {source}, {len(train)} train / {len(val)} val images, {meta.num_classes} classes; "
        f"student {config.student} ({count_parameters(base_student) / 1e6:.2f}M params), batch {config.batch_size}, "
        f"{config.epochs} epochs, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    print(
        "   teachers (randomly initialised, eval mode): "
        + ", ".join(f"{n} ({count_parameters(t) / 1e6:.1f}M)" for n, t in teachers.items()),
        flush=True,
    )

    in_worker_thread(
        lambda: warm_up(list(teachers.values()), base_student, train.images, config.batch_size), args.threads
    )
    # One-off: teacher inference over the split and publishing (done once per teacher and dataset).
    writer = SoftLabelCache(server.url, namespace=NAMESPACE)
    fps: list[str] = []
    reference: dict[str, np.ndarray] = {}
    infer_s = publish_s = 0.0
    stored = 0
    for name, teacher in teachers.items():
        fp = fingerprint("bench-teacher", name, "random-init", args.seed, dataset.fingerprint)
        start = time.perf_counter()
        logits = in_worker_thread(
            lambda teacher=teacher: predict_logits(teacher, train.images, batch_size=INFERENCE_BATCH), args.threads
        )
        infer_s += time.perf_counter() - start
        start = time.perf_counter()
        manifest = writer.publish(
            fp, dataset.fingerprint, SPLIT, logits, teacher_spec={"model": name, "init": "random"}, overwrite=True
        )
        publish_s += time.perf_counter() - start
        stored += manifest.nbytes
        fps.append(fp)
        reference[name] = logits
    writer.close()
    reader = SoftLabelCache(server.url, namespace=NAMESPACE, lru_bytes=0)
    cached = np.stack([reader.fetch(fp, dataset.fingerprint, SPLIT) for fp in fps])
    reader.close()
    online_ref = np.stack([reference[n] for n in teachers])
    teacher_err = float(np.abs(cached - online_ref).max())
    print(
        f"   one-off: teacher inference {infer_s:.1f} s + publish {publish_s * 1e3:.0f} ms "
        f"({len(fps)} entries, {stored / 1e3:.1f} KB in Redis, float16); "
        f"cached vs float32 teacher logits: max |dz| = {teacher_err:.2e} (|z| <= {np.abs(online_ref).max():.2f})",
        flush=True,
    )

    batch_cache = SoftLabelCache(server.url, namespace=NAMESPACE)
    cold_cache = SoftLabelCache(server.url, namespace=NAMESPACE, lru_bytes=0)
    split_cache = SoftLabelCache(server.url, namespace=NAMESPACE)
    variants = [
        Variant("online", lambda: online_teacher_logits(list(teachers.values()), train.images)),
        Variant("cache/batch", lambda: cached_batch_logits(batch_cache, fps, dataset.fingerprint)),
        Variant("cache/batch-nolru", lambda: cached_batch_logits(cold_cache, fps, dataset.fingerprint)),
        Variant(
            "cache/split",
            lambda: array_teacher_logits(np.stack([split_cache.fetch(fp, dataset.fingerprint, SPLIT) for fp in fps])),
        ),
    ]
    run_interleaved(
        variants,
        base_student,
        config,
        threads=args.threads,
        train_images=train.images,
        train_labels=train.labels,
        meta=meta,
    )
    reads = {
        name: dict(cache.counters)
        for name, cache in (
            ("cache/batch", batch_cache),
            ("cache/batch-nolru", cold_cache),
            ("cache/split", split_cache),
        )
    }
    for cache in (batch_cache, cold_cache, split_cache):
        cache.close()

    by_name = {v.name: v for v in variants}
    online = by_name["online"]
    header = "".join(f"{'epoch ' + str(i + 1):>10s}" for i in range(config.epochs))
    print(
        "   training time per epoch (baton waits excluded); 'logits': of the total, getting teacher logits; "
        "'setup': once per trial"
    )
    print(
        f"   {'variant':18s}{header}{'total':>10s}{'logits':>10s}{'setup':>10s}{'speedup':>9s}"
        f"   reads (Redis chunks / LRU hits)"
    )
    speedups: dict[str, float] = {}
    for variant in variants:
        epochs = "".join(f"{s:9.2f}s" for s in variant.epoch_seconds)
        ratio = online.total_seconds / variant.total_seconds
        speedups[variant.name] = ratio
        counters = reads.get(variant.name)
        read_text = f"   {counters['chunk_reads']} / {counters['lru_hits']}" if counters else ""
        print(
            f"   {variant.name:18s}{epochs}{variant.total_seconds:9.2f}s{sum(variant.logits_seconds):9.2f}s"
            f"{variant.setup_seconds * 1e3:8.1f}ms"
            f"{ratio:8.2f}x{read_text}"
        )

    cached_variants = [v for v in variants if v.name != "online"]
    slowest = max(cached_variants, key=lambda v: v.total_seconds)
    headline = online.total_seconds / slowest.total_seconds
    one_off = infer_s + publish_s
    trial_cached = max(v.total_seconds + v.setup_seconds for v in cached_variants)  # a trial's cost, reads included

    def amortised(trials: int) -> float:
        return trials * online.total_seconds / (one_off + trials * trial_cached)

    print(f"   speedup per epoch (online / slowest cached variant, {slowest.name}): {headline:.2f}x")
    print(
        f"   amortised, one-off {one_off:.1f} s included (its teacher inference was measured before the runs, not "
        f"interleaved; the online run spent {statistics.mean(online.logits_seconds):.1f} s per epoch in teacher "
        f"forward passes, interleaved), a trial's cache reads included: 1 trial of {config.epochs} epochs {amortised(1):.2f}x, {args.trials} trials "
        f"{amortised(args.trials):.2f}x, limit {online.total_seconds / trial_cached:.2f}x"
    )

    student_logits = {v.name: predict_logits(v.student, val.images) for v in variants}
    vs_online = {v.name: agreement(student_logits["online"], student_logits[v.name]) for v in cached_variants}
    among_cached = max(
        agreement(student_logits["cache/batch"], student_logits[v.name])["max_abs"] for v in cached_variants
    )
    worst = max(vs_online.values(), key=lambda a: a["max_abs"])
    print(
        f"   student val logits, cached vs online teachers: max |dz| = {worst['max_abs']:.2e} "
        f"({worst['max_rel']:.1e} of max |z| = {np.abs(student_logits['online']).max():.2f}), "
        f"argmax agreement {min(a['argmax'] for a in vs_online.values()):.4f}; "
        f"between the cached variants: max |dz| = {among_cached:.1e}",
        flush=True,
    )
    return {
        "speedup": headline,
        "speedups": speedups,
        "amortised_1": amortised(1),
        "amortised_k": amortised(args.trials),
        "one_off": one_off,
        "student_max_abs": worst["max_abs"],
        "student_argmax": min(a["argmax"] for a in vs_online.values()),
        "among_cached": among_cached,
        "online_epoch": statistics.mean(online.epoch_seconds),
        "cached_epoch": statistics.mean(slowest.epoch_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64], help="image sizes (synthetic data)")
    parser.add_argument(
        "--data",
        type=Path,
        nargs="*",
        default=[],
        help="MedMNIST .npz files; each replaces the synthetic data of its image size",
    )
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--student", default="resnet_tiny")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every variant")
    parser.add_argument("--trials", type=int, default=20, help="search trials the one-off cost is amortised over")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the redis-server is shut down
    for name in ("num_train", "num_val", "epochs", "batch_size", "threads", "trials"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.num_train < args.batch_size:
        parser.error(f"--num-train ({args.num_train}) must be at least --batch-size ({args.batch_size})")
    files = medmnist_sizes(args.data)
    sizes = sorted(set(args.sizes) | set(files))
    torch.set_num_threads(args.threads)
    print(
        f"cache speedup: 1 student x {len(TEACHERS)} teachers ({', '.join(TEACHERS)}), cached logits vs online "
        f"teachers; the variants run interleaved step by step (round-robin, one at a time, waits excluded) in one process, so "
        f"load from other processes hits them alike. CPU, torch threads {args.threads}."
    )
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="medkd-bench-") as tmp, ManagedRedisServer(data_dir=Path(tmp)) as server:
        for size in sizes:
            results[size] = benchmark_size(server, size, args, files)
    parts = [f"cache_speedup_{s}={r['speedup']:.2f}" for s, r in results.items()]
    for s, r in results.items():
        parts += [
            f"cache_speedup_{s}_batch={r['speedups']['cache/batch']:.2f}",
            f"cache_speedup_{s}_batch_nolru={r['speedups']['cache/batch-nolru']:.2f}",
            f"cache_speedup_{s}_split={r['speedups']['cache/split']:.2f}",
            f"amortised_{s}_1trial={r['amortised_1']:.2f}",
            f"amortised_{s}_{args.trials}trials={r['amortised_k']:.2f}",
            f"student_logit_maxdiff_{s}={r['student_max_abs']:.2e}",
        ]
    print("RESULT " + " ".join(parts))


if __name__ == "__main__":
    main()
