"""Errors raised while reading and checking input data."""

from __future__ import annotations


class DataValidationError(ValueError):
    """Input data that cannot be used; the message names the file (or field) and the problem.

    Raised before any training starts, so a bad file never costs a teacher's epochs.
    """


class DataFileNotFoundError(DataValidationError, FileNotFoundError):
    """A data file or folder named by the spec does not exist."""
