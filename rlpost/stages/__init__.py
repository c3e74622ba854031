"""The stages a run is made of (rlpost/run.py composes them): one file each, on one base.

    base.py          Stage (what a stage implements) and RunContext (what the stages of a run share)
    sft.py           supervised fine-tuning on demonstrations
    evaluate.py      held-out pass@1
    preference.py    offline preference optimisation (the DPO family)
    reward_model.py  a Bradley-Terry reward model as the RL reward (RLHF)
    rl.py            the RL loop (rlpost/controller.py) with checkpoints and periodic evaluation
    rejection.py     rejection-sampling SFT: fine-tuning on the policy's own verified samples (after RL)

Each stage is built from its own config sections only (`sections`, `from_config`), implements
`rlpost.stages.base.Stage` and registers itself by name in `STAGES` (`@register("sft")`); a new stage is
one file here and its import line below. A stage imports stages/base.py, never rlpost/run.py (which
imports the stages).
"""

from rlpost.stages.base import STAGES, RunContext, Stage, register
from rlpost.stages import sft, preference, reward_model, rl, rejection, evaluate  # noqa: F401 - each registers itself

__all__ = ["STAGES", "RunContext", "Stage", "register"]
