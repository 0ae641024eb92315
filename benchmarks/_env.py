"""Process set-up shared by benchmarks that start their own local Ray cluster (call before importing Ray)."""

from __future__ import annotations

import os
import warnings


def configure_local_ray() -> None:
    """No token auth or usage stats for the private local cluster; quiet third-party deprecations."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
