"""Shared fixtures. Nothing here touches the network: HF models are built from a config with a
tokenizer trained on the spot and saved to a temporary folder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as rlpost sets it (rlpost/__init__.py), before torch loads

import pytest
import torch

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where torch sees a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def train_tiny_tokenizer(texts: list[str]):
    """A byte-level BPE trained on `texts`, wrapped as a transformers fast tokenizer with bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])  # as Llama
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def encode(tok, texts):
    return [tok.encode_prompt(t) for t in texts]


def hf_greedy(model, tok, prompts, new_tokens, min_new_tokens=0):
    """transformers.generate, greedy, left-padded; rows are padded with pad_token_id after eos. The
    reference the rollout engines' greedy output is checked against."""
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), tok.pad_token_id)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    out = model.hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                            min_new_tokens=min_new_tokens or None, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)
    return out[:, P:]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved 2-layer Llama (head_dim 32) with its tokenizer: a local folder, as a user's model would be."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlpost.tasks.arithmetic import arithmetic_task

    task = arithmetic_task(num_eval=50)
    texts = [r["prompt"] + r["answer"] for r in task.train_rows[:2000]] + ["The answer is 42."]
    tok = train_tiny_tokenizer(texts)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_gpt():
    """A small random gpt_mini and its tokenizer (untrained: outputs are arbitrary but deterministic)."""
    from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig

    torch.manual_seed(0)
    tok = CharTokenizer("0123456789+=")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=32))
    return model, tok
