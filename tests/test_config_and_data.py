"""Bad input gets a clear error: recipes, overrides, prompt files, model folders."""

import json
import os
import re

import pytest
import yaml

from rlpost.algorithms import get_algorithm
from rlpost.config import Config, ConfigError, ModelConfig, load_config, to_dict
from rlpost.models import ModelLoadError, load_model
from rlpost.tasks import TaskDataError, jsonl_task, read_jsonl
from rlpost.tasks.arithmetic import arithmetic_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_recipe_file_spells_out_the_defaults():
    with open(os.path.join(ROOT, "recipes", "default.yaml")) as f:
        assert yaml.safe_load(f) == to_dict(Config())


@pytest.mark.parametrize("recipe", sorted(os.listdir(os.path.join(ROOT, "recipes"))))
def test_every_shipped_recipe_loads(recipe):
    load_config(os.path.join(ROOT, "recipes", recipe))


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["rl.steps=7", "trainer.lr=1e-3", "algorithm.beta=0", "model.chat_template=true",
                             "trainer.micro_batch_size=16"])
    assert cfg.rl.steps == 7 and cfg.trainer.lr == 1e-3 and cfg.algorithm["beta"] == 0
    assert cfg.model.chat_template is True and cfg.trainer.micro_batch_size == 16
    assert cfg.algorithm == {"name": "grpo", "beta": 0}  # GRPO's other parameters: its own defaults, written once
    assert get_algorithm(**cfg.algorithm).cfg.clip_high == 0.28


def test_recipe_algorithm_section_replaces_the_default_parameters(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("algorithm: {name: grpo, beta: 0.0}\nrl: {steps: 3}\n")
    cfg = load_config(str(path))
    assert cfg.algorithm == {"name": "grpo", "beta": 0.0} and cfg.rl.steps == 3 and cfg.rl.eval_every == 50


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'rl\.stepz'; valid keys under rl: steps, eval_every"):
        load_config(None, ["rl.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'"):
        load_config(None, ["modle.name=x"])


def test_wrongly_typed_value_is_named():
    with pytest.raises(ConfigError, match=r"'rl\.steps' expects int, got str 'many'"):
        load_config(None, ["rl.steps=many"])
    with pytest.raises(ConfigError, match=r"'trainer\.lr' expects float, got bool"):
        load_config(None, ["trainer.lr=true"])


def test_bad_algorithm_name_or_parameter_fails_at_load_time():
    with pytest.raises(ValueError, match="valid algorithms"):
        load_config(None, ["algorithm.name=ppx"])
    with pytest.raises(ValueError, match="'betta'.*valid parameters"):
        load_config(None, ["algorithm.betta=0.1"])


def test_bad_choice_and_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="valid values: auto, native, hf"):
        load_config(None, ["rollout.engine=vllmm"])
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["rl.steps"])


def test_a_key_given_twice_in_a_recipe_or_an_override_is_refused_naming_its_lines(tmp_path):
    """YAML keeps the last of two equal keys without a word: a recipe with two `rl:` sections ran with the
    default rl.steps=150, the first section's steps: 3 gone."""
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("rl:\n  steps: 3\nsft:\n  steps: 5\nrl:\n  eval_every: 1\n")
    with pytest.raises(ConfigError, match=r"twice.yaml is not valid YAML: the key 'rl' appears twice in one mapping "
                                          r"\(lines 1 and 5\); keep one\n  in \".*twice.yaml\", line 5"):
        load_config(str(recipe))
    recipe.write_text("trainer: {lr: 1.0e-4, lr: 1.0e-3}\n")
    with pytest.raises(ConfigError, match=r"the key 'lr' appears twice in one mapping \(lines 1 and 1\)"):
        load_config(str(recipe))
    with pytest.raises(ConfigError, match=r"config key 'algorithm': .* repeats a key: the key 'beta' appears twice"):
        load_config(None, ["algorithm={name: grpo, beta: 0.1, beta: 0.2}"])
    # a `<<` merge's keys are there to be overridden
    merged = tmp_path / "merged.yaml"
    merged.write_text("rl:\n  <<: {steps: 3, eval_every: 1}\n  steps: 4\n")
    cfg = load_config(str(merged))
    assert (cfg.rl.steps, cfg.rl.eval_every) == (4, 1)


def test_a_text_key_takes_its_override_as_written():
    """YAML read `task.system_prompt=#1 rule` as a comment, so the run went without a system prompt, cut
    `Be brief #2` to 'Be brief', and refused `run_name=2024`, `Answer: x` and `yes` as an int, a mapping, a bool."""
    def prompt(value: str):
        return load_config(None, [f"task.system_prompt={value}"]).task.system_prompt

    for value in ("#1 rule", "Be brief #2", "You are: helpful", "yes", "- a list?", "@home", "[x] first", "3.5"):
        assert prompt(value) == value
    assert prompt("null") is None and prompt("'#1: quoted'") == "#1: quoted" and prompt('"tab\\there"') == "tab\there"
    assert load_config(None, ["run_name=2024"]).run_name == "2024"
    assert load_config(None, ["model.name= /models/a b "]).model.name == "/models/a b"
    # keys that are not text still read YAML: numbers, booleans, lists, mappings
    cfg = load_config(None, ["rl.steps=7", "trainer.packing=false", "trainer.profile_steps=[1, 2]",
                             "task.reward=math", "task.reward_options={extract: boxed}"])
    assert (cfg.rl.steps, cfg.trainer.packing, cfg.trainer.profile_steps) == (7, False, [1, 2])
    assert cfg.task.reward_options == {"extract": "boxed"}


def test_a_number_in_exponent_notation_is_a_number_wherever_it_sits(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-2 without a dot as the string '1e-2': a float key converted it, but a weight in
    task.rewards or task.sources was refused as 'must be a finite number, got '1e-2''."""
    cfg = load_config(None, ["task.rewards=[{name: exact, weight: 1e-2}, {name: format, weight: 2E0}]"])
    assert [r["weight"] for r in cfg.task.rewards] == [0.01, 2.0]
    recipe = tmp_path / "mix.yaml"
    recipe.write_text("task:\n  sources:\n    - {file: a.jsonl, weight: 5e-1}\n    - {file: b.jsonl, weight: 1.5e0}\n"
                      "trainer:\n  lr: 3e-5\n")
    cfg = load_config(str(recipe))
    assert [s["weight"] for s in cfg.task.sources] == [0.5, 1.5] and cfg.trainer.lr == 3e-5
    with pytest.raises(ConfigError, match=r"config key 'rl.steps' expects int, got float 1000.0"):
        load_config(None, ["rl.steps=1e3"])


def test_a_dotted_key_in_a_recipe_is_named_as_a_spelling_not_as_unknown(tmp_path):
    """`trainer.lr: 1.0e-4` in a recipe was 'unknown config key 'trainer.lr'', listing the top-level keys: the key
    exists, in the spelling of an override."""
    recipe = tmp_path / "dotted.yaml"
    recipe.write_text("trainer.lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"config key 'trainer.lr' is written dotted inside a mapping: a recipe "
                                          r"nests its sections \(trainer: \{lr: ...\}"):
        load_config(str(recipe))
    recipe.write_text("model:\n  lora.r: 8\n")
    with pytest.raises(ConfigError, match=r"config key 'model.lora.r' is written dotted .*\(lora: \{r: ...\}"):
        load_config(str(recipe))
    recipe.write_text("trainer:\n  lr.x: 1\n")  # lr is no section: an unknown key, as before
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.lr.x'; valid keys under trainer: lr"):
        load_config(str(recipe))


def test_a_recipe_that_cannot_be_read_is_named_not_a_traceback(tmp_path, capsys):
    """A recipe in Latin-1 raised a bare UnicodeDecodeError (no file named), a folder an IsADirectoryError, and a
    value holding itself (`a: &x [*x]`) a RecursionError."""
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"rl:\n  steps: 3\nrun_name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"recipe .*latin.yaml: line 3: not valid UTF-8 \(byte 0xe9: .*save the file "
                                          "as UTF-8"):
        load_config(str(latin))
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"recipe .*folder.yaml cannot be read: Is a directory"):
        load_config(str(tmp_path / "folder.yaml"))
    itself = tmp_path / "itself.yaml"
    itself.write_text("task:\n  options: &x {a: *x}\n")
    with pytest.raises(ConfigError, match=r"itself.yaml: config key 'task.options.a' holds itself"):
        load_config(str(itself))
    with pytest.raises(ConfigError, match=r"config key 'stages\[0\]' holds itself"):
        load_config(None, ["stages=&s [*s]"])
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfrl:\r\n  steps: 3\r\n")  # a byte-order mark and CRLF line ends are fine
    assert load_config(str(bom)).rl.steps == 3
    from rlpost.cli import main

    assert main(["train", str(tmp_path / "folder.yaml"), f"out_dir={tmp_path / 'runs'}"]) == 2
    assert "folder.yaml cannot be read" in capsys.readouterr().err and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- tasks

def test_arithmetic_task_is_seeded_and_held_out_is_disjoint():
    a, b = arithmetic_task(seed=5, num_eval=100), arithmetic_task(seed=5, num_eval=100)
    assert a.train_rows == b.train_rows and a.demonstrations == b.demonstrations
    assert {r["prompt"] for r in a.eval_rows}.isdisjoint(r["prompt"] for r in a.train_rows)
    assert len(a.train_rows) + len(a.eval_rows) == 100 * 100
    assert all(a.verify(r["answer"], r) == 1.0 for r in a.train_rows[:50])


def test_demonstrator_is_wrong_at_the_configured_rate():
    task = arithmetic_task(num_eval=2000, error_rate=0.35)
    wrong = sum(task.verify(d["completion"], d) == 0.0 for d in task.demonstrations) / len(task.demonstrations)
    assert abs(wrong - 0.35) < 0.02  # 8000 labels: 3 sigma is ~0.016
    assert abs(task.demonstrator_accuracy - 0.65) < 0.04
    assert all(len(d["completion"]) == len(d["answer"]) for d in task.demonstrations)  # slips keep the width


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_task_reads_rows_and_builds_alphabet(tmp_path):
    train = write(tmp_path / "t.jsonl", [json.dumps({"prompt": "2*3=", "answer": 6}),
                                         json.dumps({"prompt": "2*4=", "answer": "8", "completion": "9"})])
    task = jsonl_task(train, write(tmp_path / "e.jsonl", [json.dumps({"prompt": "3*3=", "answer": "9",
                                                                      "completion": "9"})]))
    assert task.train_rows[0]["answer"] == "6" and task.demonstrations[0]["completion"] == "6"
    assert set("23489*=") <= set(task.alphabet) and task.demonstrator_accuracy == 1.0


def test_malformed_prompt_rows_are_reported_by_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "1+1=", "answer": "2"}), "{not json",
                                          json.dumps({"answer": "3"}), json.dumps({"prompt": "", "answer": "1"}),
                                          json.dumps(["a list"])])
    with pytest.raises(TaskDataError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert "4 malformed row(s)" in msg and "line 2: not valid JSON" in msg
    assert "line 3: missing required key 'prompt'" in msg and "line 4: 'prompt' is empty" in msg
    assert "line 5: expected a JSON object" in msg


def test_bytes_that_are_not_utf8_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"prompt": "1+1=", "answer": "2"}).encode() + b"\n"
                     + b'{"prompt": "caf\xe9=", "answer": "3"}\n' + b"{not json\n")
    with pytest.raises(TaskDataError) as e:
        read_jsonl(str(path))
    msg = str(e.value)  # reported with the file's other malformed lines, all at once
    assert f"{path}: 2 malformed row(s)" in msg
    assert "line 2: not valid UTF-8 (byte 0xe9 at column 16: invalid continuation byte)" in msg
    assert "line 3: not valid JSON" in msg
    array = tmp_path / "latin1.json"
    array.write_bytes(b'[{"prompt": "1+1=", "answer": "2"},\n {"prompt": "caf\xe9=", "answer": "3"}]')
    with pytest.raises(TaskDataError, match=r"latin1.json: line 2: not valid UTF-8 \(byte 0xe9 at column 17"):
        read_jsonl(str(array))


def test_bytes_that_are_not_utf8_in_a_parquet_or_arrow_table_are_named_by_row(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlpost.tasks import read_rows

    # a string column whose second value holds a latin-1 byte, as a writer that skips validation leaves it
    prompts = pa.array([b"1+1=", b"caf\xe9="], type=pa.binary()).view(pa.string())
    table = pa.table({"prompt": prompts, "answer": pa.array(["2", "3"])})
    pq.write_table(table, str(tmp_path / "t.parquet"))
    datasets.Dataset(table).save_to_disk(str(tmp_path / "folder"))
    for path in (str(tmp_path / "t.parquet"), str(tmp_path / "folder")):
        with pytest.raises(TaskDataError) as e:
            read_rows(path)
        assert f"{path}: text that is not valid UTF-8:\n  row 2: column 'prompt' is not valid UTF-8 (byte 0xe9 " \
               "at offset 3 of the value" in str(e.value)


def test_a_json_string_holding_a_line_separator_character_stays_one_line(tmp_path):
    path = tmp_path / "sep.jsonl"  # json.dumps(ensure_ascii=False), as write_rows writes, keeps U+2028 raw
    path.write_text(json.dumps({"prompt": "a\u2028b=", "answer": "1"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [r["prompt"] for r in read_jsonl(str(path))] == ["a\u2028b="]


def test_a_completion_column_named_in_the_config_is_not_required_in_the_held_out_file(tmp_path):
    from rlpost.tasks import Columns, file_task

    train = write(tmp_path / "t.jsonl", [json.dumps({"prompt": "2*3=", "answer": "6", "solution": "6"})])
    held_out = write(tmp_path / "e.jsonl", [json.dumps({"prompt": "3*3=", "answer": "9"})])
    task = file_task(train, held_out, Columns(completion="solution"))
    assert task.demonstrations[0]["completion"] == "6" and task.eval_rows[0]["prompt"] == "3*3="
    assert task.demonstrator_accuracy is None  # no held-out completion to grade
    with pytest.raises(TaskDataError, match=r"no column 'solution' \(task.completion_key\)"):  # the training file
        file_task(held_out, None, Columns(completion="solution"))  # must have it: SFT imitates it


def test_empty_or_missing_prompt_file(tmp_path):
    with pytest.raises(TaskDataError, match="has no rows"):
        read_jsonl(write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(TaskDataError, match="prompt file not found"):
        read_jsonl(str(tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------------------- models

def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found: './no/such/model'"):
        load_model(ModelConfig(name="./no/such/model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(ModelConfig(name=str(tmp_path / "empty")))
    # a file of the folder (hub ids look like paths: 'org/model.safetensors' was tried as one, offline or not)
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"model '.*empty/model.safetensors' is a file: model.name takes the "
                                             r"folder that holds the model .*, e.g. '.*empty'"):
        load_model(ModelConfig(name=str(tmp_path / "empty" / "model.safetensors")))


def test_unreachable_hub_id_says_so_offline():
    with pytest.raises(ModelLoadError, match="no such local folder.*HF_HUB_OFFLINE"):
        load_model(ModelConfig(name="nobody-here/no-such-model"))


def test_a_broken_model_folder_is_named_with_what_to_do(tiny_llama_dir, tmp_path):
    """Each used to fail elsewhere or say the wrong thing: a folder without tokenizer files loaded as an empty
    tokenizer (every prompt no tokens, a torch error in the first evaluation), a truncated safetensors file
    raised a bare SafetensorError, and an unknown model_type said 'no such local folder'."""
    import shutil

    def broken(name: str) -> str:
        folder = tmp_path / name
        shutil.copytree(tiny_llama_dir, folder)
        return str(folder)

    folder = broken("no_tokenizer")
    for f in os.listdir(folder):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(os.path.join(folder, f))
    with pytest.raises(ModelLoadError, match=f"model folder '{re.escape(folder)}' has no tokenizer files .*copy"):
        load_model(ModelConfig(name=folder))
    folder = broken("unknown_type")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, "model_type": "llama99"}, f)
    with pytest.raises(ModelLoadError, match=f"the model in folder '{re.escape(folder)}': .*llama99") as e:
        load_model(ModelConfig(name=folder))
    assert "no such local folder" not in str(e.value)
    folder = broken("truncated")
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ModelLoadError, match=f"{re.escape(weights)} cannot be read .*download or save it again"):
        load_model(ModelConfig(name=folder))
    # the tokenizer is checked before the weights are read (seconds, not the minutes a large model's take)
    with pytest.raises(ModelLoadError, match="has no chat template"):
        load_model(ModelConfig(name=folder, chat_template=True))
    with pytest.raises(ModelLoadError, match=f"model '{re.escape(tiny_llama_dir)}': model.chat_template=true but this "
                                             "tokenizer has no chat template: set model.chat_template=false"):
        load_model(ModelConfig(name=tiny_llama_dir, chat_template=True))


def test_a_model_folder_whose_config_json_is_not_a_json_object_is_named(tmp_path):
    """A config.json cut short, empty, not UTF-8 or a list raised a bare JSONDecodeError, UnicodeDecodeError or
    AttributeError, naming no file."""
    for name, content, match in [("cut", b'{"model_type": "ll', r"not valid JSON \(line 1: Unterminated string"),
                                 ("empty", b"", r"not valid JSON \(line 1: Expecting value\)"),
                                 ("latin", b'{"a": "\xe9"}', r"not valid UTF-8 \(byte 0xe9 at offset 7\)"),
                                 ("list", b"[1]", r"holds a JSON list, not the object of keys"),
                                 ("digits", b'{"vocab_size": ' + b"9" * 5000 + b"}", r"cannot be read \(ValueError")]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_bytes(content)
        with pytest.raises(ModelLoadError, match=re.escape(str(folder / "config.json")) + ": " + match):
            load_model(ModelConfig(name=str(folder)))


def test_an_hf_folder_whose_weights_lack_what_its_config_has_is_refused_not_half_random(tiny_llama_dir, tmp_path):
    """A config.json with one layer more than its weights loaded: transformers initialised the missing layer at
    random, printed a table and went on, and the run trained a model that was partly noise."""
    import shutil

    folder = tmp_path / "three_layers"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match=rf"model '{re.escape(str(folder))}': its weights lack 9 tensor\(s\) that "
                                             r"its config.json's architecture has \(model.layers.2.input_layernorm"
                                             r".*would start random"):
        load_model(ModelConfig(name=str(folder)))


def test_a_broken_gpt_mini_folder_is_named_with_the_file(tmp_path):
    """A saved gpt_mini (what model.name=runs/X/checkpoints/sft loads) had none of an HF folder's checks: a truncated
    model.safetensors raised a bare SafetensorError, a missing one FileNotFoundError, a config.json without n_embd
    KeyError, weights that do not fit the config a RuntimeError, a damaged tokenizer.json a JSONDecodeError."""
    import shutil

    from rlpost.models import save_model
    from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig

    tok = CharTokenizer("0123456789+=")
    saved = tmp_path / "saved"
    save_model(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=32)), tok, saved)

    def broken(name: str, edit) -> str:
        folder = tmp_path / name
        shutil.copytree(saved, folder)
        edit(folder)
        return str(folder)

    def config(**changes):
        def edit(folder):
            data = json.loads((folder / "config.json").read_text())
            data.update(changes)
            (folder / "config.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
        return edit

    def truncate(folder):
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])

    cases = [("truncated", truncate, r"model.safetensors cannot be read \(.*\): it is damaged or incomplete"),
             ("no_weights", lambda f: (f / "model.safetensors").unlink(), r"has no model.safetensors"),
             ("no_tokenizer", lambda f: (f / "tokenizer.json").unlink(), r"has no tokenizer.json"),
             ("bad_tokenizer", lambda f: (f / "tokenizer.json").write_text("{"),
              r"its tokenizer.json cannot be read as gpt_mini's \(JSONDecodeError"),
             ("no_n_embd", config(n_embd=None), r"config.json: a gpt_mini config.json needs 'n_embd', which it lacks"),
             ("zero_layers", config(n_layer=0), r"gpt_mini's n_layer must be a whole number >= 1, got 0"),
             ("text_size", config(n_positions="24"), r"gpt_mini's block_size must be a whole number >= 1, got '24'"),
             ("more_layers", config(n_layer=3), r"its weights do not fit its config.json \(Missing key\(s\)"),
             ("other_vocab", config(vocab_size=99), r"its weights do not fit its config.json \(size mismatch")]
    for name, edit, match in cases:
        folder = broken(name, edit)
        with pytest.raises(ModelLoadError, match=f"gpt_mini model folder '{re.escape(folder)}'.*{match}"):
            load_model(ModelConfig(name=folder))
    model, loaded = load_model(ModelConfig(name=str(saved)))
    assert loaded.vocab_size == tok.vocab_size and model.config.n_layer == 2


def test_a_chat_template_asked_of_gpt_mini_is_refused_not_ignored(tmp_path):
    """An HF tokenizer without a chat template is refused under model.chat_template=true; gpt_mini (fresh or
    saved), which has none, went on without one and without a word."""
    from rlpost.models import save_model
    from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig

    tok = CharTokenizer("0123456789+=")
    save_model(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=1, n_head=1, n_embd=8)), tok,
               tmp_path / "saved")
    for name in ("gpt_mini", str(tmp_path / "saved")):
        with pytest.raises(ModelLoadError, match=rf"model '{re.escape(name)}' is a gpt_mini, whose character "
                                                 r"tokenizer has no chat template, but model.chat_template=true"):
            load_model(ModelConfig(name=name, chat_template=True), "0123456789+=")
        assert load_model(ModelConfig(name=name), "0123456789+=")[1].vocab_size == tok.vocab_size


def test_hf_model_loads_from_a_local_folder(tiny_llama_dir):
    model, tok = load_model(ModelConfig(name=tiny_llama_dir))
    ids = tok.encode_prompt("12+34=")
    assert ids[0] == tok.tok.bos_token_id and tok.decode(tok.encode_completion("046")) == "046"
    assert model(__import__("torch").tensor([ids])).shape[-1] == len(tok.tok)


def test_rollout_scheduler_keys_are_checked_and_reach_sampling():
    cfg = load_config(None, ["rollout.max_num_seqs=16", "rollout.stop=[';']"])
    assert cfg.rollout.max_num_seqs == 16 and cfg.rollout.stop == [";"]
    with pytest.raises(ConfigError, match="max_num_seqs"):
        load_config(None, ["rollout.max_num_seqs=-1"])
    with pytest.raises(ConfigError, match="rollout.stop"):
        load_config(None, ["rollout.stop=['']"])


def test_vllm_engine_and_vllm_weight_sync_go_together():
    load_config(None, ["rollout.engine=vllm", "rl.weight_sync=vllm"])  # valid (vLLM itself is needed only to run)
    load_config(None, ["rollout.engine=vllm"])  # rl.weight_sync=auto takes the engine's way
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, ["rollout.engine=vllm", "rl.weight_sync=pointer"])
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, ["rl.weight_sync=vllm"])


def test_topology_keys_are_checked():
    load_config(None, ["rl.topology=async", "rl.weight_sync=collective", "rl.rollout_workers=2"])
    with pytest.raises(ConfigError, match="'rl.topology' is 'ray'; valid values: colocated, disaggregated, async"):
        load_config(None, ["rl.topology=ray"])
    with pytest.raises(ConfigError, match="rl.weight_sync=ray moves weights to Ray rollout workers"):
        load_config(None, ["rl.weight_sync=ray"])
    with pytest.raises(ConfigError, match="rl.topology=async sends weights .* not 'pointer'"):
        load_config(None, ["rl.topology=async", "rl.weight_sync=pointer"])
    with pytest.raises(ConfigError, match="'rl.rollout_workers' must be >= 1"):
        load_config(None, ["rl.rollout_workers=0"])
    with pytest.raises(ConfigError, match="'rl.max_staleness' must be >= 0"):
        load_config(None, ["rl.max_staleness=-1"])


# ---------------------------------------------------------------------------- a run refused before it begins

def test_a_run_refused_for_its_data_leaves_no_run_directory_and_runs_once_fixed(tmp_path, capsys):
    from rlpost.cli import main

    train = tmp_path / "train.jsonl"
    train.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "caf\xe9=", "answer": "3"}\n')
    held_out = write(tmp_path / "test.jsonl", [json.dumps({"prompt": "2+2=", "answer": "4"})])
    args = ["train", "task.name=file", f"task.train_file={train}", f"task.eval_file={held_out}", "sft.steps=0",
            "rl.steps=0", "eval.samples_per_prompt=1", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
            "threads=1", f"out_dir={tmp_path / 'runs'}", "run_name=r"]
    for _ in range(2):  # the same command again meets the same error, not a run directory in its way
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "train.jsonl: 1 malformed row(s)" in err and "line 2: not valid UTF-8" in err
        assert not (tmp_path / "runs" / "r").exists()
    train.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "3+0=", "answer": "3"}\n')
    assert main([*args, "model.block_size=3"]) == 1  # the length check refuses a run before it begins too
    assert "model.block_size" in capsys.readouterr().err and not (tmp_path / "runs" / "r").exists()
    assert main(args) == 0  # the data fixed, the same command runs
    assert (tmp_path / "runs" / "r" / "summary.json").exists()


def test_a_file_task_without_held_out_rows_is_refused_before_sft_when_the_run_evaluates(tmp_path, capsys):
    """task.eval_file is optional, but the default stages evaluate: the run trained SFT, then stopped at its first
    evaluation ('evaluation needs held-out rows'); so did RL at its first rl.eval_every step."""
    from rlpost.cli import main

    train = write(tmp_path / "train.jsonl", [json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)})
                                             for a in range(6)])
    args = ["train", "task.name=file", f"task.train_file={train}", "sft.steps=1", "rl.steps=0",
            "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "threads=1", f"out_dir={tmp_path / 'runs'}",
            "run_name=r"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert ("task file has no held-out rows (task.eval_file is not set), and the run evaluates on them (an eval "
            "stage): set task.eval_file" in err) and not (tmp_path / "runs" / "r").exists()
    rl = ["rl.steps=2", "rl.eval_every=1", "rollout.prompts_per_step=2", "rollout.k=2", "stages=[sft, rl]"]
    assert main([*args, *rl]) == 1
    assert "evaluates on them (rl.eval_every=1)" in capsys.readouterr().err
    assert main([*args, "stages=[sft]"]) == 0  # a run that never evaluates needs no held-out rows


def test_discarding_a_run_directory_keeps_what_was_there_before(tmp_path):
    from rlpost.runlog import discard_run_dir, make_run_dir, open_log

    cfg = load_config(None, [f"out_dir={tmp_path}", "run_name=mine"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    run_dir = make_run_dir(cfg, "test")
    open_log(cfg, run_dir).close()
    discard_run_dir(run_dir)
    assert os.listdir(run_dir) == ["notes.txt"]
    fresh = make_run_dir(load_config(None, [f"out_dir={tmp_path}", "run_name=new"]), "test")
    discard_run_dir(fresh)
    assert not os.path.exists(fresh)


def test_unnamed_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    """Without run_name the folder is the recipe and the time to the second: a sweep launched at once used to
    fail every run but the first (`already holds a run ... --resume` it, someone else's run). Each gets its own
    folder (-2, -3, ...); a named run keeps refusing a folder that holds one."""
    import rlpost.runlog
    from rlpost.runlog import discard_run_dir, make_run_dir

    monkeypatch.setattr(rlpost.runlog.time, "strftime", lambda fmt, *a: "20260102-030405")
    cfg = load_config(None, [f"out_dir={tmp_path}"])
    dirs = [make_run_dir(cfg, "sweep") for _ in range(3)]
    assert dirs == [str(tmp_path / "sweep-20260102-030405"), str(tmp_path / "sweep-20260102-030405-2"),
                    str(tmp_path / "sweep-20260102-030405-3")]
    assert all(os.path.isfile(os.path.join(d, "run.json")) for d in dirs)
    discard_run_dir(dirs[1])
    assert make_run_dir(cfg, "sweep") == dirs[1]  # a refused run's folder is free again
    named = load_config(None, [f"out_dir={tmp_path}", "run_name=sweep-20260102-030405"])
    with pytest.raises(FileExistsError, match="already holds config.yaml, run.json"):
        make_run_dir(named, "sweep")


def test_a_run_never_overwrites_nor_removes_files_it_did_not_write(tmp_path, capsys):
    """A user's recipe kept in the folder the run is named after, and a run_name that is a link to a user's
    folder holding a config.yaml and TensorBoard logs: the run is refused before it writes anything, and a run
    refused later (its data file missing) removes what it wrote only, never following a link."""
    from rlpost.cli import main

    recipe = tmp_path / "runs" / "exp1" / "config.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text("# my experiment: keep this comment\nrl:\n  steps: 2\n")
    small = ["task.name=file", f"task.train_file={tmp_path / 'missing.jsonl'}", "model.n_layer=1",
             "model.n_embd=16", "model.n_head=1", "threads=1"]
    assert main(["train", str(recipe), f"out_dir={tmp_path / 'runs'}", "run_name=exp1", *small]) != 0
    assert "already holds config.yaml" in capsys.readouterr().err
    assert recipe.read_text().startswith("# my experiment") and os.listdir(recipe.parent) == ["config.yaml"]

    target = tmp_path / "target"
    (target / "tensorboard").mkdir(parents=True)
    (target / "config.yaml").write_text("my notes")
    (target / "tensorboard" / "events.out.tfevents.1").write_text("event data")
    os.symlink(target, tmp_path / "runs" / "link")
    assert main(["train", f"out_dir={tmp_path / 'runs'}", "run_name=link", *small]) != 0
    assert "already holds config.yaml, tensorboard" in capsys.readouterr().err
    assert sorted(os.listdir(target)) == ["config.yaml", "tensorboard"]
    assert (target / "tensorboard" / "events.out.tfevents.1").read_text() == "event data"

    # an empty folder behind the link: the run writes into it, and once refused removes its own files only
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    os.symlink(mine, tmp_path / "runs" / "link2")
    assert main(["train", f"out_dir={tmp_path / 'runs'}", "run_name=link2", *small]) != 0
    assert "missing.jsonl" in capsys.readouterr().err
    assert os.listdir(mine) == ["notes.txt"] and os.path.islink(tmp_path / "runs" / "link2")


def test_discarding_removes_a_link_as_a_link_and_only_the_runs_own_files(tmp_path):
    from rlpost.runlog import discard_run_dir, make_run_dir, run_id_of

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "events").write_text("someone else's")
    run_dir = make_run_dir(load_config(None, [f"out_dir={tmp_path}", "run_name=r"]), "test")
    os.symlink(elsewhere, os.path.join(run_dir, "tensorboard"))  # as a sink could have linked it
    discard_run_dir(run_dir, "not this run's id")  # another run's: nothing is touched
    assert sorted(os.listdir(run_dir)) == ["config.yaml", "run.json", "tensorboard"]
    discard_run_dir(run_dir, run_id_of(run_dir))
    assert not os.path.exists(run_dir) and (elsewhere / "events").read_text() == "someone else's"


@pytest.mark.parametrize("overrides, message", [
    (["task.rewards=[{name: nosuch_reward}]"], r"'task.rewards': task.rewards\[0\] \(nosuch_reward\): unknown reward"),
    (["task.rewards=[{weight: 1}]"], r"task.rewards\[0\] must be a mapping with a 'name'"),
    (["task.rewards=[{name: format, weight: .nan}]"], r"task.rewards\[0\].weight must be a finite number, got nan"),
    (["task.rewards=[{name: math}, {name: format, weight: .inf}]"],
     r"task.rewards\[1\].weight must be a finite number, got inf"),
    (["task.rewards=[{name: code, timeout_s: -5}]"], r"task.rewards\[0\] \(code\): code reward: timeout_s must be"),
    (["task.rewards=[{name: code, timeout_s: .inf}]"], r"timeout_s must be a finite number of seconds > 0"),
    (["task.rewards=[{name: code, memory_mb: -1}]"], r"memory_mb must be a whole number >= 1"),
    (["task.rewards=[{name: code, mode: any}]"], r"mode must be 'fraction' or 'all'"),
    (["task.reward=math", "task.reward_options={extract: nosuch}"], r"'task.reward': math reward: extract='nosuch'"),
    (["task.reward=math", "task.reward_options={nosuch: 1}"], r"'task.reward': reward 'math': bad options"),
    (["task.reward=judge"], r"'task.reward': judge: give exactly one of `model`"),
    (["task.reward=judge", "task.reward_options={url: 'http://127.0.0.1:9/v1', on_failure: 1}"],
     r"on_failure must be a finite number <= 0"),
    (["task.reward=format", "task.reward_options={pattern: '('}"], r"not a regular expression"),
    (["eval.reward=nosuch"], r"'eval.reward': unknown reward 'nosuch'"),
    (["task.reward=no_such_module_here:score"], r"'task.reward': cannot load reward function"),
])
def test_reward_settings_are_checked_when_the_config_loads(overrides, message):
    """Each of these used to load and fail at the first reward call, after the model had loaded (or, under
    task.reward_on_error=zero, score every sample 0 or nan)."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_good_reward_settings_load_without_starting_anything(tmp_path, monkeypatch):
    (tmp_path / "my_terms.py").write_text("class Big:\n"
                                          "    def __init__(self, size=1):\n"
                                          "        raise RuntimeError('built at load time')\n"
                                          "    def __call__(self, c, r):\n"
                                          "        return 0.0\n")
    monkeypatch.chdir(tmp_path)
    load_config(None, ["task.rewards=[{name: math, extract: hash}, {name: format, weight: -0.5}, "
                       "{name: 'my_terms:Big', size: 3}]"])
    load_config(None, ["task.reward=judge", "task.reward_options={model: /nonexistent/judge, device: cpu}"])
    with pytest.raises(ConfigError, match=r"task.rewards\[0\] \(my_terms:Big\): reward 'my_terms:Big': bad options"):
        load_config(None, ["task.rewards=[{name: 'my_terms:Big', colour: red}]"])


def test_a_number_of_thousands_of_digits_is_named_by_row_not_a_bare_value_error(tmp_path):
    """Python reads at most 4300 digits as an int: a row holding a longer number failed the whole file (prompts,
    and preference pairs) with a bare 'Exceeds the limit (4300 digits)' ValueError naming no file or line."""
    from rlpost.preference.data import PreferenceDataError, read_preference_rows

    huge = "9" * 5000
    path = write(tmp_path / "huge.jsonl", [json.dumps({"prompt": "1+1=", "answer": "2"}),
                                           f'{{"prompt": "x", "answer": {huge}}}'])
    with pytest.raises(TaskDataError, match=r"huge.jsonl: 1 malformed row\(s\):\n  line 2: 'answer' is a whole number "
                                            r"of 5000 digits \(more than Python reads as a number\)"):
        read_jsonl(path)
    (tmp_path / "huge.json").write_text(f'[{{"prompt": "x", "answer": {huge}}}]')
    with pytest.raises(TaskDataError, match=r"row 1: 'answer' is a whole number of 5000 digits"):
        read_jsonl(str(tmp_path / "huge.json"))
    pairs = write(tmp_path / "pairs.jsonl", [f'{{"prompt": "x", "chosen": "a", "rejected": "b", "n": {huge}}}'])
    with pytest.raises(PreferenceDataError, match=r"pairs.jsonl: 1 malformed row\(s\):\n  line 1: cannot be read"):
        read_preference_rows(pairs)
    assert read_jsonl(write(tmp_path / "long.jsonl", ['{"prompt": "x", "answer": ' + "9" * 40 + "}"]))[0]["answer"] \
        == "9" * 40
    # in a recipe or an override: a YAML error at its line, not the bare ValueError
    (tmp_path / "seed.yaml").write_text(f"rl:\n  steps: 3\nseed: {huge}\n")
    with pytest.raises(ConfigError, match=r"seed.yaml is not valid YAML: a whole number of 5000 characters, more "
                                          r"digits than Python reads as a number\n  in .*seed.yaml\", line 3"):
        load_config(str(tmp_path / "seed.yaml"))
    with pytest.raises(ConfigError, match=r"config key 'seed': the value '9{200}...' of override seed=... is not "
                                          r"valid YAML \(a whole number of 5000 characters.*number\)$"):
        load_config(None, [f"seed={huge}"])


def test_json_values_no_utf8_file_or_number_can_hold_are_named_by_line_and_key(tmp_path):
    """NaN / Infinity / 1e400 used to become the answers "nan" / "inf"; a repeated key kept its last value
    silently; an escaped lone surrogate passed and failed the run at its first checkpoint. Every one is named."""
    good = json.dumps({"prompt": "1+1=", "answer": "2"})
    lines = [good, '{"prompt": "x", "answer": NaN}', '{"prompt": "x", "answer": -Infinity}',
             '{"prompt": "x", "answer": 1e400}', '{"prompt": "a", "answer": "2", "answer": "3"}',
             '{"prompt": "7+1=\\ud800", "answer": "8"}',
             '{"messages": [{"role": "user", "content": "hi \\udfff"}], "answer": "8"}',
             '{"prompt": "x", "answer": "1", "meta": {"k": 1, "k": 2}}', '{"prompt": "x", "answer": 2.5e3}']
    path = write(tmp_path / "strict.jsonl", lines)
    with pytest.raises(TaskDataError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert "7 malformed row(s)" in msg
    assert "line 2: 'answer' is NaN (not a number JSON allows)" in msg
    assert "line 3: 'answer' is -Infinity (not a number JSON allows)" in msg
    assert "line 4: 'answer' is 1e400 (beyond a float: it reads as inf)" in msg
    assert "line 5: the row repeats the key(s) 'answer'; keep one" in msg
    assert "line 6: 'prompt' holds '\\ud800' at character 4, a lone surrogate" in msg
    assert "line 7: 'messages[0].content' holds '\\udfff' at character 3" in msg
    assert "line 8: 'meta' repeats the key(s) 'k'" in msg
    assert "line 9" not in msg   # an ordinary float still reads
    rows = read_jsonl(write(tmp_path / "ok.jsonl", [good, '{"prompt": "\\ud83d\\ude00", "answer": 2.5e3}']))
    assert rows[1]["prompt"] == "\U0001F600" and rows[1]["answer"] == "2500.0"   # a surrogate pair is one character
    array = tmp_path / "strict.json"
    array.write_text('[{"prompt": "1+1=", "answer": "2"}, {"prompt": "x", "answer": NaN}]')
    with pytest.raises(TaskDataError, match=r"row 2: 'answer' is NaN"):
        read_jsonl(str(array))
