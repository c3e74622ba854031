"""The native rollout engine for gpt_mini: KV-cached sampling with continuous batching.

The scheduling (prefix sharing, shared-prompt attention for long prompts, the cross-prompt prefix
cache, continuous batching under `max_num_seqs`, stop tokens and stop strings, seeded sampling,
old_logp) is scheduler.py's, shared with the HF Llama / Qwen2 engine. This file is the model runner:
gpt_mini's forward (GPT.hidden_states, block by block, through the model's own modules, so a pointer
engine samples with the trainer's weights as they are, LoRA adapters included: peft's layers are modules
too) over the scheduler's preallocated KV cache.
Weights and version are engine.ModuleEngine's (the Engine protocol).
"""

from __future__ import annotations

import torch

from rlpost.batch import Batch
from rlpost.models.gpt_mini import GPT
from rlpost.rollout import scheduler
from rlpost.rollout.engine import ModuleEngine, SamplingParams
from rlpost.rollout.scheduler import attend, write_kv


class NativeEngine(ModuleEngine):
    prefix_block = 16  # tokens per block of the cross-prompt prefix cache (0: off)
    shared_attention_min = 64  # prompts this long (or longer) are read once per prompt in decode (scheduler.attend)

    @staticmethod
    def supports(model) -> bool:
        return isinstance(model, GPT)

    def generate(self, prompts: list[list[int]], k: int, params: SamplingParams, seed: int = 0) -> Batch:
        model = self._open()
        was_training = model.training
        model.eval()  # the modules run as they are: no dropout (e.g. LoRA's) while sampling
        try:
            with self._autocast(self.device):  # one context for the whole call: autocast casts each weight once
                return scheduler.generate(self, self.tokenizer, prompts, k, params, seed, self._policy_version,
                                          self.prefix_block, self.shared_attention_min)
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ the runner (scheduler.py)

    @property
    def device(self) -> torch.device:
        return self._model.lm_head.weight.device

    def prepare(self, S: int) -> GPT:
        if S > self._model.config.block_size:
            raise ValueError(f"prompt + max_new_tokens ({S} tokens) exceeds the model's block_size "
                             f"({self._model.config.block_size})")
        return self._model

    def new_cache(self, rows: int, S: int) -> torch.Tensor:
        cfg, w = self._model.config, self._model.lm_head.weight
        return torch.zeros((2, cfg.n_layer, rows, cfg.n_head, S, cfg.n_embd // cfg.n_head),
                           dtype=self.cache_dtype or w.dtype,
                           device=w.device)

    def forward(self, m: GPT, ids, pos, kv, cols, end, mask, shared=None) -> torch.Tensor:
        L, t = ids.shape
        C, nh = m.config.n_embd, m.config.n_head
        tr = m.transformer
        x = tr.wte(ids) + tr.wpe(pos)
        for i, block in enumerate(tr.h):
            q, k, v = (z.view(L, t, nh, C // nh).transpose(1, 2) for z in block.attn.c_attn(block.ln_1(x)).split(C, 2))
            keys, values = write_kv(kv[0, i], kv[1, i], k, v, cols, end)
            y = attend(q, keys, values, mask, None, shared, i)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(L, t, C))
            x = x + block.mlp(block.ln_2(x))
        return tr.ln_f(x)

    def logits(self, m: GPT, x_last: torch.Tensor) -> torch.Tensor:
        return m.lm_head(x_last)
