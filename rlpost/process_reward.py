"""Process rewards in RL: a process reward model's step scores as token-level rewards at the step ends.

Math-Shepherd (Wang et al. 2024, arXiv:2312.08935) trains its policy by step-by-step PPO: the PRM scores every
reasoning step, and each step's score is the reward of the step's last token. `ProcessReward` is that reward
role (as rlpost/distill.py's `TeacherReward`): for a response with steps ending at tokens e_1 < ... < e_n (each
token that writes `prm.separator`, and the last token; `rlpost.prm.step_ends`) and PRM scores s_1 ... s_n,

    r[e_j]  += coef * s_j                        (prm.reward = score)
    r[e_j]  += coef * (s_j - s_{j-1}), s_0 = 0   (prm.reward = delta: the sum telescopes to coef * s_n)
    r[last] += outcome                            (the task's verifier, as without a PRM)

and 0 on every other token (prompt, padding, tokens inside a step). `score` pays every step it sees, so a
response with more steps collects more; `delta` pays only for progress, and a response's total is the
outcome plus coef times the PRM's final score, whatever its length.

An algorithm reads the [B, T] rewards through `PolicyGradient.token_rewards`: REINFORCE++ (`reinforce_pp`)
credits token t with the rewards at and after it (returns-to-go, `gamma`), PPO with GAE; GRPO, RLOO and
REINFORCE sum a response's rewards into one. The outcome is reported as `reward/gold_mean` (the same number an
outcome-only run reports as `reward/mean`); metrics `prm/step_score_mean` (mean PRM score over every step of
the batch), `prm/final_score_mean` (the last step's), `prm/steps_per_response`, `prm/process_reward_mean` (the
PRM's part of a response's total, averaged).

    prm, prm_tokenizer = ProcessRewardModel.load("runs/prm/checkpoints/prm")
    reward = ProcessReward(prm, tokenizer, outcome=verifier, coef=1.0, mode="delta")
    scored, metrics = reward(batch)                       # scored.rewards: [B, T]
"""

from __future__ import annotations

import os

import torch

from rlpost.batch import Batch
from rlpost.config import PRM_REWARDS as MODES
from rlpost.ops import last_token_index
from rlpost.prm import ProcessRewardModel, responses, step_ends


def process_token_rewards(outcome: torch.Tensor, ends: list[list[int]], scores: list[list[float]],
                          response_mask: torch.Tensor, prompt_width: int, coef: float, mode: str) -> torch.Tensor:
    """[B, T]: `outcome` [B] on each row's last response token, plus coef * (score or score increment) of each step
    at its last token (`ends` index the response, which starts at column `prompt_width`); 0 elsewhere."""
    if mode not in MODES:
        raise ValueError(f"process reward mode {mode!r}; valid: {', '.join(MODES)}")
    mask = response_mask.bool()
    r = torch.zeros(mask.shape, dtype=torch.float32)
    rows = torch.arange(len(mask))
    r[rows, last_token_index(mask).cpu()] = outcome.float().cpu()
    for b, (e, s) in enumerate(zip(ends, scores)):
        previous = 0.0
        for j, score in zip(e, s):
            r[b, prompt_width + j] += coef * (score - previous if mode == "delta" else score)
            previous = score
    return torch.where(mask.cpu(), r, torch.zeros_like(r)).to(response_mask.device)


def prompt_ids(batch: Batch) -> list[list[int]]:
    """Each row's prompt tokens (the left padding dropped)."""
    P = batch.prompt_width
    ids, keep = batch.input_ids[:, :P].tolist(), batch.attention_mask[:, :P].bool().tolist()
    return [[t for t, k in zip(row, m) if k] for row, m in zip(ids, keep)]


class ProcessReward:
    """Reward role (see the module docstring): `reward(batch) -> (batch with token rewards [B, T], metrics)`.
    `outcome` is the run's verifier role (`rlpost.reward.Reward`), whose [B] rewards are the outcome."""

    def __init__(self, prm: ProcessRewardModel, tokenizer, outcome, coef: float = 1.0, mode: str = "delta",
                 separator: str = ";"):
        if mode not in MODES:
            raise ValueError(f"prm.reward is {mode!r}; valid: {', '.join(MODES)}")
        self.prm = prm.eval().requires_grad_(False)
        self.tokenizer, self.outcome, self.coef, self.mode, self.separator = tokenizer, outcome, coef, mode, separator

    @torch.no_grad()
    def __call__(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        scored, metrics = self.outcome(batch)
        outcome = scored.rewards.float()
        response = responses(batch)
        ends = [step_ends(r, self.tokenizer, self.separator) for r in response]
        scores = self.prm.step_scores(prompt_ids(batch), response, ends, self.tokenizer.pad_token_id)
        rewards = process_token_rewards(outcome, ends, scores, batch.response_mask, batch.prompt_width,
                                        self.coef, self.mode)
        flat = [s for ss in scores for s in ss]
        finals = [ss[-1] for ss in scores if ss]
        metrics = {**metrics,
                   "prm/step_score_mean": sum(flat) / max(len(flat), 1),
                   "prm/final_score_mean": sum(finals) / max(len(finals), 1),
                   "prm/steps_per_response": len(flat) / max(len(batch), 1),
                   "prm/process_reward_mean": float((rewards.sum(1).cpu() - outcome.cpu()).mean())}
        meta = {**scored.meta, "gold_reward": outcome.tolist()}  # the controller reports it as reward/gold_mean
        return scored.replace(rewards=rewards, meta=meta), metrics


def load_process_reward(cfg, tokenizer, outcome, prompts: list, system: str | None = None) -> ProcessReward:
    """`prm.path` loaded, its tokenizer checked against the policy's, as a reward role
    around the run's verifier `outcome`."""
    from rlpost.distill import check_same_tokenizer

    if not os.path.isdir(cfg.path):
        raise ValueError(f"prm.path: no folder at {cfg.path!r} (a process reward model: a `rlpost prm` run's "
                         "checkpoints/prm)")
    prm, prm_tokenizer = ProcessRewardModel.load(cfg.path)
    check_same_tokenizer(tokenizer, prm_tokenizer, prompts, system, where=f"prm.path {cfg.path}",
                         why="the PRM scores the policy's token ids as they are")
    return ProcessReward(prm, tokenizer, outcome, coef=cfg.coef, mode=cfg.reward, separator=cfg.separator)
