"""The native rollout engine: KV-cached sampling for gpt_mini.

1. All prompts are left-padded and prefilled in one forward pass.
2. Prefix sharing: each prompt is prefilled once and its KV cache repeated for its K samples.
3. Decoding one token per step for every live row; a row that emits eos (or a stop token) leaves
   the batch at once, so no compute is spent on finished rows.
4. The log-prob of every sampled token is recorded as it is drawn (old_logp).
"""

from __future__ import annotations

import torch

from rlpost.batch import Batch
from rlpost.models import position_ids_for
from rlpost.models.gpt_mini import GPT
from rlpost.rollout import SamplingParams, assemble, sample_next


class NativeEngine:
    def __init__(self, model: GPT, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.policy_version = 0

    @staticmethod
    def supports(model) -> bool:
        return isinstance(model, GPT)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], k: int, params: SamplingParams, seed: int = 0) -> Batch:
        model, tok = self.model, self.tokenizer
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(seed)
        device = next(model.parameters()).device
        N, P = len(prompts), max(len(p) for p in prompts)
        if P + params.max_new_tokens > model.config.block_size:
            raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"model's block_size ({model.config.block_size})")
        ids = torch.full((N, P), tok.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((N, P), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p, device=device)
            mask[i, P - len(p):] = 1
        pos = position_ids_for(mask)

        cache = model.new_cache()
        logits = model(ids, mask, pos, cache)[:, -1]              # (N, V): prefill once per prompt
        rows = torch.arange(N, device=device).repeat_interleave(k)
        cache, logits = cache.select(rows), logits[rows]          # share the prompt's KV with its K samples
        next_pos = pos[rows, -1] + 1                              # (B,)

        B, R = N * k, params.max_new_tokens
        tokens = torch.full((B, R), tok.pad_token_id, dtype=torch.long)
        logps = torch.zeros((B, R))
        lengths = torch.zeros(B, dtype=torch.long)
        stopped = torch.zeros(B, dtype=torch.bool)
        stop_ids = torch.tensor([tok.eos_token_id, *params.stop_token_ids], device=device)
        live = torch.arange(B)                                    # batch row of each live cache row
        for step in range(R):
            draw_from = logits
            if step < params.min_new_tokens:                      # no stop before min_new_tokens
                draw_from = logits.index_fill(-1, stop_ids, float("-inf"))
            tok_next = sample_next(draw_from, params, gen)        # (L,)
            lp = torch.log_softmax(logits.float() / params.logp_temperature, -1)
            tokens[live, step] = tok_next.cpu()
            logps[live, step] = lp.gather(-1, tok_next[:, None]).squeeze(-1).cpu()
            lengths[live] += 1
            done = torch.isin(tok_next, stop_ids)
            stopped[live[done.cpu()]] = True
            if step == R - 1 or bool(done.all()):
                break
            if bool(done.any()):                                  # finished rows leave the batch
                keep = (~done).nonzero().squeeze(-1)
                live, cache = live[keep.cpu()], cache.select(keep)
                tok_next, next_pos = tok_next[keep], next_pos[keep]
            one = torch.ones((len(live), 1), dtype=torch.long, device=device)
            logits = model(tok_next[:, None], one, next_pos[:, None], cache)[:, -1]
            next_pos = next_pos + 1
        model.train(was_training)
        return assemble(prompts, k, tokens, logps, lengths, stopped, tok.pad_token_id, self.policy_version)
