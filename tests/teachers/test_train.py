"""Teacher training on a real local Ray cluster: concurrency, artifacts, skip on re-run; finding a
teacher's artifact in a moved output folder or under another name."""

from __future__ import annotations

import io
import queue

import pytest
import torch

from medkd.core.progress import Progress
from medkd.data import SyntheticDataSpec, load_dataset
from medkd.data.meta import DatasetMeta
from medkd.spec.job import parse_spec
from medkd.teachers.loop import MODEL_FILE
from medkd.teachers.train import (
    ARTIFACT_FILE,
    _ProgressCallback,
    adopt_artifact,
    artifact_dir,
    find_artifact,
    load_teacher_model,
    train_teachers,
)
from tests.search.test_distill_cache import fake_teacher


def tiny_spec(tmp_path):
    return parse_spec(
        {
            "name": "tiny",
            "data": {"kind": "synthetic", "num_train": 64, "num_val": 32, "num_test": 32, "image_size": 28},
            "teachers": [
                {
                    "name": "cnn",
                    "model": "resnet18",
                    "epochs": 2,
                    "batch_size": 32,
                    "cpus_per_worker": 0.5,
                    "ema_epochs": 0.5,
                },
                {
                    "name": "vit",
                    "model": "vit_tiny",
                    "epochs": 2,
                    "batch_size": 32,
                    "cpus_per_worker": 0.5,
                    "patience": 1,
                    "cpu_precision": "bf16",
                },
            ],
            "output_dir": str(tmp_path / "out"),
        }
    )


def test_teachers_train_concurrently_and_are_skipped_on_rerun(ray_session, tmp_path, capsys):
    ray = ray_session
    spec = tiny_spec(tmp_path)
    dataset = load_dataset(spec.data)
    data_ref = ray.put({k: (s.images, s.labels) for k, s in dataset.splits.items()})
    storage = str(tmp_path / "ray")
    ready = []

    def train():
        return train_teachers(
            spec,
            dataset,
            data_ref,
            output_dir=spec.output_dir,
            storage_path=storage,
            progress=Progress(),
            on_ready=ready.append,
        )

    artifacts, status = train()
    assert status == {"cnn": "ran", "vit": "ran"}
    # Each teacher is handed over once, as it finishes (the pipeline starts its soft labels then).
    assert sorted((a.name, a.fingerprint) for a in ready) == sorted((a.name, a.fingerprint) for a in artifacts)
    for artifact in artifacts:
        assert 1 <= artifact.epochs_run <= 2
        assert artifact.history and "val_auc" in artifact.history[0]
        assert find_artifact(spec.output_dir, artifact.name, artifact.fingerprint) is not None
        model = load_teacher_model(artifact, DatasetMeta.of(dataset))
        out = model(torch.from_numpy(dataset.splits["val"].images[:3]))
        assert out.shape == (3, dataset.num_classes)
    assert artifacts[0].fingerprint != artifacts[1].fingerprint
    # The bf16 teacher says so in its artifact (its soft labels are computed in bf16 too); the other is fp32.
    assert [a.cpu_precision for a in artifacts] == [None, "bf16"]

    ready.clear()
    again, status = train()
    assert status == {"cnn": "skipped", "vit": "skipped"}
    assert [a.name for a in ready] == ["cnn", "vit"]  # found teachers are handed over at once
    assert [a.fingerprint for a in again] == [a.fingerprint for a in artifacts]
    assert "skipped, checkpoint found" in capsys.readouterr().out

    # Renamed in the spec, the same training is not trained again: its folder is copied under the new name.
    renamed = spec.model_copy(
        update={"teachers": [spec.teachers[0].model_copy(update={"name": "resnet"}), *spec.teachers[1:]]}
    )
    again, status = train_teachers(
        renamed, dataset, data_ref, output_dir=spec.output_dir, storage_path=storage, progress=Progress()
    )
    assert status == {"resnet": "skipped", "vit": "skipped"}
    assert again[0].name == "resnet" and again[0].fingerprint == artifacts[0].fingerprint
    assert f"in cnn-{artifacts[0].fingerprint} (the same training), copied" in capsys.readouterr().out


def write_moved_teacher(output_dir, dataset, name: str, seed: int = 0):
    """A teacher's folder as the teacher stage leaves it, whose recorded checkpoint path no longer exists
    (the output folder was moved, or the teacher folder copied in from another run)."""
    artifact, model = fake_teacher(output_dir.parent, dataset, name, seed)
    directory = artifact_dir(output_dir, name, artifact.fingerprint)
    directory.mkdir(parents=True)
    (output_dir.parent / f"{name}.pt").rename(directory / MODEL_FILE)
    stale = artifact.model_copy(update={"checkpoint": f"/moved/away/{name}/{MODEL_FILE}"})
    (directory / ARTIFACT_FILE).write_text(stale.model_dump_json())
    return artifact.fingerprint, model


@pytest.fixture
def small_dataset():
    return load_dataset(SyntheticDataSpec(image_size=16, num_classes=3, num_train=8, num_val=4, num_test=4))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_moved_output_folder_reads_the_checkpoint_beside_its_artifact(small_dataset, tmp_path):
    output_dir = tmp_path / "moved"
    fp, model = write_moved_teacher(output_dir, small_dataset, "cnn")

    found = find_artifact(output_dir, "cnn", fp)

    assert found is not None and found.checkpoint == str((artifact_dir(output_dir, "cnn", fp) / MODEL_FILE).resolve())
    assert same_weights(load_teacher_model(found, DatasetMeta.of(small_dataset)), model)
    assert find_artifact(output_dir, "cnn", "0" * 16) is None  # another training


def test_a_teacher_folder_under_another_name_is_copied_not_retrained(small_dataset, tmp_path):
    output_dir = tmp_path / "out"
    fp, model = write_moved_teacher(output_dir, small_dataset, "cnn")
    assert find_artifact(output_dir, "resnet", fp) is None

    adopted, source = adopt_artifact(output_dir, "resnet", fp)

    assert source == artifact_dir(output_dir, "cnn", fp) and adopted.name == "resnet"
    assert find_artifact(output_dir, "resnet", fp) == adopted  # complete under its own name now
    assert same_weights(load_teacher_model(adopted, DatasetMeta.of(small_dataset)), model)
    assert adopt_artifact(output_dir, "resnet", "0" * 16) is None


def test_a_corrupt_artifact_is_refused_naming_its_file(small_dataset, tmp_path):
    output_dir = tmp_path / "out"
    fp, _ = write_moved_teacher(output_dir, small_dataset, "cnn")
    path = artifact_dir(output_dir, "cnn", fp) / ARTIFACT_FILE
    path.write_text('{"name": "cnn"')

    with pytest.raises(ValueError, match=f"{path}: not a teacher artifact"):
        find_artifact(output_dir, "cnn", fp)


def test_each_worker_failure_shows_in_the_progress_with_what_train_does_next():
    """A worker group Ray Train restarts from the last checkpoint is said in the progress, not only in
    ``teacher.json``'s ``resumed_from`` (stop 27: a restart under load went unseen)."""
    events: queue.Queue = queue.Queue()
    callback = _ProgressCallback(events, "cnn", epochs=12, max_failures=1)
    lost = RuntimeError("A worker health check failed.\nThe actor is dead: its placement group was removed.")
    callback.after_exception(None, {0: lost})
    callback.after_exception(None, {1: ValueError("out of memory")})

    stream = io.StringIO()
    progress = Progress(stream)
    while not events.empty():
        progress.event(events.get_nowait())
    first, second = stream.getvalue().splitlines()[-2:]
    assert first.endswith(
        "teacher cnn: failure 1 of 1 allowed (worker 0: A worker health check failed. The actor is dead: its "
        "placement group was removed.); Ray Train restarts the workers from the last checkpoint"
    )
    assert "failure 2 of 1 allowed (worker 1: out of memory); no restart left" in second
