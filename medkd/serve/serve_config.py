"""The Ray Serve config file of a medkd model: what ``serve deploy`` and a KubeRay RayService run.

One application, built on the cluster by the application builder ``medkd.serve.app:app_builder``
from ``args: {model_dir, serve}``; ``serve`` holds the job spec's ``serve:`` settings that differ
from medkd's defaults (batching, autoscaling, CPUs/GPUs per replica), so the builder applies them
exactly as ``medkd run`` and ``medkd serve`` do. The config names no deployment: the builder owns
deployment names and options, so nothing here can override a deployment that does not exist.

Examples:
    >>> from medkd.spec.serve import ServeConfig
    >>> doc = serve_config("/shared/runs/quickstart", ServeConfig(host="0.0.0.0", max_replicas=8))
    >>> doc["applications"][0]["import_path"], doc["applications"][0]["args"]["serve"]
    ('medkd.serve.app:app_builder', {'max_replicas': 8})
    >>> serve_config("runs/quickstart")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    medkd.serve.serve_config.ServeConfigError: model_dir 'runs/quickstart' must be an absolute path ...
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from ray.serve.schema import ServeDeploySchema

from medkd.spec.serve import ServeConfig

APP_BUILDER = "medkd.serve.app:app_builder"
DEFAULT_APP_NAME = "medkd"
#: ServeConfig fields that are the config's own top-level settings, not the builder's.
ADDRESS_FIELDS = frozenset({"enabled", "host", "port", "route_prefix"})


class ServeConfigError(ValueError):
    """A Serve config medkd cannot write (names the offending value)."""


def serve_config(
    model_dir: str | Path, config: ServeConfig | None = None, *, app_name: str = DEFAULT_APP_NAME
) -> dict[str, Any]:
    """The Serve config (``ServeDeploySchema``) that serves ``model_dir`` with ``config``.

    Args:
        model_dir: absolute path, as the cluster sees it, of an export directory or a run's
            ``output_dir`` (whose ``models/SELECTED`` names the model).
        config: the ``serve:`` section (address, batching, autoscaling, resources per replica).
        app_name: the Serve application name.

    Returns:
        The config as plain data, already validated against Ray's ``ServeDeploySchema``.

    Raises:
        ServeConfigError: ``model_dir`` is relative (the builder runs in another process, on
            another node, with another working directory).

    Examples:
        >>> serve_config("/models/a")["http_options"]
        {'host': '127.0.0.1', 'port': 8000}
    """
    config = config or ServeConfig()
    path = PurePosixPath(str(model_dir))
    if not path.is_absolute():
        raise ServeConfigError(
            f"model_dir {str(model_dir)!r} must be an absolute path as the Ray cluster sees it "
            "(e.g. /shared/runs/quickstart): the application is built on the cluster, not here"
        )
    args: dict[str, Any] = {"model_dir": str(path)}
    builder_settings = config.model_dump(mode="json", exclude_defaults=True, exclude=set(ADDRESS_FIELDS))
    if builder_settings:
        args["serve"] = builder_settings
    document = {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.host, "port": config.port},
        "applications": [
            {"name": app_name, "route_prefix": config.route_prefix, "import_path": APP_BUILDER, "args": args},
        ],
    }
    ServeDeploySchema.model_validate(document)
    return document


def serve_config_yaml(
    model_dir: str | Path, config: ServeConfig | None = None, *, app_name: str = DEFAULT_APP_NAME
) -> str:
    """:func:`serve_config` as YAML text: the file ``serve deploy`` takes, and the text a
    RayService embeds as ``serveConfigV2``.

    Examples:
        >>> print(serve_config_yaml("/models/a").splitlines()[0])
        proxy_location: EveryNode
    """
    return yaml.safe_dump(serve_config(model_dir, config, app_name=app_name), sort_keys=False)


def write_serve_config(
    path: str | Path, model_dir: str | Path, config: ServeConfig | None = None, *, app_name: str = DEFAULT_APP_NAME
) -> Path:
    """Write :func:`serve_config_yaml` to ``path`` (parents created) and return the path.

    Examples:
        >>> write_serve_config(tmp_dir / "serve_config.yaml", "/models/a")  # doctest: +SKIP
        PosixPath('.../serve_config.yaml')
    """
    text = serve_config_yaml(model_dir, config, app_name=app_name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
