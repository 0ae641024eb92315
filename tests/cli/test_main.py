"""The `medkd` command line: exit codes and messages a user sees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def medkd(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medkd.cli.main", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_validate_quickstart():
    result = medkd("validate", "examples/quickstart.yaml")
    assert result.returncode == 0, result.stderr
    assert "valid job spec 'quickstart'" in result.stdout


def test_validate_bad_spec_names_field_without_traceback(tmp_path):
    spec = yaml.safe_load((REPO / "examples/quickstart.yaml").read_text())
    spec["teachers"][1]["epochs"] = 0
    spec["search"]["objectives"][0]["metric"] = "val_auroc"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = medkd("validate", str(path))
    assert result.returncode == 2
    assert "teachers[1].epochs: must be > 0" in result.stderr
    assert "search.objectives[0].metric" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_check_data_reports_bad_file(tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"\x00" * 10)
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "data": {"kind": "medmnist", "path": str(bad)},
                "teachers": [{"name": "a", "model": "resnet18"}],
            }
        )
    )
    result = medkd("validate", str(path), "--check-data")
    assert result.returncode == 1
    assert "broken.npz" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_commands():
    result = medkd("--help")
    assert result.returncode == 0
    for command in ("run", "validate", "serve"):
        assert command in result.stdout
