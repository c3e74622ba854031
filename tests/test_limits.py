"""Length limits: a fresh gpt_mini is sized from the data, and every prompt and demonstration that does not
fit a model's context is refused before any work, naming the row and the config key to change."""

import json
import random

import pytest
import torch

from rlpost.batch import Batch
from rlpost.config import ConfigError, ModelConfig, load_config
from rlpost.models.limits import ContextLengthError, block_size_for, check_lengths
from rlpost.models import load_model, token_logprobs
from rlpost.rollout import SamplingParams
from rlpost.rollout.native import NativeEngine
from rlpost.tasks import jsonl_task
from rlpost.tasks.arithmetic import ALPHABET, arithmetic_task

WORDS = "the of a sum is what when two numbers are added together please answer with digits only".split()


def write_long_rows(path, n, seed):
    """JSONL rows whose prompts are 70-150 characters, as a user's own data might be."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randrange(1000), rng.randrange(1000)
            words = " ".join(rng.choice(WORDS) for _ in range(80))
            prompt = f"{words[:rng.randrange(66, 141)].rstrip()} {a}+{b}="
            f.write(json.dumps({"prompt": prompt, "answer": str(a + b)}) + "\n")


def test_default_block_size_is_sized_from_long_jsonl_rows(tmp_path):
    write_long_rows(tmp_path / "train.jsonl", 40, seed=0)
    write_long_rows(tmp_path / "eval.jsonl", 10, seed=1)
    task = jsonl_task(str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl"))
    rows = task.train_rows + task.eval_rows
    assert 70 <= min(len(r["prompt"]) for r in rows) and max(len(r["prompt"]) for r in rows) <= 150
    cfg = load_config(None, ["model.n_layer=1", "model.n_embd=32", "model.n_head=2"])
    assert cfg.model.block_size is None  # the default: sized from the data
    model, tok = load_model(cfg.model, task.alphabet, rows=rows, max_new_tokens=8, demonstrations=task.demonstrations)
    longest = max(len(r["prompt"]) for r in rows) + 1  # characters + <bos>
    assert model.config.block_size == longest + 8 + 1  # + the eos of a preference completion
    check_lengths(model, tok, rows, 8, task.demonstrations)  # everything fits
    # and it really runs: rollout from the longest prompt, SFT on the longest demonstration
    prompt = max(rows, key=lambda r: len(r["prompt"]))["prompt"]
    batch = NativeEngine(model, tok).generate([tok.encode_prompt(prompt)], 2, SamplingParams(max_new_tokens=8))
    assert batch.input_ids.shape[1] <= model.config.block_size
    demo = max(task.demonstrations, key=lambda r: len(r["prompt"]) + len(r["completion"]))
    sft = Batch.for_sft([tok.encode_prompt(demo["prompt"])], [tok.encode_completion(demo["completion"]) + [2]], 0)
    assert torch.isfinite(token_logprobs(model, sft)).all()


def test_block_size_covers_demonstrations_longer_than_the_rollout():
    rows = [{"prompt": "1+1=", "answer": "2"}]
    demos = [{"prompt": "1+1=", "answer": "2", "completion": "2" * 20}]
    assert block_size_for(ALPHABET, rows, 6, demos) == 5 + 20 + 1  # <bos> + prompt, completion, eos


def test_the_default_data_gives_block_size_14():
    """'07+85=' is 7 tokens with <bos>, + rollout.max_new_tokens=6, + 1 for the eos a preference completion cut
    at 6 tokens gets; a demonstration is 7 + 3 digits + eos = 11."""
    task = arithmetic_task()
    cfg = load_config()
    size = block_size_for(task.alphabet, task.train_rows + task.eval_rows, cfg.rollout.max_new_tokens,
                          task.demonstrations)
    assert size == 14


def test_one_stray_long_row_does_not_size_a_fresh_gpt_mini_to_match(tmp_path):
    """A 100,000-character prompt among short ones sized gpt_mini's context to 100,011 positions, and its first SFT
    forward took the machine's 23 GB and more; the sizing stops at MAX_SIZED_BLOCK_SIZE, naming the row."""
    from rlpost.models.loading import MAX_SIZED_BLOCK_SIZE

    rows = [{"prompt": "1+2=", "answer": "3"}] * 3 + [{"prompt": "1" * 100_000 + "+2=", "answer": "3"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = jsonl_task(str(tmp_path / "train.jsonl"), None)
    cfg = ModelConfig(n_layer=1, n_embd=16, n_head=2)
    match = (r"would give it a context of 100013 tokens, for row 3 \(line 4\): prompt '1111111111.*' \(100004 "
             rf"tokens\) \+ rollout.max_new_tokens=8 \+ 1; it sizes itself to at most {MAX_SIZED_BLOCK_SIZE} .*: drop "
             r"or shorten such rows, or set model.block_size yourself")
    with pytest.raises(ContextLengthError, match=match):
        load_model(cfg, task.alphabet, rows=task.train_rows, max_new_tokens=8, demonstrations=task.demonstrations)
    # 100,003 characters + <bos> + 8 new tokens + eos
    assert block_size_for(task.alphabet, task.train_rows, 8, task.demonstrations) == 100_013
    # a rollout budget past the limit is named as such, with the key to lower
    match = (r"for row 0 \(line 1\): prompt '1\+2=' \(5 tokens\) \+ rollout.max_new_tokens=9000 \+ 1 \(and 2 more "
             r"prompt row\(s\) above 8192\); .*: lower rollout.max_new_tokens, drop or shorten")
    with pytest.raises(ContextLengthError, match=match):
        load_model(cfg, task.alphabet, rows=task.train_rows[:3], max_new_tokens=9000)
    # a context asked for is built as asked, and the rows that do not fit it are named by check_lengths
    model, _ = load_model(ModelConfig(n_layer=1, n_embd=16, n_head=2, block_size=64), task.alphabet,
                          rows=task.train_rows, max_new_tokens=8)
    assert model.config.block_size == 64


def test_a_prompt_too_long_for_an_hf_model_is_refused_naming_the_row_and_the_key(tiny_llama_dir):
    model, tok = load_model(ModelConfig(name=tiny_llama_dir))  # max_position_embeddings=64
    long_prompt = "The answer is 42. " * 8 + "12+34="
    rows = [{"prompt": "12+34=", "answer": "46", "line": 1}, {"prompt": long_prompt, "answer": "46", "line": 2}]
    n_long = len(tok.encode_prompt(long_prompt))
    assert n_long > 64
    with pytest.raises(ContextLengthError) as e:
        check_lengths(model, tok, rows, 6)
    msg = str(e.value)
    assert "1 of 2 prompt rows do not fit the model's max_position_embeddings=64" in msg
    assert f"row 1 (line 2): prompt 'The answer is 42. The answer is 42. The ...' ({n_long} tokens)" in msg
    assert "rollout.max_new_tokens=6" in msg and "the longest alone fills the context" in msg
    # a prompt that fits alone, but not with the response budget: lowering rollout.max_new_tokens is the fix
    n = len(tok.encode_prompt("12+34="))
    with pytest.raises(ContextLengthError, match=f"Lower rollout.max_new_tokens to {64 - n} or less"):
        check_lengths(model, tok, rows[:1], 64)
    check_lengths(model, tok, rows[:1], 64 - n)


def test_gpt_mini_errors_name_model_block_size(tiny_gpt):
    model, tok = tiny_gpt  # block_size 24
    rows = [{"prompt": "12+34=", "answer": "46"}]
    demos = [{"prompt": "12+34=", "answer": "46", "completion": "4" * 20}]
    with pytest.raises(ContextLengthError) as e:
        check_lengths(model, tok, rows, 6, demos)
    msg = str(e.value)
    assert "1 of 1 SFT demonstrations do not fit gpt_mini's block_size=24" in msg
    assert ("demonstration 0: prompt '12+34=' (7 tokens) + completion '44444444444444444444' (20 tokens) "
            "+ eos = 28") in msg
    assert "Raise model.block_size to 28 or more" in msg and "max_new_tokens" not in msg.split("\n")[-1]
    with pytest.raises(ContextLengthError, match=r"prompt '12\+34=' \(7 tokens\) \+ rollout.max_new_tokens=20 = 27"):
        check_lengths(model, tok, rows, 20)
    with pytest.raises(ValueError, match="row 0: cannot encode the prompt 'x'"):
        check_lengths(model, tok, [{"prompt": "x", "answer": "1"}], 6)


def test_block_size_config_key():
    cfg = load_config(None, ["model.block_size=64"])
    assert load_model(cfg.model, ALPHABET)[0].config.block_size == 64
    rows = [{"prompt": "1+1=", "answer": "2"}]
    assert load_model(cfg.model, ALPHABET, rows=rows, max_new_tokens=6)[0].config.block_size == 64  # as set
    assert load_model(load_config().model, ALPHABET)[0].config.block_size == 24  # unset, and no data to size from
    with pytest.raises(ConfigError, match="model.block_size"):
        load_config(None, ["model.block_size=0"])
