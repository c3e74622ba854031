"""Planning an RL job: `rlpost plan memory` (memory.py) estimates what each GPU holds; `rlpost plan throughput`
(throughput.py) fits a run's step time per role and predicts it for other topologies."""

from rlpost.plan.memory import ModelShape, Setup, estimate, format_report, shape_from_config, shape_for

__all__ = ["ModelShape", "Setup", "estimate", "format_report", "shape_from_config", "shape_for"]
