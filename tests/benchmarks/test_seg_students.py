"""benchmarks.seg_students: bad arguments stop before any training, with a message naming the flag."""

from __future__ import annotations

import pytest

from benchmarks.seg_students import parse_args


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "--seeds must be a positive integer"),
        (["--image-size", "15"], "--image-size must be an even integer >= 16"),
        (["--width", "0"], "--width must be in (0, 4]"),
        (["--depth", "3"], "--depth must be in (0, 2]"),
        (["--alpha", "1"], "--alpha must be in [0, 1)"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--spec", "/nonexistent/spec.yaml"], "--spec /nonexistent/spec.yaml: file not found"),
    ],
)
def test_bad_arguments_name_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(SystemExit):
        parse_args(["--output", str(not_a_folder)])
    assert "exists and is not a directory" in capsys.readouterr().err


def test_defaults_are_accepted():
    args = parse_args([])
    assert args.seeds == 3 and args.student_epochs == 120
