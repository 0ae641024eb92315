"""The test suite's own rules: every test has a time limit, slow tests a longer one, and tests that
need a real service are marked ``integration`` so ``make test-fast`` leaves them out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.conftest import pytest_collection_modifyitems, shared_data_file


def _timeout_of(node: pytest.Item) -> float:
    marker = node.get_closest_marker("timeout")
    return float(marker.args[0]) if marker is not None else float(node.config.getini("timeout"))


def test_every_test_has_a_time_limit(request: pytest.FixtureRequest) -> None:
    assert request.config.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed (the test extra)"
    assert 0 < _timeout_of(request.node) <= 600


@pytest.mark.slow
def test_a_slow_test_gets_a_longer_limit(request: pytest.FixtureRequest) -> None:
    assert _timeout_of(request.node) > float(request.config.getini("timeout"))


class _Item(SimpleNamespace):
    def __init__(self, fixturenames: list[str], marks: list[str] = ()) -> None:
        super().__init__(fixturenames=fixturenames, marks=[getattr(pytest.mark, m) for m in marks])

    def add_marker(self, marker) -> None:
        self.marks.append(marker)

    def get_closest_marker(self, name: str):
        return next((m.mark for m in reversed(self.marks) if m.name == name), None)


def test_tests_using_a_real_service_fixture_are_marked_integration() -> None:
    uses_redis, uses_ray, plain = _Item(["tmp_path", "redis_url"]), _Item(["ray_session"]), _Item(["tmp_path"])
    pytest_collection_modifyitems(None, [uses_redis, uses_ray, plain])  # type: ignore[arg-type]
    assert uses_redis.get_closest_marker("integration") is not None
    assert uses_ray.get_closest_marker("integration") is not None
    assert plain.get_closest_marker("integration") is None


def test_slow_tests_keep_a_timeout_of_their_own() -> None:
    own = _Item([], ["slow"])
    own.add_marker(pytest.mark.timeout(1800))
    default = _Item([], ["slow"])
    pytest_collection_modifyitems(None, [own, default])  # type: ignore[arg-type]
    assert own.get_closest_marker("timeout").args == (1800,)
    assert default.get_closest_marker("timeout").args[0] > 300


def test_a_missing_data_file_fails_in_ci_and_skips_elsewhere(tmp_path, monkeypatch) -> None:
    (tmp_path / "present.npz").write_bytes(b"x")
    assert shared_data_file("present.npz", tmp_path) == tmp_path / "present.npz"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing.npz"):
        shared_data_file("missing.npz", tmp_path)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="missing.npz"):
        shared_data_file("missing.npz", tmp_path)
