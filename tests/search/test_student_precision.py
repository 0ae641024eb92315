"""``search.cpu_precision`` reaches every student's DistillConfig through the trial context
(search trials, and through their configs the final training and the benchmarks' retrainings)."""

from __future__ import annotations

from medkd.data.meta import DatasetMeta
from medkd.search.context import search_context
from medkd.search.space import trial_distill_config
from medkd.spec.job import parse_spec

SPEC = {"name": "precision", "data": {"kind": "synthetic"}, "teachers": [{"name": "t", "model": "resnet18"}]}
META = DatasetMeta(
    task="classification", multilabel=False, spatial_dims=2, in_channels=1, num_classes=2, image_size=[8, 8]
)


def _trial_config(search: dict):
    spec = parse_spec({**SPEC, "search": search})
    context = search_context(
        spec, meta=META, data_ref=None, teacher_fps=["fp"], dataset_fp="data", cache_url="redis://127.0.0.1:1/0"
    )
    return trial_distill_config({"student": "resnet_tiny", "alpha": 0.5}, context)


def test_search_cpu_precision_reaches_the_trials_distill_config():
    assert _trial_config({"cpu_precision": "bf16"}).cpu_precision == "bf16"
    default = _trial_config({})
    assert default.cpu_precision == "fp32"
    assert "cpu_precision" not in default.model_dump()  # fp32 trial configs are as before the field
