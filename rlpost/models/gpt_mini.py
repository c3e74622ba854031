"""gpt_mini: the embedded tiny GPT, small enough to train from scratch on a laptop CPU in minutes.

The architecture is GPT-2's (pre-LayerNorm blocks, GELU MLP, learned positions, tied embeddings),
with GPT-2's parameter names. A checkpoint *is* a GPT-2 checkpoint: `save_pretrained` writes GPT-2's
config.json and weight layout (`to_hf_state_dict`) and a `tokenizers` tokenizer.json, so
`transformers.AutoModelForCausalLM` / `GPT2LMHeadModel` / `AutoTokenizer` load it as they are; a marker
key in config.json (`"rlpost_model": "gpt_mini"`) tells rlpost to load it back as this class. Two
additions over nanoGPT's model.py:

1. left-padded batches: `attention_mask` masks pad keys and `position_ids` gives each row its own
   positions, so a padded row computes exactly what it would alone; packed rows (rlpost.packing): the
   attention mask holds each token's sequence number (1, 2, ...; 0 on padding) and a token attends only
   to its own sequence (block-diagonal causal attention);
2. a KV cache (`KVCache`) through which a prompt computed once serves several rows: the shared-prompt
   forward that scoring uses (`forward_shared_prompt`, rlpost.models.logprobs.token_logprobs). The rollout
   engine does not use it: rlpost/rollout/native.py runs the blocks over the scheduler's preallocated cache.

Its tokenizer (`CharTokenizer`) is a character vocabulary plus <pad>, <bos> and <eos>.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from torch.utils.checkpoint import checkpoint

from rlpost.models.precision import checkpoint_contexts


@dataclass
class GPTConfig:
    vocab_size: int = 32
    block_size: int = 32   # longest sequence (prompt + response) the model accepts: its position table
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


class KVCache:
    """Keys and values of every layer for a batch of rows: k[layer] is [B, nh, S, hs], grown by each forward
    that is given the cache (`model(ids, cache=cache)`). `forward_shared_prompt` runs the distinct prompts into
    a fresh one and gathers it to every row (`select`); the rollout engine keeps its own preallocated cache instead
    (rlpost/rollout/scheduler.py).

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
        if cfg.n_head < 1 or cfg.n_embd % cfg.n_head:  # each head attends over n_embd / n_head dimensions
            raise ValueError(f"gpt_mini: n_embd={cfg.n_embd} must be a multiple of n_head={cfg.n_head} (config keys "
                             "model.n_embd, model.n_head)")
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

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None, head=None):
        """Logits (B, T, V); with `head` (a rlpost.models.logprobs.LogprobHead), what it computes from the final
        hidden states and the LM head instead: per-token log-probs without the (B, T, V) tensor."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        return head(hidden, self.lm_head) if head is not None else self.lm_head(hidden)

    def output_head(self) -> tuple[nn.Module, None]:
        """(the LM head, its soft-cap): what `head=` reads; the logits are lm_head(hidden)."""
        return self.lm_head, None

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
                             f"block_size={self.config.block_size}: raise model.block_size (unset, a fresh "
                             f"gpt_mini is sized from the data)")
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
        if cache is None:  # packed rows (rlpost.packing): a real query sees only real keys of its own sequence
            q, k = attention_mask[:, :, None], attention_mask[:, None, :]  # (0/1 masks: every real pair is equal)
            mask = mask & ~((q != k) & (q > 0) & (k > 0))
        mask = mask[:, None]                                           # (B, 1, T, S) broadcast over heads

        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)
        recompute = self._checkpointing and cache is None
        for layer, block in enumerate(self.transformer.h):
            if recompute:  # gradient checkpointing: the block keeps only its input; the backward reruns it
                x = checkpoint(block, x, mask, None, layer, use_reentrant=False, context_fn=checkpoint_contexts)
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
        head = _hidden_only if hidden else None  # through forward either way: its hooks see every pass
        cache = self.new_cache()
        prompt = self(input_ids[first, :P], attention_mask[first, :P], position_ids[first, :P], cache, head=head)
        response = self(input_ids[:, P:], attention_mask[:, P:], position_ids[:, P:], cache.select(owner), head=head)
        return prompt, response

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, folder: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """A GPT-2 checkpoint: config.json (GPT-2's keys plus the gpt_mini marker) and model.safetensors in
        GPT2LMHeadModel's layout, the tied lm_head stored once, as wte (as transformers saves it). `state_dict`:
        other weights under this model's names to write instead of its own (a LoRA model's merged weights)."""
        os.makedirs(folder, exist_ok=True)
        state = {k: v for k, v in self.to_hf_state_dict(state_dict).items() if k != "lm_head.weight"}
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.hf_config(), f, indent=2)

    def hf_config(self) -> dict:
        """transformers.GPT2Config's keys for this model. gpt_mini's only dropout is on attention weights
        (GPT-2's attn_pdrop); it has none on embeddings or residuals."""
        c = self.config
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], MARKER: "gpt_mini",
                "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
                "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                "attn_pdrop": c.dropout, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "tie_word_embeddings": True, "bos_token_id": CharTokenizer.BOS, "eos_token_id": CharTokenizer.EOS,
                "pad_token_id": CharTokenizer.PAD, "dtype": str(self.lm_head.weight.dtype).removeprefix("torch.")}

    @classmethod
    def from_pretrained(cls, folder: str) -> "GPT":
        """A checkpoint written by `save_pretrained` (GPT-2 layout), or by rlpost before it saved GPT-2's
        layout (config.json with model_type "gpt_mini" and the dataclass's fields)."""
        config, older = cls.config_of(folder)
        model = cls(config)
        state = load_file(os.path.join(folder, "model.safetensors"))
        if not older:
            state = from_hf_state_dict(state)
        state["lm_head.weight"] = state["transformer.wte.weight"]
        model.load_state_dict(state)
        return model

    @staticmethod
    def config_of(folder: str) -> tuple[GPTConfig, bool]:
        """(the GPTConfig of a saved checkpoint, whether it is rlpost's older format), without reading weights."""
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            raw = json.load(f)
        if raw.get("model_type") == "gpt_mini":   # the older format: GPTConfig's fields, nn.Linear layout
            fields = {k: v for k, v in raw.items() if k != "model_type"}
            unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(GPTConfig)})
            if unknown:
                raise ValueError(f"{path}: unknown gpt_mini config key(s) {', '.join(map(repr, unknown))}")
            config, older = GPTConfig(**fields), True
        else:
            names = {"vocab_size": "vocab_size", "block_size": "n_positions", "n_layer": "n_layer",
                     "n_head": "n_head", "n_embd": "n_embd"}
            lacking = [key for key in names.values() if key not in raw]
            if lacking:
                raise ValueError(f"{path}: a gpt_mini config.json needs {', '.join(map(repr, lacking))}, which it "
                                 "lacks")
            config = GPTConfig(**{field: raw[key] for field, key in names.items()},
                               dropout=raw.get("attn_pdrop", 0.0))
            older = False
        for f in dataclasses.fields(GPTConfig):  # each size a whole number >= 1, the dropout a probability
            value = getattr(config, f.name)
            good = (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
                    if f.name == "dropout" else isinstance(value, int) and not isinstance(value, bool) and value >= 1)
            if not good:
                raise ValueError(f"{path}: gpt_mini's {f.name} must be "
                                 f"{'in [0, 1)' if f.name == 'dropout' else 'a whole number >= 1'}, got {value!r}")
        return config, older

    def to_hf_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The same weights (or `state_dict`) under transformers.GPT2LMHeadModel's names (its Conv1D stores W
        transposed)."""
        state = self.state_dict() if state_dict is None else state_dict
        return {k: (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in state.items()}


def _hidden_only(hidden, lm_head):
    """A `head=` for GPT.forward that returns the final hidden states themselves."""
    return hidden


CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # GPT-2's Conv1D weights: [in, out], nn.Linear's transposed
MARKER = "rlpost_model"  # config.json key that makes rlpost load a GPT-2 checkpoint as gpt_mini


def is_gpt_mini_checkpoint(config: dict) -> bool:
    """True for a gpt_mini config.json, in the GPT-2 format (marker key) or the older one."""
    return config.get(MARKER) == "gpt_mini" or config.get("model_type") == "gpt_mini"


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's weights under gpt_mini's layout: Conv1D weights transposed back, GPT-2's attention
    mask buffers (saved by older transformers) and the tied lm_head dropped."""
    drop = (".attn.bias", ".attn.masked_bias", "lm_head.weight")
    return {k: (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in state.items() if not k.endswith(drop)}


class CharTokenizer:
    """Character-level tokenizer: ids 0..2 are <pad>, <bos>, <eos>; then one id per character.

    Saved as a `tokenizers` tokenizer.json (a WordLevel vocabulary over single characters, with the same
    ids) plus tokenizer_config.json, so `transformers.AutoTokenizer` loads it and encodes text to the same
    ids: `tok(text)` gives `encode_prompt(text)` (<bos> first), `tok(text, add_special_tokens=False)`
    gives `encode(text)`.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer characters must be distinct")
        self.chars = chars
        self.stoi = {c: i + len(self.SPECIALS) for i, c in enumerate(chars)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = self.PAD, self.BOS, self.EOS

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
        """tokenizer.json (the `tokenizers` format) and tokenizer_config.json, as transformers reads them."""
        os.makedirs(folder, exist_ok=True)
        vocab = {**{t: i for i, t in enumerate(self.SPECIALS)}, **self.stoi}
        tok = Tokenizer(WordLevel(vocab, unk_token=None))  # an unknown character is an error, as in encode
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
        tok.decoder = decoders.Fuse()                                                     # joined without spaces
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", self.BOS)])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.SPECIALS])
        tok.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<bos>",
                       "eos_token": "<eos>", "clean_up_tokenization_spaces": False}, f, indent=2)

    @classmethod
    def from_pretrained(cls, folder: str) -> "CharTokenizer":
        """From `save_pretrained`'s tokenizer.json, or the older {"type": "char", "chars": ...} one."""
        with open(os.path.join(folder, "tokenizer.json")) as f:
            raw = json.load(f)
        if raw.get("type") == "char":
            return cls(raw["chars"])
        ids = sorted((i, t) for t, i in raw["model"]["vocab"].items())
        n = len(cls.SPECIALS)
        if ([t for _, t in ids[:n]] != list(cls.SPECIALS) or [i for i, _ in ids] != list(range(len(ids)))
                or any(len(t) != 1 for _, t in ids[n:])):
            raise ValueError(f"{folder}/tokenizer.json is not a gpt_mini vocabulary (ids 0..2 must be "
                             f"{', '.join(cls.SPECIALS)}, then one id per character)")
        return cls("".join(t for _, t in ids[n:]))
