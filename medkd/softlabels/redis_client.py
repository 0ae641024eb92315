"""Connecting to any Redis by URL, with the one retry policy every cache client uses.

Examples:
    >>> client = connect("redis://127.0.0.1:6379/0", password_env="MEDKD_REDIS_PASSWORD")  # doctest: +SKIP
    >>> redact_url("redis://:secret@host:6379/0")
    'redis://:***@host:6379/0'
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import redis
from redis.backoff import EqualJitterBackoff
from redis.exceptions import AuthorizationError
from redis.retry import Retry


class RedisConnectionError(ConnectionError):
    """A Redis URL could not be connected to (after retries)."""


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs and error messages)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


_RETRYABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionResetError, BrokenPipeError)
_NOT_RETRYABLE = (redis.AuthenticationError, AuthorizationError)

# The one retry policy of every cache client (redis-py's Retry; nothing loops around it): a lost
# connection, a timeout or a server still loading its RDB is retried with exponential backoff
# and equal jitter (each wait between half and all of 0.1, 0.2, 0.4 ... 4 s). 15 retries wait
# 21-42 s in all: long enough to ride out a redis-server restart (kill, start, RDB load) on a
# loaded machine; what the restarted server lost is then a cache miss, recomputed.
DEFAULT_RETRIES = 15
RETRY_BACKOFF_BASE_S = 0.1
RETRY_BACKOFF_CAP_S = 4.0


def is_retryable(error: BaseException) -> bool:
    """Connection loss, timeouts and a server still loading its RDB are retried; auth is not."""
    return isinstance(error, _RETRYABLE) and not isinstance(error, _NOT_RETRYABLE)


class _NoAuthRetry(Retry):
    """redis-py's Retry, except that a rejected password fails at once (it is a ConnectionError
    subclass, so the stock policy would retry it)."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # type: ignore[override]
        def retryable(error: Exception) -> bool:
            if isinstance(error, _NOT_RETRYABLE):
                return False
            return is_retryable(error) if is_retryable is not None else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def retry_policy(retries: int = DEFAULT_RETRIES) -> Retry:
    """The cache clients' retry policy: ``retries`` retries with jittered exponential backoff;
    a rejected password fails at once.

    Examples:
        >>> retry_policy(3).get_retries()
        3
    """
    return _NoAuthRetry(EqualJitterBackoff(cap=RETRY_BACKOFF_CAP_S, base=RETRY_BACKOFF_BASE_S), retries)


def connect(
    url: str,
    *,
    password_env: str | None = None,
    retries: int = DEFAULT_RETRIES,
    socket_timeout: float | None = 30.0,
    check: bool = True,
) -> redis.Redis:
    """A redis-py client for ``redis://``, ``rediss://`` (TLS) or ``unix://`` URLs.

    Args:
        url: the server URL. It may carry a password, but job specs should not: use
            ``password_env``.
        password_env: name of an environment variable holding the password; it overrides
            any password in the URL.
        retries: connection errors are retried this many times with exponential backoff
            (:func:`retry_policy`; the default rides out a server restart).
        socket_timeout: seconds before a command times out.
        check: PING once (with retries) so a bad URL fails here with a clear message.

    Raises:
        ValueError: malformed URL or unset ``password_env``.
        RedisConnectionError: the server cannot be reached or rejects the password.
    """
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"redis url must start with redis://, rediss:// or unix://, got {url!r}")
    kwargs: dict[str, Any] = {}
    if password_env is not None:
        password = os.environ.get(password_env)
        if not password:
            raise ValueError(f"password_env={password_env!r}: environment variable {password_env} is not set or empty")
        kwargs["password"] = password
    try:
        if not url.startswith("unix://"):  # TCP-only options
            kwargs.update(socket_connect_timeout=5.0, socket_keepalive=True)
        client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            health_check_interval=30,
            retry=retry_policy(retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            **kwargs,
        )
    except ValueError as error:
        raise ValueError(f"invalid redis url {redact_url(url)!r}: {error}") from error
    if check:
        try:
            client.ping()  # retried by the client's own Retry policy
        except redis.AuthenticationError as error:
            raise RedisConnectionError(
                f"Redis at {redact_url(url)} rejected the credentials ({error}); check the password"
                + (f" in ${password_env}" if password_env else "")
            ) from error
        except redis.RedisError as error:
            raise RedisConnectionError(
                f"cannot connect to Redis at {redact_url(url)} after {retries} retries: {error}"
            ) from error
    return client
