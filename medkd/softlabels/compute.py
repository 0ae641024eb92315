"""Stage 2: teacher logits over every split, cached in Redis (content-addressed).

Inference runs as Ray tasks (one per teacher, GPU when the cluster has one). A teacher's
logits are only computed when the cache misses — or when a cached entry turns out corrupt,
in which case they are recomputed from the teacher checkpoint, never used silently.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import torch

from medkd.core.devices import reserved_gpu_device
from medkd.core.fingerprint import fingerprint
from medkd.core.progress import Progress
from medkd.data import apply_view, sample_view_params
from medkd.data.meta import DatasetMeta
from medkd.teachers.loop import predict
from medkd.teachers.train import TeacherArtifact, load_teacher_model

SPLITS = ("train", "val", "test")


#: What asks for the GPU of soft-label inference (named when a declared GPU is unusable).
SOFTLABELS_GPU_FIELD = "soft-label inference (it asks for a GPU whenever the cluster declares one)"


def cache_teacher_spec(artifact: TeacherArtifact) -> dict[str, Any]:
    """What a cache manifest records of the teacher that produced the logits."""
    return {"name": artifact.name, "model": artifact.model, "model_kwargs": artifact.model_kwargs}


@ray.remote(num_cpus=1)
def _teacher_logits(
    artifact_json: str, meta: DatasetMeta, data_ref_list: list, splits: list[str]
) -> dict[str, np.ndarray]:
    artifact = TeacherArtifact.model_validate_json(artifact_json)
    torch.set_num_threads(1)
    device = reserved_gpu_device(SOFTLABELS_GPU_FIELD)
    model = load_teacher_model(artifact, meta).to(device)
    data = ray.get(data_ref_list[0])
    bf16 = artifact.cpu_precision == "bf16"  # as the teacher was trained and validated
    return {split: predict(model, data[split][0], 128, device, bf16=bf16) for split in splits}


def teacher_logits_task(artifact: TeacherArtifact, meta: DatasetMeta, data_ref: Any, splits: list[str]) -> Any:
    """Start a Ray task computing the teacher's logits; returns its ObjectRef."""
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    # The ref travels inside a list so Ray passes the reference rather than the arrays.
    task = _teacher_logits.options(num_gpus=gpus)
    return task.remote(artifact.model_dump_json(), meta, [data_ref], list(splits))


def teacher_logits_remote(
    artifact: TeacherArtifact, meta: DatasetMeta, data_ref: Any, splits: list[str]
) -> dict[str, np.ndarray]:
    return ray.get(teacher_logits_task(artifact, meta, data_ref, splits))


def start_missing_logits(
    cache: Any,
    artifact: TeacherArtifact,
    *,
    dataset_fp: str,
    meta: DatasetMeta,
    data_ref: Any,
    progress: Progress,
) -> Any | None:
    """Start the Ray task that computes the splits of ``artifact`` missing from the cache.

    Returns the task's ObjectRef (``None`` when every split is cached), for
    :func:`cache_teacher_logits` to collect. The pipeline calls it as soon as a teacher is
    trained, so its inference runs while slower teachers still train.
    """
    missing = [split for split in SPLITS if not cache.exists(artifact.fingerprint, dataset_fp, split)]
    if not missing:
        return None
    progress.soft_labels(artifact.name, "computing", missing)
    return teacher_logits_task(artifact, meta, data_ref, missing)


def cache_teacher_logits(
    cache: Any,
    artifacts: list[TeacherArtifact],
    *,
    dataset_fp: str,
    meta: DatasetMeta,
    data_ref: Any,
    cache_options: dict[str, Any],
    progress: Progress,
    started_tasks: dict[str, Any | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Make sure every teacher's logits for every split are in the cache.

    Args:
        started_tasks: per teacher name, what :func:`start_missing_logits` returned for it
            earlier; teachers not in it are looked up and started here.

    Returns per teacher: status (``ran`` if any split was computed, else ``skipped``), the
    key prefixes, bytes stored and per-split hit/miss.
    """
    report: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    # Launch every teacher's missing splits at once: Ray runs them side by side.
    launched: dict[str, Any] = {}
    for artifact in artifacts:
        if artifact.name in (started_tasks or {}):
            task = started_tasks[artifact.name]
        else:
            task = start_missing_logits(
                cache, artifact, dataset_fp=dataset_fp, meta=meta, data_ref=data_ref, progress=progress
            )
        if task is not None:
            launched[artifact.name] = task
    for artifact in artifacts:
        computed: dict[str, np.ndarray] = ray.get(launched[artifact.name]) if artifact.name in launched else {}
        per_split = {}
        for split in SPLITS:

            def compute(
                split: str = split, computed: dict = computed, artifact: TeacherArtifact = artifact
            ) -> np.ndarray:
                if split in computed:
                    return computed[split]
                # Present at first look but corrupt or evicted since: recompute from the checkpoint.
                return teacher_logits_remote(artifact, meta, data_ref, [split])[split]

            _, hit = cache.fetch_or_compute(
                artifact.fingerprint,
                dataset_fp,
                split,
                compute,
                teacher_spec=cache_teacher_spec(artifact),
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
            # The node that published them (this driver's); trials on other nodes read them.
            "written_from": ray.util.get_node_ip_address() if ran else None,
        }
        progress.soft_labels(artifact.name, "cached" if ran else "skipped")
    return report


def recover_train_logits(
    cache: Any,
    artifact: TeacherArtifact,
    *,
    dataset_fp: str,
    meta: DatasetMeta,
    images: np.ndarray,
    cache_options: dict[str, Any],
    view: int | None = None,
    view_params: list[dict[str, Any]] | None = None,
) -> None:
    """Recompute a lost or corrupt train entry (or one view's) from the teacher checkpoint and republish it.

    The soft-label stage checks every entry before the search; this covers entries lost while
    it runs (Redis restarted without persistence, keys evicted, corruption). ``fetch_or_compute``
    lets one caller per entry compute while the others wait for its manifest, and returns the
    cached entry without computing when someone already restored it.
    """

    def compute() -> np.ndarray:
        model = load_teacher_model(artifact, meta)
        inputs = images if view_params is None else apply_view(images, view_params)
        return predict(model, inputs, 128, torch.device("cpu"), bf16=artifact.cpu_precision == "bf16")

    cache.fetch_or_compute(
        artifact.fingerprint,
        dataset_fp,
        "train",
        compute,
        teacher_spec=cache_teacher_spec(artifact),
        view=view,
        view_params=view_params,
        **cache_options,
    )


# --------------------------------------------------------------------------- augmented views (FKD)


def views_dataset_fingerprint(dataset_fp: str, augment: Any, seed: int) -> str:
    """Augmented views are a derived dataset: their cache entries are keyed by this."""

    return fingerprint("views", dataset_fp, augment.model_dump(mode="json"), seed)


def view_params(augment: Any, num_samples: int, *, seed: int, view: int, meta: DatasetMeta) -> list[dict[str, Any]]:
    """The augmentation parameters of view ``view`` for every training sample.

    Derived from (seed, view) only, so every teacher sees exactly the same augmented images
    and a student can replay them from the manifest.
    """

    rng = np.random.default_rng([seed, view])
    return sample_view_params(augment, num_samples, rng, meta.spatial_dims, spatial_shape=meta.image_size)


@ray.remote(num_cpus=1)
def _teacher_view_logits(
    artifact_json: str, meta: DatasetMeta, data_ref_list: list, params: list[list[dict]]
) -> list[np.ndarray]:
    artifact = TeacherArtifact.model_validate_json(artifact_json)
    torch.set_num_threads(1)
    device = reserved_gpu_device(SOFTLABELS_GPU_FIELD)
    model = load_teacher_model(artifact, meta).to(device)
    images = ray.get(data_ref_list[0])["train"][0]
    bf16 = artifact.cpu_precision == "bf16"
    return [predict(model, apply_view(images, view), 128, device, bf16=bf16) for view in params]


def cache_view_logits(
    cache: Any,
    artifacts: list[TeacherArtifact],
    *,
    dataset_fp: str,
    meta: DatasetMeta,
    data_ref: Any,
    num_train: int,
    views: int,
    augment: Any,
    seed: int,
    cache_options: dict[str, Any],
    progress: Progress,
) -> dict[str, Any]:
    """Cache every teacher's logits on ``views`` augmented copies of the training split (FKD).

    Students then train with augmentation and still never run a teacher: view ``k`` of the
    images is rebuilt from the parameters stored in the manifest.
    """
    dataset_fp = views_dataset_fingerprint(dataset_fp, augment, seed)
    all_params = [view_params(augment, num_train, seed=seed, view=k, meta=meta) for k in range(views)]
    launched = {}
    for artifact in artifacts:
        missing = [k for k in range(views) if not cache.exists(artifact.fingerprint, dataset_fp, "train", view=k)]
        if missing:
            task = _teacher_view_logits.options(num_gpus=1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0)
            launched[artifact.name] = (
                missing,
                task.remote(artifact.model_dump_json(), meta, [data_ref], [all_params[k] for k in missing]),
            )
    if launched:
        progress.line(f"  soft labels: computing {views} augmented view(s) of train for {', '.join(launched)}")
    computed = 0
    for artifact in artifacts:
        if artifact.name not in launched:
            continue
        missing, ref = launched[artifact.name]
        for k, logits in zip(missing, ray.get(ref)):
            cache.publish(
                artifact.fingerprint,
                dataset_fp,
                "train",
                logits,
                view=k,
                view_params=all_params[k],
                teacher_spec=cache_teacher_spec(artifact),
                **cache_options,
            )
            computed += 1
    return {
        "views": views,
        "views_dataset_fp": dataset_fp,
        "seed": seed,
        "computed": computed,
        "cached": views * len(artifacts) - computed,
    }
