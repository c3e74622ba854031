"""The Hugging Face adapters: `HFCausalLM` gives a `transformers` causal LM gpt_mini's calling convention
(`model(input_ids, attention_mask, position_ids) -> logits`, plus the hidden states, the output head and the
shared-prompt forward that scoring uses), `HFTokenizer` a `transformers` tokenizer rlpost's tokenizer methods."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn


class ModelLoadError(RuntimeError):
    """The model named by the recipe could not be found or loaded."""


def _cache_kwarg(model: nn.Module, cache) -> dict:
    """The KV cache as the model's forward takes it: `cache=` (transformers >= 5.25, where `past_key_values=` is
    deprecated) or `past_key_values=` (earlier releases, e.g. the one vLLM's CPU build pins)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _output_cache(output):
    """The KV cache a forward returned: `output.cache` (transformers >= 5.25) or `output.past_key_values`."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


# model types whose logits are lm_head(final hidden state), soft-capped for Gemma 2/3 (final_logit_softcapping):
# scored in chunks from the hidden states (rlpost.models.logprobs). Others (e.g. a head that rescales its logits)
# are scored from the full logits.
CHUNKED_HEADS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2")


class HFCausalLM(nn.Module):
    """A `transformers` causal LM with gpt_mini's calling convention; `.hf` is the wrapped model."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids, attention_mask=None, position_ids=None, head=None):
        """Logits (B, T, V); with `head` (a rlpost.models.logprobs.LogprobHead), what it computes from the trunk's
        final hidden states and the LM head instead (see `output_head`), without the (B, T, V) tensor."""
        if head is None:
            return self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).logits
        lm_head, softcap = self.output_head()
        return head(self.hidden_states(input_ids, attention_mask, position_ids), lm_head, softcap)

    def output_head(self) -> tuple[nn.Module, float | None] | None:
        """(LM head, soft-cap) when the model's logits are exactly `softcap * tanh(lm_head(h) / softcap)` (or
        lm_head(h) without a soft-cap) of the trunk's final hidden states h: the families in CHUNKED_HEADS, with
        a plain nn.Linear head (not a LoRA-wrapped one). None otherwise: such a model is scored from its logits."""
        head = self.hf.get_output_embeddings()
        if self.hf.config.model_type not in CHUNKED_HEADS or type(head) is not nn.Linear:
            return None
        return head, getattr(self.hf.config, "final_logit_softcapping", None)

    def forward_shared_prompt(self, input_ids, attention_mask, position_ids, P: int, first, owner,
                              hidden: bool = False):
        """Logits of rows whose first P columns repeat: see `token_logprobs`. The prompts of rows `first`
        go through the model once, their KV cache is gathered to every row (`owner`: the prompt of each
        row), and the responses (columns P:) attend to it. Returns (prompt logits [N, P, V],
        response logits [B, T-P, V]), or the trunk's final hidden states with `hidden`."""
        model = self.hf.base_model if hidden else self.hf
        prompt = model(input_ids=input_ids[first, :P], attention_mask=attention_mask[first, :P],
                       position_ids=position_ids[first, :P], use_cache=True)
        cache = _output_cache(prompt)
        cache.reorder_cache(owner)          # index_select over rows: differentiable, repeats allowed
        response = model(input_ids=input_ids[:, P:], attention_mask=attention_mask,
                         position_ids=position_ids[:, P:], use_cache=True, **_cache_kwarg(model, cache))
        if hidden:
            return prompt.last_hidden_state, response.last_hidden_state
        return prompt.logits, response.logits

    @property
    def can_share_prompt(self) -> bool:
        """False under gradient checkpointing, which turns the KV cache off in training."""
        on = getattr(self.hf, "is_activation_checkpointing", None)  # transformers >= 5.20; older: the old name
        return not (on if on is not None else getattr(self.hf, "is_gradient_checkpointing", False))

    @property
    def hidden_size(self) -> int:
        return self.hf.config.hidden_size

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None):
        """The trunk's final (normed) hidden states (B, T, H), for value heads."""
        return self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state

    def save_pretrained(self, folder: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The HF model's save_pretrained folder; `state_dict`: other weights under its names to write instead."""
        self.hf.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)


class HFTokenizer:
    """Adapter over a `transformers` tokenizer: prompts get special tokens (and the chat template if
    asked), completions are encoded bare so that prompt ids + completion ids is what rollout produces."""

    def __init__(self, tok, chat_template: bool = False):
        self.tok = tok
        if chat_template and not getattr(tok, "chat_template", None):
            raise ModelLoadError("model.chat_template=true but this tokenizer has no chat template: set "
                                 "model.chat_template=false to encode string prompts as plain text, or give the model "
                                 "folder one (chat_template.jinja, or 'chat_template' in tokenizer_config.json)")
        self.chat_template = chat_template
        if tok.eos_token_id is None:
            raise ModelLoadError("the tokenizer defines no eos_token; rollout cannot tell where a response ends")
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode_prompt(self, text: str) -> list[int]:
        if self.chat_template:
            return self.encode_messages([{"role": "user", "content": text}])
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Chat messages through the tokenizer's chat template, ending with the assistant's generation prompt."""
        if not getattr(self.tok, "chat_template", None):
            raise ValueError("a prompt given as chat messages (or with task.system_prompt) needs a tokenizer with "
                             "a chat template, and this one has none")
        try:
            return list(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False))
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError (raise_exception) is no ValueError
            if isinstance(e, ValueError) or type(e).__module__.split(".")[0] != "jinja2":
                raise
            roles = [m.get("role") for m in messages]
            hint = (": this template takes no system message, so leave task.system_prompt unset (put the "
                    "instruction in the prompt) or use a model whose template has one") if "system" in roles else ""
            raise ValueError(f"the tokenizer's chat template refused the messages (roles {roles}): "
                             f"{type(e).__name__}: {e}{hint}") from None

    def encode_completion(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, folder: str) -> None:
        self.tok.save_pretrained(folder)
