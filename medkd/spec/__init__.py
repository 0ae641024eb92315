"""The job spec: one YAML file that drives the whole pipeline, one module per section.

Examples:
    >>> from medkd.spec import load_spec
    >>> spec = load_spec("examples/quickstart.yaml")  # doctest: +SKIP
"""

from medkd.spec.base import SpecError
from medkd.spec.job import JobSpec, load_spec, parse_override, parse_spec

__all__ = ["JobSpec", "SpecError", "load_spec", "parse_override", "parse_spec"]
