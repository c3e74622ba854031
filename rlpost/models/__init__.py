"""Models behind one calling convention, and the one function every role uses to score tokens.

Every policy is an `nn.Module` called as `model(input_ids, attention_mask, position_ids) -> logits
[B, T, V]`: gpt_mini natively, a Hugging Face causal LM through `HFCausalLM`. Every tokenizer offers
`encode_prompt`, `encode_completion`, `decode`, `eos_token_id`, `pad_token_id`, `save_pretrained`; a row's
prompt (a string or chat messages, with the task's system prompt) is encoded by `encode_prompt(tokenizer,
prompt, system_prompt)`, the one place that decides between plain text and the chat template.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlpost.batch import Batch
from rlpost.limits import block_size_for
from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig, is_gpt_mini_checkpoint
from rlpost.models.logprobs import LogprobHead, chunked_logprobs
from rlpost.models.lora import (apply_lora, base_state_dict, is_lora, load_adapters, merged_state_dict, save_adapters,
                                saved_lora_config)
from rlpost.packing import Packed
from rlpost.settings.model import DTYPES  # the valid model.dtype names, declared with the key
from rlpost.settings.rollout import ROLLOUT_DTYPES  # rollout.dtype: 'auto' is the trainer's (resolved) precision
from rlpost.settings.trainer import PRECISION_CHOICES, PRECISIONS  # trainer.precision: 'auto' resolves at start

_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # float32, bfloat16
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ModelLoadError(RuntimeError):
    """The model named by the recipe could not be found or loaded."""


# ---------------------------------------------------------------------------- device and precision

def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch.device that `model.device` names: 'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or
    'cuda:N'. Asking for CUDA where there is none is an error now, not a silent CPU run."""
    spec = str(spec)
    if not DEVICE_SPEC.match(spec):
        raise ValueError(f"model.device is {spec!r}; valid values: auto, cpu, cuda, cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"model.device={spec} but CUDA is not available (torch {torch.__version__}, "
                               f"CUDA build: {torch.version.cuda or 'none'}); use model.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"model.device={spec} but this machine has {torch.cuda.device_count()} CUDA "
                               f"device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of a module's parameters: every role computes there and moves its batches there."""
    return next(model.parameters()).device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively: AMX tiles or AVX512-BF16 instructions, which
    oneDNN's bf16 kernels use. Without them torch converts bf16 on the fly or takes a scalar fallback, which
    on an AVX2 machine measured 15-100x slower than fp32 (benchmarks/grpo_step_vs_trl.py --precision bf16
    prints both)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):  # private probes: fall back on oneDNN's own bf16 check
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """trainer.precision -> (the precision the run uses, why). 'auto' is bf16 on CUDA and on a CPU with native
    bf16 matmul (`cpu_has_fast_bf16`: AMX or AVX512-BF16), fp32 elsewhere (an AVX2-only CPU runs bf16 many
    times slower than fp32). 'fp32' and 'bf16' are taken as given."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"trainer.precision is {precision!r}; valid values: {', '.join(PRECISION_CHOICES)}")
    if precision != "auto":
        return precision, "as configured"
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16", "CUDA device"
    if device.type == "cpu":
        cap = torch.backends.cpu.get_cpu_capability()
        if cpu_has_fast_bf16():
            return "bf16", f"CPU with native bf16 matmul (torch's CPU capability: {cap})"
        return "fp32", f"CPU without native bf16 matmul (torch's CPU capability: {cap}; no AMX or AVX512-BF16)"
    return "fp32", f"device type {device.type}"


def resolve_rollout_dtype(dtype: str, precision: str) -> str:
    """rollout.dtype -> the dtype the rollout engine samples in: 'auto' is the trainer's resolved precision."""
    if dtype not in ROLLOUT_DTYPES:
        raise ValueError(f"rollout.dtype is {dtype!r}; valid values: {', '.join(ROLLOUT_DTYPES)}")
    return precision if dtype == "auto" else dtype


def check_precision(precision: str, device: torch.device) -> None:
    """Fail on an unknown precision now, naming the valid ones; warn when bf16 will be slow on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision is {precision!r}; valid values: {', '.join(PRECISIONS)}")
    if precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn(f"trainer.precision=bf16 on a CPU without native bf16 matmul (torch's CPU capability: "
                      f"{torch.backends.cpu.get_cpu_capability()}; no AVX512-BF16 or AMX): bf16 matmuls take a "
                      "slow fallback path and run many times slower than fp32 here; use trainer.precision=fp32 "
                      "on this machine", stacklevel=3)


def autocast(device: torch.device, precision: str):
    """The context a role runs its model's forward in. 'fp32': nothing. 'bf16': torch.autocast to bfloat16,
    so matmuls and attention run in bf16 while the parameters (the master weights), their gradients and the
    optimizer state stay fp32; log-softmax and every loss run in fp32 (`_score` turns autocast off)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"trainer.precision is {precision!r}; valid values: {', '.join(PRECISIONS)}")


def set_gradient_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping them
    (`trainer.gradient_checkpointing`): memory for one block's activations instead of all, for about one
    more forward. HF models through their own switch; gpt_mini with torch.utils.checkpoint per block.
    Either way it applies only in training mode with grad, and it turns shared-prompt scoring off then."""
    if isinstance(model, HFCausalLM):
        hf = model.hf
        if on and not getattr(hf, "supports_gradient_checkpointing", False):
            raise ValueError(f"trainer.gradient_checkpointing: {type(hf).__name__} does not support it")
        # transformers >= 5.20 names it activation checkpointing; older versions only have the old name
        if on:
            enable = getattr(hf, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            (getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)()
    elif isinstance(model, GPT):
        model.gradient_checkpointing = on
    elif on:
        raise TypeError(f"gradient checkpointing supports HFCausalLM and gpt_mini, not {type(model).__name__}")


# ---------------------------------------------------------------------------- Hugging Face adapters

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
            raise ModelLoadError("model.chat_template=true but this tokenizer has no chat template")
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
        return list(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))

    def encode_completion(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, folder: str) -> None:
        self.tok.save_pretrained(folder)


def encode_prompt(tokenizer, prompt: str | list[dict], system_prompt: str | None = None) -> list[int]:
    """The token ids of a row's prompt, as rollout, evaluation, SFT and preference training all see it.

    - a string, when the tokenizer does not use its chat template (gpt_mini, or an HF model with
      model.chat_template=false): the tokenizer's own `encode_prompt` (special tokens + text);
    - a string, with model.chat_template=true: [system, user] messages through the chat template;
    - chat messages [{role, content}, ...]: [system] + the messages through the chat template, which the
      tokenizer must have (whatever model.chat_template says: messages have no other encoding).

    `system_prompt` (task.system_prompt) becomes a system message in front, unless the messages already
    start with one. It needs the chat template: with a plain string prompt it is an error, not ignored.
    Every template ends with the assistant's generation prompt. Errors are ValueErrors; callers name the row.
    """
    if isinstance(prompt, str) and not getattr(tokenizer, "chat_template", False):
        if system_prompt:
            raise ValueError("task.system_prompt needs the chat template: set model.chat_template=true (an HF model "
                             "whose tokenizer has one), or leave task.system_prompt unset")
        return tokenizer.encode_prompt(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    encode = getattr(tokenizer, "encode_messages", None)
    if encode is None:
        raise ValueError(f"a prompt given as chat messages needs a tokenizer with a chat template, and "
                         f"{type(tokenizer).__name__} (gpt_mini's) has none: give string prompts, or use an HF "
                         "model whose tokenizer has a chat template")
    return encode(messages)


# ---------------------------------------------------------------------------- loading

UNSIZED_BLOCK_SIZE = 24  # a fresh gpt_mini's block_size when model.block_size is None and no data is passed


def build_gpt_mini(cfg, alphabet: str, rows: list[dict] | None = None, max_new_tokens: int | None = None,
                   demonstrations: list[dict] = ()) -> tuple[GPT, CharTokenizer]:
    """A freshly initialised gpt_mini whose vocabulary is the task's alphabet.

    Its block_size is `cfg.block_size`; when that is None, the smallest that holds the data
    (`rlpost.limits.block_size_for`: every prompt of `rows` + `max_new_tokens`, every demonstration +
    eos). A caller that passes no data gets UNSIZED_BLOCK_SIZE, the fixed default before sizing."""
    tok = CharTokenizer(alphabet)
    block_size = cfg.block_size
    if block_size is None and (rows or demonstrations):
        if max_new_tokens is None:
            raise TypeError("sizing gpt_mini from the data needs max_new_tokens (rollout.max_new_tokens)")
        block_size = block_size_for(tok, rows or [], max_new_tokens, demonstrations)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size or UNSIZED_BLOCK_SIZE,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    return model, tok


def load_model(cfg, alphabet: str | None = None, *, rows: list[dict] | None = None,
               max_new_tokens: int | None = None, demonstrations: list[dict] = ()) -> tuple[nn.Module, object]:
    """(model, tokenizer) for `cfg.name`: 'gpt_mini' (new), a checkpoint folder, or a hub id; its parameters
    in `cfg.dtype` on `cfg.device` (see resolve_device). Every role follows the model's device.

    `rows` (train + held-out), `max_new_tokens` and `demonstrations` size a fresh gpt_mini when
    `cfg.block_size` is None (see build_gpt_mini); they are not used otherwise. Check that the data fits
    any model with `rlpost.limits.check_lengths` after loading it."""
    name = cfg.name
    if name == "gpt_mini":
        if alphabet is None:
            raise ModelLoadError("a fresh gpt_mini needs the task's alphabet to build its vocabulary")
        model, tok = build_gpt_mini(cfg, alphabet, rows, max_new_tokens, demonstrations)
    elif os.path.isdir(name):
        config_path = os.path.join(name, "config.json")
        if not os.path.isfile(config_path):
            raise ModelLoadError(f"model folder {name!r} has no config.json; is it a saved model?")
        with open(config_path) as f:
            config = json.load(f)
        if is_gpt_mini_checkpoint(config):  # a GPT-2 checkpoint to transformers, gpt_mini to rlpost
            model, tok = GPT.from_pretrained(name), CharTokenizer.from_pretrained(name)
        else:
            model, tok = _load_hf(name, cfg)
    elif not _HUB_ID.match(name):  # "org/name" is a hub id; any other path must exist locally
        raise ModelLoadError(f"model folder not found: {name!r} (model.name takes 'gpt_mini', a local folder, "
                             f"or a hub id such as 'Qwen/Qwen2.5-0.5B')")
    else:
        model, tok = _load_hf(name, cfg)
    model = model.to(device=resolve_device(getattr(cfg, "device", "auto")), dtype=_DTYPES[cfg.dtype])
    lora = getattr(cfg, "lora", None)
    lora = dataclasses.asdict(lora) if lora is not None and lora.r > 0 else None
    saved = saved_lora_config(name) if os.path.isdir(name) else None
    if lora or saved:  # LoRA asked for, or a LoRA checkpoint (base + adapters): see rlpost/models/lora.py
        apply_lora(model, **(lora or saved))
        if saved:
            load_adapters(model, name)
    return model, tok


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


def save_model(model: nn.Module, tokenizer, folder: str, merged: bool = False) -> None:
    """safetensors weights + config + tokenizer in `folder`, loadable by `load_model`. A LoRA model is saved as
    its base weights plus its adapters (exact: a resume continues from them), or, `merged`, as the plain model
    whose weights are base + adapter delta (no adapter files: `transformers` loads it without peft)."""
    if is_lora(model):
        model.save_pretrained(folder, state_dict=merged_state_dict(model) if merged else base_state_dict(model))
        if not merged:
            save_adapters(model, folder)
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_weights(model: nn.Module, folder: str) -> None:
    """Load the weights saved in `folder` (by `save_model`) into `model` in place, exactly: the optimizer
    and every other holder of the model's parameters keep pointing at the same tensors. A LoRA model takes the
    folder's weights as its base, and its adapters (reset to their initial values when the folder has none)."""
    if not os.path.isdir(folder):
        raise ModelLoadError(f"no saved model at {folder}")
    if saved_lora_config(folder) is not None and not is_lora(model):
        raise ModelLoadError(f"{folder} holds LoRA adapters and this model has none: load it with load_model, or "
                             f"export a merged folder (rlpost export {folder} --out FOLDER)")
    if isinstance(model, GPT):
        state = GPT.from_pretrained(folder).state_dict()
    elif isinstance(model, HFCausalLM):
        from transformers import AutoModelForCausalLM

        dtype = next(p for n, p in model.named_parameters() if "lora_" not in n).dtype
        state = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).state_dict()
    else:
        raise TypeError(f"load_weights supports gpt_mini and HFCausalLM, not {type(model).__name__}")
    with torch.no_grad():
        own = base_state_dict(model)  # a plain model's state_dict; a LoRA model's base under the plain names
        missing = [k for k in own if k not in state]
        if missing:
            raise ModelLoadError(f"{folder} lacks {len(missing)} weight(s) of this model, e.g. {missing[:3]}")
        for k, t in own.items():
            t.copy_(state[k])
    if is_lora(model):
        load_adapters(model, folder)


def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile the model's transformer blocks in place, with dynamic shapes (batch and length vary
    from step to step). The module tree, parameter names and checkpoints are unchanged. An HF model's
    trunk (`.hf.model`) is compiled; gpt_mini's blocks one by one. The first forward and backward of each
    new kind of call (plain, shared-prompt, with or without grad) compile, which takes tens of seconds;
    later calls reuse the kernels."""
    if isinstance(model, HFCausalLM):
        model.hf.model.compile(dynamic=True)
    elif isinstance(model, GPT):
        for block in model.transformer.h:
            block.compile(dynamic=True)
    else:
        raise TypeError(f"compile_model supports HFCausalLM and gpt_mini, not {type(model).__name__}")
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a policy, the unit FSDP2 shards (rlpost.distributed.shard_model): gpt_mini's
    `transformer.h`, an HF decoder's layers (`.hf.base_model.layers`: Llama, Qwen2, Mistral, ...)."""
    if isinstance(model, GPT):
        return list(model.transformer.h)
    if isinstance(model, HFCausalLM):
        layers = getattr(model.hf.base_model, "layers", None)
        if layers is None:
            raise TypeError(f"{type(model.hf).__name__} has no `.layers` on its base model to shard")
        return list(layers)
    raise TypeError(f"transformer_blocks supports HFCausalLM and gpt_mini, not {type(model).__name__}")


def rebuild(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new, plain (unsharded) module of `model`'s architecture holding `state` (its state_dict names),
    on the CPU: what a sharded policy saves its checkpoint folder from."""
    if isinstance(model, GPT):
        new = GPT(model.config)
    elif isinstance(model, HFCausalLM):
        from transformers import AutoModelForCausalLM

        new = HFCausalLM(AutoModelForCausalLM.from_config(model.hf.config))
    else:
        raise TypeError(f"rebuild supports HFCausalLM and gpt_mini, not {type(model).__name__}")
    new.load_state_dict(state)
    return new.to(next(iter(state.values())).dtype)


# ---------------------------------------------------------------------------- scoring tokens

def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: each row's first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def shared_prompt(batch: Batch) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """How the rows of `batch` share prompts: (P, first, owner), or None when no two rows do.

    P is the first response column (the same for every row, by the Batch layout); rows whose columns :P
    (ids and attention mask) are equal share one prompt. `first` [N] is the first row of each distinct
    prompt, `owner` [B] the prompt of each row (an index into `first`). Found from the tokens
    themselves, so it holds for any batch: K samples of a prompt, a preference pair, shuffled rows.
    """
    has_response = batch.response_mask.bool().any(0)
    if not bool(has_response.any()):
        return None
    P = int(has_response.int().argmax())
    if P == 0:
        return None
    B = batch.input_ids.shape[0]
    prompts = torch.cat([batch.input_ids[:, :P], batch.attention_mask[:, :P].to(batch.input_ids.dtype)], 1)
    unique, owner = torch.unique(prompts, dim=0, return_inverse=True)
    if len(unique) == B:
        return None
    rows = torch.arange(B, device=owner.device)
    first = torch.full((len(unique),), B, device=owner.device).scatter_reduce(0, owner, rows, "amin")
    return P, first, owner


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


def check_packing(model: nn.Module) -> None:
    """Fail now, naming `trainer.packing`, when `model` cannot run packed rows: two sequences packed in one row
    must compute what each computes alone. gpt_mini can; an HF model can when its attention honours restarting
    position ids without a mask (checked on two short sequences, once, in eval mode without grad)."""
    if isinstance(model, GPT):
        return
    if not isinstance(model, HFCausalLM):
        raise ValueError(f"trainer.packing supports gpt_mini and Hugging Face causal LMs, not {type(model).__name__}; "
                         "set trainer.packing=false")
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
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    err = float((packed - alone).abs().max() / alone.abs().max().clamp(min=1e-6))
    if not err <= tol:
        impl = getattr(model.hf.config, "_attn_implementation", "?")
        raise ValueError(f"trainer.packing: {type(model.hf).__name__} with attn_implementation={impl!r} does not keep "
                         f"packed sequences apart (relative difference {err:.2g} from scoring them alone); "
                         "set trainer.packing=false, or load it with an attention implementation that reads "
                         "packed position ids (sdpa, eager, flex_attention, flash_attention_2)")


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
