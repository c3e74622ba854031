"""Planning an RL job before running it: `rlpost plan memory` (memory.py) estimates what each GPU holds."""

from rlpost.plan.memory import ModelShape, Setup, estimate, format_report, shape_from_config, shape_for

__all__ = ["ModelShape", "Setup", "estimate", "format_report", "shape_from_config", "shape_for"]
