"""The ``tracking:`` section: off by default, bad input names the field, never part of a fingerprint."""

from __future__ import annotations

import pytest

from medkd.spec.job import SpecError, parse_spec
from tests.spec.test_job import minimal


def test_off_by_default_and_on_with_a_uri():
    assert parse_spec(minimal()).tracking.enabled is False
    spec = parse_spec(minimal(tracking={"enabled": True, "uri": "http://127.0.0.1:5000", "experiment": "breast"}))
    assert (spec.tracking.uri, spec.tracking.experiment) == ("http://127.0.0.1:5000", "breast")
    for uri in ("sqlite:///runs/x/mlflow.db", "postgresql+psycopg2://user@db.example/mlflow", "databricks"):
        assert parse_spec(minimal(tracking={"enabled": True, "uri": uri})).tracking.uri == uri


def test_unknown_field_is_named():
    with pytest.raises(SpecError, match=r"tracking\.experimnet: unknown field"):
        parse_spec(minimal(tracking={"enabled": True, "experimnet": "x"}))


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("runs/mlruns", r"tracking\.uri: 'runs/mlruns' is not a URI; give one with a scheme"),
        ("htp://127.0.0.1:5000", r"tracking\.uri: unknown scheme 'htp' in 'htp://127.0.0.1:5000'; known: http, https"),
        ("http://", r"tracking\.uri: 'http://' names no host"),
        ("sqlite://", r"tracking\.uri: 'sqlite://' names no file or folder"),
    ],
)
def test_bad_uri_is_named(uri, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(minimal(tracking={"enabled": True, "uri": uri}))


def test_settings_without_enabled_are_refused():
    with pytest.raises(SpecError, match=r"tracking: uri given but tracking\.enabled is false"):
        parse_spec(minimal(tracking={"uri": "http://127.0.0.1:5000"}))
    with pytest.raises(SpecError, match=r"tracking\.experiment: String should have at least 1 character"):
        parse_spec(minimal(tracking={"enabled": True, "experiment": ""}))


def test_tracking_changes_no_fingerprint():
    plain = parse_spec(minimal())
    tracked = parse_spec(minimal(tracking={"enabled": True, "uri": "http://127.0.0.1:5000", "experiment": "x"}))
    assert tracked.fingerprint() == plain.fingerprint()
    assert tracked.search.fingerprint_fields() == plain.search.fingerprint_fields()
    assert [t.training_fingerprint_fields() for t in tracked.teachers] == [
        t.training_fingerprint_fields() for t in plain.teachers
    ]
