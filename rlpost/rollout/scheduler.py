"""Continuous batching for the native engines: one scheduler, one model runner per model family
(native.py: gpt_mini; hf_native.py: Hugging Face Llama / Qwen2).

A runner knows its model and nothing about scheduling:

    ctx = runner.prepare(S)                                  # per-call state (weights, RoPE table), S columns
    kv = runner.new_cache(rows, S)                           # zeros [2, n_layer, rows, H_kv, S, head_dim]
    x = runner.forward(ctx, ids, pos, kv, cols, end, mask, shared)   # final hidden states [L, t, C]
    logits = runner.logits(ctx, x[:, -1])                            # [L, V]

`forward` runs tokens ids [L, t] at positions pos [L, t], writes their keys/values into kv (`write_kv`:
at columns cols .. cols+t-1 when cols is an int, at column cols[r] of row r when it is a tensor) and
attends to columns :end under mask (bool [L, 1, t, end], True = attend; None = every column), and to
each row's prompt in the shared prompt table when `shared` is given (`attend`, decode steps only).

The scheduler (`generate`) owns everything else:

1. Sequences. Prompt i's K samples are sequences i*K .. i*K+K-1, WAITING in that order. At most
   `params.max_num_seqs` of them RUN at once (0: all), each in one row of a preallocated KV cache laid out
   as [left-padded prompt | response]: the prompt ends at column P (the longest prompt), response token t
   sits at column P + t.
2. Prefix sharing. A prompt is prefilled when its first sample is admitted; its KV and last logits are
   kept until its last sample is admitted, so its K samples share one prefill. Prompts of at least
   `shared_attention_min` columns go further: their KV stays in one table [2, n_layer, N, H, P, D] for
   the whole call, each row's cache holds only its response, and a decode step reads each prompt once
   for all its samples (`attend`). That cuts the prompt's memory and its per-step reads K-fold, which
   is what long prompts need; short ones are faster copied into their rows (one SDPA call per layer).
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlpost.batch import Batch
from rlpost.rollout.engine import SamplingParams
from rlpost.rollout.sampling import StopStrings, sample_next


def write_kv(kc, vc, k, v, cols, end: int):
    """Write keys / values k, v [L, H, t, D] into the cache kc, vc [L, H, S, D]; return its first `end` columns."""
    if isinstance(cols, int):                      # every row at the same columns
        kc[:, :, cols:cols + k.shape[2]] = k
        vc[:, :, cols:cols + v.shape[2]] = v
    else:                                          # one token per row, each at its own column; unlike the
        rows = torch.arange(len(cols), device=cols.device)  # slice copy above, an index put does not cast
        kc[rows, :, cols] = k[:, :, 0].to(kc.dtype)         # (fp32 keys after RoPE, a bf16 cache)
        vc[rows, :, cols] = v[:, :, 0].to(vc.dtype)
    return kc[:, :, :end], vc[:, :, :end]


@dataclass
class SharedPrompts:
    """What a decode step needs to read each row's prompt from the call's prompt table instead of the row:
    row r's prompt KV is table[:, layer, group[r]], and it is sample slot[r] < k of that prompt."""

    table: torch.Tensor          # [2, n_layer, G, H_kv, P, D]: the prompts, left-padded to P columns
    group: torch.Tensor          # [L]
    slot: torch.Tensor           # [L]
    k: int
    mask: torch.Tensor | None    # [G, 1, 1, P] bool, True on real prompt columns (None: no left padding)


def attend(q, keys, values, mask, scale: float | None, shared: SharedPrompts | None = None, layer: int = 0,
           softcap: float | None = None, prompt_mask: torch.Tensor | None = None):
    """Softmax attention of q [L, H, t, D] over keys / values [L, H_kv, S, D] under mask ([L, 1, t, S] bool,
    True = attend; None = all), H a multiple of H_kv; scale None means D ** -0.5. With `softcap` the scaled
    scores become softcap * tanh(scores / softcap) before the mask (Gemma 2), as HF's eager attention does.

    With `shared` (decode steps only, t = 1) each row also attends to its prompt in the shared table,
    and keys / values hold only the responses. The prompt is read once per prompt, not once per sample:
    the queries of a prompt's k samples are stacked into one matmul against its keys, and the two parts
    meet in one softmax over [prompt | response] columns, so the result is the attention over the row's
    whole sequence. That is the K-fold cut in memory traffic that long prompts need. `prompt_mask`
    ([L, 1, 1, P] bool) further limits which prompt columns each row sees (a sliding window).
    """
    L, H, t, D = q.shape
    Hkv = keys.shape[1]
    cap = (lambda s: s) if softcap is None else (lambda s: torch.tanh(s / softcap) * softcap)
    if shared is None:
        if softcap is None:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=H != Hkv)
        # query head h reads KV head h // g (as repeat_kv): a KV head's g query heads go in one matmul,
        # so the cache is read once and never copied g-fold
        g, S = H // Hkv, keys.shape[2]
        scores = cap(torch.matmul(q.reshape(L, Hkv, g * t, D), keys.transpose(-1, -2)) * (scale or D ** -0.5))
        scores = scores.view(L, Hkv, g, t, S)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        p = scores.softmax(-1, dtype=torch.float32).to(q.dtype).view(L, Hkv, g * t, S)
        return torch.matmul(p, values).view(L, H, t, D)
    g, k, scale = H // Hkv, shared.k, D ** -0.5 if scale is None else scale
    pk, pv = shared.table[0, layer], shared.table[1, layer]                     # [G, H_kv, P, D]
    G, P = pk.shape[0], pk.shape[2]
    rows = (shared.group, shared.slot)

    def to_prompts(x):   # [L, H_kv, g, n] -> [G, H_kv, k * g, n]: each prompt's samples stacked, zeros for gaps
        out = x.new_zeros(G, k, Hkv, g, x.shape[-1])
        out[rows] = x
        return out.permute(0, 2, 1, 3, 4).reshape(G, Hkv, k * g, x.shape[-1])

    def to_rows(x):      # the inverse
        return x.view(G, Hkv, k, g, x.shape[-1]).permute(0, 2, 1, 3, 4)[rows]

    qr = q.reshape(L, Hkv, g, D) * scale
    prompt = cap(to_rows(torch.matmul(to_prompts(qr), pk.transpose(-1, -2))))     # [L, H_kv, g, P]
    if shared.mask is not None:
        prompt = prompt.masked_fill(~shared.mask[shared.group], float("-inf"))
    if prompt_mask is not None:
        prompt = prompt.masked_fill(~prompt_mask, float("-inf"))
    response = cap(torch.matmul(qr, keys.transpose(-1, -2)))                       # [L, H_kv, g, S]
    if mask is not None:
        response = response.masked_fill(~mask, float("-inf"))
    p_prompt, p_response = torch.cat([prompt, response], -1).softmax(-1).split([P, response.shape[-1]], -1)
    out = torch.matmul(p_response, values) + to_rows(torch.matmul(to_prompts(p_prompt), pv))
    return out.reshape(L, H, 1, D)


def shared_prompts(table, mask, live: torch.Tensor, k: int) -> SharedPrompts:
    """The SharedPrompts of rows running sequences `live` (sequence s is sample s % k of prompt s // k).
    The step reads the table's prompts from the lowest to the highest that has a running sample: a view,
    no copy (sequences are admitted in order, so that span is short under max_num_seqs)."""
    owner = live // k
    lo, hi = int(owner.min()), int(owner.max()) + 1
    return SharedPrompts(table[:, :, lo:hi], owner - lo, live % k, k, None if mask is None else mask[lo:hi])


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
    from its first sample's admission to its last one's; and the KV of prefixes shared across prompts.

    With `table` ([2, n_layer, N, H, P, D], shared-prompt attention) prompt i's KV goes to table[:, :, i]
    instead, where the decode steps of all its samples read it, and `take` returns no KV."""

    def __init__(self, runner, ctx, prompts: list[list[int]], k: int, block: int, table=None):
        self.runner, self.ctx, self.prompts, self.k, self.table = runner, ctx, prompts, k, table
        self.P = max(map(len, prompts))
        self.shared = shared_prefix_lengths(prompts, block)
        self.prefix_kv: dict[tuple, torch.Tensor] = {}
        self.kept: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def take(self, seqs: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """KV [2, n_layer, n, H, P, D] (None with a table) and first-token logits [n, V] of sequences `seqs`
        (taken in order)."""
        owners = [s // self.k for s in seqs]
        new = sorted(set(owners) - self.kept.keys())
        for group in ([i for i in new if not self.shared[i]], [i for i in new if self.shared[i]]):
            if group:  # prompts with and without a shared prefix start at different columns: two passes
                self._prefill(group)
        kv = None if self.table is not None else torch.stack([self.kept[i][0] for i in owners], 2)
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
            if self.table is not None:
                self.table[:, :, i] = kv[:, :, j]
            self.kept[i] = (None if self.table is not None else kv[:, :, j], logits[j])


@torch.inference_mode()
def generate(runner, tok, prompts: list[list[int]], k: int, params: SamplingParams, seed: int = 0,
             version: int = 0, prefix_block: int = 16, shared_attention_min: int = 64) -> Batch:
    """Sample k completions of every prompt with `runner`; see the module docstring. Prompts of at least
    `shared_attention_min` columns (and k > 1) use shared-prompt attention (`attend`).

    Sampling runs in inference mode, not just without grad: no tensor of the loop gets a version counter or
    autograd metadata, part of every small op's cost in a decode step (the rollout measured 12 % less CPU in
    bf16 and 7 % in fp32, benchmarks/grpo_step_vs_trl.py's shape, one thread). The Batch it returns is made of
    ordinary tensors (training reads them); what a runner keeps between calls (its fused weights) is only ever
    read by later calls."""
    N, R = len(prompts), params.max_new_tokens
    if R < 1 or params.max_num_seqs < 0:
        raise ValueError(f"max_new_tokens must be >= 1 (got {R}) and max_num_seqs >= 0, 0 meaning no cap "
                         f"(got {params.max_num_seqs})")
    B, P = N * k, max(map(len, prompts))
    cap = min(params.max_num_seqs or B, B)
    dev, S = runner.device, P + R
    ctx = runner.prepare(S)
    lens = torch.tensor([len(p) for p in prompts])                         # prompt lengths
    plen = lens.repeat_interleave(k)                                        # prompt length of each sequence
    # shared-prompt attention: the prompts stay in one table [2, n_layer, N, H, P, D] and each row's cache
    # holds its response only (column t = response token t); otherwise a row holds [prompt | response]
    shared = k > 1 and P >= shared_attention_min
    base = 0 if shared else P                                               # the cache column of token 0
    table = runner.new_cache(N, P) if shared else None
    prompt_mask = None
    if shared and int(lens.min()) < P:
        prompt_mask = (torch.arange(P, device=dev) >= P - lens.to(dev)[:, None])[:, None, None]   # [N, 1, 1, P]
    cache = PromptCache(runner, ctx, prompts, k, prefix_block, table)
    kv = runner.new_cache(cap, R if shared else S)                          # cache row r runs sequence live[r]
    U = 1 - torch.rand((B, R), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # (0, 1]
    stop_ids = torch.tensor([tok.eos_token_id, *params.stop_token_ids], device=dev)
    stop_strings = StopStrings(params.stop, tok.decode) if params.stop else None
    col = torch.arange(S, device=dev)

    tokens = torch.full((B, R), tok.pad_token_id, dtype=torch.long)
    logps = torch.zeros((B, R))
    lengths = torch.zeros(B, dtype=torch.long)                              # tokens drawn by each sequence
    stopped = torch.zeros(B, dtype=torch.bool)
    live = torch.zeros(0, dtype=torch.long)                                 # the sequence in each cache row
    logits = is_stop = None                                                 # next-token logits of rows first:
    first = admitted = 0                                                    # sequences :admitted left WAITING
    rows_changed = True                                                     # live changed since the last decode
    while admitted < B or len(live):
        # 1. waiting sequences take the free rows at the end of the batch, with their prompt's last logits
        n = min(cap - len(live), B - admitted)
        if n:
            seqs = list(range(admitted, admitted + n))
            pkv, plogits = cache.take(seqs)
            if not shared:
                kv[:, :, len(live):len(live) + n, :, :P] = pkv
            live = torch.cat([live, torch.tensor(seqs)])
            logits = plogits if logits is None else torch.cat([logits, plogits])
            admitted, rows_changed = admitted + n, True

        # 2. rows first: draw their next token; old_logp is recorded as it is drawn
        drawn = live[first:]
        step = lengths[drawn]                                               # the index of the token drawn now
        flogits, logits = logits.float(), None
        draw_from = flogits
        if params.min_new_tokens:                                           # no stop before min_new_tokens
            if is_stop is None:                                             # the stop tokens of the vocabulary
                is_stop = torch.zeros(flogits.shape[-1], dtype=torch.bool, device=dev).index_fill(0, stop_ids, True)
            early = (step < params.min_new_tokens).to(dev)[:, None]
            draw_from = flogits.masked_fill(early & is_stop, float("-inf"))
        tok_next = sample_next(draw_from, params, uniform=U[drawn, step].to(dev))
        # at temperature 1 the scaled logits are the logits (x / 1 is x, bit for bit): no division
        scaled = flogits if params.logp_temperature == 1 else flogits / params.logp_temperature
        lp = scaled.gather(-1, tok_next[:, None]).squeeze(-1) - torch.logsumexp(scaled, -1)
        tokens[drawn, step] = tok_next.cpu()
        logps[drawn, step] = lp.cpu()
        lengths[drawn] = step + 1

        # 3. finished rows leave the batch: the last rows move into their places
        hit = torch.isin(tok_next, stop_ids).cpu()                          # drew a stop token or string
        if stop_strings is not None:                                        # the drawn rows copied out once
            rows = zip(tokens[drawn].tolist(), (step + 1).tolist(), hit.tolist())
            for r, (ids, n_s, stop) in enumerate(rows):
                if not stop and n_s > params.min_new_tokens and stop_strings.hit(ids[:n_s]):
                    hit[r] = True
        done = hit | (step == R - 1)
        if first:                                                           # rows :first drew nothing this time
            done = torch.cat([torch.zeros(first, dtype=torch.bool), done])
        if bool(done.any()):
            stopped[drawn[hit]] = True
            keep = len(live) - int(done.sum())
            holes = done[:keep].nonzero().squeeze(-1)                       # finished rows inside the new batch
            movers = (~done[keep:]).nonzero().squeeze(-1) + keep            # running rows beyond it
            if len(holes):
                kv[:, :, holes.to(dev)] = kv[:, :, movers.to(dev)]
                live[holes] = live[movers]
            live, rows_changed = live[:keep], True
            if admitted < B:                                                # waiting sequences take the freed
                first = keep                                                # rows before the next decode step
                continue
        if not len(live):
            continue

        # 4. decode: feed each running row its last token, token `step` at column base + step. What depends only
        # on which sequences run is worked out when one joined or left; between such changes every row draws
        # one token per step, so the rows stay in lockstep or not, and each row's step is the one it just drew.
        if rows_changed:
            L, step = len(live), lengths[live] - 1
            feed, rows_plen, rows_kv = tokens[live, step].to(dev), plen[live].to(dev), kv[:, :, :L]
            lockstep, s0 = bool((step == step[0]).all()), int(step[0])     # lockstep: no sequence joined late
            pad = None                                                      # [L, 1, 1, S]: True from each row's
            if not shared and not bool((rows_plen == P).all()):             # first real prompt column
                pad = (col >= (P - rows_plen)[:, None])[:, None, None]
            prompts_of_rows = shared_prompts(table, prompt_mask, live.to(dev), k) if shared else None
            rows_changed = False
        else:
            feed, s0 = tok_next, s0 + 1
        if lockstep:
            at, end = base + s0, base + s0 + 1
            mask = None if pad is None else pad[..., :end]
        else:                                                               # ragged rows: each sees its own tokens
            cols = (base + step).to(dev)
            at, end = cols, int(cols.max()) + 1
            mask = (col[:end] <= cols[:, None])[:, None, None]
            mask = mask if pad is None else pad[..., :end] & mask
        x = runner.forward(ctx, feed[:, None], (rows_plen + step.to(dev))[:, None], rows_kv, at, end, mask,
                           prompts_of_rows)
        logits, first = runner.logits(ctx, x[:, -1]), 0
    with torch.inference_mode(False):  # ordinary tensors out: an inference tensor cannot be saved for a backward
        return Batch.from_sequences(prompts, k, tokens.clone(), logps.clone(), lengths.clone(), stopped.clone(),
                                    tok.pad_token_id, version)
