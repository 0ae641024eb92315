"""End to end: `run_job` on the quickstart's synthetic data with tiny budgets, against real Ray, Redis,
ONNX Runtime and Serve; the teachers and the served student must have learnt (floors below)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from medkd.core.progress import Progress
from medkd.data import load_dataset
from medkd.data.meta import DatasetMeta
from medkd.pipeline.runner import Pipeline, run_job
from medkd.search.final import final_seed
from medkd.softlabels.redis_server import ManagedRedisServer
from medkd.softlabels.store import SoftLabelCache
from medkd.spec.job import parse_spec
from medkd.teachers.train import TeacherArtifact
from tests.conftest import free_port

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
#: The quickstart's data section (768 / 192 / 192 images, 3 classes), so the floors below hold for
#: the data the quickstart really trains on.
QUICKSTART_DATA = yaml.safe_load(QUICKSTART.read_text())["data"]
# Learning floors of tiny_job (1 epoch per teacher and per trial), from one run on seed 0
# (2026-12-05): CNN teacher test AUC 0.938, ViT 0.624 (one epoch is too little for a ViT),
# their ensemble 0.941; the two trials' val AUC 0.889 and 0.802. A student trained on shuffled
# labels stays near 0.5 (tests/students/test_learning.py), so the floors can only be met by learning.
CNN_TEACHER_AUC_FLOOR = 0.85
ENSEMBLE_AUC_FLOOR = 0.85
STUDENT_AUC_FLOOR = 0.70


def tiny_job(tmp_path: Path, redis_url: str, **changes) -> dict:
    raw = {
        "name": "tiny",
        "seed": 0,
        "data": dict(QUICKSTART_DATA),
        "teachers": [
            {"name": "cnn", "model": "resnet10", "epochs": 1, "batch_size": 32, "cpus_per_worker": 0.5},
            {"name": "vit", "model": "vit_tiny", "epochs": 1, "batch_size": 32, "cpus_per_worker": 0.5},
        ],
        # One FKD view of train per teacher: trials train on it with its own cached logits.
        "cache": {"redis_url": redis_url, "namespace": f"test-{tmp_path.name}", "views": 1},
        "search": {
            "num_trials": 2,
            "max_concurrent": 2,
            "epochs": 1,
            "batch_size": 32,
            "cpus_per_trial": 0.5,
            "scheduler": "none",
            "augment": {"flip": 0.5},
            "space": {"student": ["resnet_tiny"], "width": {"low": 0.25, "high": 0.5}, "quantize": ["int8_static"]},
        },
        "serve": {"port": free_port(), "cpus_per_replica": 0.25, "max_replicas": 1},
        "output_dir": str(tmp_path / "run"),
    }
    raw.update(changes)
    return raw


def tracked_runs(results: dict) -> dict[str, list]:
    """The job's MLflow runs by ``medkd.kind``, read back with MLflow's own client."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=results["tracking"]["uri"])
    runs = client.search_runs([results["tracking"]["experiment_id"]], max_results=1000)
    by_kind: dict[str, list] = {"teacher": [], "trial": [], "student": []}
    for run in runs:
        by_kind[run.data.tags["medkd.kind"]].append(run)
    return by_kind


def assert_tracked(results: dict, output_dir: Path) -> None:
    """tracking.enabled with no uri: MLflow runs in output_dir/mlruns for the teachers, every trial
    (Tune's MLflow callback) and every exported student, matching results.json."""
    from mlflow import MlflowClient

    assert results["tracking"]["uri"] == f"sqlite:///{output_dir.resolve()}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=results["tracking"]["uri"])
    runs = tracked_runs(results)

    teachers = {r.data.tags["medkd.teacher"]: r for r in runs["teacher"]}
    assert set(teachers) == {t["name"] for t in results["teachers"]}
    for teacher in results["teachers"]:
        run = teachers[teacher["name"]]
        assert run.info.status == "FINISHED" and run.data.tags["medkd.fingerprint"] == teacher["fingerprint"]
        assert run.data.tags["medkd.checkpoint"] == teacher["checkpoint"] and Path(teacher["checkpoint"]).is_file()
        assert run.data.params["model"] == teacher["model"] and run.data.params["epochs"] == "1"
        assert run.data.metrics["test/auc"] == pytest.approx(teacher["test_metrics"]["auc"])
        assert run.data.metrics["params"] == teacher["params"]
        history = client.get_metric_history(run.info.run_id, "val_auc")
        assert [m.step for m in history] == [h["epoch"] for h in teacher["history"]]

    trials = {r.data.tags["medkd.trial_id"]: r for r in runs["trial"]}
    assert set(trials) == {t["trial_id"] for t in results["trials"]}
    for trial in results["trials"]:
        run = trials[trial["trial_id"]]
        assert run.data.tags["trial_name"].endswith(trial["trial_id"])  # made by Tune's MLflowLoggerCallback
        assert run.data.tags["medkd.search_fingerprint"] == results["search"]["fingerprint"]
        assert 0.25 <= float(run.data.params["width"]) <= 0.5  # the sampled params
        assert run.data.metrics["val_auc"] == pytest.approx(trial["metrics"]["val_auc"])
        on_front = trial["trial_id"] in results["search"]["pareto"]
        assert run.data.tags["medkd.pareto"] == str(on_front).lower()
        if on_front:
            assert run.data.metrics["pareto_rank"] == results["search"]["pareto"].index(trial["trial_id"])
    assert [t for t, r in trials.items() if r.data.tags["medkd.selected"] == "true"] == [results["best"]["trial_id"]]

    students = {r.data.tags["medkd.model_id"]: r for r in runs["student"]}
    assert set(students) == {m["model_id"] for m in results["pareto_models"]}
    served = students[results["best"]["model_id"]]
    assert served.data.tags["medkd.selected"] == "true" and served.info.run_name == results["best"]["model_id"]
    assert served.data.tags["medkd.onnx_path"] == results["best"]["onnx_path"]
    assert served.data.metrics["model_bytes"] == results["best"]["size_bytes"]
    assert served.data.metrics["latency_ms"] == pytest.approx(results["best"]["latency_ms"])
    assert served.data.metrics["test/auc"] == pytest.approx(results["best"]["test_metrics"]["auc"])
    for teacher in results["teachers"]:
        assert served.data.tags[f"medkd.teacher.{teacher['name']}"] == teacher["fingerprint"]
    assert {"metadata.json", "model.onnx"} <= {a.path for a in client.list_artifacts(served.info.run_id)}
    assert all(
        r.data.tags["medkd.selected"] == "false" for m, r in students.items() if m != results["best"]["model_id"]
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three runs of the pipeline
def test_run_job_end_to_end_then_resume(ray_session, redis_url, tmp_path, capsys):
    spec = parse_spec(tiny_job(tmp_path, redis_url, tracking={"enabled": True}))
    run_job(spec)
    results = json.loads((spec.output_dir / "results.json").read_text())
    assert_tracked(results, spec.output_dir)

    assert results["dataset"]["fingerprint"]
    assert {t["name"] for t in results["teachers"]} == {"cnn", "vit"}
    teachers = {t["name"]: t for t in results["teachers"]}
    assert all(t["params"] > 100_000 for t in teachers.values())
    assert teachers["cnn"]["test_metrics"]["auc"] >= CNN_TEACHER_AUC_FLOOR, teachers["cnn"]["test_metrics"]
    # One epoch leaves the ViT barely above chance (test AUC 0.62 measured): it must still be above it.
    assert teachers["vit"]["test_metrics"]["auc"] > 0.5, teachers["vit"]["test_metrics"]
    assert results["ensemble"]["test_metrics"]["auc"] >= ENSEMBLE_AUC_FLOOR, results["ensemble"]["test_metrics"]
    assert results["soft_labels"]["misses"] == 6 and results["soft_labels"]["bytes"] > 0
    assert results["soft_labels"]["views"]["computed"] == 2 and results["soft_labels"]["views"]["cached"] == 0
    assert len(results["trials"]) == 2 and all(t["config"]["student"] == "resnet_tiny" for t in results["trials"])
    assert all(t["final"] and 0.25 <= t["config"]["width"] <= 0.5 for t in results["trials"])
    best = results["best"]
    assert Path(best["onnx_path"]).is_file() and best["size_bytes"] == Path(best["onnx_path"]).stat().st_size
    assert best["latency_ms"] > 0 and best["parity"]["max_abs_diff"] < 1e-3
    assert best["test_metrics"]["auc"] >= STUDENT_AUC_FLOOR, best["test_metrics"]  # the served INT8 student
    metadata = json.loads((Path(best["onnx_path"]).parent / "metadata.json").read_text())
    assert [t["fingerprint"] for t in metadata["teachers"]] == [t["fingerprint"] for t in results["teachers"]]
    assert all(
        key.startswith(f"test-{tmp_path.name}:") for t in metadata["teachers"] for key in t["cache_keys"].values()
    )
    demo = results["serve"]["demo"]["answer"]
    assert len(demo["probabilities"]) == 3 and abs(sum(demo["probabilities"]) - 1) < 1e-4
    assert {name: s["status"] for name, s in results["stages"].items()} == {
        "teachers": "ran",
        "soft_labels": "ran",
        "search": "ran",
        "final": "skipped",
        "export": "ran",
        "serve": "ran",
        "report": "ran",
    }
    assert best["final_training"] is None and "final" not in results
    report = (spec.output_dir / "report.html").read_text()
    assert "Teachers vs student" in report and "data:image/png;base64" in report

    # Each teacher's soft labels start as soon as it is trained, inside the teacher stage.
    first_run = capsys.readouterr().out
    stage_2 = first_run.index("== stage 2/7: soft_labels ==")
    assert all(0 <= first_run.find(f"soft labels {name}: computing") < stage_2 for name in ("cnn", "vit")), first_run

    # Same job again: every stage with persisted output is skipped, nothing is retrained.
    run_job(spec, serve=False)
    again = json.loads((spec.output_dir / "results.json").read_text())
    assert again["stages"]["teachers"]["status"] == "skipped"
    assert again["stages"]["soft_labels"]["status"] == "skipped"
    assert again["stages"]["search"]["status"] == "skipped"
    assert again["soft_labels"]["hits"] == 6 and again["soft_labels"]["misses"] == 0
    assert again["soft_labels"]["views"]["computed"] == 0 and again["soft_labels"]["views"]["cached"] == 2
    assert again["best"]["model_id"] == best["model_id"]
    # Tracking is idempotent: the skipped stages' teachers, trials and students are not logged twice.
    assert {kind: len(runs) for kind, runs in tracked_runs(again).items()} == {
        "teacher": 2,
        "trial": 2,
        "student": len(results["pareto_models"]),
    }
    out = capsys.readouterr().out
    assert "skipped, checkpoint found" in out and "skipped, all splits found in cache" in out

    from medkd.cli.main import main

    assert main(["models", str(spec.output_dir)]) == 0
    listing = capsys.readouterr().out
    assert f"* rank 0  {best['model_id']}" in listing

    # search.final_epochs and final_branches: the same search (not re-run), its selected configuration
    # trained again for longer as a weight soup, and that model exported and selected under its own id.
    longer = parse_spec(
        tiny_job(
            tmp_path,
            redis_url,
            search={**tiny_job(tmp_path, redis_url)["search"], "final_epochs": 2, "final_branches": 2},
            tracking={"enabled": True},
        )
    )
    run_job(longer, serve=False)
    final = json.loads((spec.output_dir / "results.json").read_text())
    assert final["stages"]["search"]["status"] == "skipped" and final["stages"]["final"]["status"] == "ran"
    assert final["final"]["trial_id"] == best["trial_id"] and final["final"]["epochs"] == 2
    assert final["final"]["search_epochs"] == 1 and set(final["final"]["val"]) >= {"val_auc", "val_acc"}
    assert final["final"]["seed"] == final_seed(best["config"]["seed"])  # a fresh draw, not the trial's seed
    # Served only if val does not say it is worse than the search's instance beyond the noise
    # (registry.selection.compare_final, unit-tested both ways in tests/registry/test_selection.py).
    judged = final["selection"]["final"]
    # The same models on val; ONNX Runtime's INT8 logits move by ~1e-6 with its thread count, which
    # can swap a near-tie in the ranking (measured 4e-5 AUC).
    assert judged["search_quality"] == pytest.approx(best["val_metrics"]["val_auc"], abs=1e-3)
    assert judged["final_quality"] == pytest.approx(final["final"]["val"]["val_auc"], abs=1e-3)
    assert judged["quality_se"] > 0 and judged["decision_se"] >= 0 and "paired bootstrap" in judged["rule"]
    assert final["final"]["served"] == (judged["served"] == "final")
    out = capsys.readouterr().out
    served_line = (
        "serving the final training"
        if judged["served"] == "final"
        else f"serving the search instance of trial {best['trial_id']}"
    )
    assert "final training of trial" in out and served_line in out
    report = (spec.output_dir / "report.html").read_text()
    assert "Served instance: " in report and "SE of the difference" in report
    students = {r.data.tags["medkd.model_id"]: r.data.tags for r in tracked_runs(final)["student"]}
    if judged["served"] == "final":
        assert final["best"]["model_id"] != best["model_id"] and final["best"]["config"]["epochs"] == 2
        assert final["best"]["config"]["branches"] == 2 and final["final"]["branches"] == 2
        assert {k: v for k, v in final["best"]["config"].items() if k not in ("epochs", "branches", "seed")} == {
            k: v for k, v in best["config"].items() if k not in ("epochs", "branches", "seed")
        }
        # A fresh draw: its own seed, recorded in the registry's lineage.
        assert final["best"]["config"]["seed"] == final_seed(best["config"]["seed"]) != best["config"]["seed"]
        assert final["best"]["final_training"]["seed"] == final["best"]["config"]["seed"]
        assert final["best"]["final_training"]["epochs"] == 2 and final["best"]["final_training"]["branches"] == 2
        assert final["best"]["val_metrics"]["val_auc"] == pytest.approx(final["final"]["val"]["val_auc"])
        assert students[final["best"]["model_id"]]["medkd.final_training_fingerprint"]
        assert students[best["model_id"]]["medkd.selected"] == "false"
        assert "trained again after the search for 2 epochs (search: 1), a weight soup of 2 branches" in report
    else:
        assert final["best"]["model_id"] == best["model_id"] and final["best"]["final_training"] is None
        assert "worse beyond the val noise" in judged["reason"]
    assert Path(final["best"]["onnx_path"]).is_file() and final["best"]["parity"]["max_abs_diff"] < 1e-3
    assert (spec.output_dir / "models" / "SELECTED").read_text().strip() == final["best"]["model_id"]
    assert students[final["best"]["model_id"]]["medkd.selected"] == "true"  # the served model's own run
    run_job(longer, serve=False)
    again = json.loads((spec.output_dir / "results.json").read_text())
    assert again["stages"]["final"]["status"] == "skipped" and again["selection"]["final"] == judged  # same decision
    assert again["best"]["model_id"] == final["best"]["model_id"]
    assert "final training" in capsys.readouterr().out


def test_bad_data_fails_before_training(ray_session, redis_url, tmp_path):
    from medkd.data import DataValidationError

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    spec = parse_spec(tiny_job(tmp_path, redis_url, data={"kind": "medmnist", "path": str(bad)}))
    with pytest.raises(DataValidationError, match="bad.npz"):
        run_job(spec)
    assert not (spec.output_dir / "teachers").exists()


@pytest.mark.slow
def test_3d_segmentation_example_runs_end_to_end(ray_session, redis_url, tmp_path):
    """examples/segmentation3d.yaml with small volumes and budgets: 3D teachers, voxel logits in
    Redis, a voxel-wise distilled 3D student, ONNX export and a served NPY request."""
    from medkd.spec.job import load_spec

    repo = Path(__file__).resolve().parents[2]
    overrides = {
        "data.image_size": 16,
        "data.num_train": 16,
        "data.num_val": 8,
        "data.num_test": 8,
        "teachers.0.epochs": 1,
        "teachers.1.epochs": 1,
        "teachers.0.cpus_per_worker": 0.5,
        "teachers.1.cpus_per_worker": 0.5,
        "search.num_trials": 1,
        "search.epochs": 1,
        "search.cpus_per_trial": 0.5,
        "cache.redis_url": redis_url,
        "cache.namespace": f"test-{tmp_path.name}",
        "serve.port": free_port(),
        "output_dir": str(tmp_path / "run"),
    }
    spec = load_spec(repo / "examples" / "segmentation3d.yaml", overrides)
    run_job(spec)
    results = json.loads((spec.output_dir / "results.json").read_text())

    assert {t["name"] for t in results["teachers"]} == {"unet", "segresnet"}
    for teacher in results["teachers"]:
        assert 0.0 <= teacher["test_metrics"]["dice"] <= 1.0
    manifest_shapes = {entry["splits"]["train"]["num_samples"] for entry in results["soft_labels"]["teachers"].values()}
    assert manifest_shapes == {16}
    best = results["best"]
    assert results["trials"][0]["config"]["student"] == "unet_small"
    assert 0.0 <= best["test_metrics"]["dice"] <= 1.0 and best["parity"]["max_abs_diff"] < 1e-3
    answer = results["serve"]["demo"]["answer"]
    assert answer["shape"] == [16, 16, 16] and sum(answer["class_pixel_counts"]) == 16**3


def test_a_cache_down_when_a_teacher_is_ready_is_logged_and_left_to_stage_2(tmp_path):
    """The early start of a teacher's soft labels must not fail the teacher stage: the cache error is
    printed with the teacher's name and nothing is recorded as started, so stage 2 checks again."""
    spec = parse_spec(tiny_job(tmp_path, "redis://127.0.0.1:1/0"))
    printed = io.StringIO()
    pipeline = Pipeline(spec, progress=Progress(printed, live=False))
    pipeline.dataset = load_dataset(spec.data)
    pipeline.meta, pipeline.data_ref = DatasetMeta.of(pipeline.dataset), None
    teacher = TeacherArtifact(
        **{"name": "cnn", "model": "resnet10", "family": "cnn", "model_kwargs": {}, "fingerprint": "ab12cd34"},
        **{"params": 1, "checkpoint": str(tmp_path / "none.pt"), "epochs_run": 1, "best_epoch": 1, "best_val": 0.5},
        **{"history": [], "train_seconds": 1.0},
    )
    server = ManagedRedisServer(data_dir=tmp_path / "redis").start()
    pipeline.cache = SoftLabelCache(server.url, namespace="early", retries=0)
    server.stop()  # the cache goes away between the teachers' start and the first teacher's end

    pipeline._start_soft_labels(teacher)

    assert "cnn" not in pipeline.soft_label_tasks
    line = next(line for line in printed.getvalue().splitlines() if "soft labels cnn: not started early (" in line)
    assert "Connection" in line.split("not started early (")[1]
