"""Evaluation stage: held-out pass@1 of the policy as it is now (rlpost/heldout.py), into the summary
as `pass@1_<label>` (the stage before it: start, sft, dpo, rl, rejection, rl_2) and into metrics.jsonl as an
`eval` line with `after: <label>`. Under torchrun every rank refreshes its engine (a collective for a sharded
policy) and rank 0 alone samples; it hands the result on."""

from __future__ import annotations

from tqdm import tqdm

from rlpost import distributed as dist
from rlpost.env.verifiers import eval_reward_role
from rlpost.heldout import pass_at_1
from rlpost.stages.base import RunContext, Stage, register


@register("eval")
class EvalStage(Stage):
    """`eval.*` (samples, temperature, batch size, the reward it scores by) and `rollout.max_new_tokens`."""

    name = "eval"
    sections = ("eval",)

    @classmethod
    def from_config(cls, cfg, label: str | None = None) -> "EvalStage":
        return cls(cfg.eval, cfg.rollout, label or "")

    def __init__(self, cfg, rollout_cfg, label: str):
        self.cfg, self.max_new_tokens, self.after = cfg, rollout_cfg.max_new_tokens, label
        self.reward = None

    def scorer(self, ctx: RunContext):
        """The run's own reward role, or it scored by eval.reward when that is set (built once)."""
        if not self.cfg.reward:
            return ctx.verifier
        if self.reward is None:
            self.reward = eval_reward_role(self.cfg, ctx.verifier)
        return self.reward

    def close(self) -> None:
        if self.reward is not None:  # eval.reward's own verifier (worker processes, a judge's engine)
            self.reward, reward = None, self.reward
            reward.close()

    def evaluate(self, ctx: RunContext) -> dict:
        """pass@1 (successes) and the mean reward on the task's held-out rows, sampled by the rollout engine
        with the policy's current weights. Every rank calls it; rank 0 samples, the others get its numbers."""
        ctx.weight_sync.push()  # an engine with its own copy of the weights samples from the current policy
        if not dist.is_main():
            return dist.broadcast_object(None)
        rows = ctx.task.eval_rows
        result = pass_at_1(ctx.engine, self.scorer(ctx), rows, ctx.prompt_ids(rows),
                           samples=self.cfg.samples_per_prompt, temperature=self.cfg.temperature,
                           max_new_tokens=self.max_new_tokens, batch_prompts=self.cfg.batch_prompts, seed=ctx.seed,
                           success_threshold=self.cfg.success_threshold)
        return dist.broadcast_object(result)

    def run(self, ctx: RunContext) -> None:
        result = self.evaluate(ctx)
        value = result["pass@1"]
        ctx.summary[f"pass@1_{self.after}"] = value
        ctx.summary[f"mean_reward_{self.after}"] = result["mean_reward"]
        by_source = {k: v for k, v in result.items() if k.startswith("pass@1_")}  # task.sources: pass@1_<source>
        if by_source:
            ctx.summary[f"by_source_pass@1_{self.after}"] = {k[len("pass@1_"):]: v for k, v in by_source.items()}
        ctx.log({"stage": "eval", "step": 0, "eval/pass@1": value, "eval/mean_reward": result["mean_reward"],
                 **{f"eval/{k}": v for k, v in by_source.items()}, "after": self.after})
        if dist.is_main():
            after = "before training" if self.after == "start" else "after " + self.after
            tqdm.write(f"rlpost: held-out pass@1 ({after}): {value:.3f}")
