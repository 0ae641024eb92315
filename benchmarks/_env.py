"""Kept for benchmarks not yet moved to :mod:`benchmarks._harness`, which now holds this set-up."""

from benchmarks._harness import configure_local_ray

__all__ = ["configure_local_ray"]
