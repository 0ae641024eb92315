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

from medkd.core.files import staged_directory
from medkd.core.fingerprint import fingerprint
from medkd.core.progress import Progress
from medkd.data.meta import DatasetMeta
from medkd.registry.calibration import (
    ARGMAX,
    calibrated_probabilities,
    choose_operating_points,
    decision_metrics,
    fit_calibration,
)
from medkd.registry.layout import METADATA_FILE, registry_dir, select_model
from medkd.registry.metadata import ModelMetadata
from medkd.registry.selection import FinalComparison, Selection, compare_final, select_trial
from medkd.search.outcome import SearchOutcome, TrialRecord
from medkd.spec.job import JobSpec
from medkd.students.candidate import CANDIDATE_FILE, CANDIDATE_FILES, FP32_FILE, MODEL_FILE, STATE_FILE
from medkd.students.compression import OnnxModel
from medkd.students.distill import evaluate_logits


class ExportError(RuntimeError):
    pass


class SelectionEvidence:
    """What the tie rule of :mod:`medkd.registry.selection` needs: the val split, the served operating
    point and each completed trial's val probabilities (its compressed ONNX model run on val).

    Args:
        val_images: the val images as the model takes them.
        val_labels: the val labels.
        multilabel: one sigmoid per label.
        target_sensitivity: ``export.target_sensitivity`` (binary tasks), or None for argmax.
        positive_class: ``export.positive_class``.

    Examples:
        >>> evidence = selection_evidence(spec, dataset, meta)  # doctest: +SKIP
        >>> trial = choose(outcome, "best", evidence)  # doctest: +SKIP
    """

    def __init__(
        self,
        val_images: np.ndarray,
        val_labels: np.ndarray,
        *,
        multilabel: bool = False,
        target_sensitivity: float | None = None,
        positive_class: int = 1,
    ) -> None:
        self.val_images, self.val_labels = val_images, val_labels
        self.multilabel, self.target_sensitivity, self.positive_class = multilabel, target_sensitivity, positive_class
        self._probs: dict[str, np.ndarray] = {}

    def model_probabilities(self, model_path: Path) -> np.ndarray:
        """Val probabilities of a served ONNX model file (e.g. the final training's)."""
        logits = OnnxModel(Path(model_path), threads=1).predict(self.val_images)
        return calibrated_probabilities(logits, multilabel=self.multilabel)

    def probabilities(self, trial: TrialRecord) -> np.ndarray:
        """The trial's val probabilities from its checkpoint's served model (read once)."""
        if trial.trial_id not in self._probs:
            if trial.checkpoint is None:
                raise ExportError(f"trial {trial.trial_id} has no checkpoint")
            import ray.train

            with ray.train.Checkpoint(trial.checkpoint).as_directory() as directory:
                logits = OnnxModel(Path(directory) / MODEL_FILE, threads=1).predict(self.val_images)
            self._probs[trial.trial_id] = calibrated_probabilities(logits, multilabel=self.multilabel)
        return self._probs[trial.trial_id]


def selection_evidence(spec: JobSpec, dataset: Any, meta: DatasetMeta) -> SelectionEvidence | None:
    """The evidence for :func:`choose` (None for segmentation: Dice has no bootstrap here, the order stays)."""
    if meta.task != "classification":
        return None
    val = dataset.splits["val"]
    return SelectionEvidence(
        val.images,
        val.labels,
        multilabel=meta.multilabel,
        target_sensitivity=spec.export.target_sensitivity,
        positive_class=spec.export.positive_class,
    )


def select_for_export(
    outcome: SearchOutcome, select: str | int, evidence: SelectionEvidence | None = None
) -> tuple[TrialRecord, Selection | None]:
    """The trial to serve and, for ``select="best"`` with evidence, how it was chosen.

    ``"best"`` with evidence: :func:`medkd.registry.selection.select_trial` over every completed trial
    (ties within the val split's noise go to the better decision at the served operating point, then
    the cheaper model). Without evidence (segmentation), or when the first objective is not val AUC:
    the Pareto front's best by the first objective. An integer picks that Pareto index.
    """
    front = outcome.pareto_trials()
    if not front:
        raise ExportError("search produced no finished trial to export (see the trial errors above)")
    if select != "best":
        if not 0 <= int(select) < len(front):
            raise ExportError(f"export.select: Pareto index {select} out of range (front has {len(front)} points)")
        return front[int(select)], None
    quality = outcome.objectives[0]["metric"] if outcome.objectives else None
    if evidence is None or quality != "val_auc":
        return front[0], None
    completed = [t for t in outcome.trials if t.final and t.checkpoint is not None]
    selection = select_trial(
        completed,
        {t.trial_id: evidence.probabilities(t) for t in completed},
        evidence.val_labels,
        quality=quality,
        multilabel=evidence.multilabel,
        target_sensitivity=evidence.target_sensitivity,
        positive_class=evidence.positive_class,
    )
    return next(t for t in completed if t.trial_id == selection.chosen), selection


def choose(outcome: SearchOutcome, select: str | int, evidence: SelectionEvidence | None = None) -> TrialRecord:
    """The trial to serve (see :func:`select_for_export`)."""
    return select_for_export(outcome, select, evidence)[0]


def judge_final(
    final: Any, chosen: TrialRecord, evidence: SelectionEvidence | None, selection: Selection | None = None
) -> FinalComparison:
    """Whether the final training of ``chosen`` is served (:func:`medkd.registry.selection.compare_final`),
    from the stored models only, so a re-run decides the same.

    ``selection`` (how ``chosen`` was selected) gives the number of trials tied within the val noise,
    whose expected maximum widens the noise the final model is judged by (None: one).

    Without evidence (segmentation: no val bootstrap of Dice here) the final model is served, as before.

    Examples:
        >>> judge_final(final, chosen, selection_evidence(spec, dataset, meta)).served  # doctest: +SKIP
        'search'
    """
    if evidence is None:
        return FinalComparison(
            served="final",
            reason="no paired bootstrap for this task (segmentation): the final training is served as trained",
            rule="the final training is served",
            quality=next((k for k in final.val if k != "val_acc"), "val_dice"),
            search_quality=next((v for k, v in final.search_val.items() if k != "val_acc"), None),
            final_quality=next((v for k, v in final.val.items() if k != "val_acc"), None),
        )
    return compare_final(
        evidence.probabilities(chosen),
        evidence.model_probabilities(Path(final.path) / MODEL_FILE),
        evidence.val_labels,
        multilabel=evidence.multilabel,
        target_sensitivity=evidence.target_sensitivity,
        positive_class=evidence.positive_class,
        selected_from=sum(c.tied for c in selection.candidates) if selection is not None else 1,
    )


def export_models(
    spec: JobSpec,
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
    selected entry holds that longer-trained model instead of the trial's, under its own id —
    unless validation says it is worse than the trial's instance beyond the val noise
    (:func:`judge_final`); then the trial's instance is served and the result says why.
    """
    evidence = selection_evidence(spec, dataset, meta)
    chosen, selection = select_for_export(outcome, spec.export.select, evidence)
    comparison = None
    if final is not None:
        if final.trial_id != chosen.trial_id:
            raise ExportError(
                f"the final training is of trial {final.trial_id}, but export.select picks {chosen.trial_id}"
            )
        comparison = judge_final(final, chosen, evidence, selection)
        served = "final training" if comparison.served == "final" else f"search instance of trial {chosen.trial_id}"
        progress.line(f"  serving the {served}: {comparison.reason}")
        if comparison.served == "search":
            final = None
    test_x, test_y = dataset.splits["test"].images, dataset.splits["test"].labels
    registry = registry_dir(output_dir)
    registry.mkdir(parents=True, exist_ok=True)
    exported = []
    candidates: list[tuple[int | None, TrialRecord]] = list(enumerate(outcome.pareto_trials()))
    if all(trial.trial_id != chosen.trial_id for _, trial in candidates):
        candidates.append((None, chosen))  # tied with the best within the val noise, off the front: exported too
    for rank, trial in candidates:
        trained_again = final if final is not None and trial.trial_id == chosen.trial_id else None
        parts = [outcome.fingerprint, trial.trial_id, trial.config] + (
            [trained_again.fingerprint] if trained_again else []
        )
        model_id = f"{spec.name}-{fingerprint(*parts)}"
        target = registry / model_id
        if not (target / METADATA_FILE).is_file():
            if trained_again is not None:
                _copy_files(Path(trained_again.path), target)
            else:
                _copy_checkpoint(trial, target)
            _write_metadata(
                spec,
                trial,
                target,
                model_id=model_id,
                rank=rank,
                dataset=dataset,
                meta=meta,
                teachers=teachers,
                soft_labels=soft_labels,
                outcome=outcome,
                test=(test_x, test_y),
                final=trained_again,
            )
        metadata = ModelMetadata.model_validate_json((target / METADATA_FILE).read_text())
        exported.append(
            {
                "model_id": model_id,
                "pareto_rank": rank,
                "trial_id": trial.trial_id,
                "path": str(target),
                "metrics": metadata.metrics.model_dump(),
            }
        )
        if trial.trial_id == chosen.trial_id:
            select_model(output_dir, model_id)
            parity = metadata.parity
            progress.line(
                f"  selected {model_id}: parity ONNX vs PyTorch max|diff|={parity.max_abs_diff:.2e} "
                f"(bound {spec.export.parity_atol:g}), decision agreement {parity.argmax_agreement:.3f}"
            )
            if parity.max_abs_diff > spec.export.parity_atol:
                raise ExportError(
                    f"{model_id}: ONNX and PyTorch logits differ by {parity.max_abs_diff:.3g} "
                    f"> export.parity_atol={spec.export.parity_atol:g}"
                )
    progress.line(f"  exported {len(exported)} model(s) to {registry}")
    if selection is not None:
        tied = [c.trial_id for c in selection.candidates if c.tied]
        progress.line(
            f"  selection: {len(tied)} trial(s) tied within the val noise ({', '.join(tied)}); served {chosen.trial_id}"
        )
    selected = next(e for e in exported if e["trial_id"] == chosen.trial_id)
    if selection is None:
        rule = (
            f"export.select = {spec.export.select!r}: the Pareto front's best by the first objective"
            if spec.export.select == "best"
            else f"export.select = {spec.export.select}: that Pareto index"
        )
        selection = Selection(chosen=chosen.trial_id, rule=rule, quality="", candidates=[])
    selection.final = comparison
    record = selection.model_dump(exclude={"final"} if comparison is None else set())
    return {"selected": selected, "pareto": exported, "selection": record}


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


def _write_metadata(
    spec, trial, target, *, model_id, rank, dataset, meta, teachers, soft_labels, outcome, test, final=None
) -> None:
    started = time.perf_counter()
    logits = OnnxModel(target / MODEL_FILE, threads=1).predict(test[0])
    test_metrics = evaluate_logits(logits, test[1], meta)
    decisions = _calibrate(
        spec, target, dataset, meta, test_logits=logits, test_labels=test[1], test_metrics=test_metrics
    )
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
        "search": {
            "fingerprint": outcome.fingerprint,
            "trial_id": trial.trial_id,
            "pareto_rank": rank,
            "objectives": outcome.objectives,
        },
        # Trained again after the search (search.final_epochs / final_branches); None: the trial's model.
        "final_training": None
        if final is None
        else {
            "fingerprint": final.fingerprint,
            "epochs": final.epochs,
            "search_epochs": final.search_epochs,
            "branches": final.branches,
            "seed": final.seed,
            "search_val": final.search_val,
        },
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
        **decisions,
        "files": {"model": MODEL_FILE, "fp32": FP32_FILE, "state_dict": STATE_FILE},
        "export_seconds": time.perf_counter() - started,
    }
    (target / METADATA_FILE).write_text(ModelMetadata.model_validate(_plain(metadata)).model_dump_json(indent=2))


def _calibrate(
    spec: JobSpec,
    target: Path,
    dataset: Any,
    meta: DatasetMeta,
    *,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    test_metrics: dict[str, Any],
) -> dict[str, Any]:
    """Temperature scaling and operating points fitted on val for the served model, scored on test.

    Returns the metadata fields ``calibration``, ``operating_points`` and ``operating_point`` (the
    served one: the target-sensitivity threshold when ``export.target_sensitivity`` is set, else
    argmax) and adds ``ece_calibrated`` and per-point ``operating_points`` to ``test_metrics``.
    Segmentation models get none.
    """
    if meta.task != "classification":
        return {}
    val = dataset.splits["val"]
    val_logits = OnnxModel(target / MODEL_FILE, threads=1).predict(val.images)
    calibration = fit_calibration(val_logits, val.labels, multilabel=meta.multilabel)
    goal = spec.export.target_sensitivity  # a multi-class or multi-label task refuses it, naming the field
    val_probs = calibrated_probabilities(val_logits, calibration.temperature, multilabel=meta.multilabel)
    points = choose_operating_points(
        val_probs,
        val.labels,
        multilabel=meta.multilabel,
        target_sensitivity=goal,
        positive_class=spec.export.positive_class,
    )
    test_probs = calibrated_probabilities(test_logits, calibration.temperature, multilabel=meta.multilabel)
    test_metrics["ece_calibrated"] = evaluate_logits(test_logits / calibration.temperature, test_labels, meta)["ece"]
    test_metrics["operating_points"] = {
        point.name: decision_metrics(
            point.decide(test_probs, multilabel=meta.multilabel),
            test_labels,
            num_classes=meta.num_classes,
            multilabel=meta.multilabel,
            positive_class=spec.export.positive_class,
        )
        for point in points
    }
    return {
        "calibration": calibration.model_dump(),
        "operating_points": [p.model_dump() for p in points],
        "operating_point": points[-1].name if goal is not None else ARGMAX,
    }


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
