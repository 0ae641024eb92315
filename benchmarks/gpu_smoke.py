"""GPU smoke run: medkd's GPU work beside the same work on the CPU, on a machine with a CUDA device.

    python -m benchmarks.gpu_smoke [--image-size 64] [--num-train 2048]

Four measurements, each the same work once on the GPU and once on the CPU, through medkd's own
code, on a local Ray cluster that offers the machine's CPUs and GPUs:

- ``teacher``: one epoch of a teacher (``resnet18``) through the teacher stage
  (``train_one_teacher``, Ray Train), ``use_gpu: true`` with mixed precision vs ``use_gpu:
  false``; the figure is the ratio of their training times (CPU / GPU: above 1 means faster);
- ``softlabels``: the soft-label inference over the training split (``predict``, the function
  the soft-label tasks run) on ``cuda`` vs ``cpu``;
- ``trial``: one search trial's recipe (``train_candidate``: distill, compress, export) in a Ray
  task holding one GPU (``search.gpus_per_trial: 1``) vs none, on the device the trial takes
  (``reserved_gpu_device``): a ratio near 1 says the trial does not use its GPU;
- ``ort``: ONNX Runtime inference of the exported teacher with the ``CUDAExecutionProvider`` vs
  the CPU one (needs ``onnxruntime-gpu``; without it the figure is ``n/a`` and says why).

Ends with ``RESULT teacher_gpu_vs_cpu=… softlabels_gpu_vs_cpu=… trial_gpu_vs_cpu=… ort_gpu_vs_cpu=…``.
Without a CUDA device it stops at once, before Ray or any data, with a message and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import configure_local_ray, local_ray, print_result

NO_DEVICE_EXIT = 2


def cuda_problem() -> str | None:
    """Why this machine cannot run the GPU smoke test (None: it can).

    Examples:
        >>> cuda_problem() is None or "no CUDA device" in cuda_problem()
        True
    """
    import torch

    if torch.cuda.is_available():
        return None
    return (
        f"no CUDA device: PyTorch {torch.__version__} (built for CUDA {torch.version.cuda or 'none'}) finds none "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})"
    )


def log(message: str) -> None:
    print(f"[gpu_smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed(fn: Any) -> tuple[Any, float]:
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return value, time.perf_counter() - started


def teacher_epochs(dataset: Any, meta: Any, data_ref: Any, output: Path) -> dict[str, Any]:
    """One epoch of the same teacher with and without the GPU; the artifacts and times."""
    from medkd.spec.teachers import TeacherSpec
    from medkd.teachers.train import train_one_teacher

    runs = {}
    for name, use_gpu in (("gpu", True), ("cpu", False)):
        teacher = TeacherSpec(
            name=f"smoke-{name}",
            model="resnet18",
            epochs=1,
            batch_size=64,
            use_gpu=use_gpu,
            mixed_precision=True,
            cpus_per_worker=1,
            max_failures=0,
        )
        artifact = train_one_teacher(
            teacher,
            teacher_fp=f"gpusmoke{name}",
            seed=0,
            meta=meta,
            data_ref=data_ref,
            output_dir=output,
            storage_path=str(output / "ray"),
        )
        runs[name] = artifact
        log(f"teacher epoch on {name}: {artifact.train_seconds:.1f}s")
    return runs


def softlabel_inference(artifact: Any, meta: Any, images: Any) -> dict[str, float]:
    import torch

    from medkd.teachers.loop import predict
    from medkd.teachers.train import load_teacher_model

    seconds = {}
    for name in ("cuda", "cpu"):
        device = torch.device(name)
        model = load_teacher_model(artifact, meta).to(device)
        predict(model, images[:128], 128, device)  # warm-up (CUDA context, cuDNN autotune)
        _, seconds[name] = timed(lambda model=model, device=device: predict(model, images, 128, device))
        log(f"soft-label inference on {name}: {seconds[name]:.2f}s for {len(images)} images")
    return seconds


def search_trial(meta: Any, data_ref: Any, epochs: int) -> dict[str, float]:
    import ray

    seconds = {}
    for name, gpus in (("gpu", 1), ("cpu", 0)):
        task = ray.remote(num_cpus=1, num_gpus=gpus)(_trial_task)
        seconds[name] = ray.get(task.remote(meta, [data_ref], epochs))
        log(f"search trial recipe with {gpus} GPU: {seconds[name]:.1f}s")
    return seconds


def _trial_task(meta: Any, data_refs: list, epochs: int) -> float:
    import ray

    from medkd.core.devices import reserved_gpu_device
    from medkd.search.recipe import train_candidate
    from medkd.students.distill import DistillConfig, build_student

    device = reserved_gpu_device("search.gpus_per_trial")
    data = ray.get(data_refs[0])
    config = DistillConfig(student="resnet_tiny", epochs=epochs, alpha=1.0, quantize="none")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        train_candidate(
            build_student(meta, config),
            config,
            meta=meta,
            train=data["train"],
            val=data["val"],
            teacher_logits=None,
            augment=None,
            directory=Path(directory),
            latency_runs=5,
            device=device,
        )
    return time.perf_counter() - started


def ort_inference(artifact: Any, meta: Any, images: Any, output: Path) -> dict[str, float] | str:
    import numpy as np
    import onnxruntime as ort
    import torch

    from medkd.students.compression import export_onnx
    from medkd.teachers.train import load_teacher_model

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            f"n/a (onnxruntime {ort.__version__} has no CUDAExecutionProvider: install onnxruntime-gpu; "
            f"providers: {', '.join(ort.get_available_providers())})"
        )
    batch = np.ascontiguousarray(images[:64], dtype=np.float32)
    path = export_onnx(load_teacher_model(artifact, meta).eval(), torch.from_numpy(batch[:2]), output / "teacher.onnx")
    seconds = {}
    for name, providers in (
        ("gpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        ("cpu", ["CPUExecutionProvider"]),
    ):
        session = ort.InferenceSession(str(path), providers=providers)
        if name == "gpu" and session.get_providers()[0] != "CUDAExecutionProvider":
            return f"n/a (ONNX Runtime fell back to {session.get_providers()[0]})"
        feed = {session.get_inputs()[0].name: batch}
        for _ in range(3):
            session.run(None, feed)
        started = time.perf_counter()
        for _ in range(20):
            session.run(None, feed)
        seconds[name] = time.perf_counter() - started
        log(f"ONNX Runtime on {name}: {seconds[name] / 20 * 1000:.1f} ms per batch of {len(batch)}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64, help="synthetic images of this size (default 64)")
    parser.add_argument("--num-train", type=int, default=2048, help="training images (default 2048)")
    parser.add_argument("--trial-epochs", type=int, default=2, help="epochs of the search trial (default 2)")
    args = parser.parse_args(argv)
    problem = cuda_problem()
    if problem is not None:
        print(
            f"gpu_smoke: {problem}. This benchmark compares GPU and CPU work and needs a machine with a CUDA "
            "device; nothing was run.",
            file=sys.stderr,
            flush=True,
        )
        return NO_DEVICE_EXIT

    import torch

    configure_local_ray()
    from medkd.data import SyntheticDataSpec, load_dataset
    from medkd.data.meta import DatasetMeta

    dataset = load_dataset(
        SyntheticDataSpec(image_size=args.image_size, num_train=args.num_train, num_val=256, num_test=64, num_classes=2)
    )
    meta = DatasetMeta.of(dataset)
    images = dataset.splits["train"].images
    log(f"{torch.cuda.get_device_name(0)}; {len(images)} synthetic images of {args.image_size} px")
    with (
        tempfile.TemporaryDirectory() as tmp,
        local_ray(num_cpus=max(2, os.cpu_count() or 2), num_gpus=torch.cuda.device_count()) as ray,
    ):
        output = Path(tmp)
        data_ref = ray.put(dataset.arrays())
        teachers = teacher_epochs(dataset, meta, data_ref, output)
        soft = softlabel_inference(teachers["gpu"], meta, images)
        trial = search_trial(meta, data_ref, args.trial_epochs)
        ort_seconds = ort_inference(teachers["gpu"], meta, images, output)
    ort_ratio = (ort_seconds["cpu"] / ort_seconds["gpu"]) if isinstance(ort_seconds, dict) else None
    if ort_ratio is None:
        log(f"ONNX Runtime: {ort_seconds}")
    print_result(
        {
            "teacher_gpu_vs_cpu": teachers["cpu"].train_seconds / teachers["gpu"].train_seconds,
            "softlabels_gpu_vs_cpu": soft["cpu"] / soft["cuda"],
            "trial_gpu_vs_cpu": trial["cpu"] / trial["gpu"],
            "ort_gpu_vs_cpu": ort_ratio if ort_ratio is not None else "n/a",
        },
        digits=2,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
