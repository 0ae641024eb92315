"""The one registry mechanism every family uses."""

from __future__ import annotations

import pytest

import medkd.data.loader  # noqa: F401  (each import registers a family)
import medkd.softlabels.codec  # noqa: F401
import medkd.students  # noqa: F401
import medkd.students.compression  # noqa: F401
import medkd.teachers  # noqa: F401
from medkd.core.registry import Registry, all_registries


def test_register_create_and_list_by_info() -> None:
    widgets = Registry("test widget")

    @widgets.register("small", size=1)
    def small(scale: int = 1) -> int:
        return 1 * scale

    @widgets.register(size=2)
    def large(scale: int = 1) -> int:
        return 10 * scale

    assert widgets.names() == ["large", "small"]
    assert widgets.names(size=2) == ["large"]
    assert widgets.create("large", scale=3) == 30
    assert widgets.get("small").info == {"size": 1}
    assert "small" in widgets and "medium" not in widgets
    assert sorted(widgets) == ["large", "small"]
    assert all_registries()["test widget"] is widgets


def test_unknown_name_lists_the_known_ones() -> None:
    things = Registry("test thing")
    things.add("a", object())
    things.add("b", object())
    with pytest.raises(ValueError, match=r"unknown test thing 'c'; known test things: a, b"):
        things.get("c")


def test_a_name_taken_by_another_object_is_refused_but_reregistration_of_the_same_is_not() -> None:
    gadgets = Registry("test gadget")

    def build() -> int:
        return 1

    gadgets.add("g", build)
    gadgets.add("g", build)  # a module reloaded registers the same function again
    with pytest.raises(ValueError, match="'g' is already registered by"):
        gadgets.add("g", lambda: 2)
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        gadgets.add("", build)


def test_every_family_uses_it() -> None:
    kinds = all_registries()
    for kind in ("teacher", "student", "loss", "aggregation", "quantization mode", "data adapter", "codec"):
        assert len(kinds[kind]) > 0, kind
    assert kinds["teacher"].names(family="unet") == ["basicunet", "segresnet", "unet", "unetr"]
