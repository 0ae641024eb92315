"""The ``tracking:`` section: optional MLflow experiment tracking of teachers, trials and exported students.

Off by default. On, with no ``uri``, runs go to a SQLite store under ``output_dir/mlruns/`` (MLflow 3
keeps its plain file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is
set, so the local default is its recommended single-file database); any MLflow tracking URI otherwise.
The section never enters a fingerprint: turning tracking on retrains nothing.

Examples:
    >>> TrackingSpec(enabled=True).uri is None
    True
    >>> TrackingSpec(enabled=True, uri="http://127.0.0.1:5000", experiment="breast").experiment
    'breast'
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from medkd.core.errors import field_error
from medkd.spec.base import StrictModel

#: The URI schemes MLflow's tracking client has stores for (SQLAlchemy ones may name a driver, e.g.
#: ``postgresql+psycopg2``).
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks", "databricks-uc")
_NEEDS_HOST = {"http", "https", "postgresql", "mysql", "mssql"}


class TrackingSpec(StrictModel):
    """Where (and whether) a job logs its runs to MLflow."""

    enabled: bool = Field(False, description="log teachers, search trials and exported students to MLflow")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://…, sqlite:///…, postgresql://…); null: "
        "sqlite:///<output_dir>/mlruns/mlflow.db with artifacts in <output_dir>/mlruns/artifacts",
    )
    experiment: str | None = Field(None, min_length=1, description="MLflow experiment name; null: the job's name")

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None or value in ("databricks", "databricks-uc"):  # the workspace of the default profile
            return value
        parts = urlsplit(value)
        scheme = parts.scheme.split("+", 1)[0].lower()
        if not parts.scheme or "://" not in value:
            raise field_error(
                f"{value!r} is not a URI; give one with a scheme ({', '.join(TRACKING_SCHEMES)}), e.g. "
                "sqlite:///path/to/mlflow.db, or leave it out for a store under output_dir"
            )
        if scheme not in TRACKING_SCHEMES:
            raise field_error(f"unknown scheme {parts.scheme!r} in {value!r}; known: {', '.join(TRACKING_SCHEMES)}")
        if scheme in _NEEDS_HOST and not parts.hostname:
            raise field_error(f"{value!r} names no host")
        if scheme in ("sqlite", "file") and not parts.path.strip("/"):
            raise field_error(f"{value!r} names no file or folder")
        return value

    @model_validator(mode="after")
    def _settings_need_enabled(self) -> TrackingSpec:
        given = sorted(name for name in ("uri", "experiment") if getattr(self, name) is not None)
        if given and not self.enabled:
            raise field_error(
                f"{' and '.join(given)} given but tracking.enabled is false; set tracking.enabled: true to log to MLflow"
            )
        return self
