"""The Ray authentication token of this machine's user, found the way Ray 2.60 finds it.

Ray 2.60 turns token authentication on by default. The token is found the way Ray finds it
(:func:`find_auth_token`) and always sent as ``Authorization: Bearer ...`` by
:mod:`medkd.cli.jobs_client` -- Ray's own client only sends it when the *local*
``RAY_AUTH_MODE`` is ``token``. The messages here say where to put a missing token and where a
rejected one came from.

Examples:
    >>> token = find_auth_token()                     # doctest: +SKIP
    >>> headers = {"Authorization": f"Bearer {token}"} if token else None  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

from medkd.cli.jobs_errors import JobsAuthError, first_line

TOKEN_ENV_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV_VAR = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")


def find_auth_token() -> str | None:
    """The Ray authentication token of this machine's user, found the way Ray 2.60 finds it.

    Order: the ``RAY_AUTH_TOKEN`` environment variable, the file named by
    ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token`` (written by ``ray start`` /
    ``ray.init()`` / ``ray get-auth-token --generate``); surrounding whitespace is stripped.
    This is Ray's own loader (the one behind ``ray get-auth-token``), so it also covers what Ray
    adds, such as Kubernetes service-account tokens; a pure-Python lookup in the same order is
    the fallback when that loader is unavailable.

    Returns:
        The token, or None when there is none.

    Raises:
        JobsAuthError: ``RAY_AUTH_TOKEN_PATH`` is set but the file is missing or empty (Ray
            treats that as an error rather than falling back to the default file).
    """
    try:
        from ray._raylet import AuthenticationTokenLoader
        from ray.exceptions import AuthenticationError
    except ImportError:  # pragma: no cover - only without Ray's compiled core
        return _find_auth_token_python()
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the loader caches per process; the environment may have changed
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return None
        return loader.get_raw_token(ignore_auth_mode=True) or None
    except AuthenticationError as error:
        if os.environ.get(TOKEN_PATH_ENV_VAR):
            raise JobsAuthError(token_path_error()) from None
        raise JobsAuthError(f"cannot load the Ray authentication token: {first_line(error)}") from None
    finally:
        # The loader is process-wide: a token cached here (e.g. for a remote head) would be sent
        # by this process's own Ray clients later, e.g. to a local cluster without auth.
        loader.reset_cache()


def _find_auth_token_python() -> str | None:
    token = os.environ.get(TOKEN_ENV_VAR, "").strip()
    if token:
        return token
    if os.environ.get(TOKEN_PATH_ENV_VAR):
        path = Path(os.environ[TOKEN_PATH_ENV_VAR]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError:
            token = ""
        if not token:
            raise JobsAuthError(token_path_error())
        return token
    path = DEFAULT_TOKEN_PATH.expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def token_path_error() -> str:
    """The error for a ``RAY_AUTH_TOKEN_PATH`` that names no readable, non-empty file."""
    return (
        f"{TOKEN_PATH_ENV_VAR}={os.environ.get(TOKEN_PATH_ENV_VAR)!r} does not name a readable, "
        f"non-empty token file: fix it or unset it"
    )


def token_source() -> str:
    """Where :func:`find_auth_token` took the token from, for error messages."""
    if os.environ.get(TOKEN_ENV_VAR, "").strip():
        return TOKEN_ENV_VAR
    if os.environ.get(TOKEN_PATH_ENV_VAR):
        return f"{TOKEN_PATH_ENV_VAR}={os.environ[TOKEN_PATH_ENV_VAR]}"
    return str(DEFAULT_TOKEN_PATH)


# --------------------------------------------------------------------------------------------
# Client and error translation


def missing_token_message(address: str) -> str:
    """What to do when the cluster at ``address`` wants a token and none was found."""
    return (
        f"the Ray cluster at {address} requires an authentication token and none was found: "
        f"set {TOKEN_ENV_VAR}, set {TOKEN_PATH_ENV_VAR} to a file holding it, or save it to "
        f"{DEFAULT_TOKEN_PATH} (print it on the head node with `ray get-auth-token`)"
    )


def wrong_token_message(address: str) -> str:
    """The cluster at ``address`` rejected the token: say where it was taken from."""
    return (
        f"the Ray cluster at {address} rejected the authentication token from {token_source()}: "
        "it is not this cluster's token (print the right one on the head node with "
        "`ray get-auth-token`)"
    )


def auth_error(address: str, token: str | None) -> JobsAuthError:
    """A missing-token or wrong-token error for ``address``, depending on ``token``."""
    return JobsAuthError(wrong_token_message(address) if token else missing_token_message(address))
