"""Build, deploy and stop the medkd Serve application (the routes are in :mod:`medkd.serve.ingress`).

The models and their metadata are read on the driver and handed to the replicas as bytes, so
the application runs on multi-node clusters without a shared filesystem. Serving a registry
entry serves every Pareto student of its run beside it (model multiplexing), the selected one
by default.

Examples:
    >>> from medkd.serve.app import deploy, undeploy  # doctest: +SKIP
    >>> url = deploy("runs/quickstart", ServeConfig(port=8000))  # doctest: +SKIP
    >>> MedkdClient(url).predict("scan.png")["predicted_label"]  # doctest: +SKIP
    'benign'
    >>> undeploy()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import BackpressureConfig

from medkd.serve.deadline import HTTP_TIMEOUT_MARGIN_S
from medkd.serve.guards import bearer_token
from medkd.serve.ingress import DEPLOYMENT_NAME, PROBE_TIMEOUT_S, MedkdServer
from medkd.serve.model_store import ModelDirError, collect_models, load_model_dir, resolve_model_dir
from medkd.spec.serve import ServeConfig

__all__ = [
    "DEPLOYMENT_NAME",
    "MedkdServer",
    "ModelDirError",
    "app_builder",
    "build_app",
    "deploy",
    "load_model_dir",
    "resolve_model_dir",
    "serve_until_stopped",
    "undeploy",
    "wait_until_healthy",
]

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 10.0


def build_app(model_dir: Path | str, config: ServeConfig | None = None) -> serve.Application:
    """The Serve application for an export directory or a run directory.

    Every Pareto student of the run is served (see :func:`medkd.serve.model_store.collect_models`);
    the files are read here, on the driver, and passed to the replicas as bytes. The bearer
    token (``serve.auth_token_env``) is read here too.

    Args:
        model_dir: a registry entry written by the export stage, or a run's ``output_dir``.
        config: serving configuration (autoscaling, batching, limits, resources, auth).

    Raises:
        ModelDirError: missing files or invalid metadata.
        ValueError: ``serve.auth_token_env`` names an unset variable.

    Examples:
        >>> app = build_app("runs/quickstart", ServeConfig(max_replicas=2))  # doctest: +SKIP
    """
    config = config or ServeConfig()
    bundle = collect_models(model_dir)
    token = bearer_token(config.auth_token_env)
    deployment = MedkdServer.options(
        autoscaling_config=config.autoscaling_config(),
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s),
        ray_actor_options=config.ray_actor_options(),
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        health_check_timeout_s=max(config.request_timeout_s, PROBE_TIMEOUT_S) + 5.0,
    )
    return deployment.bind(bundle.model_dump(), config.model_dump(mode="json"), token)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve application builder for ``serve run`` / ``serve deploy`` / RayService configs.

    ``args``: ``model_dir`` (export directory or run output_dir) and optional ``serve``
    (ServeConfig fields, as in a job spec's ``serve:`` section).

    Examples:
        serve run medkd.serve.app:app_builder model_dir=runs/quickstart
    """
    if "model_dir" not in args:
        raise ModelDirError("app_builder: args.model_dir is required (an export directory or a run's output_dir)")
    unknown = set(args) - {"model_dir", "serve"}
    if unknown:
        raise ModelDirError(f"app_builder: unknown args {sorted(unknown)} (expected model_dir, serve)")
    config = ServeConfig.model_validate(args.get("serve") or {})
    return build_app(resolve_model_dir(args["model_dir"]), config)


def _serve_http_address(config: ServeConfig) -> tuple[str, int]:
    """Host and port of the running Serve HTTP proxy (which may predate this config)."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host or config.host, int(http.port)
    except Exception:  # noqa: BLE001 - private API moved: assume our own options were applied
        return config.host, config.port
    if (host, port) != (config.host, config.port):
        logger.warning(
            "medkd: Serve was already running on %s:%s; serving there instead of %s:%s",
            host,
            port,
            config.host,
            config.port,
        )
    return host, port


def wait_until_healthy(base_url: str, *, timeout_s: float = 60.0) -> None:
    """Poll ``GET /healthz`` until it answers 200.

    Examples:
        >>> wait_until_healthy("http://127.0.0.1:8000", timeout_s=30)  # doctest: +SKIP
    """
    deadline = time.monotonic() + timeout_s
    last_error: Exception | str = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as error:
            last_error = error
        time.sleep(0.2)
    raise TimeoutError(f"{base_url}/healthz did not answer 200 within {timeout_s:.0f} s: {last_error}")


def deploy(
    model_dir: Path | str, config: ServeConfig | None = None, *, app_name: str = "medkd", blocking: bool = False
) -> str:
    """Deploy the models on Ray Serve (starting Serve if needed) and return the base URL.

    Args:
        model_dir: a registry entry (``model.onnx`` + ``metadata.json``) or a run's output_dir.
        config: serving configuration; ``host``/``port`` apply when this call starts Serve.
        app_name: Serve application name (deploying the same name again updates it).
        blocking: serve until SIGTERM or Ctrl-C, then undeploy (see :func:`serve_until_stopped`).

    Returns:
        The base URL, e.g. ``http://127.0.0.1:8000`` (plus the route prefix).

    Examples:
        >>> url = deploy("runs/quickstart", ServeConfig(port=8000))  # doctest: +SKIP
    """
    config = config or ServeConfig()
    application = build_app(model_dir, config)
    serve.start(
        http_options={
            "host": config.host,
            "port": config.port,
            "request_timeout_s": config.request_timeout_s + HTTP_TIMEOUT_MARGIN_S,
        }
    )
    host, port = _serve_http_address(config)
    base_url = config.model_copy(update={"host": host, "port": port}).local_url()
    serve.run(application, name=app_name, route_prefix=config.route_prefix, blocking=False)
    wait_until_healthy(base_url)
    logger.info("medkd: serving %s at %s", model_dir, base_url)
    if blocking:
        print(f"medkd: serving at {base_url} (Ctrl-C to stop)", flush=True)
        serve_until_stopped(app_name)
    return base_url


def undeploy(app_name: str = "medkd") -> None:
    """Delete the application (draining its requests); shut Serve down when no application is
    left. Never stops Ray.

    Examples:
        >>> undeploy("medkd")  # doctest: +SKIP
    """
    if not ray.is_initialized():
        return
    applications = serve.status().applications
    if app_name in applications:
        serve.delete(app_name)
        applications = serve.status().applications
    if not applications:
        serve.shutdown()


class _Stop(Exception):
    """Raised in the main thread by SIGTERM, like KeyboardInterrupt by SIGINT."""


def serve_until_stopped(app_name: str = "medkd", *, shutdown_ray: bool = False) -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM, then drain and undeploy; optionally end Ray too.

    Serve's graceful shutdown lets in-flight requests finish (up to the deployment's
    ``graceful_shutdown_timeout_s``). With ``shutdown_ray`` (the driver started its own Ray
    instance), :func:`ray.shutdown` then ends every process of that instance — GCS, raylet,
    dashboard and its agents — so nothing is left behind.

    Examples:
        >>> serve_until_stopped("medkd", shutdown_ray=True)  # doctest: +SKIP
    """

    def on_sigterm(signum, frame):  # noqa: ARG001
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, _Stop):
        logger.info("medkd: stopping: draining requests")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the drain short
        try:
            undeploy(app_name)
        finally:
            if shutdown_ray and ray.is_initialized():
                ray.shutdown()
            signal.signal(signal.SIGTERM, previous)
