"""Errors shared by every layer: bad input data, and pydantic field errors without the "Value error, " prefix."""

from __future__ import annotations

from pydantic_core import PydanticCustomError


class DataValidationError(ValueError):
    """Input data that cannot be used; the message names the file (or field) and the problem.

    Raised before any training starts, so a bad file never costs a teacher's epochs.
    """


class DataFileNotFoundError(DataValidationError, FileNotFoundError):
    """A data file or folder named by the spec does not exist."""


def field_error(message: str) -> PydanticCustomError:
    # A custom error keeps pydantic from prefixing "Value error, " to the message, so the
    # job spec reports e.g. "serve.max_replicas: must be >= min_replicas (3), got 2".
    return PydanticCustomError("medkd_invalid", "{message}", {"message": message})
