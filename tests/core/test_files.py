"""staged_directory: a folder is replaced only once it has been written completely."""

from __future__ import annotations

import pytest

from medkd.core.files import staged_directory


def test_the_folder_is_replaced_after_writing(tmp_path):
    target = tmp_path / "entry"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_directory(target) as staging:
        (staging / "new.txt").write_text("new")
        assert (target / "old.txt").is_file()  # untouched while writing
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert not (tmp_path / "entry.partial").exists()


def test_a_failed_write_leaves_the_old_folder_and_the_next_attempt_clears_the_leftover(tmp_path):
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staging:
            (staging / "half.txt").write_text("x")
            raise RuntimeError("crash")
    assert not target.exists() and (tmp_path / "entry.partial" / "half.txt").is_file()
    with staged_directory(target) as staging:
        (staging / "whole.txt").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["whole.txt"]
