"""RL stage: the controller's seven-step loop (rlpost/controller.py), `rl.steps` times.

It builds the roles from their own sections: the algorithm (`algorithm.*`), the critic (`critic.*`,
PPO), the reference (a frozen copy of the policy as the stage starts, saved once to
checkpoints/reference/; with LoRA the policy's own adapter-free base, saved in every checkpoint),
the trainer (`trainer.*`), the sampling (`rollout.*`); the reward is the run's RL reward (the verifier,
or a learned reward model); the engine and weight sync are placed by the topology's loop (`rl.topology`,
rlpost/loops/): the run's own, or Ray rollout workers, or those behind an async pipeline.

Every `rl.eval_every` steps it measures held-out pass@1 (with `rl.keep_best`, a new best is written to
checkpoints/best/, and its value and step are in the stage's state, so a resume compares with the same best
as the run it continues); every `rl.save_every` steps it writes
checkpoints/step_<n>/ (the newest `rl.keep_checkpoints` are kept); it ends with checkpoints/final/.
A second RL stage of the run (`stages: [..., rl, ..., rl]`) is `rl_2`: checkpoints/rl_2_step_<n>/ and
rl_2_reference/, its own seed, and its steps logged after the first stage's (metrics.jsonl, rollouts.jsonl).
Only the run's last RL stage ends with checkpoints/final/; one that another RL stage follows ends with
checkpoints/<label>/ (rl/, rl_2/, ...), so that `final` is never a model the run trained on from.
Every `log.rollouts_every` steps it appends the step's samples to rollouts.jsonl, one line each (prompt,
completion, reward, finish reason, policy version, the sampling log-probs, length; an environment's episode
adds its turns: `episode_fields`); a resume drops the lines of steps after its checkpoint, as run.py drops
metrics.jsonl's.

With `trainer.strategy=fsdp2` the trainer shards the policy over the ranks (the reference is copied first,
whole, on every rank, then sharded; with LoRA it is the sharded policy itself, adapters off; PPO's critic is
sharded with it) and each rank rolls out, scores and trains on its share of each step's prompts; rank 0 writes
the console line and the checkpoints (rlpost/run.py).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager

import torch
from tqdm import tqdm

from rlpost import distributed as dist
from rlpost.algorithms import get_algorithm
from rlpost.batch import Batch
from rlpost.checkpoint import SHARDS_DIR, prune, write_model_folder
from rlpost.controller import Controller, Roles
from rlpost.critic import Critic
from rlpost.loops import LOOPS
from rlpost.models import compile_model, model_device, save_model
from rlpost.progress import progress
from rlpost.reference import Reference
from rlpost.env.reward import decode_responses
from rlpost.rollout import SamplingParams
from rlpost.runlog import ROLLOUTS_FILE, count_lines
from rlpost.stages.base import STAGES, RunContext, Stage, register
from rlpost.trainer import Trainer

_SHORT = {"rollout": "roll", "reward": "rew", "reference": "ref", "critic": "critic", "advantages": "adv",
          "train": "train", "sync": "sync", "other": "other"}


def step_line(step: int, m: dict) -> str:
    """The short console line of one RL step: learning signals, then where the step's wall-clock went
    (share of each of the six roles; critic and untimed glue only when they reach 0.5%), throughput, and
    the engine/trainer log-prob mismatch."""
    shares = " ".join(f"{_SHORT[r]} {100 * m.get(f'time_share/{r}', 0.0):.0f}%" for r in _SHORT
                      if r not in ("critic", "other") or m.get(f"time_share/{r}", 0.0) >= 0.005)
    return (f"step {step:4d} | reward {m['reward/mean']:.3f} | kl {m.get('loss/kl_ref', 0.0):.4f} "
            f"| len {m['rollout/response_len_mean']:.1f} | grad {m.get('train/grad_norm', float('nan')):.3f} "
            f"| {m['time/step']:.2f}s: {shares} | {m['rollout/tokens_per_s']:.0f} tok/s gen, "
            f"{m.get('step/tokens_per_s', float('nan')):.0f} tok/s step "
            f"| dlogp max {m.get('rollout/logp_mismatch_max', float('nan')):.1e} "
            f"mean {m.get('rollout/logp_mismatch_mean', float('nan')):.1e}")


@contextmanager
def profiled(path: str | None):
    """Run the block under torch.profiler (CPU, and CUDA when present; shapes recorded, no Python stacks, to
    keep the file small) and write a Chrome trace to `path` (chrome://tracing, ui.perfetto.dev). The
    controller's roles are named ranges in it (rollout, reward, reference, critic, advantages, train, sync).
    Nothing when `path` is None."""
    if path is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True, with_stack=False) as prof:
        yield
    os.makedirs(os.path.dirname(path), exist_ok=True)
    prof.export_chrome_trace(path)


def prompt_text(row: dict) -> str:
    """A row's prompt as text: the string itself, or chat messages as `role: content` lines."""
    prompt = row.get("prompt", row.get("messages", ""))
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


def sample_records(step: int, batch: Batch, tokenizer) -> list[dict]:
    """One rollouts.jsonl record per sample of a step's scored batch. The log-probs are those the engine
    sampled with (`rollout_logp` under a rollout correction, else `old_logp`), over the policy's tokens."""
    logp = batch.rollout_logp if batch.rollout_logp is not None else batch.old_logp
    mask = batch.response_mask.bool().cpu()
    logp = logp.detach().float().cpu() if logp is not None else None
    rewards = batch.rewards.detach().float().cpu()
    if rewards.dim() == 2:  # per-token rewards (environments): the sample's return
        rewards = rewards.sum(1)
    texts = batch.meta.get("completion") or decode_responses(batch, tokenizer)
    rows = batch.meta.get("row", [{}] * len(batch))
    records = []
    for i in range(len(batch)):
        lp = logp[i][mask[i]] if logp is not None else torch.empty(0)
        record = {"step": step, "group": int(batch.group_ids[i]) if batch.group_ids is not None else None,
                  "prompt": prompt_text(rows[i]), "completion": texts[i], "reward": float(rewards[i]),
                  "finish_reason": batch.meta.get("finish_reason", [None] * len(batch))[i],
                  "policy_version": int(batch.policy_version[i]) if batch.policy_version is not None else None,
                  "old_logp_mean": float(lp.mean()) if lp.numel() else None,
                  "old_logp_min": float(lp.min()) if lp.numel() else None,
                  "response_len": int(mask[i].sum())}
        if isinstance(rows[i].get("answer"), (str, int, float)):
            record["answer"] = str(rows[i]["answer"])
        if "gold_reward" in batch.meta:  # a learned reward: the verifier's score of the same sample
            record["gold_reward"] = float(batch.meta["gold_reward"][i])
        if "transcript" in batch.meta:  # an environment's episode: its turns
            none = [None] * len(batch)
            record.update(episode_fields(batch.meta["transcript"][i], batch.meta.get("env_error", none)[i],
                                         batch.meta.get("env_info", none)[i]))
        records.append(record)
    return records


def episode_fields(transcript: list[dict], error: str | None, info) -> dict:
    """The rollouts.jsonl fields of one environment episode (rlpost/rollout/episodes.py's transcript): `turns`,
    one per policy turn: {policy, policy_tokens, finish (stop | length | budget: how the sampling ended), reward
    (the environment step's; null when the step failed), env (continue | done | max_turns | budget | error |
    timeout: what came after the turn), observation (null when none followed), env_tokens}; the episode's
    `policy_tokens` and `env_tokens`; `env_error` (the failure's message) when it failed; `env_info` (the last
    step's info, as JSON) when there is one."""
    turns = []
    for said in transcript[1:]:  # [0] is the prompt
        if said["role"] == "assistant":
            turns.append({"policy": said["text"], "policy_tokens": said.get("tokens"), "finish": said.get("finish"),
                          "reward": said.get("reward"), "env": said.get("env"), "observation": None,
                          "env_tokens": 0})
        elif turns:
            turns[-1]["observation"], turns[-1]["env_tokens"] = said["text"], said.get("tokens", 0)
    out = {"turns": turns, "policy_tokens": sum(t["policy_tokens"] or 0 for t in turns),
           "env_tokens": sum(t["env_tokens"] for t in turns)}
    if error:
        out["env_error"] = error
    if info:
        out["env_info"] = json.loads(json.dumps(info, default=str))  # what JSON cannot hold, as its text
    return out


def trim_rollouts(run_dir: str, last_step: int) -> int:
    """Drop the rollouts.jsonl lines of steps after `last_step` (the step a resume starts from) and any
    half-written line; returns how many lines were dropped. Only for a resume from a checkpoint that does not
    count the file's lines (written by an older rlpost); a newer one's count cuts it exactly (rlpost/run.py)."""
    path = os.path.join(run_dir, ROLLOUTS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            continue
    if kept != lines:  # (a whole last line that lost only its newline gets it back)
        with open(path, "w") as f:
            f.writelines(kept)
    return len(lines) - len(kept)


@register("rl")
class RLStage(Stage):
    """`rl.*`, `rollout.*`, `algorithm`, `trainer.*`, `critic.*`, `reference.*`, `log.rollouts_every`; `evaluation`
    measures pass@1 mid-stage."""

    name = "rl"
    sections = ("rl", "rollout", "algorithm", "trainer", "critic", "reference", "eval")
    changes_weights = True
    checkpoint = "final"
    keep_step_checkpoints = True
    step_offset = 0  # RL steps of the run's RL stages before this one: its step n is logged as step_offset + n
    last = True      # the run's last RL stage (build_stages says which): it alone ends in checkpoints/final/

    @classmethod
    def from_config(cls, cfg, label: str | None = None) -> "RLStage":
        return cls(cfg.rl, cfg.rollout, cfg.algorithm, cfg.trainer, cfg.critic,
                   STAGES.classes["eval"].from_config(cfg, "rl"), log_cfg=cfg.log,
                   reference_cfg=cfg.reference)

    @property
    def end_checkpoint(self) -> str:
        """`final` for the run's last RL stage, else the stage's label (rl, rl_2, ...)."""
        return self.checkpoint if self.last else self.label

    def __init__(self, cfg, rollout_cfg, algorithm_cfg: dict, trainer_cfg, critic_cfg, evaluation, log_cfg=None,
                 reference_cfg=None):
        self.cfg, self.rollout_cfg, self.algorithm_cfg = cfg, rollout_cfg, algorithm_cfg
        self.offload_reference = reference_cfg is not None and reference_cfg.offload
        self.trainer_cfg, self.critic_cfg, self.evaluation = trainer_cfg, critic_cfg, evaluation
        self.rollouts_every = log_cfg.rollouts_every if log_cfg is not None else 0
        self.step = 0
        self.best, self.best_step = -math.inf, None  # rl.keep_best: the best held-out pass@1 so far, its step

    def setup(self, ctx: RunContext) -> None:
        rc, tc, model = self.rollout_cfg, self.trainer_cfg, ctx.model
        self.algorithm = get_algorithm(**self.algorithm_cfg)
        self.critic = Critic.build(model, self.critic_cfg.type, tc) if self.algorithm.uses_critic else None
        params = SamplingParams(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_k=rc.top_k,
                                top_p=rc.top_p, max_num_seqs=rc.max_num_seqs, stop=list(rc.stop))
        # the reference and the trainer score at params.logp_temperature, the temperature the engine reports
        # old_logp at (1 for greedy rollouts); the reference first: a whole frozen copy of the policy, taken
        # before the trainer may shard it
        if self.offload_reference and model_device(model).type == "cpu":
            raise ValueError("reference.offload: the policy runs on the CPU (model.device=auto found no GPU), so "
                             "there is nothing to offload to; set reference.offload=false or run on a GPU")
        self.reference = Reference(model, tc, params, offload=self.offload_reference) \
            if self.algorithm.uses_reference else None
        self.trainer = Trainer(model, tc, params, critic=self.critic, critic_lr=self.critic_cfg.lr,
                               seed=self.seed(ctx), total_steps=self.cfg.steps * tc.epochs * tc.minibatches)
        if tc.compile:  # after the reference (and a separate critic) copied the eager policy
            compile_model(model)
            if self.reference is not None and not self.reference.shares_policy:
                compile_model(self.reference.model)
        # the topology's loop places the rollout: the run's engine, Ray workers, or a pipeline ahead of training
        self.loop = LOOPS.build(self.cfg.topology, cfg=self.cfg, rollout=rc)
        engine, self.weight_sync = self.loop.place(ctx, params)
        roles = Roles(engine=engine, reward=ctx.rl_reward, algorithm=self.algorithm, trainer=self.trainer,
                      weight_sync=self.weight_sync, reference=self.reference, critic=self.critic)
        rows = ctx.task.train_rows
        self.controller = Controller(roles, self.cfg, params, rc, rows=rows, prompt_ids=ctx.prompt_ids(rows),
                                     seed=self.seed(ctx), loop=self.loop,
                                     shard=(dist.rank(), dist.world_size()) if tc.strategy == "fsdp2" else (0, 1),
                                     mixture=ctx.task.mixture)  # task.sources: drawn by weight

    def close(self) -> None:
        """Stop what the loop started (the rollout thread, the Ray workers, Ray itself); idempotent."""
        loop = self.__dict__.pop("loop", None)
        if loop is not None:
            loop.close()

    def state_dict(self, optimizer: bool = True) -> dict:
        """The stage's state; `optimizer=False`: the trainer's without AdamW's (a sharded checkpoint's shards
        hold it)."""
        return {"step": self.step, "controller": self.controller.state_dict(),
                "trainer": self.trainer.state_dict(optimizer=optimizer),
                "critic": self.critic.full_state_dict() if self.critic is not None and optimizer else None,
                "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, ctx: RunContext, state: dict) -> None:
        self.step = state["step"]
        self.best, self.best_step = state.get("best", -math.inf), state.get("best_step")  # (older: none kept)
        self.controller.load_state_dict(state["controller"])
        self.trainer.load_state_dict(state["trainer"])
        # a sharded checkpoint: AdamW's state and a critic's weights (unless gathered, as before) in its shards
        shards_critic = self.critic if self.critic is not None and state["critic"] is None else None
        if "optimizer" not in state["trainer"]:
            folder = os.path.join(ctx.run_dir, "checkpoints", ctx.weights_from, SHARDS_DIR)
            dist.load_shards(folder, self.trainer.model, self.trainer.optimizer, weights=False, critic=shards_critic)
        if self.critic is not None and shards_critic is None:
            self.critic.load_full_state_dict(state["critic"])
        if self.reference is not None and not self.reference.shares_policy:  # the policy as the stage started
            self.reference.load(os.path.join(ctx.run_dir, "checkpoints", self.reference_folder))
        self.weight_sync.load_state_dict(state["weight_sync"])

    def save(self, ctx: RunContext) -> None:
        # sharded (fsdp2): every rank writes its shards of the policy, of a critic and of AdamW's state (both
        # modules' parameters), nothing is gathered
        shards = dist.is_sharded(ctx.model)
        state = {**self.state_dict(optimizer=not shards), "weight_sync": self.weight_sync.state_dict()}
        ctx.save(f"{self.step_prefix}{self.step}", step=self.step, finished=False, state=state, weights=True,
                 optimizer=self.trainer.optimizer if shards else None, critic=self.critic if shards else None)
        prune(ctx.run_dir, self.cfg.keep_checkpoints, self.step_prefix)

    @property
    def step_prefix(self) -> str:
        return "step_" if self.repeat == 1 else f"{self.label}_step_"

    @property
    def reference_folder(self) -> str:
        return "reference" if self.repeat == 1 else f"{self.label}_reference"

    @property
    def best_folder(self) -> str:
        return "best" if self.repeat == 1 else f"{self.label}_best"

    def keep_if_best(self, ctx: RunContext, step: int, pass1: float) -> None:
        """rl.keep_best: when `pass1` beats the best so far, write the policy to checkpoints/best/ (a plain model
        folder, LoRA adapters merged; not a resume point) and record it in the summary (best_pass@1, best_step).
        Ties keep the earlier step. Every rank calls it (a sharded policy is gathered); rank 0 writes."""
        if not pass1 > self.best:
            return
        self.best, self.best_step = pass1, step
        model = dist.unsharded(ctx.model)
        if dist.is_main():
            write_model_folder(ctx.run_dir, self.best_folder,
                               lambda f: save_model(model, ctx.tokenizer, f, merged=True))
        dist.barrier()
        ctx.summary.update({f"{self.best_folder}_pass@1": pass1, f"{self.best_folder}_step": step})

    def profile_path(self, ctx: RunContext, step: int) -> str | None:
        """RUN_DIR/profile/rl_step_<step>.json when trainer.profile_steps asks for this step (rank 0 only)."""
        if step not in self.trainer_cfg.profile_steps or not dist.is_main():
            return None
        return os.path.join(ctx.run_dir, "profile", f"rl_step_{step}.json")

    def run(self, ctx: RunContext) -> None:
        c = self.cfg
        if self.step == 0 and self.reference is not None and not self.reference.shares_policy:
            reference = self.reference.unsharded()  # a collective when the reference is sharded (fsdp2)
            if dist.is_main():
                write_model_folder(ctx.run_dir, self.reference_folder,
                                   lambda f: save_model(reference, ctx.tokenizer, f))
        if dist.is_main() and ctx.log.rollout_lines is None:  # a resume from a checkpoint without the count:
            trim_rollouts(ctx.run_dir, self.step_offset + self.step)  # the samples after it are sampled again
            ctx.log.rollout_lines = count_lines(os.path.join(ctx.run_dir, ROLLOUTS_FILE))
        bar = progress(range(self.step + 1, c.steps + 1), initial=self.step, total=c.steps,
                       desc=f"rl/{self.algorithm.name}")
        for step in bar:
            n = self.step_offset + step  # the run's RL step: what metrics.jsonl, rollouts.jsonl and the console show
            trace = self.profile_path(ctx, n)
            with profiled(trace):
                metrics = self.controller.step(step)
            if c.eval_every and step % c.eval_every == 0 and step != c.steps:
                result = self.evaluation.evaluate(ctx)
                metrics["eval/pass@1"], metrics["eval/mean_reward"] = result["pass@1"], result["mean_reward"]
                if c.keep_best:
                    self.keep_if_best(ctx, n, result["pass@1"])
                metrics.update({f"eval/{k}": v for k, v in result.items() if k.startswith("pass@1_")})  # per source
            if self.rollouts_every and step % self.rollouts_every == 0 and dist.is_main():
                # sharded: rank 0's share of the step's prompts
                ctx.log.rollouts(sample_records(n, self.controller.sampled, ctx.tokenizer))
            ctx.log({"stage": "rl", "step": n, **metrics})
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
            if dist.is_main():
                tqdm.write(step_line(n, metrics) + (f" | pass@1 {metrics['eval/pass@1']:.3f}"
                                                       if "eval/pass@1" in metrics else "")
                           + (f" | profile: {trace}" if trace else ""))
            self.step = step
            saved = bool(c.save_every and step % c.save_every == 0 and step < c.steps)
            if saved:
                self.save(ctx)
            ctx.check_stop(save=None if saved else lambda: self.save(ctx))  # (a stop: one checkpoint, not two)
        bar.close()
