"""The final training stage's guards (the training itself runs in tests/pipeline/test_runner.py)."""

from __future__ import annotations

import pytest

from medkd.core.progress import Progress
from medkd.data.meta import DatasetMeta
from medkd.registry.export import ExportError, export_models
from medkd.search.final import FinalModel, final_fingerprint, train_final
from medkd.search.outcome import SearchOutcome, TrialRecord
from medkd.spec.job import parse_spec

META = DatasetMeta(task="segmentation", spatial_dims=2, in_channels=1, num_classes=2, image_size=[16, 16])


def spec(final_epochs: int | None, final_branches: int | None = None):
    final = {k: v for k, v in {"final_epochs": final_epochs, "final_branches": final_branches}.items() if v}
    return parse_spec(
        {
            "name": "final",
            "data": {"kind": "synthetic"},
            "teachers": [{"name": "t", "model": "resnet10"}],
            "search": {"epochs": 3, **final},
        }
    )


def trial(trial_id: str, *, finished: bool = True) -> TrialRecord:
    return TrialRecord(
        trial_id=trial_id,
        status="completed" if finished else "stopped early",
        config={"student": "resnet_tiny", "epochs": 3, "seed": 0},
        metrics={"val_auc": 0.9},
        checkpoint=None,
        final=finished,
    )


def outcome(*trials: TrialRecord) -> SearchOutcome:
    return SearchOutcome(
        fingerprint="abc",
        experiment_path="/nowhere",
        objectives=[{"metric": "val_auc", "mode": "max"}],
        trials=list(trials),
        pareto=[t.trial_id for t in trials if t.final],
    )


def test_without_final_epochs_nothing_is_trained(tmp_path):
    record, status = train_final(
        spec(None), outcome(trial("a")), trial("a"), context={}, output_dir=tmp_path, progress=Progress(quiet=True)
    )
    assert (record, status) == (None, "skipped")
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("final", [spec(10), spec(None, final_branches=4)], ids=["epochs", "branches"])
def test_an_unfinished_trial_cannot_be_trained_again(tmp_path, final):
    stopped = trial("b", finished=False)
    with pytest.raises(ValueError, match="trial b did not finish"):
        train_final(
            final, outcome(trial("a"), stopped), stopped, context={}, output_dir=tmp_path, progress=Progress(quiet=True)
        )


def test_fingerprint_depends_on_trial_config_epochs_and_branches():
    done = outcome(trial("a"), trial("b"))
    assert final_fingerprint(done, trial("a"), 10) == final_fingerprint(done, trial("a"), 10, branches=1)
    assert final_fingerprint(done, trial("a"), 10) != final_fingerprint(done, trial("a"), 20)
    assert final_fingerprint(done, trial("a"), 10) != final_fingerprint(done, trial("b"), 10)
    assert final_fingerprint(done, trial("a"), 10) != final_fingerprint(done, trial("a"), 10, branches=4)


def test_export_refuses_a_final_model_of_another_trial(tmp_path):
    other = FinalModel(
        fingerprint="f",
        trial_id="b",
        path=str(tmp_path),
        epochs=10,
        search_epochs=3,
        val={},
        search_val={},
        seconds=1.0,
    )
    done = outcome(trial("a"), trial("b"))  # export.select "best" picks the front's first, "a"
    with pytest.raises(ExportError, match="final training is of trial b.*picks a"):
        export_models(
            spec(10),
            done,
            dataset=None,
            meta=META,
            teachers=[],
            soft_labels={},
            output_dir=tmp_path,
            progress=Progress(quiet=True),
            final=other,
        )
