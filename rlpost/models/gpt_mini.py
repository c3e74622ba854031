"""gpt_mini: the embedded tiny GPT, small enough to train from scratch on a laptop CPU in minutes.

The architecture is GPT-2's (pre-LayerNorm blocks, GELU MLP, learned positions, tied embeddings),
with GPT-2's parameter names, so a checkpoint maps one-to-one onto `transformers.GPT2LMHeadModel`
(see `to_hf_state_dict`). Two additions over nanoGPT's model.py:

1. left-padded batches: `attention_mask` masks pad keys and `position_ids` gives each row its own
   positions, so a padded row computes exactly what it would alone;
2. a KV cache (`KVCache`) for incremental decoding by the rollout engine.

Its tokenizer (`CharTokenizer`) is a character vocabulary plus <pad>, <bos> and <eos>.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 32
    block_size: int = 32   # longest sequence (prompt + response) the model accepts
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


class KVCache:
    """Keys and values of every layer for a batch of rows: k[layer] is [B, nh, S, hs].

    `key_mask` [B, S] is 1 where a cached position is a real token (0 on left padding).
    """

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.key_mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def select(self, rows: torch.Tensor) -> "KVCache":
        """Keep rows `rows` (also repeats them: rows may contain an index several times)."""
        out = KVCache(len(self.k))
        out.k = [k.index_select(0, rows) for k in self.k]
        out.v = [v.index_select(0, rows) for v in self.v]
        out.key_mask = self.key_mask.index_select(0, rows)
        return out


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout

    def forward(self, x, mask, cache: KVCache | None, layer: int):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:  # append this step's keys/values to what earlier steps cached
            if cache.k[layer] is not None:
                k = torch.cat([cache.k[layer], k], dim=2)
                v = torch.cat([cache.v[layer], v], dim=2)
            cache.k[layer], cache.v[layer] = k, v
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, cache, layer):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """forward(input_ids [B, T], attention_mask [B, T], position_ids [B, T], cache) -> logits [B, T, V]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.gradient_checkpointing = False  # rlpost.models.set_gradient_checkpointing
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))  # (B, T, V)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """The final (layer-normed) hidden state of every position: (B, T, n_embd)."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        if int(position_ids.max()) >= self.config.block_size:
            raise ValueError(f"sequence of {int(position_ids.max()) + 1} tokens exceeds gpt_mini's "
                             f"block_size={self.config.block_size}")
        # Key mask over all S = past + T positions: real tokens only.
        key_mask = attention_mask.bool()
        if cache is not None:
            if cache.key_mask is not None:
                key_mask = torch.cat([cache.key_mask, key_mask], dim=1)
            cache.key_mask = key_mask
        S = key_mask.shape[1]
        # Query i (absolute position past+i) sees keys j <= past+i that are real, and always itself,
        # so a pad query never has an empty row (its output is ignored, but must not be NaN).
        q_pos = torch.arange(past, past + T, device=input_ids.device)[:, None]
        k_pos = torch.arange(S, device=input_ids.device)[None, :]
        causal = k_pos <= q_pos                                        # (T, S)
        mask = (causal & key_mask[:, None, :]) | (k_pos == q_pos)      # (B, T, S)
        mask = mask[:, None]                                           # (B, 1, T, S) broadcast over heads

        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)
        recompute = self._checkpointing and cache is None
        for layer, block in enumerate(self.transformer.h):
            if recompute:  # gradient checkpointing: the block keeps only its input; the backward reruns it
                x = checkpoint(block, x, mask, None, layer, use_reentrant=False)
            else:
                x = block(x, mask, cache, layer)
        return self.transformer.ln_f(x)

    @property
    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer)

    @property
    def can_share_prompt(self) -> bool:
        """False while gradient checkpointing applies: a recomputed block would append to the KV cache twice."""
        return not self._checkpointing

    def forward_shared_prompt(self, input_ids, attention_mask, position_ids, P: int, first, owner,
                              hidden: bool = False):
        """Logits of rows whose first P columns repeat (rlpost.models.token_logprobs): the prompts of rows
        `first` once, their cache gathered to every row (`owner`), then the responses (columns P:).
        Returns (prompt logits [N, P, V], response logits [B, T-P, V]), or hidden states with `hidden`."""
        run = self.hidden_states if hidden else self
        cache = self.new_cache()
        prompt = run(input_ids[first, :P], attention_mask[first, :P], position_ids[first, :P], cache)
        response = run(input_ids[:, P:], attention_mask[:, P:], position_ids[:, P:], cache.select(owner))
        return prompt, response

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, folder: str) -> None:
        """model.safetensors + config.json (tied lm_head stored once, as wte)."""
        os.makedirs(folder, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.state_dict().items() if k != "lm_head.weight"}
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"model_type": "gpt_mini", **asdict(self.config)}, f, indent=2)

    @classmethod
    def from_pretrained(cls, folder: str) -> "GPT":
        with open(os.path.join(folder, "config.json")) as f:
            raw = json.load(f)
        raw.pop("model_type", None)
        model = cls(GPTConfig(**raw))
        state = load_file(os.path.join(folder, "model.safetensors"))
        state["lm_head.weight"] = state["transformer.wte.weight"]
        model.load_state_dict(state)
        return model

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The same weights under transformers.GPT2LMHeadModel's names (its Conv1D stores W transposed)."""
        out = {}
        for k, v in self.state_dict().items():
            if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                v = v.t()
            out[k] = v.contiguous()
        return out


class CharTokenizer:
    """Character-level tokenizer: ids 0..2 are <pad>, <bos>, <eos>; then one id per character."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer characters must be distinct")
        self.chars = chars
        self.stoi = {c: i + len(self.SPECIALS) for i, c in enumerate(chars)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in gpt_mini's vocabulary {self.chars!r}") from None

    def encode_prompt(self, text: str) -> list[int]:
        return [self.bos_token_id] + self.encode(text)

    def encode_completion(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids: list[int]) -> str:
        n = len(self.SPECIALS)
        return "".join(self.chars[i - n] for i in ids if i >= n)

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            json.dump({"type": "char", "chars": self.chars}, f)

    @classmethod
    def from_pretrained(cls, folder: str) -> "CharTokenizer":
        with open(os.path.join(folder, "tokenizer.json")) as f:
            return cls(json.load(f)["chars"])
