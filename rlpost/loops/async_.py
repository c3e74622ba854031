"""rl.topology=async: as disaggregated, and steps 2-3 run in a background thread (rlpost/rollout/pipeline.py)
up to `rl.max_staleness` steps ahead of training.

Step t's prompts are submitted at the start of step t - S, before the weights of step t - S are pushed, so step
t samples with version t - S - 1 exactly (S = rl.max_staleness; 0 is the synchronous loop). A batch's
staleness (trainer version - its policy_version) never exceeds S. A checkpoint keeps the rollouts already made
for coming steps as data: they were sampled with older weights than a resumed run could reproduce.
"""

from __future__ import annotations

from rlpost.loops.base import LOOPS
from rlpost.loops.disaggregated import DisaggregatedLoop
from rlpost.rollout.pipeline import RolloutPipeline


@LOOPS.register("async")
class AsyncLoop(DisaggregatedLoop):
    """The Ray workers behind a RolloutPipeline, fed `rl.max_staleness` steps ahead; `submitted` is the last
    step whose rollouts are queued."""

    description = "as disaggregated, rollout runs up to rl.max_staleness steps ahead of training"
    elsewhere = ("rollout", "reward")  # in the pipeline's thread

    def __init__(self, cfg, rollout):
        super().__init__(cfg, rollout)
        self.pipeline: RolloutPipeline | None = None
        self.submitted = 0  # the last step whose rollouts were submitted

    def placement_note(self) -> str:
        return f", at most {self.cfg.max_staleness} step(s) stale"

    def weights_target(self, ctx, params):
        """The pipeline: weights queue behind the episodes submitted before them."""
        self.pipeline = RolloutPipeline(self.engine, ctx.rl_reward, self.rollout.k, params)
        return self.pipeline

    def collect(self, ctl, step: int, n_prompts: int, round_: int):
        if self.pipeline is None:
            raise RuntimeError("rl.topology=async: the rollout is not placed yet (call the loop's place first)")
        limit = self.cfg.max_staleness
        if round_ == 0:  # keep `max_staleness` steps submitted ahead of this one
            while self.submitted < min(step + limit, self.cfg.steps):
                self.submit(ctl, self.submitted + 1, 0, self.rollout.prompts_per_step)
        else:            # a refill round: after what is already queued, with the newest weights pushed
            self.submit(ctl, (step, round_), round_, n_prompts)
        batch, metrics = self.pipeline.result(step if round_ == 0 else (step, round_))
        stale = int((ctl.roles.weight_sync.version - batch.policy_version).max())
        if stale > limit:
            raise RuntimeError(f"a batch is {stale} versions stale, more than rl.max_staleness={limit}: the rollout "
                               "pipeline lost its order")
        return batch, metrics

    def submit(self, ctl, key, round_: int, n_prompts: int) -> None:
        """Draw the prompts of `key` (a step, or (step, round)) now and queue their rollouts."""
        step = key if round_ == 0 else key[0]
        idx = ctl.sampler.next(n_prompts)
        self.pipeline.submit(key, [ctl.rows[i] for i in idx], [ctl.prompt_ids[i] for i in idx],
                             ctl.episode_seed(step, round_))
        if round_ == 0:
            self.submitted = key

    def state_dict(self) -> dict:
        return {"ahead": {"submitted": self.submitted, "results": self.pipeline.drain()}}

    def load_state_dict(self, state: dict) -> None:
        if "ahead" in state:
            self.submitted = state["ahead"]["submitted"]
            self.pipeline.restore(state["ahead"]["results"])
