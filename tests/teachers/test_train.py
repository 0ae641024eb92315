"""Teacher training on a real local Ray cluster: concurrency, artifacts, skip on re-run."""

from __future__ import annotations

import torch

from medkd.core.progress import Progress
from medkd.data import load_dataset
from medkd.data.meta import DatasetMeta
from medkd.spec.job import parse_spec
from medkd.teachers.train import find_artifact, load_teacher_model, train_teachers


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
