"""The transformers.generate rollout backend: any Hugging Face causal LM.

Samples with `model.generate(num_return_sequences=K)` on left-padded prompts (greedy: once per prompt, the
answer repeated K times, as generate refuses K greedy copies), and takes old_logp from the per-step logits it
returns, so no second forward pass is needed. Stop strings are applied to
the finished samples with the native engines' rule (`StopStrings`: the response ends with the token
that completes the first stop string), so both backends truncate alike; `max_num_seqs` is ignored. The
model's own generation_config is not applied: what is sampled follows SamplingParams alone, as in the native engines.
"""

from __future__ import annotations

import torch

from rlpost.batch import Batch
from rlpost.rollout.engine import ModuleEngine, SamplingParams, weights_module
from rlpost.rollout.sampling import StopStrings


class HFGenerateEngine(ModuleEngine):
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], k: int, params: SamplingParams, seed: int = 0) -> Batch:
        from transformers import GenerationConfig

        hf = weights_module(self._open())
        tok = self.tokenizer
        was_training = hf.training
        hf.eval()
        device = next(hf.parameters()).device
        N, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((N, P), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((N, P), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = 1
        torch.manual_seed(seed)  # generate() draws from the global generator
        greedy = params.temperature <= 0
        copies = 1 if greedy else k  # greedy: one answer per prompt (generate refuses k copies), repeated k times
        # generate fills every setting not passed here from the model's generation_config, and a checkpoint's may
        # set a repetition penalty, an n-gram ban, beams, suppressed tokens...: tokens drawn from another
        # distribution than old_logp records and the native engine samples. Sampling follows `params` alone.
        own, hf.generation_config = hf.generation_config, GenerationConfig()
        try:
            with self._autocast(device):
                out = hf.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device),
                    do_sample=not greedy, temperature=None if greedy else params.temperature,
                    top_k=params.top_k, top_p=params.top_p,  # 0 / 1.0: off (generate's own default top_k is 50)
                    max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens or None,
                    num_return_sequences=copies,
                    eos_token_id=[tok.eos_token_id, *params.stop_token_ids], pad_token_id=tok.pad_token_id,
                    output_logits=True, return_dict_in_generate=True,
                )
        finally:
            hf.generation_config = own
            hf.train(was_training)
        tokens = out.sequences[:, P:].cpu()                                      # (B, R)
        logits = torch.stack(out.logits, 1).float().cpu() / params.logp_temperature  # (B, R, V) raw logits
        if copies < k:
            tokens, logits = tokens.repeat_interleave(k // copies, 0), logits.repeat_interleave(k // copies, 0)
        logps = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
        stop_ids = torch.tensor([tok.eos_token_id, *params.stop_token_ids])
        is_stop = torch.isin(tokens, stop_ids)
        stopped = is_stop.any(1)
        first_stop = torch.where(stopped, is_stop.float().argmax(1), torch.full_like(stopped, tokens.shape[1] - 1,
                                                                                      dtype=torch.long))
        lengths = first_stop + 1
        if params.stop:  # truncate at the first stop string, as the native engines stop there
            stop_strings = StopStrings(params.stop, tok.decode)
            for i in range(len(tokens)):
                end = stop_strings.end(tokens[i, :lengths[i]].tolist(), min_len=params.min_new_tokens + 1)
                if end is not None:
                    lengths[i], stopped[i] = end, True
        return Batch.from_sequences(prompts, k, tokens, logps, lengths, stopped, tok.pad_token_id,
                                    self._policy_version)
