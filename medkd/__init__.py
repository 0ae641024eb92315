"""medkd: distributed multi-teacher knowledge distillation for medical imaging."""

__version__ = "0.1.0"
