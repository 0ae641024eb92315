"""The command line loads heavy commands by name: every handler it names exists, and the light ones stay light."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from medkd.cli.main import build_parser, load_handler


def _handlers(parser: argparse.ArgumentParser) -> list:
    found = []
    for action in parser._actions:  # argparse has no public walk over subcommands
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "handler" in sub._defaults:
                    found.append(sub._defaults["handler"])
                found.extend(_handlers(sub))
    return found


def test_every_command_handler_resolves_to_a_function() -> None:
    handlers = _handlers(build_parser())
    assert {"medkd.cli.run:run", "medkd.cli.serve:serve", "medkd.cli.models:models"} <= {
        h for h in handlers if isinstance(h, str)
    }
    for handler in handlers:
        assert callable(load_handler(handler)), handler


@pytest.mark.parametrize("argv", [["--help"], ["validate", "--help"], ["run", "--help"]])
def test_help_does_not_import_torch_or_ray(argv: list[str]) -> None:
    probe = (
        "import sys\nfrom medkd.cli.main import main\ntry:\n    main("
        + repr(argv)
        + ")\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout[-500:] + result.stderr[-2000:]
