"""Continuous batching for the native engines: one scheduler, one model runner per model family
(native.py: gpt_mini; hf_native.py: Hugging Face Llama / Qwen2).

A runner knows its model and nothing about scheduling:

    ctx = runner.prepare(S)                                  # per-call state (weights, RoPE table), S columns
    kv = runner.new_cache(rows, S)                           # zeros [2, n_layer, rows, H_kv, S, head_dim]
    x = runner.forward(ctx, ids, pos, kv, cols, end, mask)   # final hidden states [L, t, C]
    logits = runner.logits(ctx, x[:, -1])                    # [L, V]

`forward` runs tokens ids [L, t] at positions pos [L, t], writes their keys/values into kv (`write_kv`:
at columns cols .. cols+t-1 when cols is an int, at column cols[r] of row r when it is a tensor) and
attends to columns :end under mask (bool [L, 1, t, end], True = attend; None = every column).

The scheduler (`generate`) owns everything else:

1. Sequences. Prompt i's K samples are sequences i*K .. i*K+K-1, WAITING in that order. At most
   `params.max_num_seqs` of them RUN at once (0: all), each in one row of a preallocated KV cache laid out
   as [left-padded prompt | response]: the prompt ends at column P (the longest prompt), response token t
   sits at column P + t.
2. Prefix sharing. A prompt is prefilled when its first sample is admitted; its KV and last logits are
   kept until its last sample is admitted, so its K samples share one prefill.
3. Prefix cache. A block-aligned (`prefix_block` tokens) leading prefix that two or more prompts of the
   call share (a system prompt) is prefilled once; the prompts that start with it copy its KV and
   prefill only the rest.
4. Decode. Each step feeds every running row its last token. A row that finishes (eos, a stop token, a
   stop string, max_new_tokens) leaves at once: the last row moves into its place, and waiting
   sequences are admitted at the end of the batch and draw their first token before the next decode
   step, so the batch stays full while any sequence waits. No compute on padding or finished rows:
   a sequence of n tokens is fed to the decoder n - 1 times.
5. Sampling. Sequence s draws its token t with the uniform U[s, t] of one table drawn from
   `torch.Generator().manual_seed(seed)` (inverse-CDF sampling): a sample depends on (seed, s, t) and the
   model only, never on which rows share a forward pass, so a capped run draws what an uncapped one
   draws (up to float rounding that depends on the batch size, which could only flip a draw landing
   within ~1e-6 of a CDF boundary). old_logp = log softmax(logits / temperature) at the drawn token.
"""

from __future__ import annotations

from collections import Counter

import torch

from rlpost.batch import Batch
from rlpost.rollout import SamplingParams, StopStrings, assemble, sample_next


def write_kv(kc, vc, k, v, cols, end: int):
    """Write keys / values k, v [L, H, t, D] into the cache kc, vc [L, H, S, D]; return its first `end` columns."""
    if isinstance(cols, int):                      # every row at the same columns
        kc[:, :, cols:cols + k.shape[2]] = k
        vc[:, :, cols:cols + v.shape[2]] = v
    else:                                          # one token per row, each at its own column
        rows = torch.arange(len(cols), device=cols.device)
        kc[rows, :, cols] = k[:, :, 0]
        vc[rows, :, cols] = v[:, :, 0]
    return kc[:, :, :end], vc[:, :, :end]


def shared_prefix_lengths(prompts: list[list[int]], block: int) -> list[int]:
    """For each prompt, the longest multiple of `block` tokens, shorter than the prompt, that another prompt
    of the list starts with too (0: none, or block <= 0)."""
    if block <= 0:
        return [0] * len(prompts)
    cuts = lambda p: range(block, len(p), block)  # noqa: E731
    starts = Counter(tuple(p[:j]) for p in prompts for j in cuts(p))
    return [max((j for j in cuts(p) if starts[tuple(p[:j])] > 1), default=0) for p in prompts]


def prefill(runner, ctx, seqs: list[list[int]], width: int, prefixes=None, want_logits: bool = True):
    """Forward the token lists `seqs`, left-padded to `width`, in one pass.

    prefixes[i] (or None): KV [2, n_layer, H, m, D] of seqs[i]'s first m tokens, copied instead of
    recomputed: the pass starts at the first column some row still has to compute.
    Returns the cache [2, n_layer, n, H, width, D] and the logits after each row's last token [n, V].
    """
    n, dev = len(seqs), runner.device
    lo = torch.tensor([width - len(s) for s in seqs])             # first real column of each row
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])  # pad columns hold token 0, masked
    col = torch.arange(width)
    pos = (col[None] - lo[:, None]).clamp(min=0)
    kv = runner.new_cache(n, width)
    start = 0
    if prefixes is not None:
        done = [int(lo[i]) + (0 if pre is None else pre.shape[-2]) for i, pre in enumerate(prefixes)]
        for i, pre in enumerate(prefixes):
            if pre is not None:
                kv[:, :, i, :, int(lo[i]):done[i]] = pre
        start = min(done)
    q = col[start:, None]                                         # query columns (t, 1)
    mask = ((col <= q) & (col >= lo[:, None, None])) | (col == q)  # (n, t, width): causal over real keys;
    x = runner.forward(ctx, ids[:, start:].to(dev), pos[:, start:].to(dev), kv, start, width,  # a pad query
                       mask[:, None].to(dev))                                                # sees itself
    return kv, runner.logits(ctx, x[:, -1]) if want_logits else None


class PromptCache:
    """The prefilled prompts of one call: a prompt's KV [2, n_layer, H, P, D] and last logits [V] are kept
    from its first sample's admission to its last one's; and the KV of prefixes shared across prompts."""

    def __init__(self, runner, ctx, prompts: list[list[int]], k: int, block: int):
        self.runner, self.ctx, self.prompts, self.k = runner, ctx, prompts, k
        self.P = max(map(len, prompts))
        self.shared = shared_prefix_lengths(prompts, block)
        self.prefix_kv: dict[tuple, torch.Tensor] = {}
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def take(self, seqs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """KV [2, n_layer, n, H, P, D] and first-token logits [n, V] of sequences `seqs` (taken in order)."""
        owners = [s // self.k for s in seqs]
        new = sorted(set(owners) - self.kept.keys())
        for group in ([i for i in new if not self.shared[i]], [i for i in new if self.shared[i]]):
            if group:  # prompts with and without a shared prefix start at different columns: two passes
                self._prefill(group)
        kv = torch.stack([self.kept[i][0] for i in owners], 2)
        logits = torch.stack([self.kept[i][1] for i in owners])
        for s in seqs:
            if s % self.k == self.k - 1:  # the prompt's last sample: nobody needs its KV any more
                del self.kept[s // self.k]
        return kv, logits

    def _prefill(self, group: list[int]) -> None:
        seqs = [self.prompts[i] for i in group]
        heads = [tuple(s[:self.shared[i]]) for i, s in zip(group, seqs)]
        missing = sorted({h for h in heads if h} - self.prefix_kv.keys())
        if missing:  # each shared prefix once, kept for every later prompt of the call that starts with it
            kv, _ = prefill(self.runner, self.ctx, [list(h) for h in missing], max(map(len, missing)),
                            want_logits=False)
            for j, h in enumerate(missing):
                self.prefix_kv[h] = kv[:, :, j, :, kv.shape[4] - len(h):]
        prefixes = [self.prefix_kv[h] if h else None for h in heads]
        kv, logits = prefill(self.runner, self.ctx, seqs, self.P, prefixes)
        for j, i in enumerate(group):
            self.kept[i] = (kv[:, :, j], logits[j])


@torch.no_grad()
def generate(runner, tok, prompts: list[list[int]], k: int, params: SamplingParams, seed: int = 0,
             version: int = 0, prefix_block: int = 16) -> Batch:
    """Sample k completions of every prompt with `runner`; see the module docstring."""
    N, R = len(prompts), params.max_new_tokens
    if R < 1 or params.max_num_seqs < 0:
        raise ValueError(f"max_new_tokens must be >= 1 (got {R}) and max_num_seqs >= 0, 0 meaning no cap "
                         f"(got {params.max_num_seqs})")
    B, P = N * k, max(map(len, prompts))
    cap = min(params.max_num_seqs or B, B)
    dev, S = runner.device, P + R
    ctx = runner.prepare(S)
    cache = PromptCache(runner, ctx, prompts, k, prefix_block)
    kv = runner.new_cache(cap, S)                                           # cache row r runs sequence live[r]
    U = 1 - torch.rand((B, R), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # (0, 1]
    plen = torch.tensor([len(p) for p in prompts]).repeat_interleave(k)     # prompt length of each sequence
    stop_ids = torch.tensor([tok.eos_token_id, *params.stop_token_ids], device=dev)
    stop_strings = StopStrings(params.stop, tok.decode) if params.stop else None
    col = torch.arange(S, device=dev)

    tokens = torch.full((B, R), tok.pad_token_id, dtype=torch.long)
    logps = torch.zeros((B, R))
    lengths = torch.zeros(B, dtype=torch.long)                              # tokens drawn by each sequence
    stopped = torch.zeros(B, dtype=torch.bool)
    live = torch.zeros(0, dtype=torch.long)                                 # the sequence in each cache row
    logits = None                                                           # next-token logits of rows first:
    first = admitted = 0                                                    # sequences :admitted left WAITING
    while admitted < B or len(live):
        # 1. waiting sequences take the free rows at the end of the batch, with their prompt's last logits
        n = min(cap - len(live), B - admitted)
        if n:
            seqs = list(range(admitted, admitted + n))
            pkv, plogits = cache.take(seqs)
            kv[:, :, len(live):len(live) + n, :, :P] = pkv
            live = torch.cat([live, torch.tensor(seqs)])
            logits = plogits if logits is None else torch.cat([logits, plogits])
            admitted += n

        # 2. rows first: draw their next token; old_logp is recorded as it is drawn
        drawn = live[first:]
        step = lengths[drawn]
        flogits, logits = logits.float(), None
        draw_from = flogits
        if params.min_new_tokens:                                           # no stop before min_new_tokens
            early = (step < params.min_new_tokens).to(dev)[:, None]
            is_stop = torch.zeros(flogits.shape[-1], dtype=torch.bool, device=dev).index_fill(0, stop_ids, True)
            draw_from = flogits.masked_fill(early & is_stop, float("-inf"))
        tok_next = sample_next(draw_from, params, uniform=U[drawn, step].to(dev))
        scaled = flogits / params.logp_temperature
        lp = scaled.gather(-1, tok_next[:, None]).squeeze(-1) - torch.logsumexp(scaled, -1)
        tokens[drawn, step] = tok_next.cpu()
        logps[drawn, step] = lp.cpu()
        lengths[drawn] += 1

        # 3. finished rows leave the batch: the last rows move into their places
        done = torch.isin(tok_next, stop_ids).cpu()
        if stop_strings is not None:
            for r, s in enumerate(drawn.tolist()):
                n_s = int(lengths[s])
                if not done[r] and n_s > params.min_new_tokens and stop_strings.hit(tokens[s, :n_s].tolist()):
                    done[r] = True
        stopped[drawn[done]] = True
        done = torch.cat([torch.zeros(first, dtype=torch.bool), done | (lengths[drawn] == R)])
        if bool(done.any()):
            keep = len(live) - int(done.sum())
            holes = done[:keep].nonzero().squeeze(-1)                       # finished rows inside the new batch
            movers = (~done[keep:]).nonzero().squeeze(-1) + keep            # running rows beyond it
            if len(holes):
                kv[:, :, holes.to(dev)] = kv[:, :, movers.to(dev)]
                live[holes] = live[movers]
            live = live[:keep]
            if admitted < B:                                                # waiting sequences take the freed
                first = keep                                                # rows before the next decode step
                continue
        if not len(live):
            continue

        # 4. decode: feed each running row its last token
        L, step = len(live), lengths[live] - 1                              # token `step` sits at column P + step
        feed = tokens[live, step].to(dev)
        cols, pos = (P + step).to(dev), (plen[live] + step).to(dev)
        lockstep = bool((step == step[0]).all())                            # no sequence joined late
        at, end = (P + int(step[0]), P + int(step[0]) + 1) if lockstep else (cols, int(cols.max()) + 1)
        mask = None
        if not (lockstep and bool((plen[live] == P).all())):                # left padding, or ragged rows
            mask = ((col[:end] >= (P - plen[live]).to(dev)[:, None]) & (col[:end] <= cols[:, None]))[:, None, None]
        x = runner.forward(ctx, feed[:, None], pos[:, None], kv[:, :, :L], at, end, mask)
        logits, first = runner.logits(ctx, x[:, -1]), 0
    return assemble(prompts, k, tokens, logps, lengths, stopped, tok.pad_token_id, version)
