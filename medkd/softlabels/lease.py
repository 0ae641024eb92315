"""The writer lease on one soft-label entry, and the Lua steps that must hold it.

A writer takes ``{prefix}:lock`` with ``SET NX PX`` and a random token; a daemon thread renews it
(every third of its TTL) until released. The commit (:data:`COMMIT`) swaps the manifest only if
the token still matches, so a writer whose lease expired or was evicted never publishes.

Examples:
    >>> scripts = LeaseScripts(client)                                              # doctest: +SKIP
    >>> lease = Lease(client, scripts, "medkd:sl:t:d:train:v-", ttl_s=30.0, call=call)  # doctest: +SKIP
    >>> if lease.try_acquire():                                                     # doctest: +SKIP
    ...     lease.release()
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any

import redis

logger = logging.getLogger(__name__)

COMMIT = """
-- KEYS: lock, manifest, index; ARGV: token, json, generation, view_params, prefix
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'json', ARGV[2], 'generation', ARGV[3], 'view_params', ARGV[4])
redis.call('SADD', KEYS[3], ARGV[5])
redis.call('DEL', KEYS[1])
return 1
"""
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseScripts:
    """The lease's Lua scripts registered on one client (``commit``, ``renew``, ``release``).

    Args:
        client: the Redis client the scripts run on.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.commit = client.register_script(COMMIT)
        self.renew = client.register_script(RENEW)
        self.release = client.register_script(RELEASE)


class LeaseLost(Exception):
    """The writer's lease expired or was taken before it committed."""


class Lease:
    """A writer lease on one entry: ``SET NX PX``, renewed by a daemon thread until released.

    Args:
        client: Redis client.
        scripts: the scripts registered on ``client``.
        prefix: the entry's key prefix; the lease key is ``{prefix}:lock``.
        ttl_s: lease duration, renewed every ``ttl_s / 3`` while held.
        call: runs one Redis operation with the cache's retry policy.
    """

    def __init__(
        self,
        client: redis.Redis,
        scripts: LeaseScripts,
        prefix: str,
        *,
        ttl_s: float,
        call: Callable[[Callable[[], Any]], Any],
    ) -> None:
        self.client, self.scripts, self.ttl_s, self._call = client, scripts, ttl_s, call
        self.key = f"{prefix}:lock"
        self.token = secrets.token_hex(16)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; start renewing it. Returns whether it was taken."""
        ttl_ms = int(self.ttl_s * 1000)
        acquired = self._call(lambda: self.client.set(self.key, self.token, nx=True, px=ttl_ms))
        if acquired:
            self._thread = threading.Thread(target=self._renew_loop, name=f"lease:{self.key}", daemon=True)
            self._thread.start()
        return bool(acquired)

    def _renew_loop(self) -> None:
        ttl_ms = int(self.ttl_s * 1000)
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.scripts.renew(keys=[self.key], args=[self.token, ttl_ms]):
                    logger.warning("lost the writer lease %s", self.key)
                    return
            except redis.RedisError as error:
                logger.warning("could not renew writer lease %s: %s", self.key, error)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.scripts.release(keys=[self.key], args=[self.token])
        except redis.RedisError as error:  # it expires on its own
            logger.warning("could not release writer lease %s: %s", self.key, error)
