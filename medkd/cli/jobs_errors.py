"""Errors of the Ray Jobs client, each a one-line message for the user.

Examples:
    >>> raise JobsNotFoundError("no job 'x' on the Ray cluster at http://127.0.0.1:8265")  # doctest: +SKIP
"""

from __future__ import annotations


class JobsError(Exception):
    """A Ray Jobs request that could not be carried out; the message is one line for the user."""


class JobsAuthError(JobsError):
    """The cluster requires a token and none was found, or it rejected the token sent."""


class JobsConnectionError(JobsError):
    """The address does not answer, or does not answer like a Ray dashboard."""


class JobsNotFoundError(JobsError):
    """The cluster has no job with that id."""


class JobsSubmitWarning(UserWarning):
    """Something in the upload that will probably not work on the cluster (the job still goes)."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when the message is empty).

    Examples:
        >>> first_line(ValueError("bad\\nmore"))
        'bad'
    """
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
