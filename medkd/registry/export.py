"""Stage 5: export every Pareto-optimal student to the model registry, with its lineage.

A registry entry is a folder ``output_dir/models/<model_id>/`` holding ``model.onnx`` (the
compressed model that is served), ``model_fp32.onnx``, ``student.pt`` and ``metadata.json``
(teachers and their fingerprints, soft-label cache keys, the trial configuration, metrics on
val and test, parity and latency). ``output_dir/models/SELECTED`` names the entry to serve.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from medkd.core.fingerprint import fingerprint
from medkd.core.progress import Progress
from medkd.core.files import staged_directory
from medkd.students.candidate import CANDIDATE_FILE, CANDIDATE_FILES, FP32_FILE, MODEL_FILE, STATE_FILE
from medkd.students.compression import OnnxModel
from medkd.students.distill import evaluate_logits
from medkd.search.run import SearchOutcome, TrialRecord
from medkd.data.meta import DatasetMeta

SELECTED_FILE = "SELECTED"
METADATA_FILE = "metadata.json"


class ExportError(RuntimeError):
    pass


def registry_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "models"


def selected_model_dir(output_dir: Path) -> Path:
    registry = registry_dir(output_dir)
    marker = registry / SELECTED_FILE
    if not marker.is_file():
        raise ExportError(f"{marker}: no model has been exported yet (run the pipeline first)")
    return registry / marker.read_text().strip()


def choose(outcome: SearchOutcome, select: str | int) -> TrialRecord:
    front = outcome.pareto_trials()
    if not front:
        raise ExportError("search produced no finished trial to export (see the trial errors above)")
    if select == "best":
        return front[0]
    if not 0 <= int(select) < len(front):
        raise ExportError(f"export.select: Pareto index {select} out of range (front has {len(front)} points)")
    return front[int(select)]


def export_models(
    spec: Any,
    outcome: SearchOutcome,
    *,
    dataset: Any,
    meta: DatasetMeta,
    teachers: list[Any],
    soft_labels: dict[str, dict[str, Any]],
    output_dir: Path,
    progress: Progress,
    final: Any = None,
) -> dict[str, Any]:
    """Copy every Pareto candidate into the registry, score it on test, select one to serve.

    With ``final`` (a :class:`medkd.search.final.FinalModel` of the selected trial), the
    selected entry holds that longer-trained model instead of the trial's, under its own id.
    """
    chosen = choose(outcome, spec.export.select)
    if final is not None and final.trial_id != chosen.trial_id:
        raise ExportError(f"the final training is of trial {final.trial_id}, but export.select picks {chosen.trial_id}")
    test_x, test_y = dataset.splits["test"].images, dataset.splits["test"].labels
    registry = registry_dir(output_dir)
    registry.mkdir(parents=True, exist_ok=True)
    exported = []
    for rank, trial in enumerate(outcome.pareto_trials()):
        trained_again = final if final is not None and trial.trial_id == chosen.trial_id else None
        parts = [outcome.fingerprint, trial.trial_id, trial.config] + ([trained_again.fingerprint] if trained_again else [])
        model_id = f"{spec.name}-{fingerprint(*parts)}"
        target = registry / model_id
        if not (target / METADATA_FILE).is_file():
            if trained_again is not None:
                _copy_files(Path(trained_again.path), target)
            else:
                _copy_checkpoint(trial, target)
            _write_metadata(spec, trial, target, model_id=model_id, rank=rank, dataset=dataset, meta=meta,
                            teachers=teachers, soft_labels=soft_labels, outcome=outcome, test=(test_x, test_y),
                            final=trained_again)
        metadata = json.loads((target / METADATA_FILE).read_text())
        exported.append({"model_id": model_id, "pareto_rank": rank, "trial_id": trial.trial_id,
                         "path": str(target), "metrics": metadata["metrics"]})
        if trial.trial_id == chosen.trial_id:
            (registry / SELECTED_FILE).write_text(model_id + "\n")
            parity = metadata["parity"]
            progress.line(
                f"  selected {model_id}: parity ONNX vs PyTorch max|diff|={parity['max_abs_diff']:.2e} "
                f"(bound {spec.export.parity_atol:g}), decision agreement {parity['argmax_agreement']:.3f}"
            )
            if parity["max_abs_diff"] > spec.export.parity_atol:
                raise ExportError(
                    f"{model_id}: ONNX and PyTorch logits differ by {parity['max_abs_diff']:.3g} "
                    f"> export.parity_atol={spec.export.parity_atol:g}"
                )
    progress.line(f"  exported {len(exported)} Pareto model(s) to {registry}")
    selected = next(e for e in exported if e["trial_id"] == chosen.trial_id)
    return {"selected": selected, "pareto": exported}


def _copy_checkpoint(trial: TrialRecord, target: Path) -> None:
    if trial.checkpoint is None:
        raise ExportError(f"trial {trial.trial_id} has no checkpoint")
    import ray.train

    with ray.train.Checkpoint(trial.checkpoint).as_directory() as directory:
        _copy_files(Path(directory), target)


def _copy_files(source: Path, target: Path) -> None:
    """The candidate's files from ``source`` into a new registry entry (complete or absent)."""
    with staged_directory(target) as staging:
        for name in CANDIDATE_FILES:
            shutil.copy2(source / name, staging / name)


def _write_metadata(spec, trial, target, *, model_id, rank, dataset, meta, teachers, soft_labels, outcome, test,
                    final=None) -> None:
    started = time.perf_counter()
    logits = OnnxModel(target / MODEL_FILE, threads=1).predict(test[0])
    test_metrics = evaluate_logits(logits, test[1], meta)
    candidate = json.loads((target / CANDIDATE_FILE).read_text())
    val_metrics = candidate["metrics"]
    metadata = {
        "model_id": model_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job": spec.name,
        "job_fingerprint": spec.fingerprint(),
        "task": meta.task,
        "multilabel": meta.multilabel,
        "num_classes": meta.num_classes,
        "class_names": list(dataset.class_names),
        "input": {
            "in_channels": meta.in_channels,
            "spatial_dims": meta.spatial_dims,
            "image_size": list(meta.image_size),
            **{k: v for k, v in dataset.preprocessing.items() if k in ("scale", "offset", "clip", "mean", "std")},
        },
        "dataset": {"fingerprint": dataset.fingerprint, "name": dataset.name},
        "teachers": [
            {
                "name": t.name,
                "model": t.model,
                "family": t.family,
                "fingerprint": t.fingerprint,
                "params": t.params,
                "cache_keys": {split: info["key_prefix"] for split, info in soft_labels[t.name]["splits"].items()},
            }
            for t in teachers
        ],
        "search": {"fingerprint": outcome.fingerprint, "trial_id": trial.trial_id, "pareto_rank": rank,
                   "objectives": outcome.objectives},
        # Trained again after the search (search.final_epochs / final_branches); None: the trial's model.
        "final_training": None if final is None else {
            "fingerprint": final.fingerprint, "epochs": final.epochs, "search_epochs": final.search_epochs,
            "branches": final.branches, "search_val": final.search_val},
        "config": candidate["config"],
        "metrics": {
            "val": {k: v for k, v in val_metrics.items() if k.startswith("val_")},
            "test": _plain(test_metrics),
            "latency_ms": val_metrics["latency_ms"],
            "params": val_metrics["params"],
            "model_bytes": val_metrics["model_bytes"],
            "fp32_bytes": val_metrics["fp32_bytes"],
        },
        "parity": {
            "max_abs_diff": val_metrics["parity_max_abs_diff"],
            "argmax_agreement": val_metrics["parity_argmax_agreement"],
            "compressed_argmax_agreement": val_metrics.get("compressed_argmax_agreement"),
        },
        "files": {"model": MODEL_FILE, "fp32": FP32_FILE, "state_dict": STATE_FILE},
        "export_seconds": time.perf_counter() - started,
    }
    (target / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and value != value:
        return None
    return value
