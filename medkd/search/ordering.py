"""Longest trial first: the order in which a search's randomly drawn start-up trials run.

A search runs ``max_concurrent`` trials at a time and each free slot takes the next trial, so the
stage ends when the last trial does. Optuna's TPE sampler draws its first
:data:`STARTUP_TRIALS` configurations at random, independently of any result: which
configurations they are does not depend on when they are asked. :func:`longest_first_sampler`
draws them up front with the very sampler the search then uses (so its random stream goes on
where it would have: the search runs the same configurations as without the ordering, with the
same seed), and returns them most expensive first, to be enqueued as the search's first trials.
Longest-first list scheduling is the classic makespan heuristic: the short trials fill the slots
at the end instead of one long trial running alone while the other slots idle.

The expected cost of a configuration is its student's forward FLOPs on one input
(:func:`student_flops`): a trial's epochs, batch and data are the same for every configuration,
so what differs is the student's size (pruning's short fine-tune and the quantization are left
out of the estimate). Only the order changes, never which configurations run; a search that starts
all its trials at once (``num_trials <= max_concurrent``) is left as it was.
"""

from __future__ import annotations

from typing import Any

import optuna
import torch
from optuna.samplers import TPESampler
from torch.utils.flop_counter import FlopCounterMode

from medkd.data.meta import DatasetMeta
from medkd.search.context import TrialContext
from medkd.search.space import trial_distill_config
from medkd.students.distill import build_student

#: TPE's random start-up trials (Optuna's default ``n_startup_trials``, stated so the ordering relies on it).
STARTUP_TRIALS = 10


def student_flops(meta: DatasetMeta, params: dict[str, Any], context: TrialContext) -> int:
    """Forward FLOPs of the student a trial with ``params`` trains, on one input of ``meta``'s shape.

    Args:
        meta: the dataset's shape (channels, image size).
        params: the sampled parameters of one trial.
        context: the search's trial context (constants, epochs, seed).

    Examples::

        >>> narrow = student_flops(meta, {"student": "resnet_tiny", "width": 0.25}, context)
        >>> narrow < student_flops(meta, {"student": "resnet_tiny", "width": 1.0}, context)
        True
    """
    # On the meta device nothing is computed: the count comes from the shapes alone (a 3-D
    # student's forward costs the driver nothing).
    model = build_student(meta, trial_distill_config(params, context)).eval().to("meta")
    example = torch.zeros(1, meta.in_channels, *meta.image_size, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    return int(counter.get_total_flops())


def longest_first_sampler(
    space: Any, directions: list[str], count: int, seed: int, cost: Any
) -> tuple[TPESampler, list[dict[str, Any]]]:
    """The search's sampler and its first ``count`` configurations (at most :data:`STARTUP_TRIALS`),
    most expensive first.

    Args:
        space: the define-by-run space (:class:`medkd.search.space.define_space`).
        directions: one ``"maximize"``/``"minimize"`` per objective.
        count: how many start-up configurations to draw (capped at :data:`STARTUP_TRIALS`).
        seed: the search's seed.
        cost: ``params -> expected cost`` (e.g. :func:`student_flops` bound to the search).

    Returns:
        The sampler (its random stream past the drawn configurations: give it to the search) and
        the configurations in the order to run them.

    Examples::

        >>> sampler, first = longest_first_sampler(space, ["maximize"], 4, 0, lambda p: p["width"])
        >>> [p["width"] for p in first] == sorted((p["width"] for p in first), reverse=True)
        True
    """
    sampler = TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS)
    draw = optuna.create_study(directions=directions, sampler=sampler)
    drawn = []
    for _ in range(min(count, STARTUP_TRIALS)):
        trial = draw.ask()
        space(trial)
        drawn.append(trial.params)
    # sorted() is stable: equal costs keep the sampler's order.
    return sampler, sorted(drawn, key=cost, reverse=True)
