"""The search's ``loss`` and ``logit_standardization`` dimensions: spec, fingerprint, sampling and
the trial's DistillConfig."""

from __future__ import annotations

import optuna
import pytest

from medkd.search.context import TrialContext, constant_params
from medkd.search.space import define_space, trial_distill_config
from medkd.spec.base import SpecError
from medkd.spec.job import parse_spec
from medkd.spec.search import SearchSpec

SPEC = {"name": "losses", "data": {"kind": "synthetic"}, "teachers": [{"name": "t", "model": "resnet18"}]}


def context(space) -> TrialContext:
    return TrialContext.model_construct(  # only what trial_distill_config reads
        constants=constant_params(space, 1), num_teachers=1, epochs=3, batch_size=16, seed=0, ema_epochs=None
    )


def test_unset_dimensions_leave_the_search_fingerprint_alone():
    default = SearchSpec()
    assert "loss" not in default.fingerprint_fields()["space"]
    assert "logit_standardization" not in default.fingerprint_fields()["space"]
    chosen = SearchSpec.model_validate({"space": {"loss": ["hinton_kd", "dkd"], "logit_standardization": [True]}})
    assert chosen.fingerprint_fields()["space"]["loss"] == ["hinton_kd", "dkd"]
    assert chosen.fingerprint_fields() != default.fingerprint_fields()


def test_a_bad_loss_name_is_a_spec_error_naming_the_field():
    with pytest.raises(SpecError, match=r"search.space.loss.*fitnet"):
        parse_spec({**SPEC, "search": {"space": {"loss": ["fitnet"]}}})
    with pytest.raises(SpecError, match=r"search.space.loss"):
        parse_spec({**SPEC, "search": {"space": {"loss": []}}})


def test_single_choices_are_constants_and_reach_the_distill_config():
    space = SearchSpec.model_validate({"space": {"loss": ["dist"], "logit_standardization": [True]}}).space
    config = trial_distill_config({"student": "resnet_tiny", "alpha": 0.3}, context(space))
    assert config.loss == "dist" and config.logit_standardization is True
    default = trial_distill_config({"student": "resnet_tiny"}, context(SearchSpec().space))
    assert default.loss is None and default.logit_standardization is False


def test_optuna_samples_the_loss_only_for_trials_that_distil():
    space = SearchSpec.model_validate(
        {"space": {"loss": ["hinton_kd", "dkd", "dist"], "logit_standardization": [False, True], "alpha": [0.3, 1.0]}}
    ).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        define_space(space, 1)(trial)
        params = trial.params
        assert ("loss" in params) == (params["alpha"] < 1)
        if "loss" in params:
            config = trial_distill_config(params, context(space))
            seen.add((config.loss, config.logit_standardization))
        study.tell(trial, 0.0)
    assert {loss for loss, _ in seen} == {"hinton_kd", "dkd", "dist"} and {ls for _, ls in seen} == {False, True}
