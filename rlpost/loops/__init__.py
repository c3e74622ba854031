"""Topologies as loops (`rl.topology`): where the controller's rollout and reward run (rlpost/loops/base.py).

    colocated      every role in this process, taking turns             loops/colocated.py
    disaggregated  rollout in Ray actors, the same loop                 loops/disaggregated.py
    async          as disaggregated, rollout runs ahead in a thread     loops/async_.py

A new topology: one module here registering its Loop (`@LOOPS.register(name)`), and its import below.
`check_config` is what a config load calls; TOPOLOGIES and WEIGHT_SYNCS are the valid rl.topology and
rl.weight_sync names.
"""

from rlpost.loops.base import LOOPS, Loop, check_config, loop_class, weight_sync_names
from rlpost.loops import colocated, disaggregated, async_  # noqa: F401, E402  (each registers its loop)

TOPOLOGIES = LOOPS.classes  # name -> Loop, in registration order (a loop registered later is valid too)
WEIGHT_SYNCS = tuple(weight_sync_names())

__all__ = ["LOOPS", "Loop", "TOPOLOGIES", "WEIGHT_SYNCS", "check_config", "loop_class", "weight_sync_names"]
