"""Stage 2: teacher logits over every split, cached in Redis (content-addressed).

Inference runs as Ray tasks (one per teacher, GPU when the cluster has one). A teacher's
logits are only computed when the cache misses — or when a cached entry turns out corrupt,
in which case they are recomputed from the teacher checkpoint, never used silently.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import ray

from medkd.platform.progress import Progress
from medkd.teachers.loop import predict
from medkd.teachers.train import TeacherArtifact, load_teacher_model

SPLITS = ("train", "val", "test")


@ray.remote(num_cpus=1)
def _teacher_logits(artifact_json: str, meta: dict[str, Any], data_ref_list: list, splits: list[str]) -> dict[str, np.ndarray]:
    artifact = TeacherArtifact.model_validate_json(artifact_json)
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_teacher_model(artifact, meta).to(device)
    data = ray.get(data_ref_list[0])
    return {split: predict(model, data[split][0], 128, device) for split in splits}


def teacher_logits_task(artifact: TeacherArtifact, meta: dict[str, Any], data_ref: Any, splits: list[str]) -> Any:
    """Start a Ray task computing the teacher's logits; returns its ObjectRef."""
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    # The ref travels inside a list so Ray passes the reference rather than the arrays.
    task = _teacher_logits.options(num_gpus=gpus)
    return task.remote(artifact.model_dump_json(), meta, [data_ref], list(splits))


def teacher_logits_remote(artifact: TeacherArtifact, meta: dict[str, Any], data_ref: Any, splits: list[str]) -> dict[str, np.ndarray]:
    return ray.get(teacher_logits_task(artifact, meta, data_ref, splits))


def cache_teacher_logits(
    cache: Any,
    artifacts: list[TeacherArtifact],
    *,
    dataset_fp: str,
    meta: dict[str, Any],
    data_ref: Any,
    cache_options: dict[str, Any],
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """Make sure every teacher's logits for every split are in the cache.

    Returns per teacher: status (``ran`` if any split was computed, else ``skipped``), the
    key prefixes, bytes stored and per-split hit/miss.
    """
    report: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    # Launch every teacher's missing splits at once: Ray runs them side by side.
    launched: dict[str, Any] = {}
    for artifact in artifacts:
        missing = [split for split in SPLITS if not cache.exists(artifact.fingerprint, dataset_fp, split)]
        if missing:
            progress.line(f"  soft labels {artifact.name}: computing {', '.join(missing)} (cache miss)")
            launched[artifact.name] = teacher_logits_task(artifact, meta, data_ref, missing)
    for artifact in artifacts:
        computed: dict[str, np.ndarray] = ray.get(launched[artifact.name]) if artifact.name in launched else {}
        per_split = {}
        for split in SPLITS:
            def compute(split: str = split) -> np.ndarray:
                if split in computed:
                    return computed[split]
                # Present at first look but corrupt or evicted since: recompute from the checkpoint.
                return teacher_logits_remote(artifact, meta, data_ref, [split])[split]

            _, hit = cache.fetch_or_compute(
                artifact.fingerprint,
                dataset_fp,
                split,
                compute,
                teacher_spec={"name": artifact.name, "model": artifact.model, "model_kwargs": artifact.model_kwargs},
                **cache_options,
            )
            manifest = cache.manifest(artifact.fingerprint, dataset_fp, split)
            per_split[split] = {
                "hit": bool(hit and split not in computed),
                "key_prefix": cache.key_prefix(artifact.fingerprint, dataset_fp, split),
                "bytes": int(manifest.nbytes) if manifest is not None else 0,
                "num_samples": int(manifest.num_samples) if manifest is not None else 0,
            }
        ran = any(not entry["hit"] for entry in per_split.values())
        report[artifact.name] = {
            "status": "ran" if ran else "skipped",
            "teacher_fp": artifact.fingerprint,
            "splits": per_split,
            "seconds": round(time.perf_counter() - started, 2),
        }
        verb = "computed and cached" if ran else "skipped, all splits found in cache"
        progress.line(f"  soft labels {artifact.name}: {verb}")
    return report
