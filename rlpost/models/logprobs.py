"""Per-token log-probs and entropies from final hidden states, without the `[tokens, V]` tensor.

    head = LogprobHead(targets, temperature=1.0, with_entropy=True)
    logp, entropy = head(hidden, lm_head)        # hidden [B, T, H]; lm_head: the model's output nn.Linear

A plain `log_softmax(hidden @ W.T)` holds the logits, the log-softmax and (for the backward) their
gradients as whole `[tokens, V]` fp32 tensors: at V = 151,936 that is 0.6 MB per token, 2.5 GB for
4,096 tokens, several times over. `chunked_logprobs` walks the tokens in chunks of `chunk` rows instead:
for each chunk it computes the logits (the LM head's matmul), their log-sum-exp, the target's log-prob
and the entropy, and keeps only those `[tokens]` numbers. Its backward recomputes each chunk's logits
and turns the incoming gradients into the hidden states' and the head weight's gradients chunk by chunk
(the head is fused into the loop), so no pass ever holds more than one chunk's `[chunk, V]` in fp32.

The math, per token with z = logits / temperature (after soft-capping, where the model has it),
p = softmax(z), lse = logsumexp(z):
    logp_t   = z_t - lse                     d logp_t / dz = onehot(t) - p
    entropy  = lse - sum_j p_j z_j           d entropy / dz = -p * (log p + entropy)
so dL/dz = g_logp * (onehot - p) - g_ent * p * (log p + entropy), and dL/dlogits = dL/dz * dz/dlogits.

Numbers are fp32 whatever the hidden states' dtype (bf16 log-softmax loses the small probabilities that
ratios and KL terms are made of); under autocast the matmul itself runs in the autocast dtype, as the
model's own head would.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# fp32 elements of one chunk's [chunk, V] logits: 32 M (128 MB); the backward holds a few such buffers
CHUNK_ELEMENTS = 1 << 25


def default_chunk(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary: one chunk's logits are at most CHUNK_ELEMENTS fp32 numbers
    (221 tokens at V = 151,936; 1,024 at V = 32,768; the whole batch at once for a tiny vocabulary)."""
    return max(16, CHUNK_ELEMENTS // max(int(vocab_size), 1))


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The matmul's dtype: autocast's where it is on (as nn.Linear under autocast), else the input's."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _chunk_logits(h, weight, bias, softcap, temperature):
    """(z, dz/dlogits or None) of one chunk in fp32 (fp64 for fp64 inputs): logits, soft-capped, over the
    temperature. Elementwise steps run in place: at a real vocabulary each pass over [chunk, V] costs as much
    as the matmul."""
    z = h @ weight.t()
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if bias is not None:
        z += bias.to(z.dtype)
    if softcap is None:
        return (z.div_(temperature) if temperature != 1.0 else z), None
    t = z.div_(softcap).tanh_()
    dz = (1 - t * t).div_(temperature)
    return t.mul_(softcap / temperature), dz


class _ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, with_entropy, chunk):
        cdt = _compute_dtype(hidden.device.type, hidden.dtype)
        w = weight.to(cdt)
        n, fdt = hidden.shape[0], torch.promote_types(cdt, torch.float32)
        logp = torch.empty(n, dtype=fdt, device=hidden.device)
        entropy = torch.empty(n, dtype=fdt, device=hidden.device) if with_entropy else None
        lse = torch.empty(n, dtype=fdt, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                z, _ = _chunk_logits(hidden[s:e].to(cdt), w, bias, softcap, temperature)
                lse[s:e] = torch.logsumexp(z, -1)
                logp[s:e] = z.gather(-1, targets[s:e, None]).squeeze(-1) - lse[s:e]
                if with_entropy:  # lse - E_p[z]
                    p = (z - lse[s:e, None]).exp_()
                    entropy[s:e] = lse[s:e] - (p.mul_(z)).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.set_materialize_grads(False)  # an output the loss does not use (entropy for a metric) costs no pass
        ctx.cdt, ctx.temperature, ctx.softcap, ctx.chunk = cdt, temperature, softcap, chunk
        return logp, (entropy if with_entropy else torch.empty(0, device=hidden.device))

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        cdt, n, fdt, T = ctx.cdt, hidden.shape[0], lse.dtype, ctx.temperature
        w = weight.to(cdt)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_hidden = torch.zeros_like(hidden) if need_h else None
        g_weight = torch.zeros(weight.shape, dtype=fdt, device=weight.device) if need_w else None
        g_bias = torch.zeros(bias.shape, dtype=fdt, device=bias.device) if need_b else None
        use_ent = entropy is not None and g_ent is not None and g_ent.numel() > 0
        # the 1/T of dz/dlogits folded into the [tokens] gradients (no soft-cap), not a pass over [chunk, V]
        scale = 1.0 / T if ctx.softcap is None else 1.0
        g_logp = (g_logp.to(fdt) * scale) if g_logp is not None else torch.zeros_like(lse)
        g_ent = (g_ent.to(fdt) * scale) if use_ent else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, ctx.chunk):
                e = min(s + ctx.chunk, n)
                h = hidden[s:e].to(cdt)
                z, dz_dlogits = _chunk_logits(h, w, bias, ctx.softcap, T)
                logp_all = z.sub_(lse[s:e, None])               # z's buffer from here on
                p = logp_all.exp()
                g = g_logp[s:e, None]
                if use_ent:  # gz = g (onehot - p) - g_ent p (log p + H), built in logp_all's buffer
                    gz = logp_all.add_(entropy[s:e, None]).mul_(p).mul_(-g_ent[s:e, None]).sub_(p.mul_(g))
                else:
                    gz = p.mul_(-g)
                gz.scatter_add_(-1, targets[s:e, None], g)
                g_logits = gz if dz_dlogits is None else gz.mul_(dz_dlogits)
                g_logits = g_logits.to(cdt)
                if need_h:
                    g_hidden[s:e] = (g_logits @ w).to(hidden.dtype)
                if need_w:
                    g_weight.addmm_(g_logits.t().to(fdt), h.to(fdt)) if cdt == fdt else \
                        g_weight.add_((g_logits.t() @ h).to(fdt))
                if need_b:
                    g_bias += g_logits.sum(0).to(fdt)
        return (g_hidden, g_weight.to(weight.dtype) if need_w else None, g_bias.to(bias.dtype) if need_b else None,
                None, None, None, None, None)


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                     temperature: float = 1.0, with_entropy: bool = False, bias: torch.Tensor | None = None,
                     softcap: float | None = None, chunk: int | None = None):
    """log softmax(head(hidden) / temperature)[targets] and (with `with_entropy`) the entropies, each shaped
    like `targets`, fp32, with gradients to `hidden`, `weight` and `bias`; `hidden` is [..., H] with the
    leading dims of `targets`. head(h) = softcap * tanh((h @ W.T + b) / softcap) with `softcap`, else
    h @ W.T + b. `chunk`: tokens per chunk (None: `default_chunk(V)`). Returns (logp, entropy or None)."""
    if not temperature > 0:
        raise ValueError(f"chunked_logprobs: temperature must be > 0, got {temperature}")
    chunk = default_chunk(weight.shape[0]) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunked_logprobs: chunk must be >= 1 token, got {chunk}")
    shape = targets.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    logp, entropy = _ChunkedHead.apply(flat_h, weight, bias, targets.reshape(-1), float(temperature),
                                       None if softcap is None else float(softcap), with_entropy, chunk)
    return logp.view(shape), (entropy.view(shape) if with_entropy else None)


class LogprobHead:
    """What a model's forward computes instead of logits when given `head=`: the log-probs (and entropies)
    of `targets` from the final hidden states, chunked (`chunked_logprobs`). `targets` [B, T-1] are the
    next tokens of columns 0..T-2, so the head reads `hidden[:, :-1]` (all of it with `shifted=False`).
    Called inside the model's forward so that a sharded (FSDP2) head weight is gathered for it."""

    def __init__(self, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                 chunk: int | None = None, shifted: bool = True):
        self.targets, self.temperature, self.with_entropy = targets, temperature, with_entropy
        self.chunk, self.shifted = chunk, shifted

    def __call__(self, hidden: torch.Tensor, lm_head: nn.Module, softcap: float | None = None):
        h = hidden[:, :-1] if self.shifted else hidden
        return chunked_logprobs(h, lm_head.weight, self.targets, temperature=self.temperature,
                                with_entropy=self.with_entropy, bias=getattr(lm_head, "bias", None),
                                softcap=softcap, chunk=self.chunk)
