"""What compression buys a small CNN student at 28x28: INT8 static quantization and channel pruning.

    python -m benchmarks.compression [--data PATH.npz] [--epochs 6] [--runs 300] [--rounds 3]

A ~0.43M-parameter CNN (conv-BN-ReLU stack) is trained briefly on a MedMNIST file (default
``$MEDKD_DATA_DIR/breastmnist.npz``, ``../shared/data`` by default; synthetic quadrant images
when no file is found), exported to ONNX and then, in one process:

* FP32 vs INT8 static (QDQ, per-channel, calibrated on 256 training images): file size ratio,
  batch-1 latency ratio, test accuracy/AUC of each and their argmax agreement;
* INT8 static with 8-bit vs 7-bit weights (``int8_static_7bit``), each in medkd's session: on x86
  CPUs without VNNI the 8-bit model runs exact (slower) products and the 7-bit one the fast kernels;
  with VNNI both run the same kernels;
* channel pruning (50% of channels by L2 norm, then a short fine-tune) vs the unpruned model,
  both FP32 ONNX: parameter ratio and batch-1 latency ratio.

Latency: ONNX Runtime, CPU, 1 intra-op thread, sequential, warm-up, median of ``--runs``; the
candidates are measured alternately for ``--rounds`` rounds and the median of the round
medians is reported, so load from other processes hits all of them alike.
Ends with ``RESULT int8_size_ratio=<int8/fp32 bytes> int8_speedup=<fp32/int8 latency>
channel_prune_speedup=<unpruned/pruned latency> ... int8_7bit_vs_int8=<int8/int8_7bit latency> ...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from benchmarks._harness import data_file, take_turns
from medkd.core.metrics import softmax
from medkd.students.compression import (
    OnnxModel,
    check_parity,
    count_parameters,
    export_onnx,
    measure_latency,
    model_size_bytes,
    prune_channels,
    quantize,
    quantize_static_int8,
)

DEFAULT_DATA = data_file("breastmnist.npz")


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def student_cnn(in_channels: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        *conv_bn_relu(in_channels, 32), *conv_bn_relu(32, 64, 2), *conv_bn_relu(64, 64),
        *conv_bn_relu(64, 128, 2), *conv_bn_relu(128, 128), *conv_bn_relu(128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes),
    )  # fmt: skip


def load_data(path: Path) -> tuple[dict[str, np.ndarray], str]:
    if path.is_file():
        raw = np.load(path)
        splits = {}
        for split in ("train", "val", "test"):
            x = raw[f"{split}_images"].astype(np.float32) / 255.0
            x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
            splits[f"{split}_x"] = np.ascontiguousarray((x - 0.5) / 0.5)
            splits[f"{split}_y"] = raw[f"{split}_labels"].reshape(-1).astype(np.int64)
        return splits, path.name
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 600), ("val", 100), ("test", 200)):
        y = rng.integers(0, 4, n)
        x = rng.normal(0, 0.5, (n, 1, 28, 28)).astype(np.float32)
        for i, label in enumerate(y):
            top, left = divmod(int(label), 2)
            r, c = top * 14 + rng.integers(1, 7), left * 14 + rng.integers(1, 7)
            x[i, 0, r : r + 6, c : c + 6] += 1.5
        splits[f"{split}_x"], splits[f"{split}_y"] = x, y
    return splits, "synthetic quadrants"


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    # Re-estimate BatchNorm statistics with the final weights (short training leaves them behind).
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
        for start in range(0, len(x), 128):
            model(torch.from_numpy(x[start : start + 128]))
    model.eval()


def quality(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, AUC: binary, or one-vs-rest macro)."""
    probs = softmax(logits, axis=1)
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    auc = roc_auc_score(labels, probs[:, 1]) if probs.shape[1] == 2 else roc_auc_score(labels, probs, multi_class="ovr")
    return accuracy, float(auc)


def interleaved_latency(paths: dict[str, Path], shape: tuple[int, ...], *, runs: int, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each model's median batch-1 latency, the models taking turns."""

    def median_ms(path: Path):
        return lambda: measure_latency(path, shape, threads=1, warmup=20, runs=runs).median_ms

    per_round = take_turns({name: median_ms(path) for name, path in paths.items()}, rounds)
    return {name: statistics.median(values) for name, values in per_round.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--prune-amount", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=300, help="timed runs per latency measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    data, source = load_data(args.data)
    classes = int(data["train_y"].max()) + 1
    in_shape = data["train_x"].shape[1:]
    model = student_cnn(in_shape[0], classes)
    started = time.perf_counter()
    train(model, data["train_x"], data["train_y"], epochs=args.epochs, lr=3e-3)
    print(f"data: {source}, train {len(data['train_x'])}, test {len(data['test_x'])}, {classes} classes")
    print(
        f"student: {count_parameters(model):,} params, trained {args.epochs} epochs in {time.perf_counter() - started:.1f}s"
    )

    with tempfile.TemporaryDirectory(prefix="medkd-bench-") as tmp:
        directory = Path(tmp)
        example = torch.from_numpy(data["train_x"][:2])
        fp32 = export_onnx(model, example, directory / "fp32.onnx")
        parity = check_parity(model, fp32, data["test_x"], atol=1e-4)
        int8 = quantize_static_int8(fp32, directory / "int8.onnx", data["train_x"][:256])
        int8_7bit = quantize(
            fp32, directory / "int8_7bit.onnx", mode="int8_static_7bit", calibration=data["train_x"][:256]
        )

        pruned = prune_channels(model, args.prune_amount, example)
        train(pruned, data["train_x"], data["train_y"], epochs=max(1, args.epochs // 2), lr=1e-3)
        pruned_fp32 = export_onnx(pruned, example, directory / "pruned_fp32.onnx")
        pruned_int8 = quantize_static_int8(pruned_fp32, directory / "pruned_int8.onnx", data["train_x"][:256])

        paths = {
            "fp32": fp32,
            "int8": int8,
            "int8_7bit": int8_7bit,
            "pruned_fp32": pruned_fp32,
            "pruned_int8": pruned_int8,
        }
        latency = interleaved_latency(paths, (1, *in_shape), runs=args.runs, rounds=args.rounds)
        logits = {name: OnnxModel(path).predict(data["test_x"]) for name, path in paths.items()}
        sizes = {name: model_size_bytes(path) for name, path in paths.items()}
        params = {"fp32": count_parameters(model), "pruned_fp32": count_parameters(pruned)}
        params["int8"] = params["int8_7bit"] = params["fp32"]
        params["pruned_int8"] = params["pruned_fp32"]

    print(
        f"export parity (FP32 ONNX vs PyTorch, test split): max |diff| {parity.max_abs_diff:.2e}, "
        f"argmax agreement {parity.argmax_agreement:.4f}"
    )
    print(
        f"\n{'model':<12} {'params':>9} {'bytes':>10} {'batch-1 ms':>11} {'test acc':>9} {'test AUC':>9} {'agree w/ fp32':>14}"
    )
    for name in paths:
        accuracy, auc = quality(logits[name], data["test_y"])
        agreement = float(np.mean(logits[name].argmax(1) == logits["fp32"].argmax(1)))
        print(
            f"{name:<12} {params[name]:>9,} {sizes[name]:>10,} {latency[name]:>11.3f} {accuracy:>9.3f} {auc:>9.3f} {agreement:>14.3f}"
        )

    int8_size_ratio = sizes["int8"] / sizes["fp32"]
    int8_speedup = latency["fp32"] / latency["int8"]
    int8_agreement = float(np.mean(logits["int8"].argmax(1) == logits["fp32"].argmax(1)))
    prune_speedup = latency["fp32"] / latency["pruned_fp32"]
    prune_param_ratio = params["pruned_fp32"] / params["fp32"]
    combined_speedup = latency["fp32"] / latency["pruned_int8"]
    seven_bit_speedup = latency["int8"] / latency["int8_7bit"]
    seven_bit_agreement = float(np.mean(logits["int8_7bit"].argmax(1) == logits["fp32"].argmax(1)))
    print(
        f"\nRESULT int8_size_ratio={int8_size_ratio:.3f} int8_speedup={int8_speedup:.2f} "
        f"int8_argmax_agreement={int8_agreement:.3f} channel_prune_speedup={prune_speedup:.2f} "
        f"channel_prune_param_ratio={prune_param_ratio:.3f} pruned_int8_speedup={combined_speedup:.2f} "
        f"int8_7bit_vs_int8={seven_bit_speedup:.2f} int8_7bit_argmax_agreement={seven_bit_agreement:.3f}"
    )


if __name__ == "__main__":
    main()
