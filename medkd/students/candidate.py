"""Turn a trained student into a deployable candidate: prune, export, quantize, measure.

Quality is always measured on the compressed ONNX model that would be served, never on the
PyTorch model before compression.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from medkd.data.meta import DatasetMeta
from medkd.students.compression import (
    OnnxModel,
    check_parity,
    count_nonzero_parameters,
    decision_agreement,
    export_onnx,
    measure_latency,
    model_size_bytes,
    prune_channels,
    prune_unstructured,
    quantize,
)
from medkd.students.distill import DistillConfig, evaluate_logits, quality_metric

FP32_FILE = "model_fp32.onnx"
MODEL_FILE = "model.onnx"
STATE_FILE = "student.pt"
CANDIDATE_FILE = "candidate.json"
CANDIDATE_FILES = (MODEL_FILE, FP32_FILE, STATE_FILE, CANDIDATE_FILE)  # what a trained candidate consists of


def strip_debug_metadata(path: Path) -> Path:
    """Drop the exporter's per-node debug metadata from an ONNX file, in place.

    torch's dynamo exporter annotates every node with its Python stack trace, FX node and module
    hierarchy (~0.4 KB per node): for a small student that is a third of an INT8 model's bytes,
    and it leaks source paths into a shipped artifact. Inference never reads it.
    """
    model = onnx.load(str(path))
    graphs = [model.graph, *(function for function in model.functions)]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    onnx.save(model, str(path))
    return path


def apply_pruning(model: nn.Module, config: DistillConfig, example: torch.Tensor) -> nn.Module:
    if config.prune == "none" or config.prune_amount <= 0:
        return model
    if config.prune == "unstructured":
        return prune_unstructured(model, config.prune_amount)
    if config.prune == "channels":
        return prune_channels(model, config.prune_amount, example)
    raise ValueError(f"prune: unknown method {config.prune!r} (none, unstructured, channels)")


def export_candidate(
    model: nn.Module,
    config: DistillConfig,
    *,
    meta: DatasetMeta,
    calibration: np.ndarray,
    val_images: np.ndarray | None,
    val_labels: np.ndarray | None,
    directory: Path,
    latency_runs: int = 50,
) -> dict[str, Any]:
    """Export ``model`` (already pruned) to ONNX, quantize it and measure the served model.

    Writes ``model_fp32.onnx``, ``model.onnx`` (compressed) and ``student.pt`` to
    ``directory``; returns the metrics (``val_*`` of the compressed model when val data is
    given, ``latency_ms``, ``params``, ``model_bytes``, parity).
    """
    directory.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    example = torch.from_numpy(calibration[:2])
    fp32_path = strip_debug_metadata(export_onnx(model, example, directory / FP32_FILE))
    parity_inputs = val_images[:64] if val_images is not None else calibration[:64]
    parity = check_parity(model, fp32_path, parity_inputs, multilabel=bool(meta.multilabel))
    model_path = quantize(fp32_path, directory / MODEL_FILE, mode=config.quantize, calibration=calibration)
    torch.save(model.state_dict(), directory / STATE_FILE)
    latency = measure_latency(model_path, (1, *calibration.shape[1:]), threads=1, runs=latency_runs)
    metrics: dict[str, Any] = {
        "latency_ms": float(latency.median_ms),
        "latency_p90_ms": float(latency.p90_ms),
        "params": int(count_nonzero_parameters(model)),
        "params_total": int(sum(p.numel() for p in model.parameters())),
        "model_bytes": int(model_size_bytes(model_path)),
        "fp32_bytes": int(model_size_bytes(fp32_path)),
        "parity_max_abs_diff": float(parity.max_abs_diff),
        "parity_argmax_agreement": float(parity.argmax_agreement),
    }
    if val_images is not None and val_labels is not None:
        served = OnnxModel(model_path, threads=1)
        compressed_logits = served.predict(val_images)
        name = quality_metric(meta)
        quality = evaluate_logits(compressed_logits, val_labels, meta)
        metrics[f"val_{name}"] = float(quality[name])
        if "acc" in quality:
            metrics["val_acc"] = float(quality["acc"])
        fp32_logits = OnnxModel(fp32_path, threads=1).predict(val_images)
        metrics["compressed_argmax_agreement"] = decision_agreement(
            fp32_logits, compressed_logits, multilabel=bool(meta.multilabel)
        )
    (directory / CANDIDATE_FILE).write_text(json.dumps({"config": config.model_dump(), "metrics": metrics}, indent=2))
    return metrics
