"""rlpost: RL post-training of language models.

The seven roles the controller calls, each its own module: the rollout engine (rollout/), the reward (reward.py),
the reference (reference.py), the critic (critic.py; only for algorithms that read values), the algorithm
(algorithms/), the trainer (trainer.py) and weight sync (weight_sync.py); controller.py runs them in the
seven-step loop. The data between them is a Batch.
"""

import os

# torch's CPU threads wait for each other at the end of every parallel operation, and OpenMP (libgomp) makes a
# waiting thread spin before it sleeps. When another process holds one of the cores, the spinning thread burns the
# time its partner needs: with other jobs on both cores, 60 SFT steps of the default run took 531 s with spinning
# waits and 29 s with sleeping ones (docs/performance.md; benchmarks/threads_under_load.py). Waiting threads sleep,
# unless the user chose a policy; this changes no number (the same threads split the same work). It must be set
# before torch is imported.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from rlpost.algorithms import get_algorithm  # noqa: E402  (after the wait policy: this imports torch)
from rlpost.batch import Batch  # noqa: E402

__all__ = ["Batch", "get_algorithm"]
__version__ = "0.1.0"
