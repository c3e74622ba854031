"""EPISODES: the one path from data rows to scored trajectories.

    batch, metrics = run_episodes(engine, reward, rows, prompt_ids, k, params, seed)

1. the engine samples k completions of each prompt (`Engine.generate`: token ids in, a `Batch` out,
   with `old_logp`, `group_ids`, `policy_version` and finish reasons);
2. each sample gets its data row (`batch.meta["row"]`), so the reward can read the gold answer;
3. the reward role scores the batch (`reward(batch) -> (batch with rewards, metrics)`): a verifier
   `fn(completion, row)` through `rlpost.reward.Reward`, or a learned reward model.

The RL controller, the held-out evaluation and the self-generated preference pairs all call it, so
the three can never disagree on how a row becomes a scored sample. Sampled token ids are kept
verbatim (never decoded and re-encoded). A single-turn verifier is the one-turn case; an
environment that answers over several turns adds its turns here, not in a second path.

`metrics` holds the reward's own metrics plus `time/rollout` and `time/reward` (seconds), so the
caller can report where the time went. Given a `probe` (rlpost.devices.RoleProbe), the two roles' memory
peaks are measured too (the caller reads them from the probe); an environment's turns interleave sampling
and env steps, so there the whole episode is the rollout's.

With an environment (`reward` is an `rlpost.env.EnvRole`) an episode runs turns: generate -> env.step
-> append the observation -> generate ... until the env says done, `max_turns`, or the token budget.
The row layout stays the batch's (prompt left-padded, then the response region), but the response
region now interleaves the policy's turns (response_mask = 1, `old_logp` as sampled) with the
environment's tokens (response_mask = 0, old_logp = 0): the trainer recomputes log-probs over the
whole sequence and every loss reads only the masked positions, so env tokens never get a gradient.
Each turn is generated from the exact token ids of everything before it (the policy's sampled ids
verbatim, the env's ids as appended); nothing is decoded and re-encoded. The first turn samples the
k episodes of a row together (`generate(prompts, k)`), as the single-turn path does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from rlpost.batch import Batch
from rlpost.env import EnvRole, Step
from rlpost.env.calls import call_all
from rlpost.rollout import SamplingParams


def run_episodes(engine, reward, rows: list[dict], prompt_ids: list[list[int]], k: int, params: SamplingParams,
                 seed: int, probe=None) -> tuple[Batch, dict[str, float]]:
    """Sample `k` completions for each of `rows` (prompt tokens `prompt_ids`) and score them; `probe` (a
    rlpost.devices.RoleProbe) measures the memory peak of the rollout and the reward."""
    if len(rows) != len(prompt_ids):
        raise ValueError(f"run_episodes: {len(rows)} rows but {len(prompt_ids)} prompts")

    def role(name: str):
        return probe.role(name) if probe is not None else contextlib.nullcontext()

    if isinstance(reward, EnvRole):  # turns of sampling and environment steps: one range in a trace
        with torch.profiler.record_function("rollout"), role("rollout"):
            batch, metrics = run_env_episodes(engine, reward, rows, k, params, seed)
        if reward.rescore is None:
            return batch, metrics
        t = time.perf_counter()  # a learned RL reward (a reward model, a teacher, a PRM) scores the episodes
        with torch.profiler.record_function("reward"), role("reward"):
            batch, scored = reward.rescore(batch)
        return batch, {**metrics, **scored, "time/reward": metrics["time/reward"] + time.perf_counter() - t}
    t0 = time.perf_counter()
    with torch.profiler.record_function("rollout"), role("rollout"):  # named ranges in a torch.profiler trace
        batch = engine.generate(prompt_ids, k, params, seed=seed)
    batch = batch.replace(meta={**batch.meta, "row": [row for row in rows for _ in range(k)]})
    t1 = time.perf_counter()
    with torch.profiler.record_function("reward"), role("reward"):
        batch, metrics = reward(batch)
    return batch, {**metrics, "time/rollout": t1 - t0, "time/reward": time.perf_counter() - t1}


def episodes_in_chunks(engine, reward, rows: list[dict], prompt_ids: list[list[int]], k: int,
                       params: SamplingParams, seed: int, chunk: int,
                       desc: str | None = None) -> Iterator[tuple[list[int], Batch]]:
    """`run_episodes` over `chunk` rows at a time (seed + first row index per chunk), for passes over a
    whole prompt set (evaluation, preference pairs). Yields (row indices, scored batch). With `desc`, a
    progress bar (prompts done, ETA) that disappears when the pass ends."""
    from rlpost.progress import progress

    bar = progress(total=len(rows), desc=desc, unit="prompt", leave=False) if desc is not None else None
    for start in range(0, len(rows), chunk):
        idx = list(range(start, min(start + chunk, len(rows))))
        batch, _ = run_episodes(engine, reward, [rows[i] for i in idx], [prompt_ids[i] for i in idx], k, params,
                                seed + start)
        if bar is not None:
            bar.update(len(idx))
        yield idx, batch
    if bar is not None:
        bar.close()


# ---------------------------------------------------------------------------- episodes with an environment

class EnvError(RuntimeError):
    """An environment's reset or step raised or hung, named with its episode."""


@dataclass
class _Episode:
    env: object
    row: dict
    group: int
    prompt: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)    # the response region: policy and env tokens
    policy: list[int] = field(default_factory=list)    # 1 where the policy sampled the token
    logp: list[float] = field(default_factory=list)
    turn_rewards: list[tuple[int, float]] = field(default_factory=list)  # (index of the turn's last token, reward)
    transcript: list[dict] = field(default_factory=list)
    turns: int = 0
    version: int = 0
    finish: str = ""
    error: str | None = None
    info: dict = field(default_factory=dict)
    budget_start: int = -1  # stopped by the token budget: tokens before the turn it left no room for
    budget_done: int = 0    # ... and the turns completed before that one


def encode_observation(tokenizer, obs, after_eos: bool = False) -> list[int]:
    """An observation's ids. A string is encoded bare (no special tokens). Chat messages become the chat
    template's rendering of the text between an assistant turn's content and the next assistant turn's
    content: the template's close of the assistant message (ChatML's "<|im_end|>\\n"), the new messages,
    and the generation prompt. The earlier turns' ids stay as they were sampled (the exact-prefix rule).

    `after_eos`: the turn ended on the tokenizer's eos. When the template closes an assistant message with
    that token, the sampled eos is the close's first token and the glue is what the template writes after
    it (ChatML's "\\n"), so the row reads as the template renders the conversation. A turn cut before its
    eos gets the whole close from the environment (masked like every environment token)."""
    if isinstance(obs, str):
        return tokenizer.encode_completion(obs)
    tok = getattr(tokenizer, "tok", None)
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError("an observation given as chat messages needs a tokenizer with a chat template")
    # where the assistant's content "a" ends in the rendering of [user, assistant, *obs]: everything after it
    # is the glue. Rendered with the generation prompt after [user], the conversation must start the same way.
    head = tok.apply_chat_template([{"role": "user", "content": "u"}], tokenize=False, add_generation_prompt=True)
    base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    after = tok.apply_chat_template(base + list(obs), tokenize=False, add_generation_prompt=True)
    if not after.startswith(head + "a"):
        raise ValueError("the chat template renders earlier messages differently once more follow; observations "
                         "cannot be appended without re-tokenising earlier turns (give them as text instead)")
    glue = after[len(head) + 1:]
    eos = tok.decode([tokenizer.eos_token_id])
    if after_eos and eos and glue.startswith(eos):  # the sampled eos already wrote the template's end of turn
        glue = glue[len(eos):]
    return tok(glue, add_special_tokens=False)["input_ids"]


def _describe(ep: _Episode, index: int, what: str) -> str:
    prompt = ep.row.get("prompt", ep.row.get("messages"))
    said = " | ".join(f"{t['role']}: {t['text']!r}" for t in ep.transcript)[-300:]
    return f"episode {index} (prompt {prompt!r}, turn {ep.turns}{', transcript ...' + said if said else ''}): {what}"


def _failure(result) -> str:
    return "timed out" if result.timed_out else f"{type(result.error).__name__}: {result.error}"


def run_env_episodes(engine, role: EnvRole, rows: list[dict], k: int, params: SamplingParams,
                     seed: int) -> tuple[Batch, dict[str, float]]:
    """k episodes of each row against fresh environments (see the module docstring). Returns the scored
    batch and metrics: env/turns, env/errors, env/timeouts, env/env_tokens (mean per episode), env/budget_frac,
    env/tool_calls (mean, when the environments count calls in their info), time/*.

    batch.meta["transcript"] holds each episode's turns in order: the prompt, then per policy turn
    {"role": "assistant", "text", "tokens", "finish" (the engine's stop/length, or budget), "reward" (the env
    step's), "env" (continue | done | max_turns | budget | error | timeout)}, and per observation {"role":
    "env", "text", "tokens"}."""
    from rlpost.models import encode_prompt

    tok = role.tokenizer
    t0 = time.perf_counter()
    t_env = 0.0
    episodes = [_Episode(env=role.make(), row=row, group=g) for g, row in enumerate(rows) for _ in range(k)]
    errors = timeouts = 0

    def fail(i: int, ep: _Episode, result) -> None:
        nonlocal errors, timeouts
        message = _describe(ep, i, f"environment {role.name} failed: {_failure(result)}")
        if role.on_error != "zero":
            raise EnvError(message) from result.error
        errors += 1
        timeouts += int(result.timed_out)
        ep.error, ep.finish, ep.turn_rewards = message, "error", []
        for said in ep.transcript[1:]:  # the turns' record (rollouts.jsonl): no reward counts; the failed step
            said.pop("reward", None)
            if said["role"] == "assistant":
                said["env"] = said.get("env") or ("timeout" if result.timed_out else "error")

    # reset: every episode's first prompt
    t = time.perf_counter()
    results = call_all([lambda ep=ep: ep.env.reset(ep.row) for ep in episodes], role.timeout_s, role.workers)
    t_env += time.perf_counter() - t
    for i, (ep, r) in enumerate(zip(episodes, results)):
        if r.ok:
            ep.prompt = encode_prompt(tok, r.value, role.system_prompt)  # as every role encodes a prompt
            ep.transcript.append({"role": "prompt", "text": tok.decode(ep.prompt)})
        else:
            fail(i, ep, r)
            ep.prompt = encode_prompt(tok, ep.row.get("prompt", ""), role.system_prompt)  # masked out below
    # turn 1 samples each row's k episodes together when their prompts agree (the single-turn path's draws)
    firsts = [episodes[g * k].prompt for g in range(len(rows))]
    grouped = all(episodes[g * k + j].prompt == firsts[g] for g in range(len(rows)) for j in range(k))
    active = [i for i, ep in enumerate(episodes) if ep.error is None]
    turn = 0
    while active:
        # each episode may sample up to its remaining budget: episodes with the same cap are sampled together
        cap = {i: min(params.max_new_tokens, role.max_tokens - len(episodes[i].tokens)) for i in active}
        for c in sorted(set(cap.values())):
            members = [i for i in active if cap[i] == c]
            turn_params = dataclasses.replace(params, max_new_tokens=c)
            if turn == 0 and grouped and len(members) == len(episodes):
                batch = engine.generate(firsts, k, turn_params, seed=seed)
            else:
                batch = engine.generate([episodes[i].prompt + episodes[i].tokens for i in members], 1, turn_params,
                                        seed=seed + 7919 * turn + c)
            mask = batch.response_mask.bool()
            for j, i in enumerate(members):
                ep = episodes[i]
                new = batch.input_ids[j][mask[j]].tolist()
                cut = c < params.max_new_tokens and batch.meta["finish_reason"][j] == "length"  # by the budget
                if cut:
                    ep.budget_start, ep.budget_done = len(ep.tokens), ep.turns
                ep.tokens += new
                ep.policy += [1] * len(new)
                ep.logp += batch.old_logp[j][mask[j]].tolist()
                ep.turns += 1
                ep.version = int(batch.policy_version[j]) if turn == 0 else ep.version
                ep.finish = "budget" if cut else batch.meta["finish_reason"][j]
                ep.transcript.append({"role": "assistant", "text": tok.decode(new), "tokens": len(new),
                                      "finish": ep.finish})
        t = time.perf_counter()
        results = call_all([lambda ep=episodes[i]: ep.env.step(ep.transcript[-1]["text"]) for i in active],
                           role.timeout_s, role.workers)
        t_env += time.perf_counter() - t
        still = []
        for i, r in zip(active, results):
            ep = episodes[i]
            if r.ok and not isinstance(r.value, Step):
                r.error = TypeError(f"step() must return an rlpost.env.Step, got {type(r.value).__name__}")
            if not r.ok:
                fail(i, ep, r)
                continue
            step: Step = r.value
            try:
                reward = float(step.reward)
                if reward != reward or reward in (float("inf"), float("-inf")):
                    raise ValueError(f"non-finite reward {reward}")
            except (TypeError, ValueError) as e:
                r.error = e
                fail(i, ep, r)
                continue
            ep.turn_rewards.append((len(ep.tokens) - 1, reward))
            ep.info = step.info
            said = ep.transcript[-1]  # this turn's record: its reward and what the environment did next
            said["reward"], said["env"] = reward, "continue"
            if step.done or ep.turns >= role.max_turns or ep.finish == "budget":
                said["env"] = "done" if step.done else "budget" if ep.finish == "budget" else "max_turns"
                ep.finish = "done" if step.done and ep.finish != "budget" else ep.finish
                continue
            try:
                ended = bool(ep.tokens) and ep.tokens[-1] == tok.eos_token_id
                obs = encode_observation(tok, step.observation, ended) if step.observation else []
            except ValueError as e:  # the env speaks outside the tokenizer's vocabulary: a setup error, stop
                raise EnvError(_describe(ep, i, f"its observation {step.observation!r} cannot be encoded: {e}")) from e
            if len(ep.tokens) + len(obs) >= role.max_tokens:  # no room left for another policy token
                ep.finish, ep.budget_start, ep.budget_done = "budget", len(ep.tokens) + len(obs), ep.turns
                said["env"] = "budget"
                continue
            ep.tokens += obs
            ep.policy += [0] * len(obs)
            ep.logp += [0.0] * len(obs)
            if obs:
                ep.transcript.append({"role": "env", "text": tok.decode(obs), "tokens": len(obs)})
            still.append(i)
        active, turn = still, turn + 1
    for ep in episodes:
        getattr(ep.env, "close", lambda: None)()
    batch = _assemble(episodes, tok.pad_token_id, per_turn=any(getattr(ep.env, "per_turn_rewards", False)
                                                               for ep in episodes))
    env_tokens = [len(ep.tokens) - sum(ep.policy) for ep in episodes]
    budget = [ep for ep in episodes if ep.finish == "budget"]
    _warn_budget(role, episodes, params.max_new_tokens)
    metrics = {"env/turns": sum(ep.turns for ep in episodes) / len(episodes), "env/errors": float(errors),
               "env/timeouts": float(timeouts), "env/env_tokens": sum(env_tokens) / len(episodes),
               "env/budget_frac": len(budget) / len(episodes),
               "time/env": t_env, "time/rollout": time.perf_counter() - t0 - t_env, "time/reward": t_env}
    calls = [ep.info["calls"] for ep in episodes
             if isinstance(ep.info, dict) and isinstance(ep.info.get("calls"), int)]
    if calls:  # a tool environment counts its calls in the last step's info (rlpost/env/tools.py)
        metrics["env/tool_calls"] = sum(calls) / len(calls)
    return batch, metrics


def _warn_budget(role: EnvRole, episodes: list[_Episode], max_new_tokens: int) -> None:
    """Once per role (per run): when more than half of the episodes were stopped by the token budget after
    their first turn, say so on stderr with the task.max_episode_tokens that gives the longest of them
    room to finish: its turns left at max_new_tokens each, with observations as long as the longest seen."""
    late = [ep for ep in episodes if ep.finish == "budget" and ep.budget_done >= 1]
    if role.budget_warned or 2 * len(late) <= len(episodes):
        return
    role.budget_warned = True
    longest = 0
    for ep in episodes:  # the environment's runs of tokens: its observations
        run = 0
        for p in ep.policy + [1]:
            run = run + 1 if p == 0 else 0
            longest = max(longest, run)
    need = max(ep.budget_start + (role.max_turns - ep.budget_done) * max_new_tokens
               + (role.max_turns - ep.budget_done - 1) * longest for ep in late)
    print(f"rlpost: warning: {len(late)} of {len(episodes)} episodes of environment {role.name} stopped at the "
          f"token budget after their first turn (task.max_episode_tokens={role.max_tokens}, policy and environment "
          f"tokens after the prompt): their later turns were cut or never ran. Set task.max_episode_tokens={need} "
          f"(or more) to give every turn room.", file=sys.stderr, flush=True)


def _assemble(episodes: list[_Episode], pad_id: int, per_turn: bool) -> Batch:
    """Episodes -> Batch: prompts left-padded, response regions (policy + env tokens) right-padded."""
    B = len(episodes)
    P = max(len(ep.prompt) for ep in episodes)
    R = max(max(len(ep.tokens) for ep in episodes), 1)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    resp = torch.zeros((B, P + R), dtype=torch.long)
    logp = torch.zeros((B, P + R))
    token_rewards = torch.zeros((B, P + R))
    for b, ep in enumerate(episodes):
        n = len(ep.tokens)
        ids[b, P - len(ep.prompt):P] = torch.tensor(ep.prompt, dtype=torch.long)
        attn[b, P - len(ep.prompt):P + n] = 1
        if n:
            ids[b, P:P + n] = torch.tensor(ep.tokens, dtype=torch.long)
            if ep.error is None:  # a failed episode stays in the batch (groups keep their size) but trains nothing
                resp[b, P:P + n] = torch.tensor(ep.policy, dtype=torch.long)
            logp[b, P:P + n] = torch.tensor(ep.logp)
        for pos, r in ep.turn_rewards:
            token_rewards[b, P + pos] += r
    rewards = token_rewards if per_turn else token_rewards.sum(1)
    meta = {
        "row": [ep.row for ep in episodes],
        "completion": ["".join(t["text"] for t in ep.transcript[1:]) for ep in episodes],  # after the prompt
        "transcript": [ep.transcript for ep in episodes],
        "turns": [ep.turns for ep in episodes],
        "finish_reason": [ep.finish for ep in episodes],
        "env_error": [ep.error for ep in episodes],
        "env_info": [ep.info for ep in episodes],
    }
    return Batch(input_ids=ids, attention_mask=attn, response_mask=resp, old_logp=logp * resp, rewards=rewards,
                 group_ids=torch.tensor([ep.group for ep in episodes]),
                 policy_version=torch.tensor([ep.version for ep in episodes]), meta=meta)
