"""How much GPU memory an RL job needs: `rlpost plan memory [RECIPE] [MODEL] [key=value ...]`.

Two layouts. The default, rlpost's own (`plan`, `format_plan`; formulas in the comments above LAYOUTS below), is
what each rank of `rlpost train` holds for a config: the keys `rlpost train` reads, checked against the measured
peak of real jobs (`rlpost.plan.measure`, tests/test_plan_memory.py). `--layout zero3` (`estimate`,
`format_report`) is the generic ZeRO-3 / FSDP view described next, which shards every copy; rlpost does not.

Every figure is bytes; the report prints GB = 1e9 bytes. N is the parameter count, G the GPU count.

Parameters, from the model's shape (hidden h, layers n, heads a, KV heads k, head_dim d, MLP width I,
vocabulary V), exactly as Llama / Qwen2 / GPT-2 (gpt_mini) lay them out:

    embedding      V*h                           (+ positions P*h for GPT-2's learned position table)
    attention      h*a*d (q) + 2*h*k*d (k, v) + a*d*h (o)        (+ biases: Qwen2 q/k/v, GPT-2 all)
    MLP            SwiGLU: 3*h*I (gate, up, down); GPT-2: 2*h*I (+ I + h biases)
    norms          RMSNorm: h each (2 per layer + the final one); LayerNorm: 2*h each (weight, bias)
    lm head        V*h unless tied to the embedding

Training state per parameter (AdamW; ZeRO-3 / FSDP shards all of it: divide by G):

    mixed (bf16)   2 bf16 weights + 2 bf16 grads + 4 fp32 master weights + 4 Adam m + 4 Adam v = 16
                   (the ZeRO paper's count) + 2 buffers (an allowance for fp32 gradient buckets and
                   communication buffers, not one tensor) = 18 bytes/param: 7e9 params -> 126 GB
    fp32           4 weights + 4 grads + 4 Adam m + 4 Adam v = 16 bytes/param. This is also what rlpost
                   holds under trainer.precision=bf16 (autocast over fp32 parameters)
    bf16 (pure)    2 + 2 + 2 + 2 = 8 bytes/param (rlpost's model.dtype=bfloat16)
    LoRA rank r    the frozen base at its weight bytes (2 or 4 per param, no grads or optimizer state) + the
                   adapters r*(in+out) per adapted matrix (q, k, v, o, gate, up, down) at the full state bytes

Inference weights (a frozen reference, a reward model, a rollout engine): 2 bytes/param in bf16 (4 in fp32):
7e9 params -> 14 GB per copy.

KV cache, for `batch` sequences of `seq_len` tokens (prompt + response), K and V of every layer:

    2 * n * kv_heads * d * seq_len * batch * bytes        kv_heads = a (MHA), k (GQA), 1 (MQA)

    Llama-2-7B (n=32, a=k=32, d=128) at 4096 tokens, bf16: 2*32*32*128*4096*2 = 2 GiB per sequence.

Activations of one training micro-batch of b sequences of s tokens (Korthikanti et al., "Reducing
Activation Recomputation in Large Transformer Models", 16-bit, no tensor or sequence parallelism):

    per layer      s*b*h*(34 + 5*a*s/h)   without flash attention (5*a*s^2*b: the attention scores,
                                          softmax and dropout mask); s*b*h*34 with flash attention, which
                                          keeps no s x s matrix
    all layers     n * per layer;  with full activation checkpointing each layer keeps only its input,
                   2*s*b*h, and the backward recomputes one layer at a time: n*2*s*b*h + one layer's
    logits         4*s*b*V: the fp32 logits the log-softmax of the RL loss reads (one copy)

The formula is for a GPT block (MLP 4h, dropout); for a SwiGLU MLP it is an estimate of the same order.
In fp32 every activation is twice as large (the figure is doubled). What autograd saves in one eager gpt_mini
block on the CPU (fp32, whose attention keeps no s x s matrix) is 1.33-1.42x the flash-attention figure:
eager PyTorch keeps contiguous copies of q, k, v and the attention output that the formula does not count.

The four copies of an RL job, and where they live:

    policy         training state + activations              on the trainer GPUs
    reference      inference weights (none under LoRA: the base with the adapters off is the reference)
    critic         training state (PPO-style algorithms only: --critic); its activations are not live at
                   the same time as the policy's, so they are not added
    reward model   inference weights (--reward-model; a verifier needs none)
    rollout        inference weights per engine (divided by its tensor-parallel size) + the KV cache of the
                   sequences it runs (the batch spread over the engines)

    colocated      every copy on the same G GPUs, all resident at once (an upper bound: engines that free
                   their KV cache while training runs peak lower)
    disaggregated  rollout engines on their own R GPUs (--rollout-gpus, of the G), the rest on the other G-R
    async          the same placement as disaggregated

Verdict: a GPU fits when its total is at most (1 - headroom) of its memory; the default headroom, 10 %,
stands for the CUDA context, the allocator's fragmentation and temporary buffers. When it does not fit,
each change below is tried alone and the bytes it saves on the fullest GPU are reported, largest first:
shard over more GPUs, LoRA, activation checkpointing, a smaller micro-batch, shorter sequences, no critic
(GRPO), no reward model (a verifier), the reference offloaded to the CPU, disaggregated rollout.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace

import yaml

from rlpost.algorithms import get_algorithm
from rlpost.config import TrainerConfig, load_config
from rlpost.models import CharTokenizer
from rlpost.tasks import load_task

GB = 1e9


@dataclass
class ModelShape:
    """The shape of a decoder-only transformer; enough to count its parameters and size its caches."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 4096
    head_dim: int | None = None      # default hidden_size // num_heads
    mlp: str = "swiglu"              # "swiglu" (Llama, Qwen2) or "gelu" (GPT-2, gpt_mini)
    norm: str = "rms"                # "rms" (weight only) or "layer" (weight and bias)
    qkv_bias: bool = False           # Qwen2: q, k, v projections have a bias
    attention_bias: bool = False     # Llama's attention_bias / GPT-2: q, k, v and o all have one
    mlp_bias: bool = False
    learned_positions: bool = False  # GPT-2: a max_position_embeddings x hidden position table

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def named_linears(self) -> list[tuple[str, int, int]]:
        """(module name, in, out) of every weight matrix of one layer, named as Llama / Qwen2 or GPT-2 (gpt_mini) name
        them: what LoRA adapts, and what model.lora.target_modules names."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.dim, self.num_kv_heads * self.dim, self.intermediate_size
        if self.mlp == "gelu":  # GPT-2's attention and MLP output projections are both c_proj
            return [("c_attn", h, q + 2 * kv), ("c_proj", q, h), ("c_fc", h, i), ("c_proj", i, h)]
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h), ("gate_proj", h, i),
                ("up_proj", h, i), ("down_proj", i, h)]

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every weight matrix of one layer."""
        return [(a, b) for _, a, b in self.named_linears()]

    def num_params(self) -> int:
        """Every parameter, a tied embedding / lm head counted once."""
        h, n, V = self.hidden_size, self.num_layers, self.vocab_size
        q, kv = self.num_heads * self.dim, self.num_kv_heads * self.dim
        layer = sum(a * b for a, b in self.linear_shapes())
        if self.qkv_bias or self.attention_bias:
            layer += q + 2 * kv
        if self.attention_bias:
            layer += h                                    # o's bias
        if self.mlp_bias:
            layer += self.intermediate_size * (1 if self.mlp == "gelu" else 2) + h
        norm = h * (2 if self.norm == "layer" else 1)
        layer += 2 * norm
        total = n * layer + V * h + norm                  # layers, embedding, final norm
        if self.learned_positions:
            total += self.max_position_embeddings * h
        if not self.tie_word_embeddings:
            total += V * h
        return total

    def lora_params(self, rank: int, targets: Iterable[str] | None = None) -> int:
        """Adapter parameters of rank `rank`, r*(in+out) each, on every layer's weight matrices named in `targets`
        (model.lora.target_modules; None: all of them)."""
        chosen = None if targets is None else set(targets)
        return self.num_layers * sum(rank * (a + b) for name, a, b in self.named_linears()
                                     if chosen is None or name in chosen)


def _qwen(name, h, n, a, k, i, v, tied):
    return ModelShape(name, h, n, a, k, i, v, tied, 32768, qkv_bias=True)


def _llama(name, h, n, a, k, i, v, pos):
    return ModelShape(name, h, n, a, k, i, v, False, pos)


# Published configs (config.json of each model on the Hugging Face hub: Qwen/Qwen2.5-*, meta-llama/*).
# name: hidden, layers, heads, kv heads, intermediate, vocab, tied.
NAMED: dict[str, ModelShape] = {
    "qwen2.5-0.5b": _qwen("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": _qwen("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-3b": _qwen("Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151936, True),
    "qwen2.5-7b": _qwen("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False),
    "qwen2.5-14b": _qwen("Qwen2.5-14B", 5120, 48, 40, 8, 13824, 152064, False),
    "qwen2.5-32b": _qwen("Qwen2.5-32B", 5120, 64, 40, 8, 27648, 152064, False),
    "qwen2.5-72b": _qwen("Qwen2.5-72B", 8192, 80, 64, 8, 29568, 152064, False),
    "llama3.1-8b": _llama("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, 131072),
    "llama3.1-70b": _llama("Llama-3.1-70B", 8192, 80, 64, 8, 28672, 128256, 131072),
    "llama2-7b": _llama("Llama-2-7B", 4096, 32, 32, 32, 11008, 32000, 4096),
}
SIZES = {"0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b", "3b": "qwen2.5-3b", "7b": "qwen2.5-7b",
         "8b": "llama3.1-8b", "14b": "qwen2.5-14b", "32b": "qwen2.5-32b", "70b": "llama3.1-70b",
         "72b": "qwen2.5-72b"}


# model_types whose config.json the formulas count exactly or within 0.1 % (tests/test_plan_memory.py builds each on
# the meta device): Llama-style attention and a SwiGLU / GeGLU MLP of three matrices; qwen2 adds q/k/v biases, and
# the small per-layer norms some add (qwen3's q/k norms, gemma2's extra ones) are not counted. GPT-2's keys (n_embd,
# what gpt_mini saves) are read on their own. Another model_type may lay its weights out otherwise (phi: +20 %,
# gpt_neox: +9 %, starcoder2: +24 % when counted this way): it is refused rather than planned wrong.
DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
                     "granite")
# keys that make a config a mixture of experts: its experts' weights are not in these formulas (qwen2_moe counted
# as dense: -99 %, mixtral: -78 %)
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def _positive_int(config: dict, key: str, required: bool = True) -> int | None:
    """config[key] as a whole number >= 1 (None when absent and not required), or a ValueError naming the key."""
    value = config.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise ValueError(f"config.json has no {key!r}, which the plan needs (a Hugging Face causal LM's config.json "
                         f"has it; model_type {config.get('model_type', '(none)')!r})")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.json's {key!r} must be a whole number >= 1, got {value!r}")
    return value


def shape_from_config(config: dict, name: str = "model") -> ModelShape:
    """A ModelShape from a config.json dict: Hugging Face Llama / Qwen2-style keys (the model_types of
    DENSE_MODEL_TYPES, or none given), or GPT-2's (which is what a gpt_mini checkpoint saves). A mixture of
    experts, another model_type, a multimodal config, a missing key or a size that is not a whole number >= 1
    (or heads that do not divide) is a ValueError that says which."""
    if "n_embd" in config:  # GPT-2 / gpt_mini
        h, heads = _positive_int(config, "n_embd"), _positive_int(config, "n_head")
        layers, vocab = _positive_int(config, "n_layer"), _positive_int(config, "vocab_size")
        positions, inner = _positive_int(config, "n_positions"), _positive_int(config, "n_inner", required=False)
        if h % heads:
            raise ValueError(f"config.json's n_embd {h} is not a multiple of n_head {heads}")
        return ModelShape(name, h, layers, heads, heads, inner or 4 * h, vocab,
                          config.get("tie_word_embeddings", True), positions, mlp="gelu", norm="layer",
                          attention_bias=True, mlp_bias=True, learned_positions=True)
    kind = config.get("model_type", "")
    moe = [k for k in MOE_KEYS if config.get(k)]
    if moe:
        raise ValueError(f"config.json describes a mixture of experts (model_type {kind!r}, {moe[0]}="
                         f"{config[moe[0]]!r}): `plan memory` counts dense transformers only, its experts' weights "
                         f"would be left out")
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        raise ValueError(f"config.json is a multimodal model's (model_type {kind!r}: its language model under "
                         "text_config): `plan memory` counts a causal LM alone; give a folder whose config.json is "
                         "the text_config, knowing that the other towers are left out")
    if kind and kind not in DENSE_MODEL_TYPES:
        raise ValueError(f"config.json's model_type {kind!r} is not one whose layout `plan memory` counts "
                         f"({', '.join(DENSE_MODEL_TYPES)}, or GPT-2's n_embd keys): its parameter count would be "
                         "wrong; plan a model of those families with the same sizes")
    h, layers = _positive_int(config, "hidden_size"), _positive_int(config, "num_hidden_layers")
    heads, inter = _positive_int(config, "num_attention_heads"), _positive_int(config, "intermediate_size")
    kv = _positive_int(config, "num_key_value_heads", required=False) or heads
    vocab, head_dim = _positive_int(config, "vocab_size"), _positive_int(config, "head_dim", required=False)
    positions = _positive_int(config, "max_position_embeddings", required=False) or 4096
    if heads % kv:
        raise ValueError(f"config.json's num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}: "
                         "grouped-query attention shares each KV head among a whole number of query heads")
    if head_dim is None and h % heads:
        raise ValueError(f"config.json's hidden_size {h} is not a multiple of num_attention_heads {heads}, and no "
                         "head_dim is given")
    return ModelShape(name, h, layers, heads, kv, inter, vocab, bool(config.get("tie_word_embeddings", False)),
                      positions, head_dim, qkv_bias=kind == "qwen2",
                      attention_bias=bool(config.get("attention_bias", False)),
                      mlp_bias=bool(config.get("mlp_bias", False)))


def shape_for(model: str) -> ModelShape:
    """A named size ('7b'), a named model ('llama3.1-8b'), or a local folder with a config.json (a config that
    cannot be planned is a ValueError naming the file)."""
    key = model.lower()
    if key in SIZES or key in NAMED:
        return NAMED[SIZES.get(key, key)]
    path = os.path.join(model, "config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                config = json.load(f)
            if not isinstance(config, dict):
                raise ValueError(f"config.json holds a {type(config).__name__}, not an object of keys")
            return shape_from_config(config, os.path.basename(os.path.normpath(model)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    raise ValueError(f"unknown model {model!r}: a size ({', '.join(SIZES)}), a name ({', '.join(NAMED)}), "
                     f"or a folder with a config.json")


# ---------------------------------------------------------------------------------------------- formulas

STATE_BYTES = {  # per parameter: (term, bytes)
    "mixed": [("bf16 weights", 2), ("bf16 grads", 2), ("fp32 master weights", 4), ("Adam m (fp32)", 4),
              ("Adam v (fp32)", 4), ("buffers (fp32 grad buckets, comms)", 2)],
    "fp32": [("fp32 weights", 4), ("fp32 grads", 4), ("Adam m (fp32)", 4), ("Adam v (fp32)", 4)],
    "bf16": [("bf16 weights", 2), ("bf16 grads", 2), ("Adam m (bf16)", 2), ("Adam v (bf16)", 2)],
}
WEIGHT_BYTES = {"mixed": 2, "fp32": 4, "bf16": 2}  # inference / frozen weights


def training_state_bytes(n_params: int, precision: str = "mixed", shards: int = 1) -> dict[str, float]:
    """Each term of the training state of `n_params` parameters, and 'total', divided over `shards` GPUs."""
    terms = {name: n_params * b / shards for name, b in STATE_BYTES[precision]}
    return {**terms, "total": sum(terms.values())}


def kv_cache_bytes(shape: ModelShape, seq_len: int, batch: int, bytes_per: int = 2,
                   kv_heads: int | None = None) -> int:
    """2 (K and V) * layers * kv_heads * head_dim * seq_len * batch * bytes."""
    heads = shape.num_kv_heads if kv_heads is None else kv_heads
    return 2 * shape.num_layers * heads * shape.dim * seq_len * batch * bytes_per


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, checkpointing: bool = False,
                     flash_attention: bool = True, bytes_per: int = 2) -> dict[str, float]:
    """Per-layer and total activation bytes of one micro-batch (Korthikanti et al.; see the module docstring)."""
    s, b, h, a, n = seq_len, micro_batch, shape.hidden_size, shape.num_heads, shape.num_layers
    scale = bytes_per / 2
    per_layer = s * b * h * (34 + (0 if flash_attention else 5 * a * s / h)) * scale
    layers = n * 2 * s * b * h * scale + per_layer if checkpointing else n * per_layer
    logits = 4 * s * b * shape.vocab_size
    return {"per_layer": per_layer, "layers": layers, "logits": logits, "total": layers + logits}


# ---------------------------------------------------------------------------------------------- the plan

@dataclass
class Setup:
    """What the job runs: see `rlpost plan memory --help` for each field."""

    seq_len: int = 4096           # prompt + response tokens
    batch: int = 64               # rollout sequences in flight, over all engines
    micro_batch: int = 1          # sequences per training forward/backward
    gpus: int = 1
    gpu_memory_gb: float = 80.0
    topology: str = "colocated"   # colocated | disaggregated | async
    rollout_gpus: int | None = None   # disaggregated: GPUs of the rollout engines (default: half)
    rollout_tp: int = 1           # tensor-parallel size of one rollout engine
    critic: bool = False
    reward_model: bool = False
    lora_rank: int = 0
    checkpointing: bool = False
    precision: str = "mixed"      # mixed | fp32 | bf16
    shard: bool = True            # ZeRO-3 / FSDP over the trainer GPUs
    flash_attention: bool = True
    offload_reference: bool = False
    headroom: float = 0.10

    def placement(self) -> tuple[int, int]:
        """(trainer GPUs, rollout GPUs); colocated: the same G GPUs for both. A ValueError for a placement that
        cannot exist: rollout GPUs under colocated, or an engine wider (rollout_tp) than the rollout GPUs."""
        if self.topology == "colocated":
            if self.rollout_gpus is not None:
                raise ValueError(f"--rollout-gpus {self.rollout_gpus} puts the engines on GPUs of their own: it needs "
                                 "--topology disaggregated or async (colocated, every GPU holds both)")
            out = self.gpus, self.gpus
        elif self.topology not in ("disaggregated", "async"):
            raise ValueError(f"topology must be colocated, disaggregated or async, not {self.topology!r}")
        else:
            rollout = self.rollout_gpus if self.rollout_gpus is not None else self.gpus // 2
            if not 1 <= rollout < self.gpus:
                raise ValueError(f"{self.topology} needs 1 <= rollout GPUs < GPUs (got {rollout} of {self.gpus})")
            out = self.gpus - rollout, rollout
        if self.rollout_tp > out[1]:
            raise ValueError(f"--rollout-tp {self.rollout_tp}: one engine spans {self.rollout_tp} GPUs, more than the "
                             f"{out[1]} rollout GPU(s); lower --rollout-tp or give more GPUs")
        return out


@dataclass
class Term:
    name: str
    where: str          # "trainer" or "rollout"
    total: float        # bytes over the whole job
    per_gpu: float      # bytes on each GPU that holds it
    detail: str = ""


@dataclass
class Estimate:
    model: str
    params: int
    setup: Setup
    terms: list[Term]
    trainer_gpus: int
    rollout_gpus: int
    per_gpu: dict[str, float]   # "trainer" / "rollout" (colocated: one "gpu") -> bytes
    usable: float
    fits: bool
    breakdown: dict = field(default_factory=dict)
    suggestions: list[dict] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.per_gpu.values())

    def to_dict(self) -> dict:
        """A JSON-ready dict (bytes, plus GB for the totals)."""
        d = asdict(self)
        d["peak_per_gpu_gb"] = self.peak / GB
        d["usable_per_gpu_gb"] = self.usable / GB
        d["per_gpu_gb"] = {k: v / GB for k, v in self.per_gpu.items()}
        return d


def estimate(shape: ModelShape, setup: Setup, suggest: bool = True) -> Estimate:
    """Every term of the job on each GPU, the verdict and (when it does not fit) the computed suggestions."""
    s = setup
    n_train, n_roll = s.placement()
    shards = n_train if s.shard else 1
    N = shape.num_params()
    wbytes = WEIGHT_BYTES[s.precision]
    state_per_param = sum(b for _, b in STATE_BYTES[s.precision])
    act_bytes = 4 if s.precision == "fp32" else 2

    def training(label: str) -> Term:
        if s.lora_rank:
            lora = shape.lora_params(s.lora_rank)
            total = N * wbytes + lora * state_per_param
            return Term(label, "trainer", total, total / shards,
                        f"LoRA r={s.lora_rank}: {N:,} frozen x {wbytes} B + {lora:,} adapters x {state_per_param} B")
        return Term(label, "trainer", N * state_per_param, N * state_per_param / shards,
                    f"{N:,} params x {state_per_param} B" + (f" / {shards} GPUs (ZeRO-3)" if shards > 1 else ""))

    def frozen(label: str, detail: str) -> Term:
        return Term(label, "trainer", N * wbytes, N * wbytes / shards, f"{N:,} x {wbytes} B {detail}".rstrip())

    terms = [training("policy: training state")]
    act = activation_bytes(shape, s.seq_len, s.micro_batch, s.checkpointing, s.flash_attention, act_bytes)
    terms.append(Term("policy: activations", "trainer", act["total"] * n_train, act["total"],
                      f"micro-batch {s.micro_batch} x {s.seq_len} tokens, "
                      f"{'checkpointed' if s.checkpointing else 'no checkpointing'} (+ {act['logits'] / GB:.2f} GB "
                      f"fp32 logits)"))
    if s.lora_rank:
        terms.append(Term("reference", "trainer", 0, 0, "the LoRA base with adapters off: no copy"))
    elif s.offload_reference:
        terms.append(Term("reference", "trainer", 0, 0, "offloaded to CPU memory"))
    else:
        terms.append(frozen("reference", "(frozen)"))
    if s.critic:
        terms.append(training("critic: training state"))
    if s.reward_model:
        terms.append(frozen("reward model", "(frozen)"))
    engines = max(n_roll // s.rollout_tp, 1)
    seqs = math.ceil(s.batch / engines)
    kv = kv_cache_bytes(shape, s.seq_len, seqs, wbytes)
    terms.append(Term("rollout: weights", "rollout", N * wbytes * engines, N * wbytes / s.rollout_tp,
                      f"{engines} engine(s) x {N * wbytes / GB:.2f} GB" + (f" / TP {s.rollout_tp}" if s.rollout_tp > 1
                                                                           else "")))
    terms.append(Term("rollout: KV cache", "rollout", kv * engines, kv / s.rollout_tp,
                      f"{seqs} seq(s) x {s.seq_len} tokens per engine, {shape.num_kv_heads} KV heads"))

    if s.topology == "colocated":
        per_gpu = {"gpu": sum(t.per_gpu for t in terms)}
    else:
        per_gpu = {w: sum(t.per_gpu for t in terms if t.where == w) for w in ("trainer", "rollout")}
    usable = s.gpu_memory_gb * GB * (1 - s.headroom)
    out = Estimate(shape.name, N, s, terms, n_train, n_roll, per_gpu, usable, max(per_gpu.values()) <= usable)
    out.breakdown = breakdown(shape, s)
    if suggest and not out.fits:
        out.suggestions = suggestions(shape, out)
    return out


def breakdown(shape: ModelShape, s: Setup) -> dict:
    """The side tables: bytes/param of training, KV per sequence for MHA / GQA / MQA, activations."""
    wbytes = WEIGHT_BYTES[s.precision]
    act_bytes = 4 if s.precision == "fp32" else 2
    return {
        "state_bytes_per_param": dict(STATE_BYTES[s.precision]),
        "weight_bytes_per_param": wbytes,
        "kv_per_sequence": {f"{kind} ({heads} KV heads)": kv_cache_bytes(shape, s.seq_len, 1, wbytes, heads)
                            for kind, heads in (("MHA", shape.num_heads), ("GQA", shape.num_kv_heads), ("MQA", 1))},
        "activations": {f"{'checkpointed' if ckpt else 'full'}, {'flash' if flash else 'no flash'}":
                        activation_bytes(shape, s.seq_len, s.micro_batch, ckpt, flash, act_bytes)["total"]
                        for ckpt in (False, True) for flash in (True, False)},
    }


def _changes(shape: ModelShape, s: Setup) -> list[tuple[str, Setup]]:
    """The changes worth trying on setup `s`, each as (what, the changed setup)."""
    n_train, n_roll = s.placement()
    changes = []
    if s.shard:
        changes.append((f"shard over {2 * s.gpus} GPUs", replace(s, gpus=2 * s.gpus, rollout_gpus=(
            None if s.rollout_gpus is None else 2 * s.rollout_gpus))))
    else:
        changes.append((f"shard the training state over the {n_train} trainer GPUs (ZeRO-3 / FSDP)",
                        replace(s, shard=True)))
    if not s.lora_rank:
        changes.append(("LoRA rank 16 (and no reference copy)", replace(s, lora_rank=16)))
    if not s.checkpointing:
        changes.append(("activation checkpointing", replace(s, checkpointing=True)))
    if s.micro_batch > 1:
        changes.append((f"micro-batch {s.micro_batch // 2}", replace(s, micro_batch=s.micro_batch // 2)))
    if s.seq_len > 256:
        changes.append((f"sequences of {s.seq_len // 2} tokens", replace(s, seq_len=s.seq_len // 2)))
    if s.critic:
        changes.append(("no critic (GRPO)", replace(s, critic=False)))
    if s.reward_model:
        changes.append(("no reward model (a verifier)", replace(s, reward_model=False)))
    if not s.offload_reference and not s.lora_rank:
        changes.append(("reference offloaded to CPU", replace(s, offload_reference=True)))
    if 2 * s.rollout_tp <= n_roll:
        changes.append((f"rollout engines of tensor-parallel size {2 * s.rollout_tp}",
                        replace(s, rollout_tp=2 * s.rollout_tp)))
    if s.topology == "colocated" and s.gpus >= 2 and s.rollout_tp <= s.gpus // 2:
        changes.append((f"disaggregate: rollout on {s.gpus // 2} of the {s.gpus} GPUs",
                        replace(s, topology="disaggregated", rollout_gpus=s.gpus // 2)))
    return changes


def suggestions(shape: ModelShape, est: Estimate) -> list[dict]:
    """Each change tried alone: the bytes it saves on the fullest GPU and whether it then fits, largest first.
    Then, when no change alone is enough, the changes applied greedily (the largest saving first) until it fits."""
    out = []
    for what, changed in _changes(shape, est.setup):
        after = estimate(shape, changed, suggest=False)
        if est.peak - after.peak > 0:
            out.append({"change": what, "saves_gb": (est.peak - after.peak) / GB, "peak_gb": after.peak / GB,
                        "fits": after.fits})
    out.sort(key=lambda d: -d["saves_gb"])
    if out and not any(d["fits"] for d in out):
        current, steps = est, []
        for _ in range(8):
            tried = [(estimate(shape, changed, suggest=False), what)
                     for what, changed in _changes(shape, current.setup)]
            best, what = min(tried, key=lambda t: t[0].peak, default=(None, None))
            if best is None or best.peak >= current.peak:
                break
            current, steps = best, steps + [what]
            if current.fits:
                break
        out.append({"change": "together: " + ", then ".join(steps), "saves_gb": (est.peak - current.peak) / GB,
                    "peak_gb": current.peak / GB, "fits": current.fits})
    return out


def format_report(est: Estimate) -> str:
    """The readable table: each term per GPU and in total, the side tables, the verdict and suggestions."""
    s, bd = est.setup, est.breakdown
    where = (f"colocated on {s.gpus} GPUs" if s.topology == "colocated" else
             f"{s.topology}: {est.trainer_gpus} trainer GPUs + {est.rollout_gpus} rollout GPUs")
    lines = [f"{est.model}: {est.params:,} parameters ({est.params / 1e9:.2f} B); {where}, "
             f"{s.gpu_memory_gb:g} GB each",
             f"precision {s.precision}, seq_len {s.seq_len}, rollout batch {s.batch}, micro-batch {s.micro_batch}, "
             f"{'ZeRO-3 sharded' if s.shard else 'unsharded'}", "",
             f"  {'term':<24} {'on':<8} {'per GPU GB':>10} {'total GB':>10}  detail"]
    for t in est.terms:
        lines.append(f"  {t.name:<24} {t.where:<8} {t.per_gpu / GB:>10.2f} {t.total / GB:>10.2f}  {t.detail}")
    for k, v in est.per_gpu.items():
        label = "= per GPU" if k == "gpu" else f"= per {k} GPU"
        lines.append(f"  {label:<33} {v / GB:>10.2f}")
    state = " + ".join(f"{b} {n}" for n, b in bd["state_bytes_per_param"].items())
    lines += ["", f"  training state per param: {state} = {sum(bd['state_bytes_per_param'].values())} B; "
                  f"inference weights {bd['weight_bytes_per_param']} B/param",
              f"  KV cache per sequence of {s.seq_len} tokens: "
              + ", ".join(f"{k} {v / GB:.3f} GB" for k, v in bd["kv_per_sequence"].items()),
              "  activations per micro-batch (all layers + logits): "
              + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in bd["activations"].items()), ""]
    lines += _verdict(est, "on the fullest GPU", s.gpu_memory_gb, s.headroom)
    return "\n".join(lines)


def _verdict(plan, where: str, gpu_memory_gb: float, headroom: float) -> list[str]:
    """The closing lines of a printed plan: fits or not, and each suggestion with what it saves."""
    lines = [f"{'FITS' if plan.fits else 'DOES NOT FIT'}: {plan.peak / GB:.2f} GB {where}, {plan.usable / GB:.2f} GB "
             f"usable ({gpu_memory_gb:g} GB less {headroom:.0%} headroom)"]
    for sug in plan.suggestions:
        lines.append(f"  - {sug['change']}: saves {sug['saves_gb']:.2f} GB -> {sug['peak_gb']:.2f} GB"
                     f"{' (fits)' if sug['fits'] else ''}")
    return lines


# ---------------------------------------------------------------------------------------------- rlpost's layout
#
# What one rlpost rank (one process, one GPU) holds for a config, term by term, with the formulas the report
# prints. N parameters of B bytes (model.dtype: 4 float32, 2 bfloat16; trainer.precision=bf16 is autocast over
# these parameters, so it does not change B), R ranks (trainer.strategy=fsdp2 under torchrun; single: 1).
#
# Held for the whole stage:
#   policy weights, grads, AdamW m and v   N*B / R each (LoRA: the base N*B / R, and the adapters' A*B / R x 4;
#                                          under fsdp2 the frozen base is sharded with the adapters)
#   reference                              the frozen copy of the policy, N*Br: Br = 2 under trainer.precision=bf16
#                                          (the copy is stored in bf16), else B; sharded like the policy under fsdp2,
#                                          N*Br / R; 0 with reference.offload (it lives in CPU memory); none under
#                                          LoRA (the base with adapters off, under fsdp2 the sharded policy itself) or
#                                          without a KL term (algorithm.beta=0)
#   engine copy                            a FULL copy on every rank under rl.weight_sync=copy: N*B, its matmul
#                                          weights (the blocks', an untied head) in bf16 under rollout.dtype=bf16
#                                          (the colocated single-process default, pointer, shares the trainer's
#                                          module); LoRA: + A*B, its adapters; under fsdp2 not held: see the
#                                          rollout phase
#   native engine's fused matrices         Llama / Qwen2: q|k|v and gate|up concatenated per layer, cached:
#                                          n * h * (q + 2*kv + 2*I) * B (under fsdp2: with the engine copy)
#   critic (PPO)                           separate: weights, grads, m, v of a copy: 4*N*B; head: 4*h*B
# One phase at a time on top (the roles take turns), the largest counts:
#   rollout     KV cache 2*n*kv*d*S*rows*B (rows = the rank's prompts_per_step*k / R, capped by rollout.max_num_seqs)
#               fsdp2: + the engine copy (and the fused matrices), gathered at the sync and freed after the rollout's
#               scoring (reference, critic), so also in the reference phase, not in train
#               + one decode step's logits and sampling buffers rows*V*28 (fp32 logits, the sampler's scaled logits
#               and probabilities, 4 B each; their fp64 copy and its cumulative sum, 8 B each)
#   reference   one no-grad forward over one of the trainer's micro-batches (trainer.micro_batch_size rows, at
#               most trainer.micro_batch_tokens positions; the rank's whole batch when neither is set): a layer's
#               buffers tokens*(3h + q + 2kv + 3I)*A + the head's chunk 3*c*V*4 (HEAD_CHUNK_BUFFERS);
#               fsdp2 or reference.offload: + the root and one block on the device, (root + block) * Br (gathered
#               from the shards, or streamed from the CPU, one block at a time); LoRA under fsdp2: the policy's own
#               root and one block, (root + block) * B
#   train       one micro-batch's saved activations, per layer tokens*(4h + 3q + 3kv + 4I)*A (checkpointing:
#               tokens*h*A per layer + one layer's), + the log-prob head's backward: 4*c*V*4 (chunk buffers)
#               + V*h*4 (its fp32 weight gradient; not under fsdp2 or LoRA); fsdp2: the root module (embedding,
#               final norm, head) and one block gathered, weights and gradients, 2 * (root + block) * B (LoRA: the
#               weights and the block's adapter gradients, (root + block + A / n) * B)
#   train end   the embedding's dense gradient V*h*B (tied to the head: 3 of them, the head's gradient waiting in
#               autograd's input buffer, the embedding's and their sum); fsdp2: + the gathered root and its
#               gradient's copy for the reduce-scatter, 2 * root * B. LoRA: no embedding gradient (frozen), and
#               under fsdp2 the gathered root alone, root * B
#   sync        fsdp2: the engine copy, gathered one parameter at a time (each cast to the engine's dtype: + the
#               largest, V*h*B, before its cast) after the old copy was freed; the engine keeps these tensors (LoRA:
#               the base and its adapters, the copy having been freed while the trainer worked)
#   checkpoint  fsdp2: rank 0 gathers the full weights N*B and rebuilds a plain model N*B to save (in host
#               memory on a GPU run, so counted only under model.device=cpu)
# A = activation bytes (2 under bf16 autocast or bfloat16 parameters, else 4); c = trainer.logprob_chunk tokens
# (None: 2**25 / V); tokens = rows * (prompt + response) (trainer.micro_batch_size rows; the rank's whole batch
# when None; trainer.micro_batch_tokens with trainer.packing).

LAYOUTS = ("rlpost", "zero3")

# fp32 [chunk, V] buffers the chunked log-prob head (rlpost.models.logprobs) holds at once, measured (tests/
# test_plan_memory.py). Forward: the chunk's logits, log-sum-exp's temporary and the probabilities. Backward: this
# chunk's logits and probabilities, and the previous chunk's two, which the loop's variables still reference while
# this chunk's are computed.
HEAD_CHUNK_BUFFERS = {"forward": 3, "backward": 4}


def logprob_head_bytes(chunk: int, vocab: int, backward: bool) -> int:
    """Bytes of the chunked log-prob head's [chunk, V] fp32 buffers at its fullest: HEAD_CHUNK_BUFFERS x chunk x V x 4
    (the head weight's gradient, V x h, comes on top in the backward)."""
    return HEAD_CHUNK_BUFFERS["backward" if backward else "forward"] * chunk * vocab * 4


@dataclass
class Job:
    """The settings of an rlpost RL job that set its memory, read from a Config (`job_from_config`)."""

    ranks: int = 1                     # trainer.strategy=fsdp2: torchrun's ranks; single: 1
    strategy: str = "single"
    param_bytes: int = 4               # model.dtype: float32 4, bfloat16 2
    autocast: bool = False             # trainer.precision=bf16
    lora_rank: int = 0
    lora_targets: tuple[str, ...] | None = None  # model.lora.target_modules (None: every matrix)
    checkpointing: bool = False
    micro_batch_size: int | None = None
    minibatches: int = 1               # trainer.minibatches: optimizer steps per pass over the batch
    packing: bool = False              # trainer.packing (when this rlpost has it)
    micro_batch_tokens: int | None = None  # trainer.micro_batch_tokens (when this rlpost has it)
    logprob_chunk: int | None = None
    prompts_per_step: int = 32
    k: int = 8
    prompt_tokens: int = 128           # the longest prompt (a plan-only figure: --prompt-tokens)
    max_new_tokens: int = 6
    max_num_seqs: int = 0
    reference: bool = True             # the algorithm reads ref_logp (GRPO: beta > 0)
    offload_reference: bool = False    # reference.offload: the copy in CPU memory, streamed block by block
    critic: str | None = None          # "separate" | "head" | None
    engine_copy: bool = False          # fsdp2, or rl.weight_sync=copy
    rollout_bf16: bool = False         # rollout.dtype=bf16: a copy engine holds its matmul weights in bf16
    native_engine: bool = True         # rlpost's native engine (Llama / Qwen2 fuse q|k|v and gate|up)
    vllm_engine: bool = False          # rollout.engine=vllm: its weights and KV cache are vLLM's, not counted
    topology: str = "colocated"
    cpu: bool = False                  # model.device=cpu: the run's memory is this process's RSS
    gpu_memory_gb: float = 80.0
    headroom: float = 0.10
    notes: list[str] = field(default_factory=list)

    @property
    def seq_tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    @property
    def rank_rows(self) -> int:
        """Sequences of one step on one rank (each rank rolls out its share of the prompts)."""
        return math.ceil(self.prompts_per_step / self.ranks) * self.k


def shape_for_config(cfg) -> ModelShape:
    """The shape of `model.name`: a named size or model, a folder with a config.json, a hub id whose last part
    is a named model (Qwen/Qwen2.5-7B), or gpt_mini (its character vocabulary from the task's alphabet)."""
    name = cfg.model.name
    if name == "gpt_mini":
        vocab = CharTokenizer(load_task(cfg.task).alphabet).vocab_size
        h = cfg.model.n_embd
        blocks = cfg.model.block_size or 2048
        return ModelShape("gpt_mini", h, cfg.model.n_layer, cfg.model.n_head, cfg.model.n_head, 4 * h, vocab, True,
                          blocks, mlp="gelu", norm="layer", attention_bias=True, mlp_bias=True,
                          learned_positions=True)
    if os.path.isfile(os.path.join(name, "config.json")):  # its own errors (a mixture of experts, ...) are the answer
        return shape_for(name)
    try:
        return shape_for(name)
    except ValueError:
        base = name.rstrip("/").split("/")[-1].lower()
        if base in NAMED:
            return NAMED[base]
        raise ValueError(f"model.name={name!r}: no config.json there and not a named model; give a size or name "
                         f"as MODEL ({', '.join(SIZES)}; {', '.join(NAMED)}) or a local folder") from None


def job_from_config(cfg, ranks: int = 1, prompt_tokens: int = 128, gpu_memory_gb: float = 80.0,
                    headroom: float = 0.10) -> Job:
    """A Job from a loaded Config (`rlpost.config.load_config`): the same keys `rlpost train` reads."""
    tc, rc = cfg.trainer, cfg.rollout
    if ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {ranks}")
    if ranks > 1 and tc.strategy != "fsdp2":
        raise ValueError(f"--ranks {ranks} needs trainer.strategy=fsdp2 (trainer.strategy={tc.strategy} runs one "
                         "process); add trainer.strategy=fsdp2 rl.weight_sync=copy")
    algo = get_algorithm(**cfg.algorithm)
    job = Job(ranks=ranks, strategy=tc.strategy, param_bytes=2 if cfg.model.dtype == "bfloat16" else 4,
              autocast=tc.precision == "bf16", lora_rank=cfg.model.lora.r,
              lora_targets=tuple(cfg.model.lora.target_modules), checkpointing=tc.gradient_checkpointing,
              micro_batch_size=tc.micro_batch_size, minibatches=tc.minibatches,
              # auto may pack any batch: planned as packed, whose token budget bounds a padded micro-batch's too
              packing=getattr(tc, "packing", False) is not False,
              micro_batch_tokens=getattr(tc, "micro_batch_tokens", None),
              logprob_chunk=tc.logprob_chunk,
              prompts_per_step=rc.prompts_per_step, k=rc.k, prompt_tokens=prompt_tokens,
              max_new_tokens=rc.max_new_tokens, max_num_seqs=rc.max_num_seqs, reference=algo.uses_reference,
              offload_reference=cfg.reference.offload,
              critic=cfg.critic.type if algo.uses_critic else None,
              engine_copy=tc.strategy == "fsdp2" or cfg.rl.weight_sync == "copy",
              rollout_bf16=rc.dtype == "bf16" or (rc.dtype == "auto" and tc.precision == "bf16"),
              native_engine=rc.engine in ("auto", "native"), vllm_engine=rc.engine == "vllm", topology=cfg.rl.topology,
              cpu=cfg.model.device == "cpu", gpu_memory_gb=gpu_memory_gb,
              headroom=headroom)
    if rc.engine == "vllm":
        share = rc.vllm_gpu_memory_utilization
        job.notes.append(f"rollout.engine=vllm: vLLM's weights and KV cache are not counted (no rollout phase below): "
                         f"vLLM reserves rollout.vllm_gpu_memory_utilization={share} of the GPU for them "
                         f"({share * gpu_memory_gb:.1f} GB of {gpu_memory_gb:g} GB) beside these terms, and frees it "
                         f"while it sleeps (rollout.vllm_sleep)")
    if cfg.rl.topology != "colocated":
        job.notes.append(f"rl.topology={cfg.rl.topology}: the engines run in Ray workers, each with its own "
                         "weights and KV cache (the rollout rows below)")
    return job


@dataclass
class PlanTerm:
    name: str
    phase: str          # "held" (the whole stage) or the phase it peaks in: rollout | reference | train | ...
    bytes: float
    formula: str


@dataclass
class Plan:
    """rlpost's own layout of one job: the terms on the fullest rank, the peak and the verdict."""

    model: str
    params: int
    job: Job
    terms: list[PlanTerm]
    peak_phase: str
    peak: float
    usable: float
    fits: bool
    suggestions: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_gb"], d["usable_gb"] = self.peak / GB, self.usable / GB
        return d


def _gb(x: float) -> str:
    """Bytes as GB from 0.1 GB up (a subtracted term too: -30.5 GB, not -3.05e+04 MB), else MB."""
    return f"{x / GB:.3g} GB" if abs(x) >= 1e8 else f"{x / 1e6:.3g} MB"


def plan(shape: ModelShape, job: Job, suggest: bool = True) -> Plan:
    """Every term one rlpost rank holds for `job`, the phase that peaks, and the verdict (see the comments above
    LAYOUTS for the formulas)."""
    j = job
    N, B, R, V, h, n = shape.num_params(), j.param_bytes, j.ranks, shape.vocab_size, shape.hidden_size, \
        shape.num_layers
    q, kv, inter = shape.num_heads * shape.dim, shape.num_kv_heads * shape.dim, shape.intermediate_size
    A = 2 if (j.autocast or B == 2) else 4
    sharded = j.strategy == "fsdp2"
    shard = f" / {R} ranks" if sharded and R > 1 else ""
    div = R if sharded else 1
    terms: list[PlanTerm] = []

    def held(name, value, formula):
        terms.append(PlanTerm(name, "held", value, formula))

    if j.lora_rank:
        a = shape.lora_params(j.lora_rank, j.lora_targets)
        held("policy weights", (N + a) * B / div, f"(N + adapters) x {B} B{shard} = ({N:,} + {a:,}) x {B}{shard}")
        held("policy grads + AdamW m, v", 3 * a * B / div, f"3 x adapters x {B} B{shard} = 3 x {a:,} x {B}{shard}")
    else:
        held("policy weights", N * B / div, f"N x {B} B{shard} = {N:,} x {B}{shard}")
        held("policy grads", N * B / div, f"N x {B} B{shard}")
        held("policy AdamW m, v", 2 * N * B / div, f"2 x N x {B} B{shard}")
    # FSDP2's root module: the embedding, the final norm and the head; and one transformer block
    root = V * h * (1 if shape.tie_word_embeddings else 2) + h * (2 if shape.norm == "layer" else 1) + (
        shape.max_position_embeddings * h if shape.learned_positions else 0)
    layer = (N - root) // n
    Br = 2 if j.autocast else B  # the reference's bytes per parameter: stored in bf16 under bf16 autocast
    kept = "bf16 copy (trainer.precision=bf16)" if j.autocast and B == 4 else "frozen copy of the policy"
    if j.reference and j.lora_rank:
        held("reference", 0, "the LoRA base with adapters off: no copy")
    elif j.reference and j.offload_reference:
        held("reference (offloaded)", 0, f"0: the {kept}, N x {Br} B = {_gb(N * Br)}, lives in CPU memory "
                                         "(reference.offload)")
    elif j.reference and sharded:
        held("reference (sharded)", N * Br / div, f"N x {Br} B{shard}: the {kept}, sharded like the policy")
    elif j.reference:
        held("reference (full copy)", N * Br, f"N x {Br} B: a whole {kept}")
    colocated = j.topology == "colocated"
    lora = shape.lora_params(j.lora_rank, j.lora_targets) if j.lora_rank else 0  # the adapters' parameters
    # a copy engine's weights: under rollout.dtype=bf16 its matmul weights (the blocks', an untied head) in bf16,
    # the embedding and norms in B (LoRA: and its adapters); under fsdp2 it holds them only from a sync to the end
    # of the rollout's scoring (LoRA too: the sync after the release gathers the base again)
    matmul = N - root + (0 if shape.tie_word_embeddings else V * h) if j.rollout_bf16 and B == 4 else 0
    engine_bytes = matmul * 2 + (N - matmul) * B + lora * B
    engine_f = (f"(N - root + untied head) x 2 B + the rest x {B} B = {matmul:,} x 2 + {N - matmul:,} x {B} "
                "(rollout.dtype=bf16)" if matmul else f"N x {B} B") + (f" + adapters x {B} B" if lora else "")
    released = sharded
    engine_terms = []
    if colocated and j.engine_copy:
        engine_terms.append(("engine copy (full, every rank)", engine_bytes, engine_f + (
            ": fsdp2, no engine samples from shards; freed from the rollout's end to the sync" if released
            else " (rl.weight_sync=copy)")))
    if colocated and j.native_engine and shape.mlp == "swiglu":
        engine_terms.append(("native engine fused q|k|v, gate|up", n * h * (q + 2 * kv + 2 * inter) * B,
                             f"n x h x (q + 2 kv + 2 I) x {B} B = {n} x {h} x ({q} + {2 * kv} + {2 * inter}) x {B}"))
    for name, value, formula in engine_terms:
        if not released or not j.engine_copy:
            held(name, value, formula)
    if j.critic == "separate":
        held("critic (separate copy)", 4 * N * B / div, f"4 (weights, grads, m, v) x N x {B} B")
    elif j.critic == "head":
        held("critic (value head)", 4 * h * B, f"4 x h x {B} B")

    chunk = j.logprob_chunk or (1 << 25) // max(V, 1)
    chunk = max(16, chunk) if not j.logprob_chunk else chunk
    S, rows = j.seq_tokens, j.rank_rows
    phases: dict[str, list[PlanTerm]] = {}
    if colocated and not j.vllm_engine:  # (vLLM's cache is its own reservation: a note says so)
        live = min(j.max_num_seqs or rows, rows)
        kvb = 2 * n * shape.num_kv_heads * shape.dim * S * live * B
        phases["rollout"] = [
            PlanTerm("KV cache", "rollout", kvb, f"2 x n x kv_heads x d x S x rows x {B} B = 2 x {n} x "
                                                 f"{shape.num_kv_heads} x {shape.dim} x {S} x {live} x {B}"),
            PlanTerm("decode logits + sampling", "rollout", live * V * 28, f"rows x V x 28 B = {live} x {V:,} x 28")]
    if j.reference:
        # the reference scores in the trainer's micro-batches (rlpost.packing.micro_batches): packed, at most
        # micro_batch_tokens positions; padded, micro_batch_size rows, fewer when micro_batch_tokens caps rows x S
        if j.packing and j.micro_batch_tokens:
            ref_tokens, what = j.micro_batch_tokens, "trainer.micro_batch_tokens"
        else:
            ref_rows = min(j.micro_batch_size or rows, rows)
            if j.micro_batch_tokens:
                ref_rows = min(ref_rows, max(1, j.micro_batch_tokens // S))
            ref_tokens = ref_rows * S
            what = f"the rank's whole batch, {rows} x {S}" if ref_rows == rows else f"{ref_rows} rows x {S}"
        per = 3 * h + q + 2 * kv + 3 * inter
        phases["reference"] = [
            PlanTerm("reference forward (no grad)", "reference", ref_tokens * per * A,
                     f"tokens x (3h + q + 2kv + 3I) x {A} B = {ref_tokens:,} ({what}) x {per:,} x {A}"),
            PlanTerm("log-prob head chunk", "reference", logprob_head_bytes(min(chunk, ref_tokens), V, False),
                     f"3 x chunk x V x 4 B = 3 x {min(chunk, ref_tokens)} x {V:,} x 4")]
        if not j.lora_rank and (j.offload_reference or sharded):
            how = "streamed from the CPU" if j.offload_reference else "gathered from the shards"
            phases["reference"].append(PlanTerm(
                "reference root + one block", "reference", (root + layer) * Br,
                f"(root + block) x {Br} B = ({root:,} + {layer:,}) x {Br}, {how} one block at a time"))
        elif sharded:  # LoRA under fsdp2: the reference is the sharded policy itself, adapters off
            phases["reference"].append(PlanTerm(
                "policy root + one block (adapters off)", "reference", (root + layer) * B,
                f"(root + block) x {B} B = ({root:,} + {layer:,}) x {B}, gathered from the policy's shards one "
                "block at a time"))
    if j.packing and j.micro_batch_tokens:
        mb_tokens, mb_what = j.micro_batch_tokens, "trainer.micro_batch_tokens"
    else:
        mb_rows = min(j.micro_batch_size or rows, rows)
        mb_tokens, mb_what = mb_rows * S, f"{mb_rows} rows x {S}"
    mlp_k = 4 if shape.mlp == "swiglu" else 2  # swiglu: gate, up, silu(gate), product; gelu: fc out, gelu out
    per_layer = 4 * h + 3 * q + 3 * kv + mlp_k * inter
    if j.checkpointing:
        act = mb_tokens * (n * h + per_layer) * A
        act_f = (f"tokens x (n x h + 4h + 3q + 3kv + {mlp_k}I) x {A} B = {mb_tokens:,} ({mb_what}) x "
                 f"{n * h + per_layer:,} x {A} (checkpointed)")
    else:
        act = mb_tokens * n * per_layer * A
        act_f = (f"tokens x n x (4h + 3q + 3kv + {mlp_k}I) x {A} B = {mb_tokens:,} ({mb_what}) x {n} x "
                 f"{per_layer:,} x {A}")
    train_chunk = min(chunk, mb_tokens)
    # the backward starts at the head. With one micro-batch per optimizer step zero_grad(set_to_none) has freed the
    # held gradients by then; with more, the later micro-batches accumulate into them. The head's fp32 weight
    # gradient (under fsdp2: the unsharded root's, counted in its gathers below) and chunk buffers come on top.
    trained = shape.lora_params(j.lora_rank, j.lora_targets) * B / div if j.lora_rank else N * B / div
    mb_rows = j.micro_batch_size or rows
    one_micro_batch = not (j.packing and j.micro_batch_tokens) and mb_rows >= math.ceil(rows / j.minibatches)
    head_w = 0 if sharded or lora else V * h * 4  # (LoRA: the head is frozen, it gets no gradient)
    phases["train"] = [PlanTerm("activations (one micro-batch)", "train", act, act_f),
                       PlanTerm("log-prob head backward", "train", logprob_head_bytes(train_chunk, V, True) + head_w,
                                f"4 x chunk x V x 4 B{'' if head_w == 0 else ' + V x h x 4 B'} = 4 x {train_chunk} x "
                                f"{V:,} x 4" + ("" if head_w == 0 else f" + {V:,} x {h} x 4"))]
    if one_micro_batch:
        phases["train"].append(PlanTerm("policy grads, freed until the backward", "train", -trained,
                                        "- the held policy grads: one micro-batch per optimizer step, and zero_grad "
                                        "sets them to None before it"))
    if sharded and lora:  # the frozen base has no gradient: only the block's adapters get one
        block_adapters = lora // n
        phases["train"].append(PlanTerm("fsdp2 gathers", "train", (root + layer + block_adapters) * B,
                                        f"(root {root:,} + one block {layer:,}) x {B} B weights + the block's "
                                        f"adapter grads {block_adapters:,} x {B} B, unsharded"))
    elif sharded:  # FSDP2 keeps the root unsharded from its forward to the backward's end
        phases["train"].append(PlanTerm("fsdp2 gathers", "train", 2 * (root + layer) * B,
                                        f"2 (weights, grads) x (root {root:,} + one block {layer:,}) x {B} B, "
                                        "unsharded"))
    # the backward's end: the embedding's dense gradient V*h*B arrives; a tied embedding's autograd input buffer
    # still holds the head's gradient and adds the two into a third tensor before accumulating them
    tied = shape.tie_word_embeddings
    emb_k = 3 if tied else 1
    end = [] if lora else [  # (LoRA: the embedding is frozen, it gets no gradient)
        PlanTerm("embedding gradient" + (" (tied: + head's + sum)" if tied else ""), "train end",
                 emb_k * V * h * B, f"{emb_k} x V x h x {B} B = {emb_k} x {V:,} x {h} x {B}")]
    if sharded and lora:  # the root stays gathered; frozen, it has no gradient to reduce
        end += [PlanTerm("fsdp2 root", "train end", root * B, f"root x {B} B = {root:,} x {B} (frozen: no gradient)")]
    elif sharded:  # the root stays gathered, and its unsharded gradient is copied into the reduce-scatter's input
        end += [PlanTerm("fsdp2 root + reduce-scatter copy", "train end", 2 * root * B,
                         f"2 x root x {B} B = 2 x {root:,} x {B}")]
    if one_micro_batch:
        end.append(PlanTerm("policy grads, freed until the backward", "train end", -trained,
                            "- the held policy grads (one micro-batch per optimizer step)"))
    phases["train end"] = end
    if released and colocated and j.engine_copy:  # the engine's copy: there while it samples and its rows are scored
        for phase in ("rollout", "reference"):
            if phase in phases:
                phases[phase] += [PlanTerm(name, phase, value, formula) for name, value, formula in engine_terms]
    if sharded:  # one parameter at a time, cast to the engine's dtype: its old copy was freed before
        cast = V * h * B if matmul else 0
        phases["sync"] = [PlanTerm("gathered weights", "sync", engine_bytes + cast,
                                   f"the engine's copy, {_gb(engine_bytes)}, all-gathered" +
                                   (f" + one parameter in {B} B before its cast, the largest V x h" if cast else "") +
                                   (" (LoRA: the base and its adapters, the copy having been freed)" if lora else ""))]
        if j.cpu:  # on a GPU run rank 0 gathers and rebuilds in host memory (cpu_offload), not on its GPU
            phases["checkpoint"] = [PlanTerm("gathered + rebuilt model (rank 0)", "checkpoint", 2 * N * B,
                                             f"2 x N x {B} B, to save a checkpoint")]
    peak_phase, extra = max(((p, sum(t.bytes for t in ts)) for p, ts in phases.items()), key=lambda t: t[1])
    for p, ts in phases.items():
        terms.extend(ts)
    base = sum(t.bytes for t in terms if t.phase == "held")
    peak = base + extra
    usable = j.gpu_memory_gb * GB * (1 - j.headroom)
    out = Plan(shape.name, N, j, terms, peak_phase, peak, usable, peak <= usable)
    if suggest and not out.fits:
        out.suggestions = plan_suggestions(shape, out)
    return out


def _job_changes(shape: ModelShape, j: Job) -> list[tuple[str, Job]]:
    """Settings rlpost has, each as (the override, the changed job)."""
    out = []
    if j.param_bytes == 4:
        out.append(("model.dtype=bfloat16", replace(j, param_bytes=2)))
    if not j.lora_rank:
        out.append(("model.lora.r=16", replace(j, lora_rank=16)))
    if not j.checkpointing:
        out.append(("trainer.gradient_checkpointing=true", replace(j, checkpointing=True)))
    mb = j.micro_batch_size or j.rank_rows
    if mb > 1 and not (j.packing and j.micro_batch_tokens):
        out.append((f"trainer.micro_batch_size={max(mb // 4, 1)}", replace(j, micro_batch_size=max(mb // 4, 1))))
    if j.packing and j.micro_batch_tokens and j.micro_batch_tokens > 1024:
        out.append((f"trainer.micro_batch_tokens={j.micro_batch_tokens // 2}",
                    replace(j, micro_batch_tokens=j.micro_batch_tokens // 2)))
    if j.reference:
        out.append(("algorithm.beta=0 (no KL term: no reference)", replace(j, reference=False)))
    # the reference in CPU memory: only where the run accepts it (a GPU, a copy to offload, not sharded)
    if j.reference and not (j.offload_reference or j.lora_rank or j.cpu or j.strategy == "fsdp2"):
        out.append(("reference.offload=true", replace(j, offload_reference=True)))
    live = min(j.max_num_seqs or j.rank_rows, j.rank_rows)
    if live > 1:  # the largest cap that fits, halving from the rows (a quarter of them when none fits)
        caps = [c for c in (live >> i for i in range(1, live.bit_length())) if c >= 1]
        cap = next((c for c in caps if plan(shape, replace(j, max_num_seqs=c), suggest=False).fits),
                   max(live // 4, 1))
        out.append((f"rollout.max_num_seqs={cap}", replace(j, max_num_seqs=cap)))
    if j.strategy == "fsdp2":
        out.append((f"--ranks {2 * j.ranks} (fsdp2 over more GPUs)", replace(j, ranks=2 * j.ranks)))
    if j.prompts_per_step > 1:
        out.append((f"rollout.prompts_per_step={max(j.prompts_per_step // 2, 1)}",
                    replace(j, prompts_per_step=max(j.prompts_per_step // 2, 1))))
    return out


# How much a change alters the job, lowest first: scheduling only (the same training), numerics, hardware, then
# what is trained (the algorithm, the adapters, the batch).
CHANGE_COST = {"rollout.max_num_seqs": 0, "trainer.gradient_checkpointing": 0, "trainer.micro_batch_size": 0,
               "trainer.micro_batch_tokens": 0, "reference.offload": 0, "model.dtype": 1, "--ranks": 2,
               "model.lora.r": 3, "algorithm.beta": 3, "rollout.prompts_per_step": 3}


def _setting(change: str) -> str:
    return change.split("=")[0].split(" ")[0]


def _cost(changes: tuple[str, ...]) -> int:
    return sum(CHANGE_COST.get(_setting(c), 3) for c in changes)


def plan_suggestions(shape: ModelShape, p: Plan) -> list[dict]:
    """Each existing setting tried alone (what it saves on the fullest rank, whether it then fits), largest saving
    first. When none fits alone: the smallest change that fits, the fewest settings together (up to three); of
    those, the one that alters the job least (CHANGE_COST), then the one that leaves its memory closest to what
    was asked."""
    out = []
    for what, job in _job_changes(shape, p.job):
        after = plan(shape, job, suggest=False)
        if after.peak < p.peak:
            out.append({"change": what, "saves_gb": (p.peak - after.peak) / GB, "peak_gb": after.peak / GB,
                        "fits": after.fits})
    out.sort(key=lambda d: -d["saves_gb"])
    if out and not any(d["fits"] for d in out):
        level = [((), p.job)]
        for _ in range(3):
            nxt, fitting = {}, []
            for steps, job in level:
                for what, changed in _job_changes(shape, job):
                    key = tuple(sorted(steps + (what,)))
                    if _setting(what) in map(_setting, steps) or key in nxt:
                        continue
                    nxt[key] = changed
                    after = plan(shape, changed, suggest=False)
                    if after.fits:
                        fitting.append((-_cost(key), after.peak, key))
            if fitting:
                _, peak, key = max(fitting)
                out.append({"change": "smallest change that fits: " + " + ".join(key),
                            "saves_gb": (p.peak - peak) / GB, "peak_gb": peak / GB, "fits": True})
                break
            level = list(nxt.items())
    return out


def format_plan(p: Plan) -> str:
    """The readable table of `plan`: each term with its bytes and formula, the peak phase and the verdict."""
    j = p.job
    lines = [f"{p.model}: {p.params:,} parameters ({p.params / 1e9:.3g} B); rlpost's layout per rank: "
             f"trainer.strategy={j.strategy}, {j.ranks} rank(s) of {j.gpu_memory_gb:g} GB",
             f"parameters {'bfloat16' if j.param_bytes == 2 else 'float32'}"
             f"{', bf16 autocast' if j.autocast else ''}; {j.prompts_per_step} prompts x {j.k} samples x "
             f"({j.prompt_tokens} prompt + {j.max_new_tokens} response) tokens per step, {j.rank_rows} rows per rank"
             + (", gradient checkpointing" if j.checkpointing else "")
             + (f", LoRA r={j.lora_rank}" if j.lora_rank else ""), "",
             f"  {'term':<42} {'phase':<10} {'per rank':>10}  formula"]
    for t in p.terms:
        lines.append(f"  {t.name:<42} {t.phase:<10} {_gb(t.bytes):>10}  {t.formula}")
    held = sum(t.bytes for t in p.terms if t.phase == "held")
    phase = sum(t.bytes for t in p.terms if t.phase == p.peak_phase)
    lines += [f"  = held {_gb(held)} + the largest phase, {p.peak_phase}, {_gb(phase)}", ""]
    lines += [f"  note: {x}" for x in j.notes]
    lines += _verdict(p, "at the peak on each rank", j.gpu_memory_gb, j.headroom)
    return "\n".join(lines)


PLAN_AHEAD_KEYS = ("trainer.packing", "trainer.micro_batch_tokens")  # planned even where this rlpost lacks them


def plan_inputs(inputs: list[str], ranks: int = 1, prompt_tokens: int = 128, gpu_memory_gb: float = 80.0,
                headroom: float = 0.10) -> tuple[ModelShape, Job]:
    """(shape, job) from `rlpost plan memory`'s positional inputs: a recipe (.yaml / .yml), key=value overrides as
    `rlpost train` takes them (rlpost.config.load_config), and at most one MODEL (a size, a name or a folder; default:
    the config's model.name). Keys of PLAN_AHEAD_KEYS that this rlpost's config does not have yet are applied to the
    plan alone, with a note saying so."""
    recipe, overrides, models, ahead = None, [], [], {}
    have = {f"trainer.{f.name}" for f in fields(TrainerConfig)}
    for item in inputs:
        if "=" in item:
            key, raw = item.split("=", 1)
            if key.strip() in PLAN_AHEAD_KEYS and key.strip() not in have:
                ahead[key.strip()] = yaml.safe_load(raw)
            else:
                overrides.append(item)
        elif item.endswith((".yaml", ".yml")):
            if recipe is not None:
                raise ValueError(f"two recipes given ({recipe}, {item}); give one and key=value overrides")
            recipe = item
        else:
            models.append(item)
    if len(models) > 1:
        raise ValueError(f"more than one MODEL given ({', '.join(models)}): give one, or set model.name")
    cfg = load_config(recipe, overrides)
    shape = shape_for(models[0]) if models else shape_for_config(cfg)
    job = job_from_config(cfg, ranks, prompt_tokens, gpu_memory_gb, headroom)
    if "trainer.packing" in ahead:
        job.packing = bool(ahead["trainer.packing"])
    if "trainer.micro_batch_tokens" in ahead:
        job.micro_batch_tokens = int(ahead["trainer.micro_batch_tokens"])
    if ahead:
        job.notes.append(f"{', '.join(ahead)}: not config keys of this rlpost yet; planned as given, "
                         "`rlpost train` refuses them")
    names = {name for name, _, _ in shape.named_linears()}
    if job.lora_rank and not names & set(job.lora_targets or names):  # as rlpost.models.lora.apply_lora refuses it
        raise ValueError(f"model.lora.target_modules {list(job.lora_targets)} names none of {shape.name}'s weight "
                         f"matrices ({', '.join(sorted(names))}): `rlpost train` refuses it; name some of them")
    # a fresh gpt_mini's context is sized from the task's rows (model.block_size null): nothing to compare with
    sized_later = shape.name == "gpt_mini" and not models and not cfg.model.block_size
    if job.seq_tokens > shape.max_position_embeddings and not sized_later:
        job.notes.append(f"prompt + response = {job.prompt_tokens} + {job.max_new_tokens} = {job.seq_tokens} tokens, "
                         f"longer than {shape.name}'s context of {shape.max_position_embeddings} "
                         "(max_position_embeddings): `rlpost train` refuses such rows before any work "
                         "(rlpost/models/limits.py); lower rollout.max_new_tokens or --prompt-tokens")
    return shape, job
