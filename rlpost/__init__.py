"""rlpost: RL post-training of language models.

The six roles, each one module:  rollout/  reward.py  reference.py  algorithms/  trainer.py
weight_sync.py, and the controller.py that runs the seven-step loop. The data between them is a Batch.
"""

from rlpost.algorithms import get_algorithm
from rlpost.batch import Batch

__all__ = ["Batch", "get_algorithm"]
__version__ = "0.1.0"
