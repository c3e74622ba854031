"""Sequence packing: the real tokens of a padded Batch laid end to end, and the way back.

A Batch is [B, T], every row padded to the longest; on long-tailed response lengths most of the [B, T]
positions a forward computes are padding. `pack(batch, max_tokens)` drops the padding: each sequence's
real tokens (attention_mask = 1) go into rows of width W (the longest sequence), several sequences per
row, first-fit in decreasing length, and the rows are grouped into micro-batches of at most `max_tokens`
positions (R * W <= max_tokens; one row goes alone if it is wider than that). Within a row, position ids
restart at 0 for every sequence and each token attends only to the earlier tokens of its own sequence
(block-diagonal causal attention), so every sequence computes exactly what it computes alone, and what it
computes padded.

Rows of width W rather than one row of all tokens: the attention kernels available everywhere (SDPA
with a mask, eager) compute a dense [W, W] block per row, so one long row of L tokens would cost L^2
where the padded batch costs B * T^2. Rows of the longest sequence's width cost what the positions cost.
The rows of a micro-batch run as a few `segments`, each trimmed to its fullest row, so that the part-filled
last rows do not compute a whole row of padding each (a row joins a segment while it is >= 95 % full).

Each `Packed` knows where its tokens came from, and `unpack` scatters a per-token quantity computed on
the packed rows ([R, W]: log-probs, entropies, values) back into the padded layout of its rows ([n, T],
zero off the real tokens), with gradients: algorithms and losses read [B, T] tensors as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from rlpost.batch import Batch


@dataclass
class Packed:
    """One packed micro-batch: the sequences of batch rows `rows`, in R rows of W positions.

    - `input_ids`, `position_ids` [R, W]: tokens and their positions (restarting at 0 per sequence; the
      unused tail of a row holds token 0 at positions 0, 1, ... of its own).
    - `seq_ids` [R, W]: 1, 2, ... for the sequences of a row, 0 on its unused tail: gpt_mini's attention
      mask (a query sees the keys of its own sequence).
    - `src` [R * W]: for each packed position, its index in the flattened [n, T] padded layout of `rows`
      (row i of the micro-batch is batch row rows[i]); -1 on the unused tail.
    - `first` [R, W]: True at the first token of each sequence, whose "previous token" is another sequence's.
    - `segments`: (first row, end row, width) of the forwards that run the rows (rows in decreasing fill);
      a forward computes columns :width of its rows, the rest is padding it skips.
    """

    rows: torch.Tensor
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    seq_ids: torch.Tensor
    src: torch.Tensor
    first: torch.Tensor
    width: int  # T of the padded layout that `unpack` writes
    segments: list[tuple[int, int, int]]

    @property
    def positions(self) -> int:
        """Token positions the forwards of this micro-batch compute (its segments' rows x widths)."""
        return sum((end - start) * w for start, end, w in self.segments)

    def run(self, fn, *inputs: torch.Tensor) -> torch.Tensor:
        """fn(*inputs restricted to each segment's rows and columns) -> [r, w, ...], reassembled as [R, W, ...]
        (zero beyond each segment's width). `inputs` are [R, W] tensors such as input_ids and position_ids."""
        W = self.input_ids.shape[1]
        parts = []
        for start, end, w in self.segments:
            out = fn(*(x[start:end, :w] if x is not None else None for x in inputs))
            pad = [0, 0] * (out.dim() - 2) + [0, W - w]
            parts.append(torch.nn.functional.pad(out, pad))
        return torch.cat(parts)

    @property
    def real_tokens(self) -> int:
        return int((self.src >= 0).sum())

    def unpack(self, values: torch.Tensor, shifted: bool = True) -> torch.Tensor:
        """[R, W] per-token values -> [n, T] in the padded layout of `rows`, zero elsewhere (differentiable).

        `shifted`: the values at a sequence's first token are dropped (set to 0) because they were read off
        the previous position, which belongs to another sequence (a log-prob of token t is computed from
        position t - 1; so is a value V(prefix before t))."""
        keep = self.src >= 0
        if shifted:
            keep &= ~self.first.reshape(-1)
        flat = values.reshape(-1)[keep]
        out = values.new_zeros(len(self.rows) * self.width)
        return out.index_copy(0, self.src[keep], flat).view(len(self.rows), self.width)


def _lengths_and_positions(batch: Batch):
    mask = batch.attention_mask.bool()
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError(f"pack: row {int((lengths == 0).nonzero()[0])} has no real token (attention_mask all 0)")
    return mask, lengths


def pack(batch: Batch, max_tokens: int | None = None) -> list[Packed]:
    """The real tokens of `batch` in packed micro-batches of at most `max_tokens` positions (None: one).

    Sequences go, longest first, into the first row with room (rows are as wide as the longest sequence);
    rows are then grouped in order into micro-batches of at most `max_tokens` positions. Each micro-batch's
    width is trimmed to its fullest row. Every batch row is in exactly one micro-batch."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"pack: max_tokens must be >= 1 or None, got {max_tokens}")
    mask, lengths = _lengths_and_positions(batch)
    lens = lengths.tolist()
    W = max(lens)
    order = sorted(range(len(lens)), key=lambda i: -lens[i])  # stable: equal lengths keep batch order
    bins: list[list[int]] = []
    fill: list[int] = []  # tokens in each bin
    for i in order:  # first fit, decreasing
        for b, used in enumerate(fill):
            if used + lens[i] <= W:
                bins[b].append(i)
                fill[b] += lens[i]
                break
        else:
            bins.append([i])
            fill.append(lens[i])
    groups: list[list[int]] = []  # bin indices per micro-batch
    for b in range(len(bins)):
        width = max([fill[c] for c in groups[-1]] + [fill[b]]) if groups else fill[b]
        if groups and (max_tokens is None or (len(groups[-1]) + 1) * width <= max_tokens):
            groups[-1].append(b)
        else:
            groups.append([b])
    out = []
    for g in groups:
        g = sorted(g, key=lambda b: -fill[b])  # stable: fullest rows first, so that segments are few
        out.append(_build(batch, mask, lens, [bins[b] for b in g], [fill[b] for b in g]))
    return out


def _segments(fills: list[int], full: float = 0.95) -> list[tuple[int, int, int]]:
    """(start, end, width) runs of rows (fills in decreasing order): a row joins the current run while it is
    at least `full` of the run's width, else it starts a run of its own width."""
    runs: list[tuple[int, int, int]] = []
    for r, f in enumerate(fills):
        if runs and f >= full * runs[-1][2]:
            runs[-1] = (runs[-1][0], r + 1, runs[-1][2])
        else:
            runs.append((r, r + 1, f))
    return runs


def _build(batch: Batch, mask: torch.Tensor, lens: list[int], bins: list[list[int]], fills: list[int]) -> Packed:
    device, W = batch.input_ids.device, max(fills)
    T = batch.input_ids.shape[1]
    rows = [i for b in bins for i in b]
    local = {r: n for n, r in enumerate(rows)}
    ids = torch.zeros(len(bins), W, dtype=batch.input_ids.dtype, device=device)
    pos = torch.zeros(len(bins), W, dtype=torch.long, device=device)
    seq = torch.zeros(len(bins), W, dtype=torch.long, device=device)
    src = torch.full((len(bins), W), -1, dtype=torch.long, device=device)
    first = torch.zeros(len(bins), W, dtype=torch.bool, device=device)
    for r, b in enumerate(bins):
        at = 0
        for s, i in enumerate(b):
            cols = mask[i].nonzero().squeeze(1)  # the real columns of row i, in order
            n = lens[i]
            ids[r, at:at + n] = batch.input_ids[i, cols]
            pos[r, at:at + n] = torch.arange(n, device=device)
            seq[r, at:at + n] = s + 1
            src[r, at:at + n] = local[i] * T + cols
            first[r, at] = True
            at += n
        pos[r, at:] = torch.arange(W - at, device=device)  # the tail: a sequence of its own, never read
    return Packed(rows=torch.tensor(rows, dtype=torch.long, device=device), input_ids=ids, position_ids=pos,
                  seq_ids=seq, src=src.view(-1), first=first, width=T, segments=_segments(fills))


def shared_prompt(batch: Batch) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """How the rows of `batch` share prompts: (P, first, owner), or None when no two rows do.

    P is the first response column (the same for every row, by the Batch layout); rows whose columns :P
    (ids and attention mask) are equal share one prompt. `first` [N] is the first row of each distinct
    prompt, `owner` [B] the prompt of each row (an index into `first`). Found from the tokens
    themselves, so it holds for any batch: K samples of a prompt, a preference pair, shuffled rows.
    """
    has_response = batch.response_mask.bool().any(0)
    if not bool(has_response.any()):
        return None
    P = int(has_response.int().argmax())
    if P == 0:
        return None
    B = batch.input_ids.shape[0]
    prompts = torch.cat([batch.input_ids[:, :P], batch.attention_mask[:, :P].to(batch.input_ids.dtype)], 1)
    unique, owner = torch.unique(prompts, dim=0, return_inverse=True)
    if len(unique) == B:
        return None
    rows = torch.arange(B, device=owner.device)
    first = torch.full((len(unique),), B, device=owner.device).scatter_reduce(0, owner, rows, "amin")
    return P, first, owner


def padded_micro_batches(batch: Batch, size: int | None, max_tokens: int | None) -> list[list[int]]:
    """Row indices of the padded micro-batches: `size` rows each, and at most `max_tokens` positions
    (rows x T) each when `max_tokens` is set (at least one row per micro-batch)."""
    B, T = batch.input_ids.shape
    per = size or B
    if max_tokens is not None:
        per = min(per, max(1, max_tokens // max(T, 1)))
    return [list(range(s, min(s + per, B))) for s in range(0, B, per)]


def token_budget(batch: Batch, micro_batch_size: int | None, micro_batch_tokens: int | None) -> int | None:
    """The positions per packed micro-batch: `micro_batch_tokens`, else the positions of a padded
    micro-batch of `micro_batch_size` rows (so packing never holds more activations than padding did),
    else None (all rows in one micro-batch)."""
    if micro_batch_tokens is not None:
        return micro_batch_tokens
    if micro_batch_size is not None:
        return micro_batch_size * batch.input_ids.shape[1]
    return None


def scatter_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], B: int) -> torch.Tensor:
    """Per-row results of micro-batches [(rows, values [n, ...])] back in batch order [B, ...]."""
    rows = torch.cat([r for r, _ in parts])
    values = torch.cat([v for _, v in parts])
    out = values.new_zeros((B, *values.shape[1:]))
    return out.index_copy(0, rows.to(values.device), values)


def padded_positions(batch: Batch, plan: list[list[int]], share_prompt: bool) -> int:
    """Token positions the padded micro-batches `plan` (row indices) compute: rows x T each, with each distinct
    prompt of a micro-batch computed once when `share_prompt` (rlpost.models.token_logprobs)."""
    T, total = batch.input_ids.shape[1], 0
    for rows in plan:
        split = shared_prompt(batch.select(rows)) if share_prompt else None
        total += len(rows) * T if split is None else len(split[1]) * split[0] + len(rows) * (T - split[0])
    return total


def single_forward(plan: list[tuple[torch.Tensor, Batch, Packed | None]]) -> list:
    """`plan` (micro_batches' triples) with each packed micro-batch run as ONE forward of all its rows at its
    fullest row's width (its segments joined): a micro-batch is then one forward whether it is packed or padded
    (see `even_forwards`). The extra positions are padding, which `unpack` drops."""
    return [(rows, mb, p if p is None or len(p.segments) <= 1 else
             dataclasses.replace(p, segments=[(0, p.input_ids.shape[0], p.input_ids.shape[1])]))
            for rows, mb, p in plan]


def even_forwards(batch: Batch, plan: list[tuple[torch.Tensor, Batch, Packed | None]],
                  agree: Callable[[float], float] | None = None) -> list[tuple[torch.Tensor, Batch, Packed | None,
                                                                               bool]]:
    """The forwards a role runs for `plan` (micro_batches' triples of `batch`): (rows, micro-batch, packing, real).

    Sharded (`agree`: the maximum over ranks, rlpost.distributed.reduce_max): under fsdp2 every forward
    all-gathers the blocks' shards, a collective, so every rank must run exactly as many forwards as the others or
    the run hangs; yet each rank plans its own rows (how many micro-batches, and under packing=auto whether they
    pack). So: each micro-batch is ONE forward (`single_forward`: a packed one's segment count depends on its
    rows), and a rank with fewer micro-batches than the most adds padding forwards (real=False) whose results the
    role drops: its first micro-batch again (all its fields, so a trainer can run its loss and backward at zero
    weight), or a 1-row, 2-token batch when it has no rows. One agreement per call: every rank must call this
    for the same pass. Unsharded (`agree` None): `plan` as it is, every forward real."""
    if agree is None:
        return [(rows, mb, p, True) for rows, mb, p in plan]
    out = [(rows, mb, p, True) for rows, mb, p in single_forward(plan)]
    most = int(agree(len(out)))
    if out:
        spare = out[0][:3]
    else:
        ids = torch.zeros(1, 2, dtype=torch.long, device=batch.input_ids.device)
        spare = (ids.new_zeros(0), Batch(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         response_mask=torch.zeros_like(ids)), None)
    return out + [(*spare, False)] * (most - len(out))


def micro_batches(batch: Batch, size: int | None = None, max_tokens: int | None = None,
                  packing: bool | str = False,
                  share_prompt: bool = False) -> list[tuple[torch.Tensor, Batch, Packed | None]]:
    """The micro-batches a role runs `batch` in: (their batch rows [n], those rows as a Batch, their
    packing or None).

    Each micro-batch remembers the whole batch's response-token and sequence counts (global_tokens /
    global_seqs), so losses normalised by them sum to the whole batch's loss (see Batch.micro_batches).
    Padded (`packing` False): consecutive rows, `size` at a time and at most `max_tokens` positions
    (rows x T). Packed (True): `pack(batch, token_budget(...))`, rows in the order the packing put them.
    'auto': packed when that computes fewer positions than padded (`padded_positions`, each prompt once when
    `share_prompt`: the role's model shares prompts), else padded. Long prompts with short responses are where
    padding wins: the K samples of a group share one prompt there, while each packed sequence carries its own."""
    tokens = float(batch.global_tokens if batch.global_tokens is not None else batch.response_mask.sum().item())
    seqs = float(batch.global_seqs if batch.global_seqs is not None else len(batch))
    packed = pack(batch, token_budget(batch, size, max_tokens)) if packing else None
    padded = padded_micro_batches(batch, size, max_tokens)
    if packing == "auto" and sum(p.positions for p in packed) >= padded_positions(batch, padded, share_prompt):
        packed = None
    if packed is not None:
        plans = [(p.rows, p) for p in packed]
    else:
        plans = [(torch.tensor(rows, dtype=torch.long, device=batch.input_ids.device), None) for rows in padded]
    out = []
    for rows, p in plans:
        mb = batch.select(rows)
        mb.global_tokens, mb.global_seqs = tokens, seqs
        out.append((rows, mb, p))
    return out
