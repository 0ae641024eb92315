"""Longest trial first: the search runs the configurations its sampler draws anyway, only the
random start-up ones reordered by their student's FLOPs (medkd.search.ordering)."""

from __future__ import annotations

import optuna
from optuna.samplers import TPESampler
from ray.tune.search.optuna import OptunaSearch

from medkd.data.meta import DatasetMeta
from medkd.search.context import search_context
from medkd.search.ordering import STARTUP_TRIALS, longest_first_sampler, student_flops
from medkd.search.space import define_space
from medkd.spec.job import parse_spec
from medkd.spec.search import SearchSpec

META = DatasetMeta(
    task="classification", multilabel=False, spatial_dims=2, in_channels=1, num_classes=3, image_size=[28, 28]
)
DIRECTIONS = ["maximize", "maximize", "minimize"]


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def _context():
    spec = parse_spec(
        {"name": "order", "data": {"kind": "synthetic"}, "teachers": [{"name": "t", "model": "resnet18"}]}
    )
    return search_context(
        spec, meta=META, data_ref=None, teacher_fps=["fp"], dataset_fp="data", cache_url="redis://127.0.0.1:1/0"
    )


def test_a_wider_student_costs_more_flops_and_the_count_needs_no_real_forward():
    context = _context()
    narrow = student_flops(META, {"student": "resnet_tiny", "width": 0.25}, context)
    wide = student_flops(META, {"student": "resnet_tiny", "width": 1.0}, context)
    assert 0 < narrow < wide


def test_the_start_up_configurations_are_the_samplers_own_draws_longest_first_and_its_stream_goes_on():
    space = define_space(SearchSpec().space, 2)
    plain = optuna.create_study(directions=DIRECTIONS, sampler=TPESampler(seed=3))
    expected = []
    for _ in range(7):
        trial = plain.ask()
        space(trial)
        expected.append(trial.params)

    sampler, first = longest_first_sampler(space, DIRECTIONS, 6, 3, cost=lambda params: params["width"])
    assert sorted(map(_key, first)) == sorted(map(_key, expected[:6]))  # the same six configurations
    assert [p["width"] for p in first] == sorted((p["width"] for p in expected[:6]), reverse=True)
    after = optuna.create_study(directions=DIRECTIONS, sampler=sampler).ask()
    space(after)
    assert after.params == expected[6]  # the 7th draw is the one the sampler alone would have made


def test_at_most_the_random_start_up_trials_are_drawn_ahead():
    space = define_space(SearchSpec().space, 2)
    _, first = longest_first_sampler(space, DIRECTIONS, 25, 0, cost=lambda params: params["width"])
    assert len(first) == STARTUP_TRIALS


def test_tunes_optuna_searcher_hands_the_enqueued_order_out_first():
    spec = SearchSpec()
    space = define_space(spec.space, 2)
    sampler, first = longest_first_sampler(space, DIRECTIONS, 4, 0, cost=lambda params: params["width"])
    searcher = OptunaSearch(
        space=space,
        metric=[o.metric for o in spec.objectives],
        mode=[o.mode for o in spec.objectives],
        sampler=sampler,
        points_to_evaluate=first,
    )
    suggested = [searcher.suggest(f"t{i}") for i in range(5)]
    assert [s["width"] for s in suggested[:4]] == [p["width"] for p in first]
    assert _key(suggested[4]) not in {_key(p) for p in first}  # then the sampler's own next draw
