"""Held-out evaluation: pass@k, maj@k, the mean reward and the response length, from sampled completions.

A sample *succeeds* when the environment's last step says so (`info["success"]`) or, otherwise, when its
reward is >= `success_threshold` (1.0 by default: right, for 0/1 verifiers). pass@k counts successes,
never the mean of a partial-credit reward: a code reward of 0.5 (half the tests) is not half a pass.
The mean reward is reported beside it under its own name.

- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n - c, k) / C(n, k) for c successes
  among n samples of a prompt, averaged over prompts; pass@1 is the mean success rate.
- maj@k: the answer most of a prompt's first k samples give (the role's `final_answer(completion, row)`: its
  verifier's answer extraction, e.g. math's, with task.sources the row's source's; by default the completion's
  first line), right if its samples succeed.

Samples are drawn at `temperature` (1.0 by default: the policy itself, not its mode), through the same
episode function as training (rlpost/rollout/episodes.py), nothing else.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch

from rlpost.config import load_config
from rlpost.checkpoint import resolve_model
from rlpost.env.role import RewardRole
from rlpost.env.verifiers import eval_reward_role, reward_role
from rlpost.models import encode_prompt, load_model
from rlpost.prompts import SOURCE_KEY
from rlpost.rollout import SamplingParams, build_engine
from rlpost.rollout.episodes import episodes_in_chunks
from rlpost.tasks import load_task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c successes: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def majority_answer(keys: list):
    """The most common answer among `keys`: ties go to the answer seen first; no answer (None) never wins a
    vote while some sample has one (None when none has)."""
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(k for k in keys if k is not None and counts[k] == best)


def majority_success(keys: list, successes: list[bool]) -> bool:
    """Does the most common answer among `keys` (`majority_answer`) succeed?"""
    winner = majority_answer(keys)
    return winner is not None and any(s for k, s in zip(keys, successes) if k == winner)


def voted_texts(batch) -> list[str]:
    """The text of each sample that maj@k extracts its answer from: the completion, or for an environment's
    episode its final turn (the answer; the completion holds every turn and observation before it, so two
    episodes that reach one answer by different look-ups would never agree)."""
    completions = batch.meta.get("completion", [""] * len(batch))
    transcripts = batch.meta.get("transcript")
    if transcripts is None:
        return completions
    out = []
    for completion, said in zip(completions, transcripts):
        turns = [t["text"] for t in (said or []) if t.get("role") == "assistant"]
        out.append(turns[-1] if turns else "" if said else completion)
    return out


def evaluate(engine, reward: RewardRole, rows: list[dict], prompt_ids: list[list[int]], *, samples: int,
             temperature: float, max_new_tokens: int, ks: tuple[int, ...] = (1,), success_threshold: float = 1.0,
             batch_prompts: int = 256, seed: int = 0) -> dict:
    """pass@k and maj@k for each k in `ks` (k <= samples), mean_reward, mean_length (response tokens),
    prompts, samples: over `rows`, `samples` completions each."""
    if not rows:
        raise ValueError("evaluation needs held-out rows; the task has none")
    bad = [k for k in ks if not 1 <= k <= samples]
    if bad:
        raise ValueError(f"k={bad} must be between 1 and the samples per prompt ({samples})")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    passes = {k: 0.0 for k in ks}
    sources: dict[str, list[float]] = {}  # task.sources: each source's pass@k sums and prompts
    majority = {k: 0.0 for k in ks}
    reward_sum = length_sum = 0.0
    for idx, batch in episodes_in_chunks(engine, reward, rows, prompt_ids, samples, params, seed, batch_prompts,
                                         desc="eval"):
        rewards = batch.rewards.float()
        rewards = rewards.sum(1) if rewards.dim() == 2 else rewards
        lengths = batch.response_mask.sum(1)
        infos = batch.meta.get("env_info", [{}] * len(batch))
        completions = voted_texts(batch)
        for j in range(len(idx)):
            group = range(j * samples, (j + 1) * samples)
            ok = [bool(infos[i].get("success")) if "success" in (infos[i] or {}) else
                  float(rewards[i]) >= success_threshold for i in group]
            keys = [reward.final_answer(completions[i], rows[idx[j]]) for i in group]
            source = rows[idx[j]].get(SOURCE_KEY)
            for k in ks:
                passes[k] += pass_at_k(samples, sum(ok), k)
                majority[k] += float(majority_success(keys[:k], ok[:k]))
            if source is not None:
                tally = sources.setdefault(source, [0.0] * len(ks) + [0])
                for n, k in enumerate(ks):
                    tally[n] += pass_at_k(samples, sum(ok), k)
                tally[-1] += 1
        reward_sum += float(rewards.sum())
        length_sum += float(lengths.sum())
    n = len(rows)
    out = {f"pass@{k}": passes[k] / n for k in ks}
    out.update({f"maj@{k}": majority[k] / n for k in ks})
    for source, tally in sources.items():  # pass@k_<source>: over that source's held-out prompts
        out.update({f"pass@{k}_{source}": tally[i] / tally[-1] for i, k in enumerate(ks)})
    out.update({"mean_reward": reward_sum / (n * samples), "mean_length": length_sum / (n * samples),
                "prompts": n, "samples": samples, "success_threshold": success_threshold})
    return out


def pass_at_1(engine, reward: RewardRole, rows: list[dict], prompt_ids: list[list[int]], *, samples: int,
              temperature: float, max_new_tokens: int, batch_prompts: int = 256, seed: int = 0,
              success_threshold: float = 1.0) -> dict:
    """The pipeline's evaluation: {"pass@1", "mean_reward", ...} (see `evaluate`)."""
    return evaluate(engine, reward, rows, prompt_ids, samples=samples, temperature=temperature,
                    max_new_tokens=max_new_tokens, ks=(1,), success_threshold=success_threshold,
                    batch_prompts=batch_prompts, seed=seed)


# ---------------------------------------------------------------------------- the command

def checkpoint_config(checkpoint: str, recipe: str | None, overrides: list[str], command: str):
    """(config, run directory or None) of a command that reads a checkpoint: the recipe given, else the run
    directory's config.yaml, with the overrides; model.name set to the checkpoint's weights (a run directory's
    newest, or the model folder itself)."""
    run_dir = checkpoint if os.path.isfile(os.path.join(checkpoint, "config.yaml")) else None
    if recipe is None and run_dir is not None:
        recipe = os.path.join(run_dir, "config.yaml")
    cfg = load_config(recipe, overrides)
    if not os.path.isdir(checkpoint):
        raise ValueError(f"{command}: {checkpoint} is not a run directory or a model folder")
    cfg.model.name = resolve_model(checkpoint)
    return cfg, run_dir


def _eval_path(out: str | None, run_dir: str | None) -> str:
    """Where eval.json goes: `out` (a file, or a folder that exists: eval.json in it), else the run directory, else
    here. ValueError when it cannot be written there (its folder missing, a file, or not writable)."""
    if out is None:
        return os.path.join(run_dir or ".", "eval.json")
    path = os.path.join(out, "eval.json") if os.path.isdir(out) else out
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out}: {folder} is {'a file' if os.path.exists(folder) else 'not there'}; give a "
                         "file in a folder that exists (or such a folder)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder {folder} is not writable")
    return path


def run_eval(checkpoint: str, recipe: str | None, overrides: list[str], *, ks: list[int], samples: int | None,
             out: str | None) -> dict:
    """`rlpost eval CHECKPOINT`: the task's held-out rows sampled from CHECKPOINT's weights and scored by the
    run's reward (or eval.reward: the run's role scored by it, with task.env too), as the pipeline's evaluation
    does; writes eval.json and returns it.

    CHECKPOINT is a run directory (its newest checkpoint's weights, its config.yaml for the task unless a
    recipe is given) or a model folder. eval.json goes to `out` (a file, or a folder that exists), else into the
    run directory, else the working directory."""
    cfg, run_dir = checkpoint_config(checkpoint, recipe, overrides, "rlpost eval")
    path = _eval_path(out, run_dir)  # checked before the sampling, which may take hours, not after it
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.task)
    model, tokenizer = load_model(cfg.model, task.alphabet)
    model.eval()
    engine = build_engine(cfg.rollout.engine, model, tokenizer, share_weights=True,
                          vllm_gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization)
    role = reward_role(cfg.task, task.verify, tokenizer, cfg.rollout.max_new_tokens)
    reward = eval_reward_role(cfg.eval, role) or role
    samples = samples or max(ks)
    rows = task.eval_rows
    try:
        with torch.no_grad():
            result = evaluate(engine, reward, rows, [encode_prompt(tokenizer, r["prompt"], task.system_prompt)
                                                     for r in rows],
                              samples=samples, temperature=cfg.eval.temperature,
                              max_new_tokens=cfg.rollout.max_new_tokens, ks=tuple(sorted(set(ks))),
                              success_threshold=cfg.eval.success_threshold, batch_prompts=cfg.eval.batch_prompts,
                              seed=cfg.seed)
    finally:
        engine.close()
        for r in {id(r): r for r in (reward, role)}.values():  # process pools, a judge's engine
            r.close()
    result = {"checkpoint": cfg.model.name, "task": task.name, "temperature": cfg.eval.temperature, **result}
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    result["written_to"] = path
    return result
