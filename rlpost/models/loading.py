"""Loading and saving models: `load_model` (a fresh gpt_mini, a checkpoint folder or a hub id, with its
tokenizer), `save_model`, `load_weights` (a saved folder into a live model, in place), and `rebuild`.

`transformers` is imported where an HF model is loaded, not at the top: a gpt_mini run never needs it, and
importing it costs more than half a second."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from rlpost.models.blocks import is_sharded
from rlpost.models.gpt_mini import CONV1D, GPT, CharTokenizer, GPTConfig, is_gpt_mini_checkpoint
from rlpost.models.hf import HFCausalLM, HFTokenizer, ModelLoadError
from rlpost.models.limits import block_size_for
from rlpost.models.lora import (apply_lora, base_state_dict, initial_adapters, is_adapter_name, is_lora, load_adapters,
                                lora_config, merged_state_dict, plain_name, save_adapters, saved_lora_config)
from rlpost.models.precision import TORCH_DTYPES, resolve_device

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


UNSIZED_BLOCK_SIZE = 24  # a fresh gpt_mini's block_size when model.block_size is None and no data is passed
# the largest block_size a fresh gpt_mini sizes itself to from the data: one stray long row (a 100,000-character
# prompt) sized it to match, and its first forward took all of the machine's memory
MAX_SIZED_BLOCK_SIZE = 8192


def build_gpt_mini(cfg, alphabet: str, rows: list[dict] | None = None, max_new_tokens: int | None = None,
                   demonstrations: list[dict] = ()) -> tuple[GPT, CharTokenizer]:
    """A freshly initialised gpt_mini whose vocabulary is the task's alphabet.

    Its block_size is `cfg.block_size`; when that is None, the smallest that holds the data
    (`rlpost.models.limits.block_size_for`: every prompt of `rows` + `max_new_tokens`, every demonstration +
    eos), at most MAX_SIZED_BLOCK_SIZE (ContextLengthError naming the longest row beyond it). A caller that passes
    no data gets UNSIZED_BLOCK_SIZE, the fixed default before sizing."""
    tok = CharTokenizer(alphabet)
    block_size = cfg.block_size
    if block_size is None and (rows or demonstrations):
        if max_new_tokens is None:
            raise TypeError("sizing gpt_mini from the data needs max_new_tokens (rollout.max_new_tokens)")
        block_size = block_size_for(tok, rows or [], max_new_tokens, demonstrations, limit=MAX_SIZED_BLOCK_SIZE)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size or UNSIZED_BLOCK_SIZE,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    return model, tok


@contextmanager
def parameters_on_meta():
    """Within it, each parameter a module registers goes to the meta device as it is registered (its shape and
    dtype, no storage): a model is built without its weights, each allocated and dropped in turn, so never more
    than one parameter at a time. Buffers stay real (RoPE tables, masks: what no checkpoint holds). A parameter
    on the meta device already (a tied weight assigned to a second module) is kept as it is, so ties hold."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_model(cfg, alphabet: str | None = None, *, rows: list[dict] | None = None,
               max_new_tokens: int | None = None, demonstrations: list[dict] = (),
               skeleton: bool = False) -> tuple[nn.Module, object]:
    """(model, tokenizer) for `cfg.name`: 'gpt_mini' (new), a checkpoint folder, or a hub id; its parameters
    in `cfg.dtype` on `cfg.device` (see resolve_device). Every role follows the model's device.

    `rows` (train + held-out), `max_new_tokens` and `demonstrations` size a fresh gpt_mini when
    `cfg.block_size` is None (see build_gpt_mini); they are not used otherwise. Check that the data fits
    any model with `rlpost.models.limits.check_lengths` after loading it.

    `skeleton`: the architecture alone, its parameters on the meta device (`parameters_on_meta`: no weight is
    read or held; buffers real, on `cfg.device`), for a caller that shards it and then reads its shards
    (a fsdp2 resume: rlpost.distributed.shard_model, load_shards). Not with LoRA."""
    name = cfg.name
    lora = getattr(cfg, "lora", None)
    lora = dataclasses.asdict(lora) if lora is not None and lora.r > 0 else None
    try:
        saved = saved_lora_config(name) if os.path.isdir(name) else None
    except ValueError as e:  # a damaged lora_config.json
        raise ModelLoadError(f"model folder {name!r}: {e}") from None
    if skeleton and (lora or saved):
        raise ModelLoadError(f"model {name!r}: a skeleton (parameters on the meta device) is not built with LoRA")
    with parameters_on_meta() if skeleton else nullcontext():
        model, tok = _build(name, cfg, alphabet, rows, max_new_tokens, demonstrations, skeleton)
    device, dtype = resolve_device(getattr(cfg, "device", "auto")), TORCH_DTYPES[cfg.dtype]
    if skeleton:  # (a meta tensor cannot move: only the buffers go to the device)
        model = model.to(dtype=dtype)._apply(lambda t: t if t.is_meta else t.to(device))
    else:
        model = model.to(device=device, dtype=dtype)
    if lora or saved:  # LoRA asked for, or a LoRA checkpoint (base + adapters): see rlpost/models/lora.py
        apply_lora(model, **(lora or saved))
        if saved:
            load_adapters(model, name)
    return model, tok


def _build(name: str, cfg, alphabet, rows, max_new_tokens, demonstrations, skeleton: bool):
    """load_model's (model, tokenizer) before its device, dtype and LoRA; `skeleton`: reads no weights."""
    if getattr(cfg, "chat_template", False) and (name == "gpt_mini" or _is_gpt_mini_folder(name)):
        # (an HF tokenizer without a template is refused as it loads: HFTokenizer; gpt_mini's went on without one)
        raise ModelLoadError(f"model {name!r} is a gpt_mini, whose character tokenizer has no chat template, but "
                             "model.chat_template=true: set model.chat_template=false (its prompts are plain text)")
    if name == "gpt_mini":
        if alphabet is None:
            raise ModelLoadError("a fresh gpt_mini needs the task's alphabet to build its vocabulary")
        return build_gpt_mini(cfg, alphabet, rows, max_new_tokens, demonstrations)
    if os.path.isdir(name):
        config_path = os.path.join(name, "config.json")
        if not os.path.isfile(config_path):
            raise ModelLoadError(f"model folder {name!r} has no config.json; is it a saved model?")
        config = _config_json(config_path)
        if is_gpt_mini_checkpoint(config):  # a GPT-2 checkpoint to transformers, gpt_mini to rlpost
            return _load_gpt_mini(name, skeleton)
        return _load_hf(name, cfg, skeleton)
    if os.path.isfile(name):  # a file of a model folder (its weights, its config.json), not the folder
        raise ModelLoadError(f"model {name!r} is a file: model.name takes the folder that holds the model "
                             f"(config.json, its weights, its tokenizer), e.g. {os.path.dirname(name) or '.'!r}")
    if not _HUB_ID.match(name):  # "org/name" is a hub id; any other path must exist locally
        raise ModelLoadError(f"model folder not found: {name!r} (model.name takes 'gpt_mini', a local folder, "
                             f"or a hub id such as 'Qwen/Qwen2.5-0.5B')")
    return _load_hf(name, cfg, skeleton)


def _is_gpt_mini_folder(name: str) -> bool:
    """Whether `name` is a folder holding a saved gpt_mini (a config.json that says so)."""
    path = os.path.join(name, "config.json")
    return os.path.isfile(path) and is_gpt_mini_checkpoint(_config_json(path))


def _config_json(path: str) -> dict:
    """A model folder's config.json as a dict; ModelLoadError naming the file when it is not one JSON object."""
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); is it "
                             "a model's config.json?") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); is the file complete? save or "
                             "download the model again") from None
    except (ValueError, RecursionError) as e:  # a number of thousands of digits, nesting past the stack
        raise ModelLoadError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: holds a JSON {type(config).__name__}, not the object of keys a model's "
                             "config.json is")
    return config


def _load_gpt_mini(name: str, skeleton: bool) -> tuple[GPT, CharTokenizer]:
    """A saved gpt_mini (config.json, model.safetensors, tokenizer.json) and its tokenizer; ModelLoadError naming
    the folder and the file when one is missing, damaged, or does not fit the others."""
    from safetensors import SafetensorError

    for file in ("tokenizer.json",) + (() if skeleton else ("model.safetensors",)):
        if not os.path.isfile(os.path.join(name, file)):
            raise ModelLoadError(f"gpt_mini model folder {name!r} has no {file}: copy it from the folder the model "
                                 "was saved to, or save the model again")
    try:
        tok = CharTokenizer.from_pretrained(name)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not a vocabulary of characters
        raise ModelLoadError(f"gpt_mini model folder {name!r}: its tokenizer.json cannot be read as gpt_mini's "
                             f"({type(e).__name__}: {e})") from None
    try:
        model = GPT(GPT.config_of(name)[0]) if skeleton else GPT.from_pretrained(name)
    except SafetensorError as e:
        raise ModelLoadError(f"gpt_mini model folder {name!r}: {os.path.join(name, 'model.safetensors')} cannot be "
                             f"read ({e}): it is damaged or incomplete (an interrupted copy?); save it again"
                             ) from None
    except RuntimeError as e:  # load_state_dict: weights of another shape or other layers than config.json says
        lines = str(e).splitlines()
        first = (lines[1] if len(lines) > 1 else lines[0]).strip() if lines else type(e).__name__
        raise ModelLoadError(f"gpt_mini model folder {name!r}: its weights do not fit its config.json "
                             f"({first[:300]}{' ...' if len(first) > 300 else ''})") from None
    except ValueError as e:
        raise ModelLoadError(f"gpt_mini model folder {name!r}: {e}") from None
    if tok.vocab_size != model.config.vocab_size:
        raise ModelLoadError(f"gpt_mini model folder {name!r}: its tokenizer.json has {tok.vocab_size} tokens and "
                             f"its config.json vocab_size={model.config.vocab_size}: they were not saved together")
    return model, tok


# what a saved tokenizer is made of; a folder with none of them would load as an empty tokenizer (see _load_hf)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def _load_hf(name: str, cfg, skeleton: bool = False) -> tuple[HFCausalLM, HFTokenizer]:
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = os.path.isdir(name)
    if local and not any(os.path.isfile(os.path.join(name, f)) for f in TOKENIZER_FILES):
        # transformers builds a tokenizer of one special token from config.json alone: every prompt would encode
        # to no tokens, and the run would fail far from here
        raise ModelLoadError(f"model folder {name!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): "
                             "copy the tokenizer of the model it was saved from into it (tokenizer.save_pretrained)")
    try:
        tok = _tokenizer(name, AutoTokenizer.from_pretrained(name), cfg)  # before the weights: seconds, not minutes
        if skeleton:
            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name), dtype=TORCH_DTYPES[cfg.dtype])
        else:
            hf, info = AutoModelForCausalLM.from_pretrained(name, dtype=TORCH_DTYPES[cfg.dtype],
                                                            output_loading_info=True)
            _check_all_weights_loaded(name, info.get("missing_keys") or ())
    except SafetensorError as e:  # a weights file cut short (an interrupted download or copy) or damaged
        raise ModelLoadError(f"model {name!r}: {_unreadable_weights(name) or 'a weights file'} cannot be read "
                             f"({e}): it is damaged or incomplete (an interrupted download or copy?); download or "
                             "save it again") from e
    except (OSError, ValueError) as e:
        if local:  # the folder is there: what failed is in it (an unknown model_type, a missing weights file)
            raise ModelLoadError(f"could not load the model in folder {name!r}: {e}") from e
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only local folders and the local cache are searched)" if offline else ""
        raise ModelLoadError(f"could not load model {name!r}: no such local folder, and loading it as a hub id "
                             f"failed{hint}: {e}") from e
    return HFCausalLM(hf), tok


def _check_all_weights_loaded(name: str, missing) -> None:
    """ModelLoadError when the checkpoint lacks weights its config.json's architecture has: transformers starts
    them random and goes on (a config.json with more layers than the weights, a base model saved without its LM
    head), and the run would train a model that is partly noise."""
    if missing:
        shown = sorted(missing)
        raise ModelLoadError(f"model {name!r}: its weights lack {len(shown)} tensor(s) that its config.json's "
                             f"architecture has ({', '.join(shown[:4])}{', ...' if len(shown) > 4 else ''}), which "
                             "would start random: is the config.json the one saved with these weights (its number of "
                             "layers, its model_type)?")


def _tokenizer(name: str, tok, cfg) -> HFTokenizer:
    """`tok` as rlpost's HFTokenizer, or a ModelLoadError naming model `name`: a tokenizer that encodes text to
    no tokens (a folder that kept tokenizer_config.json but lost its vocabulary), no chat template while
    model.chat_template asks for one, no eos token."""
    if not tok("0 a", add_special_tokens=False)["input_ids"]:
        raise ModelLoadError(f"model {name!r}: its tokenizer ({type(tok).__name__}, {len(tok)} tokens) encodes text "
                             "to no tokens: its vocabulary file (tokenizer.json, or vocab.json + merges.txt, ...) is "
                             "missing or empty; copy the tokenizer of the model it was saved from into the folder")
    try:
        return HFTokenizer(tok, chat_template=cfg.chat_template)
    except ModelLoadError as e:
        raise ModelLoadError(f"model {name!r}: {e}") from None


def _unreadable_weights(folder: str) -> str | None:
    """The first .safetensors file of a local `folder` whose header cannot be read, or None."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isdir(folder):
        return None
    for file in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(folder, file), "pt"):
                pass
        except (SafetensorError, OSError):
            return os.path.join(folder, file)
    return None


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


def load_weights(model: nn.Module, folder: str, files: dict[str, str] | None = None) -> None:
    """Load the weights saved in `folder` (by `save_model`) into `model` in place, exactly: the optimizer
    and every other holder of the model's parameters keep pointing at the same tensors. A LoRA model takes the
    folder's weights as its base, and its adapters (reset to their initial values when the folder has none).
    An FSDP2-sharded model keeps its shard of them on each rank: without LoRA, from a safetensors folder, each
    rank reads only its shards' rows (`read_own_rows`) when the folder holds them under the model's own names
    (`missing_weights`); otherwise every rank reads the full weights as transformers loads them and keeps its
    shard (a collective: every rank calls it). `files`: the folder's `safetensors_files`, when the caller has
    listed them already (the folder's headers are then not read again to list them)."""
    if not os.path.isdir(folder):
        raise ModelLoadError(f"no saved model at {folder}")
    if saved_lora_config(folder) is not None and not is_lora(model):
        raise ModelLoadError(f"{folder} holds LoRA adapters and this model has none: load it with load_model, or "
                             f"export a merged folder (rlpost export {folder} --out FOLDER)")
    if is_sharded(model) and not is_lora(model):
        files = safetensors_files(folder) if files is None else files  # listed once for both uses below
        if not missing_weights(model, folder, files):
            read_own_rows(model, folder, files)  # each rank its shards' rows of each tensor, never the full weights
            return
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
        if is_sharded(model):  # FSDP2 (a sharded reference): each rank keeps its shard of the full weights
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            # under the model's own names (a wrapped HF model's `hf.` prefix, a LoRA layer's `base_layer`)
            prefix = "hf." if isinstance(model, HFCausalLM) else ""
            names = [n for n in model.state_dict() if not is_adapter_name(n)]
            set_model_state_dict(model, {n: state[plain_name(n.removeprefix(prefix))] for n in names},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            for k, t in own.items():
                t.copy_(state[k])
    if is_lora(model):
        load_adapters(model, folder)


def safetensors_files(folder: str) -> dict[str, str] | None:
    """{tensor name: the safetensors file holding it} of a saved model folder (model.safetensors, or the files
    of model.safetensors.index.json); None when the folder has no safetensors weights (a .bin checkpoint)."""
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        return None
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def cached_hub_folder(name: str) -> str | None:
    """The local folder of hub id `name` in the Hugging Face cache (the snapshot its `main` ref names; nothing is
    downloaded) when every safetensors file of it is there; None otherwise (not a hub id, not in the cache, or
    only part of it)."""
    if os.path.isdir(name) or not _HUB_ID.match(name):
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name, local_files_only=True)
    except (ImportError, OSError, ValueError):  # (not in the cache: LocalEntryNotFoundError, an OSError)
        return None
    files = safetensors_files(folder)
    return folder if files and all(os.path.isfile(f) for f in set(files.values())) else None


def _file_keys(model: nn.Module, folder: str) -> tuple[dict[str, str], set[str]]:
    """({the model's state_dict name: the folder's tensor name}, the names whose file tensor is stored
    transposed): a wrapped HF model's names without `hf.`; a gpt_mini's in GPT-2's layout (its Conv1D weights
    transposed) or, saved by an older rlpost, its own."""
    names = list(model.state_dict())
    if isinstance(model, HFCausalLM):
        return {n: n.removeprefix("hf.") for n in names}, set()
    if isinstance(model, GPT):
        transposed = set() if GPT.config_of(folder)[1] else {n for n in names if n.endswith(CONV1D)}
        return {n: n for n in names}, transposed
    raise TypeError(f"load_weights supports gpt_mini and HFCausalLM, not {type(model).__name__}")


def missing_weights(model: nn.Module, folder: str, files: dict[str, str] | None = None) -> list[str]:
    """The names of `model`'s weights (a shared, tied tensor counted once, under any of its names) that the
    safetensors files of `folder` do not hold under the names `read_own_rows` reads, or hold under several of a
    tied weight's names (transformers unties a head saved apart from its embedding when the two differ, so
    which one is meant is known only from their values): empty when it can fill the model (a folder whose names
    transformers converts on loading, an older format, cannot be read row by row). Reads no tensor, only the
    files' headers, or none when the caller passes their listing (`files`: the folder's `safetensors_files`)."""
    files = safetensors_files(folder) if files is None else files
    if files is None:
        return ["(no model.safetensors)"]
    keys, _ = _file_keys(model, folder)
    missing = []
    for names in _tied_groups(model).values():
        held = [n for n in names if keys[n] in files]
        if not held:
            missing.append(names[0])
        elif len(held) > 1:
            missing.append(f"{held[1]} (tied to {held[0]}, both saved)")
    return missing


def _tied_groups(model: nn.Module) -> dict[int, list[str]]:
    """{id(tensor): its state_dict names}: a tied weight (an LM head sharing the embedding) is one entry."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return groups


def read_own_rows(model: nn.Module, folder: str, files: dict[str, str] | None = None) -> None:
    """Fill an FSDP2-sharded model (a meta skeleton sharded by rlpost.distributed.shard_model, or a sharded
    model's weights to replace) from the safetensors weights of a saved model folder, in place: each rank reads,
    memory-mapped, only the part of each tensor its own shard covers (safetensors' get_slice), cast to the
    model's dtype, so no rank ever holds a full tensor, let alone the full model. A weight that is not sharded
    (a persistent buffer) is read whole. Tied weights are read once, under whichever name the file holds (a
    tied LM head is saved as the embedding). Not a collective: each rank reads on its own. Not for LoRA
    (load_weights reads a LoRA model's base and adapters whole). `files`: the folder's `safetensors_files`, when
    the caller has listed them already."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    files = safetensors_files(folder) if files is None else files
    missing = missing_weights(model, folder, files)
    if files is None or missing:
        raise ModelLoadError(f"{folder} lacks {len(missing)} weight(s) of this model under its own names (or "
                             f"saves a tied one twice), e.g. {missing[:3]}; is it a model folder saved by rlpost "
                             f"or transformers for this model? (load_model reads it whole)")
    keys, transposed = _file_keys(model, folder)
    tensors = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for names in _tied_groups(model).values():
            name = next(n for n in names if keys[n] in files)
            # opened for this tensor alone: its mapped pages (counted in the process's RSS) go with it
            with safe_open(files[keys[name]], "pt") as f:
                target = tensors[name]
                if not isinstance(target, DTensor):  # not sharded (a persistent buffer): read whole
                    local, part = target, f.get_tensor(keys[name])
                    part = part.t() if name in transposed else part
                else:
                    local = target.to_local()
                    if local.numel() == 0:  # (more ranks than rows: this rank holds none of them)
                        continue
                    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                                          target.placements)
                    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
                    source = f.get_slice(keys[name])
                    if name in transposed:  # stored [in, out]: this rank's rows are the file's columns
                        part = source[index[1], index[0]].t()
                    else:
                        part = source[index]
                if tuple(part.shape) != tuple(local.shape):
                    raise ModelLoadError(f"{folder}: weight {keys[name]!r} does not fit this model's {name!r} "
                                         f"(global shape {tuple(target.shape)}; this rank's part "
                                         f"{tuple(part.shape)}, it holds {tuple(local.shape)})")
                local.copy_(part.to(local.dtype))


def _same_architecture(model: nn.Module, caller: str) -> nn.Module:
    """A new module of `model`'s architecture (gpt_mini or HFCausalLM, without LoRA), freshly initialised."""
    if isinstance(model, GPT):
        return GPT(model.config)
    if isinstance(model, HFCausalLM):
        from transformers import AutoModelForCausalLM

        return HFCausalLM(AutoModelForCausalLM.from_config(model.hf.config))
    raise TypeError(f"{caller} supports HFCausalLM and gpt_mini, not {type(model).__name__}")


def skeleton_of(model: nn.Module) -> nn.Module:
    """A new module of `model`'s architecture (gpt_mini or HFCausalLM, not LoRA) with its parameters on the meta
    device in their dtypes and `model`'s own buffers (cloned, the non-persistent ones too): what a sharded copy is
    sharded from and then filled, shard by shard (rlpost.distributed.sharded_copy)."""
    if is_lora(model):
        raise TypeError("skeleton_of: a LoRA model's skeleton is not built (its adapters are not meta tensors)")
    with parameters_on_meta():
        new = _same_architecture(model, "skeleton_of")
    dtypes = dict((n, p.dtype) for n, p in model.named_parameters())
    with torch.no_grad():
        for name, p in new.named_parameters():
            p.data = p.data.to(dtypes[name])
    buffers = dict(model.named_buffers())
    for module_name, m in new.named_modules():
        for name in list(m._buffers):
            if m._buffers[name] is not None:
                m._buffers[name] = buffers[f"{module_name}.{name}" if module_name else name].detach().clone()
    return new


def rebuild(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new, plain (unsharded) module of `model`'s architecture holding `state` (its state_dict names),
    on the CPU: what a sharded policy saves its checkpoint folder from. A LoRA model's copy has its adapters
    (the same config and initial values). The random streams are left as they were: building the copy draws
    initial weights, which `state` then replaces."""
    with torch.random.fork_rng(devices=[]):
        new = _same_architecture(model, "rebuild")
        if is_lora(model):
            apply_lora(new, **lora_config(model))
            initial_adapters(new).update(initial_adapters(model))
    new.load_state_dict(state)
    return new.to(next(iter(state.values())).dtype)
