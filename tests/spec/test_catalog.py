"""The spec validates registry names from catalog.json: current with the registries, fast, and clear."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medkd.cli.catalog import render_catalog
from medkd.spec import SpecError, parse_spec
from medkd.spec.catalog import CATALOG_FILE

QUICKSTART = {"name": "q", "data": {"kind": "synthetic"}, "teachers": [{"name": "t1", "model": "resnet18"}]}


def test_catalog_file_is_generated_from_the_registries() -> None:
    assert CATALOG_FILE.read_text() == render_catalog(), (
        "medkd/spec/catalog.json is stale: run `python -m medkd.cli.catalog` after adding or renaming a registered name"
    )


@pytest.mark.parametrize(
    "section,value,message",
    [
        (
            {"teachers": [{"name": "t1", "model": "resnet81"}]},
            None,
            r"teachers\[0\]\.model: unknown teacher 'resnet81'; known teachers: .*resnet18",
        ),
        (
            {"search": {"space": {"student": ["resnet_tiyn"]}}},
            None,
            r"search\.space\.student: unknown student 'resnet_tiyn'; known students: mobilenet_tiny, resnet_tiny",
        ),
        (
            {"search": {"space": {"aggregation": ["median"]}}},
            None,
            r"search\.space\.aggregation: unknown aggregation 'median'; known aggregations: confidence, mean, weighted",
        ),
        (
            {"search": {"space": {"quantize": ["int4"]}}},
            None,
            r"search\.space\.quantize: unknown quantization mode 'int4'; known quantization modes: fp16, int8_dynamic",
        ),
        (
            {"search": {"space": {"student": ["unet_small"]}}},
            None,
            r"search\.space\.student: 'unet_small' is a segmentation student but task is 'classification'; "
            r"classification students: mobilenet_tiny, resnet_tiny, vit_micro",
        ),
        (
            {"search": {"space": {"loss": ["fitnet"]}}},
            None,
            r"search\.space\.loss: unknown loss 'fitnet'; known losses: dist, dkd, hinton_kd, multilabel_kd, pixel_kd",
        ),
        (
            {"search": {"space": {"loss": ["pixel_kd"]}}},
            None,
            r"search\.space\.loss: 'pixel_kd' is a segmentation loss; the search chooses among single-label "
            r"classification losses: dist, dkd, hinton_kd",
        ),
        (
            {"teachers": [{"name": "t1", "model": "unet"}]},
            None,
            r"teachers\[0\]\.model: 'unet' is a segmentation teacher but task is 'classification'",
        ),
    ],
)
def test_unknown_or_misplaced_names_are_rejected_naming_the_field(section: dict, value: None, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({**QUICKSTART, **section})


def test_medkd_validate_rejects_a_misspelt_student_in_under_a_second_without_importing_torch(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({**QUICKSTART, "search": {"space": {"student": ["resnet_tiyn"]}}}))
    probe = (
        "import resource, sys; from medkd.cli.main import main; "
        f"rc = main(['validate', {str(spec)!r}]); usage = resource.getrusage(resource.RUSAGE_SELF); "
        "print('RC', rc, 'TORCH', 'torch' in sys.modules, 'SECONDS', usage.ru_utime + usage.ru_stime)"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - started
    rc, torch_imported, seconds = result.stdout.split()[1::2]
    assert rc == "2", result.stderr
    assert (
        "search.space.student: unknown student 'resnet_tiyn'; known students: mobilenet_tiny, resnet_tiny"
        in result.stderr
    )
    assert torch_imported == "False", "validate must not import torch (it costs seconds)"
    # CPU seconds of the whole process (interpreter start, imports, validation): wall time would also count
    # whatever else the machine runs; on a quiet machine the wall time is about the same (~0.45 s).
    assert float(seconds) < 1.0, f"validate used {seconds} CPU seconds ({wall:.2f} s wall)"
