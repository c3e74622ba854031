"""Shared set-up of the benchmarks: a tiny Llama built from a config with a BPE tokenizer trained on
the spot (nothing is downloaded), its prompts, and timing helpers.

The default size is the one the project measured TRL on: hidden 256, 4 layers, 4 heads,
intermediate 1024, a 512-token vocabulary (about 4.5 M parameters).
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

WORDS = ("the a one two three four five six seven eight nine ten plus minus times what is sum of and "
         "answer question number add subtract result equals compute please short give me").split()


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        out.append(f"Question: {words} {a}+{b}? Answer: {a + b}.")
    return out


def train_tokenizer(vocab_size: int = 512):
    """A byte-level BPE with <pad>, <s>, </s>, as tests/conftest.py builds it, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_llama(tok, hidden: int = 256, layers: int = 4, heads: int = 4, intermediate: int = 1024, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def save_llama(folder: str, **kw):
    """Build the tokenizer and model and save both to `folder` (what TRL loads and reloads)."""
    tok = train_tokenizer()
    model = build_llama(tok, **kw)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def prompts(n: int, seed: int = 1, words: int = 0) -> list[str]:
    """n arithmetic questions; with `words`, each starts with that many random words of its own (long prompts
    that share no prefix, so the cross-prompt prefix cache does not shorten them)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lead = " ".join(rng.choice(WORDS) for _ in range(words))
        question = f"Question: what is {rng.randint(0, 999)}+{rng.randint(0, 999)}? Answer:"
        out.append(f"{lead} {question}" if lead else question)
    return out


def n_params(model, embeddings: bool = True) -> int:
    n = sum(p.numel() for p in model.parameters())
    if not embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n


def median(xs):
    return statistics.median(xs)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def load_line() -> str:
    """The 1/5/15-minute load averages: other processes share this machine's CPUs."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def env_line() -> str:
    import platform

    import transformers

    return (f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
