"""recipes/gsm8k.yaml on data shaped like GSM8K (`question`, `answer` = worked solution + "#### N") and a tiny
random Qwen2 folder with a ChatML tokenizer: the gold answer, the rendered prompt, then `rlpost curate` and a
2-step `rlpost train` through the recipe (shape and plumbing: a random model learns nothing here).

The tokenizer is trained with Qwen2's own normaliser (NFC) and pre-tokeniser (the Split regex, then ByteLevel
without its own regex): a folder whose config says qwen2 is reloaded by AutoTokenizer as a Qwen2Tokenizer,
which installs those, so a tokenizer trained otherwise would encode differently once reloaded."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from rlpost.config import ModelConfig, load_config
from rlpost.env.math import MathReward, gold_answer
from rlpost.models import encode_prompt, load_model
from rlpost.tasks import TaskDataError, load_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "gsm8k.yaml")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
          "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
          "{%- endif %}")

NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina", "Randy", "Joy", "Mark",
         "Mrs. Snyder", "Jasmine", "Tobias", "Carla", "Abel", "Gary", "Rose", "Mike"]
ITEMS = ["clips", "apples", "stickers", "marbles", "pencils", "cookies", "books", "shells", "cards", "stamps",
         "balloons", "candles", "buttons", "crayons", "tickets"]


def train_problem(template: int, name: str, item: str, rng: random.Random) -> tuple[str, str]:
    """(question, worked solution ending in '#### N') of one of the training templates."""
    a, b = rng.randrange(10, 90, 2), rng.randrange(2, 9)
    if template == 0:
        return (f"{name} sold {item} to {a} of her friends in April, and then she sold half as many {item} in "
                f"May. How many {item} did {name} sell altogether in April and May?",
                f"{name} sold {a}/2 = <<{a}/2={a // 2}>>{a // 2} {item} in May.\n"
                f"{name} sold {a}+{a // 2} = <<{a}+{a // 2}={a + a // 2}>>{a + a // 2} {item} altogether.\n"
                f"#### {a + a // 2}")
    if template == 1:
        return (f"{name} buys {b} boxes of {item}. Each box holds {a} {item}. How many {item} does {name} have?",
                f"{name} has {b} * {a} = <<{b}*{a}={a * b}>>{a * b} {item}.\n#### {a * b}")
    return (f"{name} had {a + b} {item} and gave away {b} of them to a neighbour on Sunday. How many {item} "
            f"are left for {name}?", f"{name} has {a + b} - {b} = <<{a + b}-{b}={a}>>{a} {item} left.\n#### {a}")


def held_out_problem(name: str, item: str, rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(2, 20), rng.randrange(2, 20)
    return (f"Each week {name} reads {a} {item} more; after {b} weeks, what total did {name} reach?",
            f"{name} reached {a} * {b} = <<{a}*{b}={a * b}>>{a * b}.\n#### {a * b}")


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    """train.parquet (300 distinct questions, 2 exact repeats, 2 copies of test questions) and test.parquet
    (30 questions of another template), both with GSM8K's columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    combos = [(t, n, i) for t in range(3) for n in NAMES for i in ITEMS]
    rng.shuffle(combos)
    train = [train_problem(*c, rng) for c in combos[:300]]
    test = [held_out_problem(n, i, rng) for n, i in zip(NAMES, ITEMS + ITEMS)] + \
        [held_out_problem(n, i, rng) for n, i in zip(NAMES[:10], reversed(ITEMS))]
    train = train + [train[3], train[7], test[0], test[1]]
    folder = tmp_path_factory.mktemp("gsm8k")
    for name, rows in (("train", train), ("test", test)):
        table = pa.table({"question": [q for q, _ in rows], "answer": [a for _, a in rows]})
        pq.write_table(table, folder / f"{name}.parquet")
    return folder


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, gsm8k):
    """A saved random 2-layer Qwen2 with a ChatML tokenizer (eos <|im_end|>, pad <|endoftext|>, no bos)."""
    import pyarrow.parquet as pq
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    table = pq.read_table(gsm8k / "train.parquet").to_pydict()
    texts = table["question"] + table["answer"] + ["Please reason step by step, and put your final answer within "
                                                   "\\boxed{}. So the answer is \\boxed{72}."]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf_tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(hf_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512, bos_token_id=None,
                      eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return str(folder)


def recipe_task(gsm8k):
    cfg = load_config(RECIPE, [f"task.train_file={gsm8k / 'train.parquet'}",
                               f"task.eval_file={gsm8k / 'test.parquet'}"])
    return cfg, load_task(cfg.task)


def test_the_gold_is_the_number_after_the_hashes_and_only_a_boxed_reply_scores(gsm8k):
    cfg, task = recipe_task(gsm8k)
    assert len(task.train_rows) == 304 and len(task.eval_rows) == 30
    row = task.train_rows[0]
    assert row["prompt"].endswith("?") and "<<" in row["answer"]  # GSM8K's columns, read as prompt and answer
    gold = row["answer"].rsplit("####", 1)[1].strip()
    assert gold_answer(row["answer"]) == gold
    reward = MathReward(**cfg.task.reward_options)
    try:
        assert reward(f"Step by step... so the total is \\boxed{{{gold}}}.", row) == 1.0
        assert reward(f"\\boxed{{{int(gold) + 1}}}", row) == 0.0
        assert reward(row["answer"], row) == 0.0  # the right number, not boxed: the format the prompt asks for
        # every test row's gold is its own "#### N"
        assert all(reward(f"\\boxed{{{r['answer'].split('#### ')[1]}}}", r) == 1.0 for r in task.eval_rows)
    finally:
        reward.close()


def test_the_prompt_is_the_system_prompt_and_the_question_in_chatml(gsm8k, qwen2_dir):
    cfg, task = recipe_task(gsm8k)
    _, tok = load_model(ModelConfig(name=qwen2_dir, chat_template=cfg.model.chat_template, device="cpu"))
    question = task.train_rows[0]["prompt"]
    ids = encode_prompt(tok, question, cfg.task.system_prompt)
    assert tok.tok.decode(ids) == ("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                                   f"\\boxed{{}}.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                                   "<|im_start|>assistant\n")
    assert tok.eos_token_id == tok.tok.convert_tokens_to_ids("<|im_end|>")  # a reply ends at ChatML's end of turn


@pytest.mark.slow
def test_curate_then_train_two_steps_through_the_recipe(gsm8k, qwen2_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    tiny = ["rollout.max_new_tokens=8", "model.device=cpu"]
    curate = [sys.executable, "-m", "rlpost.cli", "curate", "--recipe", RECIPE, "--model", qwen2_dir, "-k", "2",
              "--train", str(gsm8k / "train.parquet"), "--eval", str(gsm8k / "test.parquet"),
              "--out", "curated.parquet", "--report", "report.json",
              "--band", "0", "1", *tiny]  # a random model solves nothing: the full band keeps every row
    proc = subprocess.run(curate, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"train on them with `rlpost train {RECIPE} task.train_file=curated.parquet`" in proc.stdout
    counts = json.loads((tmp_path / "report.json").read_text())["counts"]
    assert counts["read"] == 304 and counts["exact_duplicates"] == 2 and counts["contaminated"] == 2
    assert counts["kept"] == 304 - sum(v for k, v in counts.items() if k not in ("read", "kept"))
    assert counts["kept"] >= 250
    import pyarrow.parquet as pq

    curated = pq.read_table(tmp_path / "curated.parquet")
    assert set(curated.column_names) == {"question", "answer", "pass_rate"}

    run_dir = tmp_path / "runs"
    train = [sys.executable, "-m", "rlpost.cli", "train", RECIPE, f"model.name={qwen2_dir}",
             "task.train_file=curated.parquet", f"task.eval_file={gsm8k / 'test.parquet'}", f"out_dir={run_dir}",
             "run_name=r", "rl.steps=2", "rl.eval_every=0", "rl.save_every=0", "rollout.prompts_per_step=4",
             "rollout.k=2", "trainer.micro_batch_size=4", "eval.batch_prompts=32", *tiny]
    proc = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(run_dir / "r" / "metrics.jsonl") as f:
        rl = [m for m in map(json.loads, f) if m.get("stage") == "rl" and "step" in m]
    assert [m["step"] for m in rl] == [1, 2]
    summary = json.loads((run_dir / "r" / "summary.json").read_text())
    assert summary["status"] == "ok" and 0.0 <= summary["pass@1_rl"] <= 1.0


def test_a_datasets_folder_gives_the_train_and_test_splits(gsm8k, tmp_path):
    """GSM8K saved by `datasets` (a DatasetDict folder): train_file is the folder; eval_file=null: its test split."""
    datasets = pytest.importorskip("datasets")

    splits = {name: datasets.Dataset.from_parquet(str(gsm8k / f"{name}.parquet")) for name in ("train", "test")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "gsm8k_ds"))
    cfg = load_config(RECIPE, [f"task.train_file={tmp_path / 'gsm8k_ds'}", "task.eval_file=null"])
    task = load_task(cfg.task)
    assert len(task.train_rows) == 304 and len(task.eval_rows) == 30
    assert task.eval_rows[0]["prompt"].startswith("Each week") and "#### " in task.eval_rows[0]["answer"]


def test_rows_the_math_reward_cannot_score_are_refused_as_the_task_loads(gsm8k, tmp_path):
    """Through the recipe (task.reward: math) every row needs a gold the reward can read: a file without the
    answer column, a null answer, or a '####' with nothing after it used to load and then fail (or silently
    score 0) at the RL step that drew the row, after the first evaluation had run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(gsm8k / "train.parquet").to_pylist()[:6]
    rows[1]["answer"] = None
    rows[3]["answer"] = "She sold 72.\n#### "
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    pq.write_table(pa.table({"question": [r["question"] for r in rows]}), tmp_path / "no_answer.parquet")
    for name, want in (("bad.parquet", r"2 malformed row\(s\):\n  row 2: missing required key 'answer'\n  row 4: "
                                       r"'answer' \(the gold answer of the math reward\) has nothing after its last "
                                       "'####'"),
                       ("no_answer.parquet", r"no column 'answer' \(task.answer_key\); its columns: question")):
        cfg = load_config(RECIPE, [f"task.train_file={tmp_path / name}", "task.eval_file=null"])
        with pytest.raises(TaskDataError, match=want):
            load_task(cfg.task)
    cfg = load_config(RECIPE, [f"task.train_file={gsm8k / 'train.parquet'}",
                               f"task.eval_file={tmp_path / 'bad.parquet'}"])
    with pytest.raises(TaskDataError, match="bad.parquet: 2 malformed"):  # the held-out rows too
        load_task(cfg.task)
    # the column named twice: task.answer_key maps 'final' to the row's answer, the reward's option reads 'final'
    pq.write_table(pa.table({"question": [r["question"] for r in rows[:1]], "final": ["#### 3"]}),
                   tmp_path / "final.parquet")
    keys = [f"task.train_file={tmp_path / 'final.parquet'}", "task.eval_file=null", "task.answer_key=final"]
    assert len(load_task(load_config(RECIPE, keys).task).train_rows) == 1
    with pytest.raises(TaskDataError, match=r"row 1: missing the key 'final', where the math reward reads the gold "
                                            r"answer \(task.answer_key maps .*leave that option unset\)"):
        load_task(load_config(RECIPE, [*keys, "task.reward_options={extract: boxed, answer_key: final}"]).task)


def test_a_chat_template_that_refuses_the_system_prompt_says_what_to_do(qwen2_dir, tmp_path):
    """Some templates raise on a system message (jinja's raise_exception): that was a bare TemplateError, not the
    ValueError the callers name the row with, and it did not say that task.system_prompt made the message."""
    import shutil

    folder = tmp_path / "no_system"
    shutil.copytree(qwen2_dir, folder)
    (folder / "chat_template.jinja").write_text(
        "{%- for m in messages %}{%- if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{%- endif %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
        "{{- '<|im_start|>assistant\\n' }}")
    _, tok = load_model(ModelConfig(name=str(folder), chat_template=True, device="cpu"))
    assert encode_prompt(tok, "How many?") == encode_prompt(tok, [{"role": "user", "content": "How many?"}])
    with pytest.raises(ValueError, match=r"chat template refused the messages \(roles \['system', 'user'\]\): "
                                         r"TemplateError: System role not supported: .*task.system_prompt unset"):
        encode_prompt(tok, "How many?", "Please reason step by step.")


def test_curate_decontaminates_a_datasets_folder_against_its_own_test_split(gsm8k, tmp_path, capsys):
    """Training holds out a DatasetDict train folder's test split (task.eval_file=null); curate, given the same
    folder as --train and no --eval, used to skip decontamination, keeping the 2 copies of test questions."""
    datasets = pytest.importorskip("datasets")
    from rlpost.cli import main

    splits = {name: datasets.Dataset.from_parquet(str(gsm8k / f"{name}.parquet")) for name in ("train", "test")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "gsm8k_ds"))
    out = tmp_path / "curated.parquet"
    assert main(["curate", "--recipe", RECIPE, "--no-model", "--train", str(tmp_path / "gsm8k_ds"),
                 "--out", str(out), "--report", str(tmp_path / "report.json")]) == 0
    printed = capsys.readouterr().out
    assert f"overlap with {tmp_path / 'gsm8k_ds'} [split test]" in printed
    # the output is one file: training names the folder as its held-out set
    assert f"task.train_file={out} task.eval_file={tmp_path / 'gsm8k_ds'}`" in printed
    counts = json.loads((tmp_path / "report.json").read_text())["counts"]
    assert counts["contaminated"] == 2 and counts["kept"] == 300


def test_gsm8k_answers_under_the_exact_verifier_warn_that_nothing_can_match(gsm8k, recwarn):
    """Without task.reward a GSM8K file is scored by the exact first-line match against the whole worked
    solution: every reward 0, silently. The recipe (task.reward: math) does not warn."""
    keys = ["task.name=file", f"task.train_file={gsm8k / 'train.parquet'}", "task.prompt_key=question"]
    with pytest.warns(UserWarning, match=r"304 of 304 training answers \('answer'\) are worked solutions ending "
                                         r"in '#### N'.*set task.reward=math"):
        load_task(load_config(None, keys).task)
    recwarn.clear()
    recipe_task(gsm8k)
    assert not [w for w in recwarn if "worked solutions" in str(w.message)]


def test_check_gold_through_the_recipe_says_when_no_row_can_pass(gsm8k, capsys):
    """The recipe's reward reads only a \\boxed{} answer, so --check-gold through it failed all 304 rows as 'data
    bugs' with no word on why; the reading that takes GSM8K's '#### N' verifies every one."""
    from rlpost.cli import main

    check = ["curate", "--recipe", RECIPE, "--check-gold", "--train", str(gsm8k / "train.parquet")]
    assert main(check) == 0
    out = capsys.readouterr().out
    assert "0 of 304 rows' gold verifies under math" in out
    assert "every row fails: does the reward read the gold in this form?" in out and "extract: auto" in out
    assert main([*check, "--strict", "task.reward_options={extract: auto}"]) == 0
    out = capsys.readouterr().out
    assert "304 of 304 rows' gold verifies under math" in out and "every row fails" not in out


def test_a_qwen2_folder_that_lost_its_vocabulary_is_refused(qwen2_dir, tmp_path):
    """Without tokenizer.json (tokenizer_config.json still there) transformers builds a Qwen2 tokenizer of its 2
    special tokens: every prompt encoded to no tokens, and the run died in the first forward."""
    import shutil

    from rlpost.models import ModelLoadError

    folder = tmp_path / "no_vocabulary"
    shutil.copytree(qwen2_dir, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"its tokenizer \(Qwen2Tokenizer, 2 tokens\) encodes text to no "
                                             r"tokens: its vocabulary file .* is missing or empty"):
        load_model(ModelConfig(name=str(folder), device="cpu"))
