"""Stage 4: the final training of the selected student (``search.final_epochs``, ``search.final_branches``).

A search trial is a proxy that ranks configurations on a short budget (``search.epochs``, and
ASHA stops most trials sooner), and one trained instance of a configuration is one draw: on a
few hundred images, test AUC moves by points from seed to seed while a small val split cannot
tell the draws apart. The final training trains the configuration the export will select once
more from scratch — from a fresh seed (:func:`final_seed`), on the same cached soft labels and FKD
views, never a teacher:

- ``final_epochs``: for that many epochs instead of the search's;
- neither changed (``final_epochs`` equal to the search's): one more draw of the configuration.
  The search's instance is the best of the trials tied on val, so its val figures overstate
  what its configuration gives; a fresh draw does not carry that luck;
- ``final_branches``: as a weight soup (:func:`medkd.students.distill.distill` with
  ``branches``): one run to a quarter of the epochs, then that many copies finish it with their
  own data order, and the served weights are their average (BatchNorm statistics recomputed) —
  one model of the same size and latency whose quality varies less between seeds than a single
  run's.

It is then pruned, exported and quantized, and validated, exactly as in a trial
(:func:`medkd.search.recipe.train_candidate`). The export serves that model in place of the
trial's unless validation says it is worse than the trial's own model beyond the val split's
noise, widened by the search instance's selection optimism
(:func:`medkd.registry.selection.compare_final`: paired bootstrap, val AUC and val accuracy at the
served operating point); the other Pareto points are exported as searched.

The result is kept under ``output_dir/final/<fingerprint>/`` (search, trial, configuration and
epochs), so a re-run or ``--resume`` finds it instead of training again.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from medkd.core.devices import limit_cpu_threads, reserved_gpu_device
from medkd.core.files import staged_directory
from medkd.core.fingerprint import fingerprint
from medkd.core.progress import Progress, send_event
from medkd.search.context import TrialContext
from medkd.search.outcome import SearchOutcome, TrialRecord
from medkd.search.recipe import teacher_logits_source, train_candidate, trial_augmentation
from medkd.spec.job import JobSpec
from medkd.students.candidate import CANDIDATE_FILES
from medkd.students.distill import DistillConfig, build_student, quality_metric

FINAL_DIR = "final"
RECORD_FILE = "final.json"


class FinalModel(BaseModel):
    """A selected student trained for ``epochs`` after the search; its files are in ``path``."""

    fingerprint: str
    trial_id: str
    path: str
    epochs: int
    search_epochs: int
    branches: int = 1
    seed: int | None = None  # None: a record written before the final training had its own seed
    val: dict[str, float]
    search_val: dict[str, float]
    seconds: float


def final_fingerprint(outcome: SearchOutcome, trial: TrialRecord, epochs: int, branches: int = 1) -> str:
    parts = [outcome.fingerprint, trial.trial_id, trial.config, epochs] + ([branches] if branches > 1 else [])
    return fingerprint("final", *parts, {"seed": final_seed(int(trial.config.get("seed", 0)))})


def final_seed(search_seed: int) -> int:
    """The final training's seed: a draw other than the search trial's ``search_seed``, the same on
    every re-run.

    Examples:
        >>> final_seed(0) != 0, final_seed(0) == final_seed(0), 0 <= final_seed(7) < 2**31
        (True, True, True)
    """
    return int(fingerprint("final seed", search_seed), 16) % 2**31


def final_cpus(cpus_per_trial: float, max_concurrent: int) -> float:
    """The search's whole allotment (it runs alone), within the largest alive node's CPUs."""
    import ray

    node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    return max(cpus_per_trial, min(cpus_per_trial * max_concurrent, max(node_cpus, default=cpus_per_trial)))


def _val_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith("val_") and isinstance(v, (int, float))}


def train_final(
    spec: JobSpec,
    outcome: SearchOutcome,
    trial: TrialRecord,
    *,
    context: TrialContext,
    output_dir: Path,
    progress: Progress,
) -> tuple[FinalModel | None, str]:
    """Train ``trial``'s configuration again: for ``spec.search.final_epochs`` (default: the trial's
    epochs), as a soup of ``spec.search.final_branches`` branches (default: one run).

    Returns the model and ``"ran"``, ``"skipped"`` when an earlier run's result was found, or
    ``(None, "skipped")`` when neither setting is given.

    Args:
        spec: the job spec.
        outcome: the finished search.
        trial: the trial the export selects (``medkd.registry.export.choose``).
        context: :func:`medkd.search.context.search_context` of this job.
        output_dir: the job's output folder; the model goes to ``final/<fingerprint>/``.
        progress: where the stage reports epochs and the result.

    Raises:
        ValueError: ``trial`` did not finish (it has no trained configuration to repeat).
    """
    if not spec.search.final_training:
        return None, "skipped"
    if not trial.final:
        raise ValueError(f"trial {trial.trial_id} did not finish ({trial.status}): nothing to train again")
    import ray

    search_epochs = int(trial.config.get("epochs", spec.search.epochs))
    epochs = spec.search.final_epochs or search_epochs
    branches = spec.search.final_branches or 1
    final_fp = final_fingerprint(outcome, trial, epochs, branches)
    target = Path(output_dir) / FINAL_DIR / final_fp
    record_path = target / RECORD_FILE
    if record_path.is_file():
        record = FinalModel.model_validate_json(record_path.read_text())
        progress.line(
            f"  final training {final_fp}: found ({record.epochs} epochs, {record.branches} branch(es), "
            + ", ".join(f"{k}={v:.4f}" for k, v in record.val.items())
            + ")"
        )
        return record, "skipped"

    config = DistillConfig.model_validate(trial.config)
    config = config.model_copy(update={"epochs": epochs, "branches": branches, "seed": final_seed(config.seed)})
    cpus = final_cpus(spec.search.cpus_per_trial, spec.search.max_concurrent)
    soup = (
        f", a soup of {branches} branches forked at epoch {round(epochs * config.fork_fraction)}"
        if branches > 1
        else ""
    )
    progress.line(
        f"  final training of trial {trial.trial_id} ({config.student}, width {config.width:.2f}): "
        f"{epochs} epochs (search: {search_epochs}){soup}, fresh seed {config.seed}, {cpus:g} CPU"
    )
    started = time.perf_counter()
    task = ray.remote(num_cpus=cpus, num_gpus=spec.search.gpus_per_trial, max_retries=1)(final_candidate)
    files, metrics = ray.get(task.remote(config.model_dump_json(), context, cpus))
    seconds = time.perf_counter() - started

    record = FinalModel(
        fingerprint=final_fp,
        trial_id=trial.trial_id,
        path=str(target),
        epochs=epochs,
        search_epochs=search_epochs,
        branches=branches,
        seed=config.seed,
        val=_val_metrics(metrics),
        search_val=_val_metrics(trial.metrics),
        seconds=round(seconds, 1),
    )
    with staged_directory(target) as staging:
        for name, content in files.items():
            (staging / name).write_bytes(content)
        (staging / RECORD_FILE).write_text(record.model_dump_json(indent=2))
    progress.line(
        f"  final training done in {seconds:.0f}s: "
        + ", ".join(f"{k}={v:.4f} (search {record.search_val.get(k, float('nan')):.4f})" for k, v in record.val.items())
    )
    return record, "ran"


def final_candidate(config_json: str, context: TrialContext, cpus: float) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Ray task: train, compress and export one student; returns its files (bytes) and metrics.

    Files travel back through the object store, so the driver's output folder need not be
    shared with the node that trained.
    """
    import ray

    device = reserved_gpu_device("search.gpus_per_trial")  # like a trial: on its GPU, or a clear stop
    limit_cpu_threads(cpus)
    config = DistillConfig.model_validate_json(config_json)
    meta = context.meta
    data = ray.get(context.data_refs[0])
    teacher_logits, views = teacher_logits_source(context, data["train"][0])
    quality_key = f"val_{quality_metric(meta)}"

    def on_epoch(record: dict[str, Any]) -> None:
        trial = "final" if "branch" not in record else f"final branch {record['branch']}/{config.branches}"
        send_event(
            context.events,
            {
                "kind": "trial_epoch",
                "trial": trial,
                "epoch": record["epoch"],
                "epochs": config.epochs,
                "metric": quality_key,
                "value": float(record.get(quality_key, float("nan"))),
            },
        )

    with tempfile.TemporaryDirectory() as directory:
        metrics = train_candidate(
            build_student(meta, config),
            config,
            meta=meta,
            train=data["train"],
            val=data["val"],
            teacher_logits=teacher_logits,
            augment=trial_augmentation(context.augment, context.meta, config.seed),
            directory=Path(directory),
            latency_runs=context.latency_runs,
            on_epoch=on_epoch,
            views=views,
            device=device,
        )
        files = {name: (Path(directory) / name).read_bytes() for name in CANDIDATE_FILES}
    return files, metrics
