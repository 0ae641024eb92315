"""The students benchmark's job spec and the retraining of its selected student, shared by
``benchmarks.students`` and ``benchmarks.soup`` (which retrains a finished students run's selection).

:func:`build_spec` is the spec template (default ``examples/breastmnist.yaml``) pointed at a
MedMNIST file, with the recipe's teachers (:func:`medkd.teachers.recipe.teacher_recipe`) and
search budgets that scale with the training split, counted in 28x28 images
(:func:`medkd.teachers.recipe.image_cost`); from ``BF16_FROM`` (2,000) such images on, the students
train in bf16 on CPU (``search.cpu_precision``) as the recipe's teachers do; classification students
learn from the teachers ``search.teacher_selection: val_contribution`` keeps. The spec it builds decides every fingerprint of the
run (teachers, soft labels, search): a change here retrains. :func:`kd_gain_run` trains one
configuration through the search's own recipe from the run's soft-label cache and scores its
INT8 export on test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._harness import PASSWORD_ENV, REPO_ROOT, data_file, managed_redis
from medkd.data import load_dataset
from medkd.data.meta import DatasetMeta
from medkd.search.space import teacher_temperatures
from medkd.softlabels.reading import cached_teacher_logits, cached_views, missing_views
from medkd.softlabels.store import SoftLabelCache
from medkd.spec.job import load_spec, parse_override
from medkd.students.compression import OnnxModel
from medkd.students.distill import DistillConfig, build_student, evaluate_logits
from medkd.teachers.recipe import (
    image_cost,
    laterality_specific,
    scaled_floor,
    teacher_recipe,
    trains_in_bf16,
)

# Modules that import Ray (medkd.search.recipe, medkd.softlabels.recovery, medkd.teachers.train,
# medkd.pipeline.runner, ray itself) are imported in the functions that use them: a benchmark sets
# Ray's environment (benchmarks._harness.configure_local_ray) before Ray is imported, and
# benchmarks.profile_scale imports this module without Ray.

DEFAULT_SPEC = REPO_ROOT / "examples" / "breastmnist.yaml"
DEFAULT_DATA = data_file("breastmnist.npz")
STUDENT_SAMPLE_BUDGET = 24_000  # training samples per search trial: ~44 epochs of 546 images, 5 of 5,000
# Up to 5,000 images (medkd.teachers.recipe.SCALE_FROM); above, the floor shrinks as sqrt(5,000 / n)
# (recipe.scaled_floor): a trial sees ~sqrt(n) samples, 2 epochs of OrganAMNIST's 34,561 images.
MIN_STUDENT_EPOCHS = 6
# Per-split budgets, so the whole run fits the 45 min on 5,000 images (2 cores) while a
# small split keeps the template's full search: student training samples over the whole search
# (12 trials x 40 epochs x 546 images = 262k), and teacher passes per teacher for the FKD views.
SEARCH_SAMPLE_BUDGET = 270_000
MIN_TRIALS = 6
VIEW_PASS_BUDGET = 10_000
# Weight soups (search.final_branches) only for training splits up to this many 28x28 images.
# Below it one trained instance's test AUC spreads by points between seeds (BreastMNIST, 546
# images: 0.891 to 0.918 over 4 seeds) and a val split of a few dozen images cannot see which
# draw it got; at 5,000 images single instances agree to +-0.001 AUC over 3 seeds, and the soup's
# (1 + 3 * branches) / 4 trials of training, for the served model and each KD-gain run, do not
# fit the 45-minute budget. Above it the final training is one fresh draw of the selected
# configuration at the search's epochs (one trial's training more), so the served model is not
# the search's best-of-the-tied draw unless val says the fresh one is worse
# (medkd.registry.selection.compare_final).
SOUP_MAX_TRAIN_SIZE = 2_000
# search.teacher_selection of classification runs. The rule drops the ViT on both real sets' cached val
# logits (BloodMNIST: +0.58 val ACC points without it, 1.6 SE, on 20 of 20 bootstrap seeds; BreastMNIST:
# +2.6 points, 1.0 SE, 10 of 20), and on BreastMNIST the served configuration distilled from the CNN
# alone is the best of CE / KD all / KD selected on val over 3 seeds (benchmarks/RESULTS.md, teacher
# selection).
RECIPE_TEACHER_SELECTION = "val_contribution"


def student_epochs(train_size: float, max_epochs: int) -> int:
    """The search's epoch budget: about STUDENT_SAMPLE_BUDGET samples per trial, at least
    MIN_STUDENT_EPOCHS (scaled down as ``sqrt(5,000 / train_size)`` above 5,000 images), at most
    the spec's.

    ``train_size`` (here and below): the training split counted in 28x28 images.
    """
    floor = max(1, round(scaled_floor(MIN_STUDENT_EPOCHS, train_size)))
    return int(min(max_epochs, max(floor, round(STUDENT_SAMPLE_BUDGET / train_size))))


def search_trials(train_size: float, epochs: int, max_trials: int) -> int:
    """Trials within SEARCH_SAMPLE_BUDGET student samples, at least MIN_TRIALS, at most the spec's."""
    return int(min(max_trials, max(MIN_TRIALS, SEARCH_SAMPLE_BUDGET // (epochs * train_size))))


def view_count(train_size: float, max_views: int) -> int:
    """FKD views within VIEW_PASS_BUDGET teacher passes per teacher (at least 1), at most the spec's."""
    return int(min(max_views, max(1, VIEW_PASS_BUDGET // train_size)))


def build_spec(args: argparse.Namespace, redis_port: int, dataset: Any | None = None) -> Any:
    """The spec template pointed at ``--data``, with the benchmark's cache, budget and overrides.

    With ``dataset`` given, ``--teachers recipe`` replaces the template's teachers by
    ``medkd.teachers.recipe.teacher_recipe`` for this data (its epoch budget scales with the
    training split), and ``--epochs auto`` scales the search's epochs the same way.
    """
    data = Path(args.data).resolve()
    if not data.is_file():
        raise SystemExit(f"--data {data}: file not found (MedMNIST .npz expected)")
    name = f"students-{data.stem}"
    overrides: dict[str, Any] = {
        "name": name,
        "data.path": str(data),
        "output_dir": str(Path(args.output or f"runs/bench-{name}").resolve()),
        "cache.redis_url": f"redis://127.0.0.1:{redis_port}/0",
        "cache.password_env": PASSWORD_ENV,
        "serve.enabled": False,
    }
    if args.trials is not None:
        overrides["search.num_trials"] = args.trials
    if args.epochs not in (None, "auto"):
        overrides["search.epochs"] = int(args.epochs)
    if dataset is not None and args.teachers == "recipe":
        overrides["teachers"] = teacher_recipe(
            n_train=len(dataset.splits["train"].images),
            class_names=list(dataset.class_names),
            image_size=list(dataset.image_size),
        )
    for text in args.set or []:
        key, value = parse_override(text)
        overrides[key] = value
    spec = load_spec(args.spec, overrides)
    if dataset is None:
        return spec
    if laterality_specific(list(dataset.class_names)):  # a flip would change a left/right label
        spec = without_flips(spec)
    # In 28x28 images: the budgets below were set at 28x28, and compute grows with the pixels.
    train_size = len(dataset.splits["train"].images) * image_cost(list(dataset.image_size))
    if args.epochs == "auto":
        epochs = student_epochs(train_size, spec.search.epochs)
        # ASHA's first rung keeps its share of the trial's budget (10 of 40 epochs -> 2 of 6).
        grace = max(1, round(spec.search.grace_period * epochs / spec.search.epochs))
        spec = with_search(spec, epochs=epochs, grace_period=grace)
    if args.trials is None:
        trials = search_trials(train_size, spec.search.epochs, spec.search.num_trials)
        spec = with_search(spec, num_trials=trials)
    explicit = {parse_override(text)[0] for text in args.set or []}
    if trains_in_bf16(train_size) and "search.cpu_precision" not in explicit:
        # As the recipe's teachers: students train in bf16 from 2,000 images on (1.4-1.6x per image,
        # validation quality checked in benchmarks/RESULTS.md) where the CPU has native bf16 kernels;
        # smaller splits keep their fingerprints.
        spec = with_search(spec, cpu_precision="bf16")
    if spec.task == "classification" and "search.teacher_selection" not in explicit:
        # Students learn only from teachers that do not hurt the ensemble's val decisions beyond the
        # noise; the search fingerprint changes only where the rule drops one.
        spec = with_search(spec, teacher_selection=RECIPE_TEACHER_SELECTION)
    if train_size > SOUP_MAX_TRAIN_SIZE and "search.final_branches" not in explicit:
        spec = with_search(spec, final_branches=None, final_epochs=spec.search.final_epochs or spec.search.epochs)
    if spec.cache.views:
        # A student sees each sample once per epoch, as the original or one view: views beyond
        # the epoch count would mostly go unseen, and each costs a teacher pass per image (on
        # 5,000 images at 28 px, ~1 min per view and teacher here).
        views = min(spec.search.epochs, view_count(train_size, spec.cache.views))
        spec = spec.model_copy(update={"cache": spec.cache.model_copy(update={"views": views})})
    return spec


def with_search(spec: Any, **changes: Any) -> Any:
    return spec.model_copy(update={"search": spec.search.model_copy(update=changes)})


def without_flips(spec: Any) -> Any:
    """``spec`` with flips off in ``search.augment`` and in every teacher's ``augment``.

    For data whose class names are left/right specific (OrganMNIST's kidney-left): a mirrored
    image would carry the wrong label, for the template's teachers (``--teachers spec``) as for
    the students and their cached views (the recipe's teachers already have no flips).
    """

    def off(augment: Any) -> Any:
        return augment.model_copy(update={"flip": 0.0}) if augment is not None and augment.flip > 0 else augment

    teachers = [t.model_copy(update={"augment": off(t.augment)}) for t in spec.teachers]
    search = spec.search.model_copy(update={"augment": off(spec.search.augment)})
    return spec.model_copy(update={"teachers": teachers, "search": search})


def spec_options(
    data: Path,
    spec: Path = DEFAULT_SPEC,
    output: str | Path | None = None,
    *,
    trials: int | None = None,
    epochs: str = "auto",
    teachers: str = "recipe",
    overrides: list[str] | None = None,
) -> argparse.Namespace:
    """The options :func:`build_spec` reads, as ``python -m benchmarks.students`` parses them (its defaults)."""
    return argparse.Namespace(
        data=data,
        spec=spec,
        output=None if output is None else str(output),
        trials=trials,
        epochs=epochs,
        teachers=teachers,
        set=overrides,
    )


# --------------------------------------------------------------------------- retraining


def kd_gain_run(
    config_json: str,
    meta: DatasetMeta,
    data_refs: list,
    cache: dict[str, Any],
    augment: dict | None,
    latency_runs: int,
    score_test: bool = True,
) -> dict[str, Any]:
    """One retraining of the selected student (a Ray task): train, compress, score INT8 on val (and on
    test unless ``score_test`` is False: studies that choose a method look at val only)."""
    from medkd.search.recipe import train_candidate, trial_augmentation

    torch.set_num_threads(1)
    config = DistillConfig.model_validate_json(config_json)
    data = ray_get(data_refs[0])
    teacher_logits = views = None
    if config.alpha < 1:
        # As in a search trial: the cached logits, and the cached FKD views when the job has them.
        source = SoftLabelCache(cache["url"], namespace=cache["namespace"], password_env=cache["password_env"])
        teacher_logits = cached_teacher_logits(source, cache["teacher_fps"], cache["dataset_fp"], segmentation=False)
        if cache.get("views"):
            views = cached_views(
                source,
                cache["teacher_fps"],
                cache["views"]["views_dataset_fp"],
                cache["views"]["views"],
                segmentation=False,
            )
    augmentation = trial_augmentation(augment, meta, config.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        metrics = train_candidate(
            build_student(meta, config),
            config,
            meta=meta,
            train=data["train"],
            val=data["val"],
            teacher_logits=teacher_logits,
            augment=augmentation,
            directory=Path(directory),
            latency_runs=latency_runs,
            views=views,
        )
        served = OnnxModel(Path(directory) / "model.onnx", threads=1)
        test = evaluate_logits(served.predict(data["test"][0]), data["test"][1], meta) if score_test else {}
    return {
        "seed": config.seed,
        "alpha": config.alpha,
        **({"test_auc": float(test["auc"]), "test_acc": float(test["acc"])} if score_test else {}),
        "val_auc": float(metrics.get("val_auc", float("nan"))),
        "val_acc": float(metrics.get("val_acc", float("nan"))),
        "params": metrics["params"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def ray_get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


def retraining_inputs(spec: Any, results: dict[str, Any], dataset: Any) -> tuple[Any, dict[str, Any], dict | None]:
    """What :func:`kd_gain_run` needs besides a config: the data (in the object store), the job's
    soft-label cache (teachers, views) and its ``search.augment``."""
    import ray

    data_ref = ray.put({name: (s.images, s.labels) for name, s in dataset.splits.items()})
    # The teachers the run's students learned from (distill: false and search.teacher_selection applied).
    distilled = (results.get("ensemble") or {}).get("distilled") or [t["name"] for t in results["teachers"]]
    cache = {
        "url": spec.cache.redis_url,
        "namespace": spec.cache.namespace,
        "password_env": spec.cache.password_env,
        "dataset_fp": dataset.fingerprint,
        "teacher_fps": [t["fingerprint"] for t in results["teachers"] if t["name"] in distilled],
        "views": results["soft_labels"].get("views"),
    }
    augment = spec.search.augment.model_dump(mode="json") if spec.search.augment is not None else None
    return data_ref, cache, augment


def students_run_parser(prog: str, description: str, *, seeds: list[int]) -> argparse.ArgumentParser:
    """The arguments of every benchmark that retrains students of a finished ``benchmarks.students``
    run: ``--run``, ``--data``, ``--spec`` and ``--seeds`` (checked by :func:`check_students_run_args`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--run", type=Path, required=True, help="output folder of a benchmarks.students run")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="the run's MedMNIST .npz (default: %(default)s)"
    )
    parser.add_argument(
        "--spec", type=Path, default=DEFAULT_SPEC, help="the run's spec template (default: %(default)s)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    return parser


def check_students_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each seed once, ``--epochs`` (where the benchmark has it) >= 1, ``--data`` a file and ``--run``
    the output folder of a ``benchmarks.students`` run; else ``parser.error`` naming the option."""
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds}")
    if getattr(args, "epochs", None) is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    if not (args.run / "results.json").is_file() or not (args.run / "redis").is_dir():
        parser.error(f"--run {args.run}: no results.json and redis/ (the output folder of a benchmarks.students run)")


def load_students_run(data: Path, spec: Path, run: Path) -> tuple[dict[str, Any], Any, argparse.Namespace, Any]:
    """A finished ``benchmarks.students`` run: its ``results.json``, the served configuration
    (a ``DistillConfig``), the run's own spec options (same teachers, cache and search) and its data.

    Raises:
        SystemExit: ``data`` is not the run's data (dataset fingerprints differ).
    """

    results = json.loads((run / "results.json").read_text())
    config = served_config(run)
    students = spec_options(data, spec, run)
    dataset = load_dataset(build_spec(students, redis_port=1).data)
    if dataset.fingerprint != results["dataset"]["fingerprint"]:
        raise SystemExit(f"--data {data} is not the data of --run {run} (dataset fingerprints differ)")
    return results, config, students, dataset


def served_config(run: Path, dataset_fp: str | None = None) -> Any:
    """The configuration (a ``DistillConfig``) a finished ``benchmarks.students`` run served.

    Raises:
        SystemExit: ``run`` has no ``results.json``, or its data is not ``dataset_fp`` (names the run).
    """
    path = run / "results.json"
    if not path.is_file():
        raise SystemExit(f"{run}: no results.json (not a finished benchmarks.students run)")
    results = json.loads(path.read_text())
    if dataset_fp is not None and results["dataset"]["fingerprint"] != dataset_fp:
        raise SystemExit(f"{run} ran on other data than this run (dataset fingerprints differ)")
    return DistillConfig.model_validate(results["best"]["config"])


def retrain_variants(
    run: Path,
    students: argparse.Namespace,
    results: dict[str, Any],
    dataset: Any,
    config: Any,
    variants: dict[str, dict[str, Any]],
    seeds: list[int],
    log: Any,
    *,
    score_test: bool = True,
    reused: dict[str, list[dict[str, Any]]] | None = None,
    reused_from: dict[str, Path] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Train ``config`` once per (variant, seed) through :func:`kd_gain_run`, as Ray tasks of 1 CPU
    on a local Ray instance, with the run's managed redis-server holding its soft labels.

    Args:
        run: the ``benchmarks.students`` output folder (its ``redis/`` is reused).
        variants: name -> the ``DistillConfig`` fields that variant changes; ``calibrate_teachers: True``
            stands for ``teacher_temperatures`` fitted on val from the run's cached teacher logits
            (what ``search.calibrate_teachers`` does in a search); ``teachers: [names]`` distills from
            those of the run's teachers only (default: those its students learned from), with the
            configuration's ``teacher_weights`` cut to them.
        log: prints one line (each benchmark's own prefix).
        score_test: also score each run on test (False: val only).
        reused: variant name -> per-seed runs read from the run's KD gain (:func:`kd_gain_runs`):
            those variants are not trained again.
        reused_from: variant name -> the run folder whose KD gain its reused runs came from (default: ``run``).

    Returns:
        variant name -> one :func:`kd_gain_run` dict per seed, in ``seeds`` order.
    """
    import ray

    from medkd.pipeline.runner import init_ray

    reused = {name: reused[name] for name in variants if name in (reused or {})}
    sources: dict[Path, list[str]] = {}
    for name in reused:
        sources.setdefault((reused_from or {}).get(name, run), []).append(name)
    for source, names in sources.items():
        log(f"{', '.join(names)}: read from the KD gain of {source} (same configuration and seeds), not trained again")
    order, variants = list(variants), {name: update for name, update in variants.items() if name not in reused}
    if not variants:
        return {name: reused[name] for name in order}
    meta = DatasetMeta.of(dataset)
    runs: dict[str, list[dict[str, Any]]] = {}
    with managed_redis(run / "redis", password_env=PASSWORD_ENV) as redis:
        spec = build_spec(students, redis_port=redis.port, dataset=dataset)
        started_ray = init_ray(spec)
        try:
            data_ref, cache, augment = retraining_inputs(spec, results, dataset)
            variants = {
                name: resolve_calibration(update, spec, cache, dataset, log) for name, update in variants.items()
            }
            sources = {name: teacher_subset(update, config, cache, results) for name, update in variants.items()}
            distilling = [
                fp
                for name, (update, source) in sources.items()
                if config.model_copy(update=update).alpha < 1
                for fp in source["teacher_fps"]
            ]
            fill_missing_views(run, spec, cache, results, dataset, list(dict.fromkeys(distilling)), log)
            task = ray.remote(num_cpus=1)(kd_gain_run)
            refs = {
                (name, seed): task.remote(
                    config.model_copy(update={**sources[name][0], "seed": seed}).model_dump_json(),
                    meta,
                    [data_ref],
                    sources[name][1],
                    augment,
                    spec.export.latency_runs,
                    score_test,
                )
                for name in variants
                for seed in seeds
            }
            log(
                f"{len(refs)} trainings of {config.student} (width {config.width:.2f}, {config.epochs} epochs): "
                f"{', '.join(variants)} x seeds {seeds}"
            )
            for (name, seed), ref in refs.items():
                result = ray.get(ref)
                runs.setdefault(name, []).append(result)
                test = f", INT8 test AUC {result['test_auc']:.4f} ACC {result['test_acc']:.4f}" if score_test else ""
                log(
                    f"  {name} seed {seed}: val AUC {result['val_auc']:.4f} ACC {result['val_acc']:.4f}{test} "
                    f"({result['seconds']:.0f}s)"
                )
        finally:
            if started_ray:
                ray.shutdown()
    return {name: reused.get(name) or runs[name] for name in order}


def kd_gain_runs(run: Path, config: Any, seeds: list[int]) -> dict[str, list[dict[str, Any]]]:
    """The ``kd`` and ``ce`` trainings of ``config`` at ``seeds`` that the run's own KD gain
    (``RUN/benchmark/students.json``) already made, for a retraining benchmark to read rather than
    train again: a (configuration, seed) trains to the same model (a retraining reproduced them to
    the digit, ``benchmarks/RESULTS.md`` stop 24). Empty when there is no such file, its configuration
    (seed aside; a ``loss`` of None is Hinton KD) differs or a seed is missing."""

    path = run / "benchmark" / "students.json"
    gain = (json.loads(path.read_text()).get("kd_gain") or {}) if path.is_file() else {}
    if not gain.get("config"):
        return {}
    trained = DistillConfig.model_validate(gain["config"])
    if (trained.loss or "hinton_kd") != (config.loss or "hinton_kd"):
        return {}
    if trained.model_copy(update={"seed": 0, "loss": None}) != config.model_copy(update={"seed": 0, "loss": None}):
        return {}
    by_seed = {kind: {r["seed"]: r for r in gain["runs"].get(kind, [])} for kind in ("kd", "ce")}
    if any(seed not in runs for runs in by_seed.values() for seed in seeds):
        return {}
    return {kind: [runs[seed] for seed in seeds] for kind, runs in by_seed.items()}


def fill_missing_views(
    run: Path,
    spec: Any,
    cache: dict[str, Any],
    results: dict[str, Any],
    dataset: Any,
    teacher_fps: list[str],
    log: Any,
) -> None:
    """Cache the FKD views of ``teacher_fps`` the run did not cache, from the teachers' checkpoints in
    ``run``, before any training starts.

    The soft-label stage caches views only for the teachers the students learn from, so a variant
    distilling from a teacher ``search.teacher_selection`` dropped needs its views computed as a
    search trial would recompute lost ones (:func:`medkd.softlabels.recovery.cache_recovery`).

    Raises:
        SystemExit: such a teacher's checkpoint is not in ``run`` (names the teacher and the folder).
    """
    views = cache.get("views")
    if not views or not teacher_fps:
        return
    from medkd.softlabels.recovery import cache_recovery
    from medkd.teachers.train import artifact_dir, find_artifact

    source = SoftLabelCache(cache["url"], namespace=cache["namespace"], password_env=cache["password_env"])
    try:
        missing = missing_views(source, teacher_fps, views["views_dataset_fp"], views["views"])
        if not missing:
            return
        names = {t["fingerprint"]: t["name"] for t in results["teachers"]}
        lacking = list(dict.fromkeys(teacher_fps[t] for t, _ in missing))
        artifacts = []
        for fp in lacking:
            artifact = find_artifact(run, names[fp], fp)
            if artifact is None:
                raise SystemExit(
                    f"teacher {names[fp]}: its FKD views are not cached and its checkpoint is not in "
                    f"{artifact_dir(run, names[fp], fp)} to compute them"
                )
            artifacts.append(artifact.model_dump_json())
        recover = cache_recovery(
            source,
            artifacts=artifacts,
            dataset_fp=cache["dataset_fp"],
            meta=DatasetMeta.of(dataset),
            cache_options={
                "encoding": spec.cache.encoding,
                "compression": spec.cache.compression,
                "topk": spec.cache.topk,
            },
            train_images=dataset.splits["train"].images,
            augment=spec.search.augment.model_dump(mode="json"),
            views=views,
        )
        for t, view in missing:
            log(
                f"FKD view {view} of teacher {names[teacher_fps[t]]} is not cached (not distilled by the run): computing"
            )
            recover(lacking.index(teacher_fps[t]), view)
    finally:
        source.close()


def teacher_subset(
    update: dict[str, Any], config: Any, cache: dict[str, Any], results: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A variant's config update and soft-label source: with ``teachers: [names]``, the cache's teacher
    fingerprints cut to those teachers and ``teacher_weights`` to theirs (renormalised).

    Raises:
        SystemExit: a name that is not one of the run's teachers.
    """
    names = update.get("teachers")
    if names is None:
        return update, cache
    rest = {k: v for k, v in update.items() if k != "teachers"}
    order = [t["name"] for t in results["teachers"]]
    unknown = sorted(set(names) - set(order))
    if unknown:
        raise SystemExit(f"teachers {unknown} are not teachers of the run (teachers: {order})")
    keep = [i for i, name in enumerate(order) if name in names]
    if config.teacher_weights is not None:
        # The configuration's weights are one per teacher its students learned from.
        distilled = (results.get("ensemble") or {}).get("distilled") or order
        by_name = dict(zip(distilled, config.teacher_weights, strict=False))
        cut = [by_name.get(order[i]) for i in keep]
        fits = len(config.teacher_weights) == len(distilled) and None not in cut and sum(cut) > 0
        rest.setdefault("teacher_weights", [w / sum(cut) for w in cut] if fits else None)
    fps = [results["teachers"][i]["fingerprint"] for i in keep]
    return rest, {**cache, "teacher_fps": fps}


def resolve_calibration(
    update: dict[str, Any], spec: Any, cache: dict[str, Any], dataset: Any, log: Any
) -> dict[str, Any]:
    """A variant's config update with ``calibrate_teachers: True`` replaced by the teachers' val-fitted
    temperatures (:func:`medkd.search.space.teacher_temperatures`, as ``search.calibrate_teachers``)."""
    if not update.get("calibrate_teachers"):
        return {k: v for k, v in update.items() if k != "calibrate_teachers"}

    source = SoftLabelCache(cache["url"], namespace=cache["namespace"], password_env=cache["password_env"])
    val_logits = [source.fetch(fp, cache["dataset_fp"], "val") for fp in cache["teacher_fps"]]
    temperatures = teacher_temperatures(val_logits, dataset.splits["val"].labels, DatasetMeta.of(dataset))
    log(f"teacher temperatures fitted on val: {temperatures}")
    rest = {k: v for k, v in update.items() if k != "calibrate_teachers"}
    return {**rest, "teacher_temperatures": temperatures}
