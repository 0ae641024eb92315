"""Where the calling process runs, for error messages (kept apart from ``errors`` so that the
spec and the CLI's help import no Ray)."""

from __future__ import annotations

import socket

import ray


def ray_node_description() -> str:
    """Where the calling process runs, for error messages: ``IP (node id …)`` inside Ray.

    Examples:
        >>> ray_node_description()  # outside Ray  # doctest: +SKIP
        'myhost (not in a Ray cluster)'
    """
    if not ray.is_initialized():
        return f"{socket.gethostname()} (not in a Ray cluster)"
    return f"{ray.util.get_node_ip_address()} (node id {ray.get_runtime_context().get_node_id()})"
