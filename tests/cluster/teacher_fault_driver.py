"""The driver of the teacher fault tests: trains one tiny teacher with medkd's teacher stage
(``train_one_teacher``) on the cluster it joins (``RAY_ADDRESS``), and prints one line
``SCENARIO_RESULT {json}`` with the artifact's history or the error's message.

Run on the head's namespace by ``tests/cluster/test_faults_teachers.py`` (the fault comes from the
test)::

    python -m tests.cluster.teacher_fault_driver --output SHARED/teacher --workers 2 --min-workers 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import ray

from medkd.data import SyntheticDataSpec, load_dataset
from medkd.data.meta import DatasetMeta
from medkd.spec.teachers import TeacherSpec
from medkd.teachers.faults import TeacherTrainingError
from medkd.teachers.train import train_one_teacher

TEACHER_FP = "faultscenario"
#: A worker group that cannot be placed fails its start after this long (Ray's default 60 s) and
#: is retried: with ``MEDKD_LOST_NODE_WAIT_S`` the bound of a run that cannot go on.
WORKER_GROUP_START_TIMEOUT_S = "10"


def run_dir(output: Path, name: str) -> Path:
    """Ray Train's directory of the teacher's run (its checkpoints and their registry)."""
    return output / "ray" / f"teacher-{name}-{TEACHER_FP}"


def train(output: Path, *, name: str, epochs: int, workers: int, min_workers: int | None) -> dict[str, Any]:
    dataset = load_dataset(SyntheticDataSpec(image_size=16, num_train=256, num_val=64, num_test=32, num_classes=2))
    teacher = TeacherSpec(
        name=name,
        model="vit",
        model_kwargs={"hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2},
        epochs=epochs,
        batch_size=32,
        cpus_per_worker=1,
        num_workers=workers,
        min_workers=min_workers,
        use_gpu=False,
        max_failures=3,
        ema_epochs=1.0,  # a resumed run must also restore the weight average
    )
    try:
        artifact = train_one_teacher(
            teacher,
            teacher_fp=TEACHER_FP,
            seed=0,
            meta=DatasetMeta.of(dataset),
            data_ref=ray.put(dataset.arrays()),
            output_dir=output,
            storage_path=str(output / "ray"),
        )
    except TeacherTrainingError as error:
        return {"ok": False, "error": str(error)}
    return {
        "ok": True,
        "history": [
            {"epoch": int(r["epoch"]), "workers": int(r.get("workers", 1)), "node": r.get("node")}
            for r in artifact.history
        ],
        "resumed_from": artifact.resumed_from,
        "best_val": artifact.best_val if math.isfinite(artifact.best_val) else None,
        "checkpoint": artifact.checkpoint,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.teacher_fault_driver")
    parser.add_argument("--output", type=Path, required=True, help="artifacts and Ray Train storage (shared)")
    parser.add_argument("--name", default="fault")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--min-workers", type=int, default=None)
    args = parser.parse_args(argv)
    # The job's environment reaches Train's controller wherever Ray places it.
    ray.init(
        runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": WORKER_GROUP_START_TIMEOUT_S}},
        log_to_driver=False,
    )
    try:
        outcome = train(
            args.output.resolve(),
            name=args.name,
            epochs=args.epochs,
            workers=args.workers,
            min_workers=args.min_workers,
        )
    finally:
        ray.shutdown()
    print("SCENARIO_RESULT " + json.dumps(outcome), flush=True)
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
