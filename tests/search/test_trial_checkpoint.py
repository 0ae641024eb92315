"""Search trials checkpoint every epoch; a trial whose process dies is retried from its checkpoint.

The integration test runs ``run_search`` (real Ray Tune with the search's own FailureConfig and
CheckpointConfig, real redis-server holding the teacher logits) with two trials of the same
configuration, inside a Ray task whose runtime environment sets the test-only fault hook: the first
trial to finish epoch 2 exits its process (``os._exit``) once; Tune retries it from its checkpoint.
The other trial is the uninterrupted run the resumed one must equal.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import ray
import torch

from medkd.core.progress import Progress
from medkd.data import SyntheticDataSpec, load_dataset
from medkd.data.meta import DatasetMeta
from medkd.search.run import run_search
from medkd.search.trial_checkpoint import KILL_AT_EPOCH_ENV, KILL_MARKER_ENV, KILLED_EXIT_CODE, die_if_a_test_asks
from medkd.softlabels.store import SoftLabelCache
from medkd.spec.job import JobSpec
from medkd.students.candidate import STATE_FILE

EPOCHS = 4
KILL_AT = 2


@ray.remote(num_cpus=0)
def search_in_task(spec: JobSpec, meta: DatasetMeta, refs: list, teacher_fps: list[str], **kwargs):
    """``run_search`` as a Ray task, so its trials inherit the task's runtime environment (the fault hook)."""
    return run_search(spec, meta=meta, data_ref=refs[0], teacher_fps=teacher_fps, **kwargs)


def job_spec(redis_url: str, namespace: str, output: Path) -> JobSpec:
    same = {"low": 0.25, "high": 0.25}
    return JobSpec.model_validate(
        {
            "name": "trial-checkpoint",
            "data": {"kind": "synthetic", "num_train": 64, "num_val": 32, "num_test": 8, "image_size": 16},
            "teachers": [{"name": "cnn", "model": "resnet10", "epochs": 1}],
            "cache": {"redis_url": redis_url, "namespace": namespace},
            "search": {
                "num_trials": 2,
                "max_concurrent": 2,
                "epochs": EPOCHS,
                "batch_size": 16,
                "cpus_per_trial": 0.5,
                "scheduler": "asha",
                "grace_period": 1,
                "ema_epochs": 1.0,
                "objectives": [{"metric": "val_auc", "mode": "max"}],
                "augment": {"flip": 0.5},
                # Every dimension single-valued: both trials train the very same student.
                "space": {
                    "student": ["resnet_tiny"],
                    "width": same,
                    "temperature": {"low": 2.0, "high": 2.0},
                    "alpha": {"low": 0.5, "high": 0.5},
                    "aggregation": ["mean"],
                    "lr": {"low": 0.01, "high": 0.01},
                    "quantize": ["none"],
                },
            },
            "serve": {"enabled": False},
            "output_dir": str(output),
        }
    )


def reports(trial_dir: Path) -> list[dict]:
    """Every result Tune recorded for a trial (both attempts), in order."""
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


@pytest.mark.timeout(600)
def test_a_trial_whose_process_dies_resumes_from_its_checkpoint_to_the_uninterrupted_result(
    ray_session, redis_url, tmp_path
):
    namespace = f"trial-checkpoint-{uuid.uuid4().hex[:8]}"
    spec = job_spec(redis_url, namespace, tmp_path / "run")
    dataset = load_dataset(SyntheticDataSpec(num_train=64, num_val=32, num_test=8, image_size=16))
    meta = DatasetMeta.of(dataset)
    labels = dataset.splits["train"].labels.reshape(-1)
    logits = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), meta.num_classes).float().numpy() * 3
    cache = SoftLabelCache(redis_url, namespace=namespace)
    marker = tmp_path / "killed.marker"
    try:
        cache.publish("teacher-fp", dataset.fingerprint, "train", logits, teacher_spec={"model": "test"})
        outcome = ray.get(
            search_in_task.options(
                runtime_env={"env_vars": {KILL_AT_EPOCH_ENV: str(KILL_AT), KILL_MARKER_ENV: str(marker)}}
            ).remote(
                spec,
                meta,
                [ray.put(dataset.arrays())],
                ["teacher-fp"],
                dataset_fp=dataset.fingerprint,
                cache_url=redis_url,
                storage_path=str(tmp_path / "ray"),
                progress=Progress(io.StringIO(), live=False),
            ),
            timeout=540,
        )
    finally:
        cache.purge()
        cache.close()

    assert marker.read_text().endswith(f"exited after epoch {KILL_AT}\n")  # the hook did kill a trial
    assert [t.status for t in outcome.trials] == ["completed", "completed"]
    by_resume = sorted(outcome.trials, key=lambda t: t.metrics["resumed_from_epoch"])
    uninterrupted, resumed = by_resume
    # The retried attempt started at the checkpointed epoch, not 0, and trained to the full count.
    assert uninterrupted.metrics["resumed_from_epoch"] == 0
    assert resumed.metrics["resumed_from_epoch"] == KILL_AT
    for trial in outcome.trials:
        assert trial.metrics["epoch"] == EPOCHS and trial.metrics["training_iteration"] == EPOCHS
        # ASHA's time axis: one report per epoch, each epoch once, also across the retry.
        rows = reports(Path(trial.checkpoint).parent)
        assert [r["training_iteration"] for r in rows] == list(range(1, EPOCHS + 1))
        assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
        assert [r["final"] for r in rows] == [False] * (EPOCHS - 1) + [True]
        # Once the search has ended only the latest checkpoint is left: the exported candidate (the
        # earlier training states, kept while a driver restore could name them, are dropped).
        assert [p.name for p in Path(trial.checkpoint).parent.glob("checkpoint_*")] == [Path(trial.checkpoint).name]
    # Same seed, same data order, same augmentation draws: the resumed trial ends where the
    # uninterrupted one ends, to the bit.
    assert resumed.metrics["val_auc"] == uninterrupted.metrics["val_auc"]
    a = torch.load(Path(uninterrupted.checkpoint) / STATE_FILE, weights_only=True)
    b = torch.load(Path(resumed.checkpoint) / STATE_FILE, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_fault_hook_needs_both_variables_and_an_epoch_number(monkeypatch, tmp_path):
    monkeypatch.delenv(KILL_AT_EPOCH_ENV, raising=False)
    monkeypatch.delenv(KILL_MARKER_ENV, raising=False)
    die_if_a_test_asks(2)  # off: returns
    monkeypatch.setenv(KILL_AT_EPOCH_ENV, "2")
    with pytest.raises(ValueError, match=KILL_MARKER_ENV):
        die_if_a_test_asks(2)
    monkeypatch.setenv(KILL_MARKER_ENV, str(tmp_path / "marker"))
    monkeypatch.setenv(KILL_AT_EPOCH_ENV, "two")
    with pytest.raises(ValueError, match=f"{KILL_AT_EPOCH_ENV}='two': expected an epoch number"):
        die_if_a_test_asks(2)
    monkeypatch.setenv(KILL_AT_EPOCH_ENV, "3")
    die_if_a_test_asks(2)  # another epoch: returns
    assert not (tmp_path / "marker").exists()


@pytest.mark.slow  # a child interpreter that imports the search stack
def test_the_fault_hook_kills_the_first_process_only(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    env = {**os.environ, KILL_AT_EPOCH_ENV: "2", KILL_MARKER_ENV: str(marker)}
    code = "from medkd.search.trial_checkpoint import die_if_a_test_asks; die_if_a_test_asks(2); print('alive')"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert (first.returncode, first.stdout) == (KILLED_EXIT_CODE, "")
    assert "exited after epoch 2" in marker.read_text()
    # The retried attempt finds the marker and carries on.
    monkeypatch.setenv(KILL_AT_EPOCH_ENV, "2")
    monkeypatch.setenv(KILL_MARKER_ENV, str(marker))
    die_if_a_test_asks(2)
