"""Which prediction requests the pure-ASGI fast lane takes (the rest go to FastAPI, which validates
them); tests/serve/test_app.py checks both paths answer alike over HTTP."""

from __future__ import annotations

import pytest

from medkd.serve.fast_lane import MAX_MODEL_ID_CHARS, simple_query


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", {"model": None, "mask": None}),
        (b"model=m1", {"model": "m1", "mask": None}),
        (b"mask=npy_b64&model=a%20b", {"model": "a b", "mask": "npy_b64"}),
        (b"model=", {"model": "", "mask": None}),
        (b"model=" + b"m" * MAX_MODEL_ID_CHARS, {"model": "m" * MAX_MODEL_ID_CHARS, "mask": None}),
    ],
)
def test_plainly_valid_query_strings_take_the_lane(query, expected):
    assert simple_query(query) == expected


@pytest.mark.parametrize(
    "query",
    [b"mask=png", b"model=" + b"m" * (MAX_MODEL_ID_CHARS + 1), b"model=a&model=b", b"extra=1", b"mask=list&mask=list"],
)
def test_anything_fastapi_must_judge_goes_to_fastapi(query):
    assert simple_query(query) is None
