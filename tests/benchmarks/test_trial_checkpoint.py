"""benchmarks.trial_checkpoint: its arguments (the benchmark itself is run by hand, see RESULTS.md)."""

from __future__ import annotations

import pytest

from benchmarks.trial_checkpoint import main


def test_a_resume_needs_two_epochs_and_the_error_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--epochs", "1"])
    assert "--epochs must be >= 2" in capsys.readouterr().err
