"""ENV: episodes against an environment, one `Env` per episode (rlpost/env/base.py), and the role that runs
them (`EnvRole`, built from task.env by `EnvRole.from_config`).

An episode runs turns: generate -> env.step -> append the observation -> generate ... until the env says
done, `max_turns`, or the token budget. The row layout stays the batch's (prompt left-padded, then the
response region), but the response region interleaves the policy's turns (response_mask = 1, `old_logp` as
sampled) with the environment's tokens (response_mask = 0, old_logp = 0): the trainer recomputes log-probs
over the whole sequence and every loss reads only the masked positions, so env tokens never get a gradient.
Each turn is generated from the exact token ids of everything before it (the policy's sampled ids verbatim,
the env's ids as appended); nothing is decoded and re-encoded. The first turn samples the k episodes of a
row together (`generate(prompts, k)`), as the one-turn verifier does.

The loop that samples the turns is rlpost/rollout/episodes.py's, the same for every role; `EnvEpisodes`
holds the episodes between its calls.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlpost.batch import Batch
from rlpost.env.base import Env, Step, Verifier, reward_value
from rlpost.env.calls import call_all
from rlpost.env.registry import env_class, response_budget
from rlpost.env.role import Episodes, RewardRole, Turn
from rlpost.models import encode_prompt


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


class EnvEpisodes(Episodes):
    """k episodes of each row against fresh environments (see the module docstring). Its metrics: env/turns,
    env/errors, env/timeouts, env/env_tokens (mean per episode), env/budget_frac, env/tool_calls (mean, when
    the environments count calls in their info), time/env.

    batch.meta["transcript"] holds each episode's turns in order: the prompt, then per policy turn
    {"role": "assistant", "text", "tokens", "finish" (the engine's stop/length, or budget), "reward" (the env
    step's), "env" (continue | done | max_turns | budget | error | timeout)}, and per observation {"role":
    "env", "text", "tokens"}."""

    def __init__(self, role: EnvRole, rows: list[dict], k: int):
        self.role, self.k = role, k
        tok = role.tokenizer
        self.episodes = [_Episode(env=role.make(), row=row, group=g) for g, row in enumerate(rows) for _ in range(k)]
        self.errors = self.timeouts = 0
        self.turn, self.max_new_tokens = 0, 0
        self.behaviour = False  # the engine's log-probs are a truncated distribution's (batch.rollout_logp)
        t = time.perf_counter()
        results = call_all([lambda ep=ep: ep.env.reset(ep.row) for ep in self.episodes], role.timeout_s,
                           role.workers)
        self.env_seconds = time.perf_counter() - t
        for i, (ep, r) in enumerate(zip(self.episodes, results)):
            if r.ok:
                ep.prompt = encode_prompt(tok, r.value, role.system_prompt)  # as every role encodes a prompt
                ep.transcript.append({"role": "prompt", "text": tok.decode(ep.prompt)})
            else:
                self.fail(i, ep, r)
                ep.prompt = encode_prompt(tok, ep.row.get("prompt", ""), role.system_prompt)  # masked out below
        # turn 1 samples each row's k episodes together when their prompts agree (the one-turn path's draws)
        self.firsts = [self.episodes[g * k].prompt for g in range(len(rows))]
        self.grouped = all(self.episodes[g * k + j].prompt == self.firsts[g] for g in range(len(rows))
                           for j in range(k))
        self.active = [i for i, ep in enumerate(self.episodes) if ep.error is None]

    def fail(self, i: int, ep: _Episode, result) -> None:
        """Episode i's reset or step failed: raise EnvError, or (on_error=zero) end it with reward 0, counted."""
        message = _describe(ep, i, f"environment {self.role.name} failed: {_failure(result)}")
        if self.role.on_error != "zero":
            raise EnvError(message) from result.error
        self.errors += 1
        self.timeouts += int(result.timed_out)
        ep.error, ep.finish, ep.turn_rewards = message, "error", []
        for said in ep.transcript[1:]:  # the turns' record (rollouts.jsonl): no reward counts; the failed step
            said.pop("reward", None)
            if said["role"] == "assistant":
                said["env"] = said.get("env") or ("timeout" if result.timed_out else "error")

    def turns(self, params, seed: int) -> list[Turn]:
        """The active episodes' next turn: those with the same token cap (max_new_tokens, or what the
        budget leaves) are sampled together."""
        self.max_new_tokens = params.max_new_tokens
        cap = {i: min(params.max_new_tokens, self.role.max_tokens - len(self.episodes[i].tokens)) for i in self.active}
        out = []
        for c in sorted(set(cap.values())):
            members = [i for i in self.active if cap[i] == c]
            turn_params = dataclasses.replace(params, max_new_tokens=c)
            if self.turn == 0 and self.grouped and len(members) == len(self.episodes):
                out.append(Turn(self.firsts, self.k, turn_params, seed, members))
            else:
                out.append(Turn([self.episodes[i].prompt + self.episodes[i].tokens for i in members], 1, turn_params,
                                seed + 7919 * self.turn + c, members))
        return out

    def sampled(self, turn: Turn, batch: Batch) -> None:
        tok, c = self.role.tokenizer, turn.params.max_new_tokens
        self.behaviour = self.behaviour or batch.rollout_logp is not None
        mask = batch.response_mask.bool()
        for j, i in enumerate(turn.members):
            ep = self.episodes[i]
            new = batch.input_ids[j][mask[j]].tolist()
            cut = c < self.max_new_tokens and batch.meta["finish_reason"][j] == "length"  # by the budget
            if cut:
                ep.budget_start, ep.budget_done = len(ep.tokens), ep.turns
            ep.tokens += new
            ep.policy += [1] * len(new)
            ep.logp += batch.old_logp[j][mask[j]].tolist()
            ep.turns += 1
            ep.version = int(batch.policy_version[j]) if self.turn == 0 else ep.version
            ep.finish = "budget" if cut else batch.meta["finish_reason"][j]
            ep.transcript.append({"role": "assistant", "text": tok.decode(new), "tokens": len(new),
                                  "finish": ep.finish})

    def step(self) -> None:
        """Every active episode's environment answers its last turn; those that go on get the observation."""
        role, tok = self.role, self.role.tokenizer
        t = time.perf_counter()
        results = call_all([lambda ep=self.episodes[i]: ep.env.step(ep.transcript[-1]["text"]) for i in self.active],
                           role.timeout_s, role.workers)
        self.env_seconds += time.perf_counter() - t
        still = []
        for i, r in zip(self.active, results):
            ep = self.episodes[i]
            if r.ok and not isinstance(r.value, Step):
                r.error = TypeError(f"step() must return an rlpost.env.Step, got {type(r.value).__name__}")
            if not r.ok:
                self.fail(i, ep, r)
                continue
            step: Step = r.value
            try:
                reward = reward_value(step.reward)
            except (TypeError, ValueError) as e:
                r.error = e
                self.fail(i, ep, r)
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
        self.active, self.turn = still, self.turn + 1

    def result(self) -> tuple[Batch, dict[str, float]]:
        episodes = self.episodes
        for ep in episodes:  # an environment class need not subclass Env: what it lacks is Env's default
            getattr(ep.env, "close", lambda: None)()
        batch = _assemble(episodes, self.role.tokenizer.pad_token_id,
                          per_turn=any(getattr(ep.env, "per_turn_rewards", False) for ep in episodes))
        if self.behaviour:  # said on, as a one-turn batch says it: the controller then recomputes old_logp
            batch = batch.replace(rollout_logp=batch.old_logp.clone())
        env_tokens = [len(ep.tokens) - sum(ep.policy) for ep in episodes]
        budget = [ep for ep in episodes if ep.finish == "budget"]
        _warn_budget(self.role, episodes, self.max_new_tokens)
        metrics = {"env/turns": sum(ep.turns for ep in episodes) / len(episodes), "env/errors": float(self.errors),
                   "env/timeouts": float(self.timeouts), "env/env_tokens": sum(env_tokens) / len(episodes),
                   "env/budget_frac": len(budget) / len(episodes), "time/env": self.env_seconds}
        calls = [ep.info["calls"] for ep in episodes
                 if isinstance(ep.info, dict) and isinstance(ep.info.get("calls"), int)]
        if calls:  # a tool environment counts its calls in the last step's info (rlpost/env/tools.py)
            metrics["env/tool_calls"] = sum(calls) / len(calls)
        if self.role.rescore is not None:  # a learned RL reward (a reward model, a teacher, a PRM) scores them
            batch, scored = self.role.rescore(batch)
            metrics.update(scored)
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
          f"token budget after their first turn ({role.key}.max_episode_tokens={role.max_tokens}, policy and "
          f"environment tokens after the prompt): their later turns were cut or never ran. Set "
          f"{role.key}.max_episode_tokens={need} "
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


@dataclass
class EnvRole(RewardRole):
    """How episodes with an environment run: `make()` builds one fresh Env per episode.

    max_turns: assistant turns per episode at most; max_tokens: tokens after the prompt (policy and
    environment) at most; timeout_s: a reset or step that takes longer counts as hung; on_error:
    'raise' stops the run naming the episode, 'zero' ends that episode with reward 0 (counted);
    workers: environment calls run at once (threads). `fn`: the verifier the environment scores its final
    turn with (task.env's `reward` option), when it takes one."""

    make: Callable[[], Env]
    tokenizer: Any
    max_turns: int = 1
    max_tokens: int = 16
    timeout_s: float | None = 30.0
    on_error: str = "raise"
    workers: int = 8
    name: str = "env"
    fn: Verifier | None = None  # the run's reward, when the environment scores with it (closed at the end of the run)
    system_prompt: str | None = None  # task.system_prompt, put before the first prompt (chat template)
    budget_warned: bool = False  # the too-small-budget warning was given (once per role, i.e. per run)
    env_cls: type | None = None  # task.env's class and options (from_config), to build it with another reward
    options: dict = field(default_factory=dict)
    rescore: Callable[[Batch], tuple[Batch, dict]] | None = None  # a learned RL reward over the episodes (source.py)
    key: str = "task"  # the config section its keys are set in (task.sources[i] for a source's env), for messages

    @classmethod
    def from_config(cls, task_cfg, tokenizer, reward_fn: Verifier, max_new_tokens: int) -> "EnvRole":
        """task.env's role: its class built with task.env_options (and `reward_fn` when it takes a `reward`)."""
        env_cls, options, _ = env_class(task_cfg, reward_fn)
        return cls(make=lambda: env_cls(**options), tokenizer=tokenizer, max_turns=task_cfg.max_turns,
                   max_tokens=response_budget(task_cfg, max_new_tokens), timeout_s=task_cfg.env_timeout_s,
                   on_error=task_cfg.env_on_error, workers=max(task_cfg.reward_workers, 8), name=task_cfg.env,
                   fn=options.get("reward"), system_prompt=task_cfg.system_prompt, env_cls=env_cls, options=options)

    def start(self, rows: list[dict], prompt_ids: list[list[int]], k: int) -> EnvEpisodes:
        """k fresh environments per row, reset: their prompts replace `prompt_ids`."""
        return EnvEpisodes(self, rows, k)

    def scored_by(self, fn: Verifier) -> "EnvRole":
        """The same episodes with `fn` scoring the final turn (eval.reward), for an environment that takes a
        `reward`; ValueError for one that scores its episodes itself."""
        if self.env_cls is None or "reward" not in inspect.signature(self.env_cls).parameters:
            raise ValueError(f"environment {self.name!r} scores its episodes itself (its constructor takes no "
                             "`reward`), so eval.reward cannot score them: leave eval.reward unset, or give the "
                             "environment a `reward` parameter that scores its final turn")
        options = {**self.options, "reward": fn}
        env_cls = self.env_cls
        return dataclasses.replace(self, make=lambda: env_cls(**options), fn=fn, options=options,
                                   budget_warned=False)
