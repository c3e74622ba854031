"""Models behind one calling convention, and the one function every role uses to score tokens.

Every policy is an `nn.Module` called as `model(input_ids, attention_mask, position_ids) -> logits
[B, T, V]`: gpt_mini natively, a Hugging Face causal LM through `HFCausalLM`. Every tokenizer offers
`encode_prompt`, `encode_completion`, `decode`, `eos_token_id`, `pad_token_id`, `save_pretrained`.
"""

from __future__ import annotations

import json
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlpost.batch import Batch
from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(RuntimeError):
    """The model named by the recipe could not be found or loaded."""


# ---------------------------------------------------------------------------- Hugging Face adapters

class HFCausalLM(nn.Module):
    """A `transformers` causal LM with gpt_mini's calling convention; `.hf` is the wrapped model."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits

    @property
    def hidden_size(self) -> int:
        return self.hf.config.hidden_size

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None):
        """The trunk's final (normed) hidden states (B, T, H), for value heads."""
        return self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state

    def save_pretrained(self, folder: str) -> None:
        self.hf.save_pretrained(folder, safe_serialization=True)


class HFTokenizer:
    """Adapter over a `transformers` tokenizer: prompts get special tokens (and the chat template if
    asked), completions are encoded bare so that prompt ids + completion ids is what rollout produces."""

    def __init__(self, tok, chat_template: bool = False):
        self.tok = tok
        if chat_template and not getattr(tok, "chat_template", None):
            raise ModelLoadError("model.chat_template=true but this tokenizer has no chat template")
        self.chat_template = chat_template
        if tok.eos_token_id is None:
            raise ModelLoadError("the tokenizer defines no eos_token; rollout cannot tell where a response ends")
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode_prompt(self, text: str) -> list[int]:
        if self.chat_template:
            return list(self.tok.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=True, return_dict=False))
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def encode_completion(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, folder: str) -> None:
        self.tok.save_pretrained(folder)


# ---------------------------------------------------------------------------- loading

def build_gpt_mini(cfg, alphabet: str) -> tuple[GPT, CharTokenizer]:
    """A freshly initialised gpt_mini whose vocabulary is the task's alphabet."""
    tok = CharTokenizer(alphabet)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd))
    return model, tok


def load_model(cfg, alphabet: str | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) for `cfg.name`: 'gpt_mini' (new), a checkpoint folder, or a hub id."""
    name = cfg.name
    if name == "gpt_mini":
        if alphabet is None:
            raise ModelLoadError("a fresh gpt_mini needs the task's alphabet to build its vocabulary")
        model, tok = build_gpt_mini(cfg, alphabet)
    elif os.path.isdir(name):
        config_path = os.path.join(name, "config.json")
        if not os.path.isfile(config_path):
            raise ModelLoadError(f"model folder {name!r} has no config.json; is it a saved model?")
        with open(config_path) as f:
            model_type = json.load(f).get("model_type")
        if model_type == "gpt_mini":
            model, tok = GPT.from_pretrained(name), CharTokenizer.from_pretrained(name)
        else:
            model, tok = _load_hf(name, cfg)
    elif not _HUB_ID.match(name):  # "org/name" is a hub id; any other path must exist locally
        raise ModelLoadError(f"model folder not found: {name!r} (model.name takes 'gpt_mini', a local folder, "
                             f"or a hub id such as 'Qwen/Qwen2.5-0.5B')")
    else:
        model, tok = _load_hf(name, cfg)
    return model.to(_DTYPES[cfg.dtype]), tok


def _load_hf(name: str, cfg) -> tuple[HFCausalLM, HFTokenizer]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=_DTYPES[cfg.dtype])
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only local folders and the local cache are searched)" if offline else ""
        raise ModelLoadError(f"could not load model {name!r}: no such local folder, and loading it as a hub id "
                             f"failed{hint}: {e}") from e
    return HFCausalLM(hf), HFTokenizer(tok, chat_template=cfg.chat_template)


def save_model(model: nn.Module, tokenizer, folder: str) -> None:
    """safetensors weights + config + tokenizer in `folder`, loadable by `load_model`."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------- scoring tokens

def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: each row's first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(model: nn.Module, batch: Batch, temperature: float = 1.0, with_entropy: bool = False):
    """log pi(input_ids[:, t] | input_ids[:, :t]) for every t >= 1, as [B, T] (column 0 is 0).

    Logits are divided by `temperature` first, so the trainer scores tokens under the distribution
    the rollout engine sampled from. With `with_entropy`, also returns the per-token entropy [B, T]
    of that distribution (with grad when grad is enabled, for entropy bonuses).
    """
    logits = model(batch.input_ids, batch.attention_mask, position_ids_for(batch.attention_mask))
    logits = logits[:, :-1].float() / temperature             # (B, T-1, V): predicts tokens 1..T-1
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    logp = F.pad(logp, (1, 0))                                # (B, T): aligned with input_ids
    if not with_entropy:
        return logp
    entropy = F.pad(-(logp_all.exp() * logp_all).sum(-1), (1, 0))
    return logp, entropy
