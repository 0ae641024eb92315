"""``medkd.core.cpu_features``: bf16 where it is fast, and a clear warning where a spec asks for it anyway."""

from __future__ import annotations

import warnings

import pytest

from medkd.core import cpu_features
from medkd.core.cpu_features import cpu_has_native_bf16, warn_if_cpu_bf16_is_slow


def test_cpu_has_native_bf16_is_stable_per_process():
    assert cpu_has_native_bf16() is cpu_has_native_bf16()


def test_bf16_on_a_cpu_without_native_kernels_warns_naming_the_part_and_the_fix(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match=r"teacher 'cnn': cpu_precision is bf16.*cpu_precision: fp32"):
        assert warn_if_cpu_bf16_is_slow("teacher 'cnn'")


def test_bf16_on_a_cpu_with_native_kernels_is_silent(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_cpu_bf16_is_slow("teacher 'cnn'")
