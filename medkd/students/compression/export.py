"""ONNX export of a PyTorch model and a parity check of the exported model against it.

Export uses torch's ``torch.export``-based exporter (``dynamo=True``) with the weights inside the
``.onnx`` file and a dynamic batch dimension; the TorchScript exporter is only a fallback for
models ``torch.export`` cannot capture (data-dependent Python control flow, for example).
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.export import Dim

from medkd.students.compression.runtime import OnnxModel

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "ParityError", "ParityReport", "check_parity", "export_onnx"]

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_PARITY_ATOL = 1e-4
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy, so the caller's model keeps its device and train/eval mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return copy.deepcopy(model).cpu().eval()


def _export_dynamo(model: nn.Module, example: Tensor, path: Path, *, dynamic_batch: bool, opset: int | None) -> None:
    dynamic_shapes = ({0: Dim("batch")},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=True,
            external_data=False,
            dynamic_shapes=dynamic_shapes,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            verbose=False,
        )


def _export_legacy(model: nn.Module, example: Tensor, path: Path, *, dynamic_batch: bool, opset: int | None) -> None:
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=opset if opset is not None else 17,
            do_constant_folding=True,
        )


def _root_cause(error: BaseException) -> str:
    """``Type: first line`` of the innermost cause (the exporter wraps the informative error)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = _ANSI_ESCAPE.sub("", str(error)).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    path: Path,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> Path:
    """Export ``model`` to a self-contained ONNX file (weights inside, no ``.onnx.data``).

    The model is exported from a CPU copy in eval mode (the caller's model is not changed), with
    one input named ``"input"`` and first output named ``"logits"``.

    Args:
        model: the model to export.
        example_input: one example batch (any batch size; with ``dynamic_batch`` the exported
            model accepts any batch size).
        path: the ``.onnx`` file to write; parent folders are created.
        dynamic_batch: make the batch dimension dynamic.
        opset: ONNX opset to target; ``None`` lets the exporter choose.

    Returns:
        ``path``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_input`` not a tensor.
        ValueError: ``example_input`` is not a batch (fewer than 2 dimensions).
        RuntimeError: neither exporter could export the model (both reasons are given).

    Examples:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> export_onnx(net, torch.randn(2, 1, 2, 2), Path(tmp) / "net.onnx")  # doctest: +SKIP
    """
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.dim() < 2:
        raise ValueError(
            f"example_input must be a batch with at least 2 dimensions, got shape {tuple(example_input.shape)}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_model = _cpu_eval_copy(model)
    example = example_input.detach().cpu().float()

    try:
        _export_dynamo(cpu_model, example, path, dynamic_batch=dynamic_batch, opset=opset)
    except Exception as dynamo_error:
        logger.warning(
            "torch.export-based ONNX export of %s failed (%s); falling back to the TorchScript exporter",
            type(model).__name__,
            _root_cause(dynamo_error),
        )
        try:
            _export_legacy(cpu_model, example, path, dynamic_batch=dynamic_batch, opset=opset)
        except Exception as legacy_error:
            raise RuntimeError(
                f"could not export {type(model).__name__} to ONNX: torch.export failed with "
                f"{_root_cause(dynamo_error)}; the TorchScript exporter failed with "
                f"{_root_cause(legacy_error)}"
            ) from legacy_error
    onnx.checker.check_model(str(path))
    return path


class ParityReport(BaseModel):
    """How closely an exported model reproduces the PyTorch model's outputs."""

    model_config = ConfigDict(frozen=True)

    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float
    n: int
    atol: float | None
    min_argmax_agreement: float | None = None
    passed: bool


class ParityError(RuntimeError):
    """The exported model's outputs differ from the PyTorch model's more than allowed."""

    def __init__(self, report: ParityReport, path: Path) -> None:
        self.report = report
        limits = ", ".join(
            f"{name}={value:g}"
            for name, value in (("atol", report.atol), ("min_argmax_agreement", report.min_argmax_agreement))
            if value is not None
        )
        super().__init__(
            f"ONNX model {path} does not match the PyTorch model on {report.n} samples: "
            f"max_abs_diff={report.max_abs_diff:.3g}, mean_abs_diff={report.mean_abs_diff:.3g}, "
            f"argmax_agreement={report.argmax_agreement:.4f} ({limits})"
        )


def _first_output(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"model output must be a tensor (or a sequence of tensors), got {type(output).__name__}")


def _torch_logits(model: nn.Module, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            batch = torch.from_numpy(inputs[start : start + batch_size])
            outputs.append(_first_output(model(batch)).float().numpy())
    return np.concatenate(outputs, axis=0)


def decision_agreement(a: np.ndarray, b: np.ndarray, *, multilabel: bool = False) -> float:
    """Share of the decisions two sets of logits ``(n, C, ...)`` agree on.

    Argmax over axis 1 (classes, or classes per pixel for segmentation), averaged over samples
    (and pixels); for ``multilabel`` logits (one sigmoid per label) and single-logit outputs,
    each label's present/absent decision (logit > 0), averaged over samples and labels.
    """
    if multilabel or a.ndim < 2 or a.shape[1] == 1:
        return float(np.mean((a > 0) == (b > 0)))
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    inputs: np.ndarray,
    *,
    atol: float | None = None,
    min_argmax_agreement: float | None = None,
    batch_size: int = 64,
    multilabel: bool = False,
) -> ParityReport:
    """Compare the ONNX model's outputs with the PyTorch model's on the same inputs (CPU, eval).

    Agreement of decisions is :func:`decision_agreement`: argmax over axis 1 (classes, or classes
    per pixel for segmentation), or each label's logit sign for ``multilabel`` models.

    Args:
        model: the PyTorch model that was exported.
        onnx_path: the exported (or compressed) ONNX file.
        inputs: a batch of model inputs, ``(n, *input_shape)``.
        atol: maximum allowed absolute difference of any output element; exceeding it raises.
        min_argmax_agreement: minimum allowed argmax agreement in [0, 1]; falling below it
            raises (the useful limit for quantized models, whose logits legitimately move).
            When neither limit is given nothing raises and ``passed`` is judged against
            ``atol=1e-4``.
        batch_size: inference batch size.
        multilabel: one sigmoid per label: decisions are logit signs, not an argmax.

    Returns:
        A ``ParityReport``.

    Raises:
        FileNotFoundError: ``onnx_path`` does not exist.
        ValueError: ``inputs`` is empty or does not fit the ONNX model's input shape, or a bad
            ``atol``/``min_argmax_agreement``.
        ParityError: a given limit is exceeded (the message carries the numbers).
    """
    if atol is not None and not atol >= 0:
        raise ValueError(f"atol must be >= 0 or None, got {atol}")
    if min_argmax_agreement is not None and not 0.0 <= min_argmax_agreement <= 1.0:
        raise ValueError(f"min_argmax_agreement must be in [0, 1] or None, got {min_argmax_agreement}")
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    if inputs.ndim < 2 or len(inputs) == 0:
        raise ValueError(f"inputs must be a non-empty batch (n, ...), got shape {inputs.shape}")

    session = OnnxModel(onnx_path, threads=1)
    session.check_input(inputs)
    onnx_logits = session.predict(inputs, batch_size=batch_size).astype(np.float64)
    torch_logits = _torch_logits(_cpu_eval_copy(model), inputs, batch_size).astype(np.float64)
    if onnx_logits.shape != torch_logits.shape:
        raise ValueError(
            f"ONNX output shape {onnx_logits.shape} differs from the PyTorch output shape "
            f"{torch_logits.shape} for {onnx_path}"
        )

    diff = np.abs(onnx_logits - torch_logits)
    agreement = decision_agreement(onnx_logits, torch_logits, multilabel=multilabel)
    # The limits in force: those given, or the default logit tolerance when none is given.
    enforce = atol is not None or min_argmax_agreement is not None
    limit = atol if enforce else DEFAULT_PARITY_ATOL
    max_abs_diff = float(diff.max())
    passed = (limit is None or max_abs_diff <= limit) and (
        min_argmax_agreement is None or agreement >= min_argmax_agreement
    )
    report = ParityReport(
        max_abs_diff=max_abs_diff,
        mean_abs_diff=float(diff.mean()),
        argmax_agreement=agreement,
        n=len(inputs),
        atol=limit,
        min_argmax_agreement=min_argmax_agreement,
        passed=passed,
    )
    if enforce and not passed:
        raise ParityError(report, Path(onnx_path))
    return report
