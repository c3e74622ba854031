"""Scoring tokens: `token_logprobs`, the one function every role uses for per-token log-probs and entropies
(the trainer, the reference, preference training, distillation), and `trunk_hidden_states` for value heads
and reward models. A batch is scored with each distinct prompt computed once (`shared_prompt`), or packed
(rlpost.packing), and the log-probs come from the final hidden states in chunks (the chunked head below),
without the `[tokens, V]` tensor of logits.

The chunked head:

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
import torch.nn.functional as F

from rlpost.batch import Batch
from rlpost.models.gpt_mini import GPT
from rlpost.models.hf import HFCausalLM
from rlpost.models.precision import model_device
from rlpost.packing import Packed, shared_prompt
from rlpost.schema import ConfigError


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


# ---------------------------------------------------------------------------- scoring a batch's tokens


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: each row's first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _prompt_split(model: nn.Module, batch: Batch, share_prompt: bool):
    """shared_prompt(batch) when `model` can use it (see token_logprobs), else None."""
    return shared_prompt(batch) if share_prompt and getattr(model, "can_share_prompt", False) else None


def _packed_inputs(model: nn.Module, batch: Batch, packed: Packed):
    """(input_ids, attention_mask, position_ids) of a packed forward. gpt_mini reads the packing from its attention
    mask (each token's sequence number); an HF model from position ids that restart at 0 with no attention mask
    (transformers' packed-sequence convention: block-diagonal masks for sdpa / eager / flex, varlen for flash)."""
    if len(packed.rows) != len(batch) or packed.width != batch.input_ids.shape[1]:
        raise ValueError(f"this packing describes {len(packed.rows)} rows of {packed.width} columns, the batch has "
                         f"{len(batch)} of {batch.input_ids.shape[1]}: pass batch.select(packed.rows)")
    mask = None if isinstance(model, HFCausalLM) else packed.seq_ids
    return packed.input_ids, mask, packed.position_ids


def packing_refusal(model: nn.Module) -> str | None:
    """Why `model` cannot run packed rows (two sequences packed in one row must compute what each computes
    alone), or None when it can. gpt_mini can; an HF model can when its attention honours restarting position
    ids without a mask (checked on two short sequences, once per call, in eval mode without grad)."""
    if isinstance(model, GPT):
        return None
    if not isinstance(model, HFCausalLM):
        return f"packing supports gpt_mini and Hugging Face causal LMs, not {type(model).__name__}"
    device, vocab = model_device(model), model.hf.config.vocab_size
    ids = torch.randint(3, max(vocab, 4), (1, 7), generator=torch.Generator().manual_seed(0), device="cpu")
    ids = ids.to(device)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model.hidden_states(ids, None, pos).float()
            alone = torch.cat([model.hidden_states(ids[:, :3]), model.hidden_states(ids[:, 3:])], 1).float()
    finally:
        model.train(was_training)
        _reshard(model)
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    err = float((packed - alone).abs().max() / alone.abs().max().clamp(min=1e-6))
    if not err <= tol:
        impl = getattr(model.hf.config, "_attn_implementation", "?")
        return (f"{type(model.hf).__name__} with attn_implementation={impl!r} does not keep packed sequences apart "
                f"(relative difference {err:.2g} from scoring them alone); load it with an attention implementation "
                "that reads packed position ids (sdpa, eager, flex_attention, flash_attention_2)")
    return None


def _reshard(model: nn.Module) -> None:
    """An FSDP2 root keeps its parameters gathered after a forward (for the backward that follows in training):
    after a probe, shard them again, or the parameters the module lists are the gathered copies, not its shards
    (an optimizer built from them would update copies that the next forward throws away)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def check_packing(model: nn.Module) -> None:
    """Fail now, naming `trainer.packing`, when `model` cannot run packed rows (`packing_refusal`)."""
    why = packing_refusal(model)
    if why is not None:
        raise ConfigError(f"trainer.packing=true: {why}; set trainer.packing=auto (packs where the model can) or "
                          "false")


def resolve_packing(setting: bool | str, *models: nn.Module | None) -> bool | str:
    """What a role that runs `models` (None entries skipped) does with `trainer.packing`: False and True as
    given (True fails now on a model that cannot pack: `check_packing`); 'auto' stays 'auto' when every model
    can pack (rlpost.packing.micro_batches then packs the batches where that computes fewer positions), else
    False."""
    if setting not in (True, False, "auto"):
        raise ConfigError(f"trainer.packing is {setting!r}; valid values: auto, true, false")
    models = tuple(m for m in models if m is not None)
    if setting is True:
        for m in models:
            check_packing(m)
    if setting == "auto" and any(packing_refusal(m) is not None for m in models):
        return False
    return setting


def trunk_hidden_states(model: nn.Module, batch: Batch, share_prompt: bool = True,
                        packed: Packed | None = None) -> torch.Tensor:
    """The trunk's final hidden state at every position of `batch` [B, T, C] (for value heads and reward
    models), with each distinct prompt computed once as in `token_logprobs`. With `packed` (the packing of
    `batch`'s rows, rlpost.packing.pack), the hidden states of the packed rows [R, W, C] instead: the caller
    computes its per-token values on them and puts them back with `packed.unpack`."""
    if packed is not None:
        return packed.run(model.hidden_states, *_packed_inputs(model, batch, packed))
    ids, mask = batch.input_ids, batch.attention_mask
    pos = position_ids_for(mask)
    split = _prompt_split(model, batch, share_prompt)
    if split is None:
        return model.hidden_states(ids, mask, pos)
    P, first, owner = split
    prompt, response = model.forward_shared_prompt(ids, mask, pos, P, first, owner, hidden=True)
    return torch.cat([prompt[owner], response], 1)


def _score(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """log-probs of `targets` [..., n] under logits [..., n, V] / temperature, and the entropies (or None),
    in fp32 whatever the logits' dtype and whether autocast is on (bf16 log-softmax loses the small
    probabilities that ratios and KL terms are made of). The full-logits path: for models without a
    chunkable head (`output_head` None) only."""
    with torch.autocast(logits.device.type, enabled=False):
        logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
        logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
        return logp, (-(logp_all.exp() * logp_all).sum(-1) if with_entropy else None)


def chunked_head(model: nn.Module) -> tuple[nn.Module, float | None] | None:
    """(LM head, soft-cap) of a model whose log-probs can be computed in chunks from its hidden states, else
    None (see HFCausalLM.output_head)."""
    output_head = getattr(model, "output_head", None)
    return output_head() if output_head is not None else None


def token_logprobs(model: nn.Module, batch: Batch, temperature: float = 1.0, with_entropy: bool = False,
                   share_prompt: bool = True, chunk: int | None = None, packed: Packed | None = None):
    """log pi(input_ids[:, t] | input_ids[:, :t]) for every t >= 1, as [B, T] (column 0 is 0).

    Logits are divided by `temperature` first, so the trainer scores tokens under the distribution
    the rollout engine sampled from. With `with_entropy`, also returns the per-token entropy [B, T]
    of that distribution (with grad when grad is enabled, for entropy bonuses).

    Chunked head: for gpt_mini and the HF families of CHUNKED_HEADS the log-probs and entropies come from
    the final hidden states `chunk` tokens at a time (rlpost.models.logprobs; None: sized from the
    vocabulary), forward and backward, so no [B, T, V] tensor of logits or log-softmax is ever held.

    Shared prompts (`share_prompt`, on by default): when rows repeat a prompt (the K samples of a GRPO
    group; see `shared_prompt`) and the model can (`can_share_prompt`), each distinct prompt goes
    through the model once and its KV cache serves all its rows, with gradients flowing back through
    it. That is the same function of the weights (the prompt's positions never see the response), so
    log-probs, entropies and gradients equal the plain forward's up to float rounding, for
    (B - N) * P fewer token positions of forward and backward (N distinct prompts of P columns).

    Packed (`packed`: the packing of `batch`'s rows, rlpost.packing.pack): the model runs the packed rows, each
    sequence attending only to itself, and the results come back in `batch`'s [B, T] layout, 0 off the real
    tokens and at each sequence's first token. Prompts are not shared then (each row carries its own).
    """
    if packed is not None:
        return _packed_logprobs(model, batch, packed, temperature, with_entropy, chunk)
    ids, mask = batch.input_ids, batch.attention_mask
    pos = position_ids_for(mask)
    split = _prompt_split(model, batch, share_prompt)
    head = chunked_head(model)
    if split is None:
        if head is not None:  # through the model's forward, so that a sharded head is gathered for it
            logp, entropy = model(ids, mask, pos, head=LogprobHead(ids[:, 1:], temperature, with_entropy, chunk))
        else:
            logp, entropy = _score(model(ids, mask, pos)[:, :-1], ids[:, 1:], temperature, with_entropy)
    else:
        P, first, owner = split
        if head is not None:
            lm_head, softcap = head
            prompt_h, response_h = model.forward_shared_prompt(ids, mask, pos, P, first, owner, hidden=True)

            def score(h, targets):
                return chunked_logprobs(h, lm_head.weight, targets, temperature=temperature, with_entropy=with_entropy,
                                        bias=lm_head.bias, softcap=softcap, chunk=chunk)
            lp_prompt, ent_prompt = score(prompt_h[:, :-1], ids[first, 1:P])
            # the response's first token is predicted by the prompt's last position
            lp_resp, ent_resp = score(torch.cat([prompt_h[owner, -1:], response_h[:, :-1]], 1), ids[:, P:])
        else:
            prompt_logits, response_logits = model.forward_shared_prompt(ids, mask, pos, P, first, owner)
            lp_prompt, ent_prompt = _score(prompt_logits[:, :-1], ids[first, 1:P], temperature, with_entropy)
            logits = torch.cat([prompt_logits[owner, -1:], response_logits[:, :-1]], 1)
            lp_resp, ent_resp = _score(logits, ids[:, P:], temperature, with_entropy)
        logp = torch.cat([lp_prompt[owner], lp_resp], 1)
        entropy = torch.cat([ent_prompt[owner], ent_resp], 1) if with_entropy else None
    logp = F.pad(logp, (1, 0))                                # (B, T): aligned with input_ids
    return (logp, F.pad(entropy, (1, 0))) if with_entropy else logp


def _packed_logprobs(model, batch, packed, temperature, with_entropy, chunk):
    def segment(ids, mask, pos):  # [r, w, 2]: log-prob and entropy (or 0) of each token, column 0 is 0
        if chunked_head(model) is not None:
            logp, entropy = model(ids, mask, pos, head=LogprobHead(ids[:, 1:], temperature, with_entropy, chunk))
        else:
            logp, entropy = _score(model(ids, mask, pos)[:, :-1], ids[:, 1:], temperature, with_entropy)
        return F.pad(torch.stack([logp, entropy if with_entropy else torch.zeros_like(logp)], -1), (0, 0, 1, 0))

    out = packed.run(segment, *_packed_inputs(model, batch, packed))
    logp = packed.unpack(out[..., 0])
    return (logp, packed.unpack(out[..., 1])) if with_entropy else logp
