"""The ``ray:`` section: which Ray cluster runs the job."""

from __future__ import annotations

from pydantic import Field

from medkd.spec.base import StrictModel


class RaySpec(StrictModel):
    address: str | None = Field(None, description="null: start a local Ray cluster")
    num_cpus: int | None = Field(None, gt=0)
    num_gpus: int | None = Field(None, ge=0)
    storage_path: str | None = Field(None, description="Ray Train/Tune storage; default output_dir/ray")
