"""Models behind one calling convention, and the one function every role uses to score tokens.

Every policy is an `nn.Module` called as `model(input_ids, attention_mask, position_ids) -> logits
[B, T, V]`: gpt_mini natively, a Hugging Face causal LM through `HFCausalLM`. Every tokenizer offers
`encode_prompt`, `encode_completion`, `decode`, `eos_token_id`, `pad_token_id`, `save_pretrained`; a row's
prompt (a string or chat messages, with the task's system prompt) is encoded by `encode_prompt(tokenizer,
prompt, system_prompt)`, the one place that decides between plain text and the chat template.

This package's API, from its modules:

    gpt_mini.py   the native model and its character tokenizer
    hf.py         HFCausalLM and HFTokenizer, the adapters over `transformers`
    encoding.py   encode_prompt, encode_demonstration: a row's text as token ids
    limits.py     a model's context against the data: check_lengths, block_size_for, model_context
    loading.py    load_model, build_gpt_mini, save_model, load_weights, rebuild, read_own_rows (a sharded
                  model's rows from a folder), missing_weights, skeleton_of
    precision.py  model.device, model.dtype, trainer.precision, rollout.dtype, autocast
    blocks.py     gradient checkpointing, torch.compile and the sharding unit of a policy's blocks;
                  is_sharded (rlpost.distributed offers it too)
    logprobs.py   token_logprobs, trunk_hidden_states, shared prompts, the chunked head
    lora.py       LoRA adapters through peft
"""

from rlpost.models.blocks import compile_model, is_sharded, set_gradient_checkpointing, transformer_blocks
from rlpost.models.encoding import encode_demonstration, encode_prompt
from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig
from rlpost.models.hf import CHUNKED_HEADS, HFCausalLM, HFTokenizer, ModelLoadError
from rlpost.models.limits import ContextLengthError, block_size_for, check_lengths, model_context
from rlpost.models.loading import (UNSIZED_BLOCK_SIZE, build_gpt_mini, cached_hub_folder, load_model, load_weights,
                                   missing_weights, read_own_rows, rebuild, safetensors_files, save_model,
                                   skeleton_of)
from rlpost.models.logprobs import (LogprobHead, check_packing, chunked_head, chunked_logprobs, packing_refusal,
                                    position_ids_for, resolve_packing, token_logprobs,
                                    trunk_hidden_states)
from rlpost.models.precision import (DEVICE_SPEC, DTYPES, PRECISION_CHOICES, PRECISIONS, ROLLOUT_DTYPES, TORCH_DTYPES,
                                     autocast, check_precision, cpu_has_fast_bf16, model_device, resolve_device,
                                     resolve_precision, resolve_rollout_dtype)

__all__ = [
    "CHUNKED_HEADS", "DEVICE_SPEC", "DTYPES", "GPT", "PRECISIONS", "PRECISION_CHOICES", "ROLLOUT_DTYPES",
    "TORCH_DTYPES", "UNSIZED_BLOCK_SIZE", "CharTokenizer", "ContextLengthError", "GPTConfig", "HFCausalLM",
    "HFTokenizer", "LogprobHead", "ModelLoadError", "autocast", "block_size_for", "build_gpt_mini",
    "cached_hub_folder", "check_lengths",
    "check_packing", "check_precision", "chunked_head", "chunked_logprobs", "compile_model", "cpu_has_fast_bf16",
    "encode_demonstration", "encode_prompt", "is_sharded", "load_model", "load_weights", "missing_weights",
    "model_context",
    "model_device", "packing_refusal", "position_ids_for", "read_own_rows", "rebuild", "resolve_device",
    "resolve_packing", "resolve_precision", "resolve_rollout_dtype", "safetensors_files", "save_model",
    "set_gradient_checkpointing", "skeleton_of", "token_logprobs",
    "transformer_blocks", "trunk_hidden_states",
]
