"""The data contract: one batch of trajectories travels between every role.

Tensors are [B, T] (B = prompts x K samples, T = padded length) or [B] per sequence.
Layout of a row: the prompt is left-padded, the response follows it and is right-padded,

    [pad pad p0 p1 p2 | r0 r1 r2 eos pad]
     attention_mask  0 0 1 1 1   1 1 1 1   0
     response_mask   0 0 0 0 0   1 1 1 1   0

so every response starts in the same column. Per-token quantities (`old_logp`, `ref_logp`,
`advantages`, `values`) are aligned with `input_ids`: entry [b, t] belongs to token
input_ids[b, t] (the log-prob of that token given everything before it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

Tensor = torch.Tensor

# name -> "BT" (per token) or "B" (per sequence); `rewards` may be either.
_FIELDS = {
    "input_ids": "BT",
    "attention_mask": "BT",
    "response_mask": "BT",
    "old_logp": "BT",
    "ref_logp": "BT",
    "rewards": "B|BT",
    "advantages": "BT",
    "values": "BT",
    "group_ids": "B",
    "policy_version": "B",
    # Beyond the data contract (docs/architecture.md): written by algorithms or the trainer, read by losses.
    "returns": "BT",      # value targets (PPO: GAE advantage + old value)
    # the behaviour log-probs exactly as the engine sampled them; set under an importance-sampling correction
    # (algorithms/correction.py) or by an engine whose log-probs are a truncated distribution's (vLLM with
    # top-k / top-p); the controller then makes old_logp the proximal policy's (the trainer's)
    "rollout_logp": "BT",
    "entropy": "BT",      # set by the trainer on each micro-batch: policy entropy per token, with grad
    "new_values": "BT",   # set by the trainer on each micro-batch: current critic values, with grad
}


@dataclass
class Batch:
    """Trajectories as tensors, with the field names of the data contract (docs/architecture.md).

    Build one from keyword tensors: ``Batch(input_ids=..., attention_mask=..., response_mask=...)``.
    Shapes are checked on construction; a mismatch names the field.

    `meta` carries per-sequence Python values (prompt text, completion text, finish reason,
    the gold answer); each list has length B. `global_tokens` / `global_seqs` are set when a
    batch is split into micro-batches, so a loss normalised by them sums over micro-batches to
    exactly the loss of the whole batch (gradient accumulation equals one large batch).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    values: Tensor | None = None
    group_ids: Tensor | None = None
    policy_version: Tensor | None = None
    returns: Tensor | None = None
    rollout_logp: Tensor | None = None
    entropy: Tensor | None = None
    new_values: Tensor | None = None
    meta: dict[str, list[Any]] = field(default_factory=dict)
    global_tokens: float | None = None
    global_seqs: float | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError(f"Batch.input_ids must be [B, T], got shape {tuple(self.input_ids.shape)}")
        B, T = self.input_ids.shape
        for name, kind in _FIELDS.items():
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Batch.{name} must be a torch.Tensor, got {type(t).__name__}")
            ok = (t.shape == (B, T) and "BT" in kind) or (t.shape == (B,) and kind.startswith("B") and kind != "BT")
            if not ok:
                want = {"BT": f"[{B}, {T}]", "B": f"[{B}]", "B|BT": f"[{B}] or [{B}, {T}]"}[kind]
                raise ValueError(f"Batch.{name} has shape {list(t.shape)}, expected {want}")
        for key, values in self.meta.items():
            if len(values) != B:
                raise ValueError(f"Batch.meta[{key!r}] has {len(values)} entries, expected {B}")

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def replace(self, **changes: Any) -> "Batch":
        """A new Batch with some fields replaced (tensors are shared, not copied)."""
        return dataclasses.replace(self, **changes)

    def tensors(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in _FIELDS if getattr(self, n) is not None}

    def to(self, device: torch.device | str) -> "Batch":
        return self.replace(**{n: t.to(device) for n, t in self.tensors().items()})

    def select(self, index: Tensor | list[int] | slice) -> "Batch":
        """Rows `index` of every tensor and every meta list."""
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        else:
            rows = index.tolist() if isinstance(index, Tensor) else list(index)
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        tensors = {n: t.index_select(0, idx.to(t.device)) for n, t in self.tensors().items()}
        meta = {k: [v[i] for i in rows] for k, v in self.meta.items()}
        return Batch(**tensors, meta=meta, global_tokens=self.global_tokens, global_seqs=self.global_seqs)

    def micro_batches(self, size: int | None) -> Iterator["Batch"]:
        """Split into chunks of `size` rows that remember the whole batch's token and sequence counts."""
        size = size or len(self)
        tokens = float(self.global_tokens if self.global_tokens is not None else self.response_mask.sum().item())
        seqs = float(self.global_seqs if self.global_seqs is not None else len(self))
        for start in range(0, len(self), size):
            mb = self.select(slice(start, start + size))
            mb.global_tokens, mb.global_seqs = tokens, seqs
            yield mb

    @property
    def prompt_width(self) -> int:
        """Columns before the first response column (every response starts there)."""
        cols = self.response_mask.any(0).nonzero()
        return int(cols[0]) if len(cols) else self.input_ids.shape[1]

    @staticmethod
    def concat(batches: list["Batch"]) -> "Batch":
        """Stack batches row-wise, re-aligning them: prompts are left-padded to the widest prompt and
        responses right-padded to the longest, so responses still start in one column. Padding is
        masked (attention_mask = response_mask = 0) and holds token id 0."""
        P = max(b.prompt_width for b in batches)
        R = max(b.input_ids.shape[1] - b.prompt_width for b in batches)
        parts: dict[str, list[Tensor]] = {n: [] for n in batches[0].tensors()}
        for b in batches:
            left, right = P - b.prompt_width, R - (b.input_ids.shape[1] - b.prompt_width)
            for n in parts:
                t = getattr(b, n)
                if t is None:
                    raise ValueError(f"Batch.concat: field {n} is missing in one of the batches")
                parts[n].append(torch.nn.functional.pad(t, (left, right)) if _FIELDS[n] == "BT" or
                                (n == "rewards" and t.dim() == 2) else t)
        meta = {k: [v for b in batches for v in b.meta[k]] for k in batches[0].meta}
        return Batch(**{n: torch.cat(ts) for n, ts in parts.items()}, meta=meta)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_sequences(cls, prompts: list[list[int]], k: int, tokens: Tensor, logps: Tensor, lengths: Tensor,
                       stopped: Tensor, pad_id: int, version: int) -> "Batch":
        """What an engine returns: `k` samples of each prompt as one batch, prompts left-padded and responses
        right-padded. prompts: N token-id lists; tokens / logps: [N*k, R] (sample j of prompt i is row i*k + j);
        lengths / stopped: [N*k] (tokens past a length are padding; stopped: ended on eos or a stop string,
        else ran out of length, recorded in meta["finish_reason"]). `version` is the weights' policy_version."""
        N, P = len(prompts), max(len(p) for p in prompts)
        prompt_ids = torch.full((N, P), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((N, P), dtype=torch.long)
        for i, p in enumerate(prompts):
            prompt_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            prompt_mask[i, P - len(p):] = 1
        rows = torch.arange(N).repeat_interleave(k)
        R = max(int(lengths.max()), 1)
        resp_mask = (torch.arange(R)[None, :] < lengths[:, None]).long()       # (B, R)
        resp_ids = torch.where(resp_mask.bool(), tokens[:, :R], torch.full_like(tokens[:, :R], pad_id))
        B = N * k
        return cls(
            input_ids=torch.cat([prompt_ids[rows], resp_ids], 1),
            attention_mask=torch.cat([prompt_mask[rows], resp_mask], 1),
            response_mask=torch.cat([torch.zeros((B, P), dtype=torch.long), resp_mask], 1),
            old_logp=torch.cat([torch.zeros((B, P)), logps[:, :R].float() * resp_mask], 1),
            group_ids=rows.clone(),
            policy_version=torch.full((B,), version, dtype=torch.long),
            meta={"finish_reason": ["stop" if s else "length" for s in stopped.tolist()]},
        )

    @classmethod
    def for_sft(cls, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                trained: list[list[int]] | None = None) -> "Batch":
        """Prompt + completion rows for a supervised loss (SFT, a scorer's input); the loss reads response_mask,
        which is `trained` where given (0/1 per completion token: a multi-turn demonstration's environment tokens
        are in the sequence but not imitated), else every completion token. No log-probs, no policy version."""
        R = max(len(c) for c in completions)
        tokens = torch.full((len(prompts), R), pad_id, dtype=torch.long)
        for i, c in enumerate(completions):
            tokens[i, :len(c)] = torch.tensor(c)
        lengths = torch.tensor([len(c) for c in completions])
        batch = cls.from_sequences(prompts, 1, tokens, torch.zeros(tokens.shape), lengths,
                                   torch.ones(len(prompts), dtype=torch.bool), pad_id, version=0)
        batch = batch.replace(old_logp=None, policy_version=None, meta={})
        if trained is not None:
            mask = torch.zeros_like(batch.response_mask)
            P = batch.prompt_width
            for i, t in enumerate(trained):
                mask[i, P:P + len(t)] = torch.tensor(t)
            batch = batch.replace(response_mask=mask)
        return batch
