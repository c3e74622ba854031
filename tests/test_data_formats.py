"""Prompt data in: JSONL, JSON, parquet and `datasets` folders give the same rows; column mapping, chat
messages, system prompts and the chat template; every malformed row named, in every format."""

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import train_tiny_tokenizer

from rlpost.config import ConfigError, ModelConfig, TaskConfig, load_config
from rlpost.models import HFTokenizer, encode_prompt, load_model
from rlpost.stages.base import RunContext
from rlpost.tasks import Columns, TaskDataError, file_task, load_task, read_rows
from rlpost.tasks.files import write_rows

TRAIN = [
    {"prompt": "2+3=", "answer": "5", "completion": "2+3 is 5. The answer is 5", "reference": "five"},
    {"prompt": "4*2=", "answer": "8", "reference": "eight"},
    {"messages": [{"role": "user", "content": "7-1="}], "answer": "6", "reference": "six"},
    {"messages": [{"role": "system", "content": "Show your work."}, {"role": "user", "content": "3*3="},
                  {"role": "assistant", "content": "3*3 is 9. The answer is 9"}], "answer": "9", "reference": "nine"},
]
TEST = [{"prompt": "1+1=", "answer": "2", "completion": "1+1 is 2. The answer is 2", "reference": "two"}]

# what every format must read TRAIN as (positions aside): internal keys, messages as the prompt, the last
# assistant message of row 4 split off as its completion
EXPECTED = [
    {"prompt": "2+3=", "answer": "5", "completion": "2+3 is 5. The answer is 5", "reference": "five"},
    {"prompt": "4*2=", "answer": "8", "reference": "eight"},
    {"prompt": [{"role": "user", "content": "7-1="}], "answer": "6", "reference": "six"},
    {"prompt": [{"role": "system", "content": "Show your work."}, {"role": "user", "content": "3*3="}],
     "answer": "9", "completion": "3*3 is 9. The answer is 9", "reference": "nine"},
]


def data(rows):
    return [{k: v for k, v in r.items() if k not in ("line", "row")} for r in rows]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows):
    keys = list({k: None for r in rows for k in r})  # from_pylist takes the columns of the first row alone
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), str(path))
    return str(path)


def write_dataset_dict(path, splits):
    import datasets

    def table(rows):  # every key in every row (from_list takes its columns from the first row alone)
        keys = list({k: None for r in rows for k in r})
        return datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])

    datasets.DatasetDict({name: table(rows) for name, rows in splits.items()}).save_to_disk(str(path))
    return str(path)


# ---------------------------------------------------------------------------- formats

def test_the_same_rows_load_equal_from_every_format(tmp_path, monkeypatch):
    jsonl = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    array = tmp_path / "train.json"
    array.write_text(json.dumps(TRAIN))
    parquet = write_parquet(tmp_path / "train.parquet", TRAIN)
    folder = write_dataset_dict(tmp_path / "ds", {"train": TRAIN, "test": TEST})
    from_jsonl = read_rows(jsonl)
    assert data(from_jsonl) == EXPECTED and [r["line"] for r in from_jsonl] == [1, 2, 3, 4]
    assert data(read_rows(str(array))) == EXPECTED
    from_parquet = read_rows(parquet)
    assert data(from_parquet) == EXPECTED and [r["row"] for r in from_parquet] == [1, 2, 3, 4]
    assert data(read_rows(folder)) == EXPECTED                     # split "train" by default
    assert data(read_rows(folder, split="test")) == data(read_rows(write_jsonl(tmp_path / "t.jsonl", TEST)))
    # without the `datasets` package the Arrow files are read with pyarrow, to the same rows
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert data(read_rows(folder)) == EXPECTED
    assert data(read_rows(folder, split="test"))[0]["completion"] == "1+1 is 2. The answer is 2"


def test_a_single_dataset_folder_and_a_dataset_dict_as_the_train_file(tmp_path):
    import datasets

    keys = list({k: None for r in TRAIN for k in r})
    datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in TRAIN]).save_to_disk(str(tmp_path / "single"))
    assert data(read_rows(str(tmp_path / "single"))) == EXPECTED
    folder = write_dataset_dict(tmp_path / "ds", {"train": TRAIN, "test": TEST, "dev": TEST[:1]})
    task = file_task(folder, None)  # no eval_file: the folder's eval_split ("test") is held out
    assert len(task.train_rows) == 4 and data(task.eval_rows) == TEST
    task = file_task(folder, folder, eval_split="dev")
    assert data(task.eval_rows) == TEST
    cfg = TaskConfig(name="file", train_file=folder, train_split="dev", eval_split="train")
    task = load_task(cfg)
    assert data(task.train_rows) == TEST and len(task.eval_rows) == 4


def test_written_rows_read_back_equal_in_both_formats(tmp_path):
    rows = read_rows(write_jsonl(tmp_path / "train.jsonl", TRAIN))
    for name in ("out.jsonl", "out.parquet"):
        write_rows(rows, str(tmp_path / name))
        assert data(read_rows(str(tmp_path / name))) == EXPECTED
    # a value JSON cannot hold (a parquet timestamp) failed in json.dumps with a half-written file behind
    import datetime

    dated = [{**rows[0], "when": datetime.date(2024, 1, 1)}]
    with pytest.raises(ValueError, match=r"cannot write .*dated.jsonl: column 'when' holds date values, which JSON"):
        write_rows(dated, str(tmp_path / "dated.jsonl"))
    assert not (tmp_path / "dated.jsonl").exists()
    write_rows(dated, str(tmp_path / "dated.parquet"))  # a parquet column holds it
    assert read_rows(str(tmp_path / "dated.parquet"))[0]["when"] == datetime.date(2024, 1, 1)


# ---------------------------------------------------------------------------- columns

def test_column_mapping_renames_and_keeps_the_other_columns(tmp_path):
    rows = [{"question": "What is 6*7?", "final": 42, "solution": "6*7 = 42. The answer is 42", "tests": ["t1"]}]
    cols = Columns(prompt="question", answer="final", completion="solution")
    for path in (write_jsonl(tmp_path / "q.jsonl", rows), write_parquet(tmp_path / "q.parquet", rows)):
        assert data(read_rows(path, cols)) == [{"prompt": "What is 6*7?", "answer": "42",
                                                "completion": "6*7 = 42. The answer is 42", "tests": ["t1"]}]
    cfg = load_config(None, ["task.name=file", f"task.train_file={tmp_path / 'q.parquet'}",
                             "task.prompt_key=question", "task.answer_key=final", "task.completion_key=solution"])
    task = load_task(cfg.task)
    assert task.train_rows[0]["prompt"] == "What is 6*7?"
    assert task.demonstrations[0]["completion"] == "6*7 = 42. The answer is 42"


def test_a_column_no_row_has_names_the_columns_there_are(tmp_path):
    rows = [{"question": "1+1=", "final": "2"}]
    for path in (write_jsonl(tmp_path / "q.jsonl", rows), write_parquet(tmp_path / "q.parquet", rows),
                 write_dataset_dict(tmp_path / "ds", {"train": rows})):
        with pytest.raises(TaskDataError) as e:
            read_rows(path, Columns(prompt="q", answer="final"))
        assert "no column 'q' (task.prompt_key) or 'messages' (task.messages_key); its columns: question, final" \
            in str(e.value)
        with pytest.raises(TaskDataError, match=r"no column 'answer' \(task.answer_key\); its columns: question"):
            read_rows(path, Columns(prompt="question"))
        with pytest.raises(TaskDataError, match=r"no column 'why' \(task.completion_key\)"):
            read_rows(path, Columns(prompt="question", answer="final", completion="why"))
        # a custom reward needs no answer column
        assert data(read_rows(path, Columns(prompt="question"), require_answer=False)) == [
            {"prompt": "1+1=", "final": "2"}]


def test_a_column_named_like_a_rows_place_is_refused_not_lost(tmp_path):
    """`line` / `row` hold each row's place in its file: a data column of that name used to be kept beside the
    place (errors then named 'line 99') and dropped from every file rlpost writes (curate's output)."""
    rows = [{"prompt": "1+1=", "answer": "2", "line": 99}, {"prompt": "2+2=", "answer": "4", "line": 98}]
    for path in (write_jsonl(tmp_path / "q.jsonl", rows), write_parquet(tmp_path / "q.parquet", rows)):
        with pytest.raises(TaskDataError, match=r"q\.(jsonl|parquet): has a column 'line', .*rename the column"):
            read_rows(path)
    with open(tmp_path / "r.jsonl", "w") as f:  # a line that is no JSON: the columns are unknown, each row named
        f.write('{"prompt": "1+1=", "answer": "2", "row": 3}\nnot json\n')
    with pytest.raises(TaskDataError, match=r"2 malformed row\(s\):\n  line 1: has a column 'row'"):
        read_rows(str(tmp_path / "r.jsonl"))


# ---------------------------------------------------------------------------- malformed rows

BAD = [
    {"prompt": "1+1=", "answer": "2"},
    {"prompt": "", "answer": "1"},
    {"messages": [{"role": "robot", "content": "hi"}], "answer": "1"},
    {"prompt": "2+2=", "answer": None},
    {"messages": [{"role": "assistant", "content": "only a reply"}], "answer": "3"},
    {"messages": [{"role": "user", "content": 5}], "answer": "3"},
]
BAD_PROBLEMS = ["{w} 2: 'prompt' is empty", "{w} 3: 'messages' message 1 has role 'robot'",
                "{w} 4: missing required key 'answer'",
                "{w} 5: 'messages' holds only an assistant message",
                "{w} 6: 'messages' message 1 (user) needs a string 'content', got int"]


def test_every_malformed_row_is_named_in_every_format(tmp_path):
    cases = [(write_jsonl(tmp_path / "bad.jsonl", BAD), "line", "bad.jsonl"),
             (write_parquet(tmp_path / "bad.parquet", [dict(r, messages=r.get("messages"))
                                                       for r in BAD[:5]]), "row", "bad.parquet"),
             (write_dataset_dict(tmp_path / "ds", {"train": BAD[:1], "test": BAD[:5]}), "row", "ds [split test]")]
    for path, word, name in cases:
        with pytest.raises(TaskDataError) as e:
            read_rows(path, split="test")
        msg = str(e.value)
        expected = BAD_PROBLEMS if word == "line" else BAD_PROBLEMS[:4]
        assert f"{name}: {len(expected)} malformed row(s)" in msg, msg
        for problem in expected:
            assert problem.format(w=word) in msg, (problem, msg)


def test_a_nan_or_infinite_number_in_a_table_is_refused_as_in_json(tmp_path):
    """pandas writes a float column's missing value as NaN: it used to become the answer "nan" (or a prompt),
    while the JSON reader refuses NaN and Infinity."""
    path = str(tmp_path / "nan.parquet")
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2=", "3+3=", "nan"], "answer": [2.0, float("nan"), float("inf"),
                                                                                  6.0]}), path)
    with pytest.raises(TaskDataError, match=r"2 malformed row\(s\):\n  row 2: 'answer' is nan, not a finite number "
                                            r".*\n  row 3: 'answer' is inf, not a finite number"):
        read_rows(path)
    pq.write_table(pa.table({"prompt": [1.5, float("-inf")], "answer": ["1", "2"]}), path)
    with pytest.raises(TaskDataError, match=r"row 2: 'prompt' is -inf"):
        read_rows(path, require_answer=False)


def test_a_pretty_printed_json_document_is_one_error_that_says_so(tmp_path):
    """A .jsonl file that is one indented array, or a .json file that is an object holding the rows, used to be
    one 'not valid JSON' error a line, none saying what the file is."""
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    (tmp_path / "a.jsonl").write_text(json.dumps(rows, indent=2))
    with pytest.raises(TaskDataError, match=r"a.jsonl: one JSON array over several lines, not JSON Lines .*\.json"):
        read_rows(str(tmp_path / "a.jsonl"))
    (tmp_path / "o.json").write_text(json.dumps({"version": 1, "data": rows}, indent=2))
    with pytest.raises(TaskDataError, match=r"o.json: one JSON object over several lines \(keys: version, data\), "
                                            r"not rows: write the rows \(its list 'data', say\)"):
        read_rows(str(tmp_path / "o.json"))
    assert len(read_rows(write_jsonl(tmp_path / "ok.jsonl", rows))) == 2
    (tmp_path / "b.jsonl").write_text("{bad\n{worse\n")  # not one document either: each line named
    with pytest.raises(TaskDataError, match=r"2 malformed row\(s\):\n  line 1: not valid JSON"):
        read_rows(str(tmp_path / "b.jsonl"))


def test_bad_json_lines_and_wrong_types_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{oops\n["a list"]\n{"prompt": {"x": 1}, "answer": "1"}\n'
                    '{"prompt": "3+3=", "answer": "6", "completion": 6}\n')
    with pytest.raises(TaskDataError) as e:
        read_rows(str(path))
    msg = str(e.value)
    assert "4 malformed row(s)" in msg and "line 2: not valid JSON" in msg and "line 3: expected a JSON object" in msg
    assert "line 4: 'prompt' must be a string or a list of {role, content} messages, got dict" in msg
    assert ("line 5: 'completion' must be a string, or a multi-turn demonstration [{role, content}, ...], "
            "got int") in msg


def test_missing_files_folders_splits_and_formats_name_the_path(tmp_path):
    for name in ("nope.jsonl", "nope.parquet", "nope_folder"):
        with pytest.raises(TaskDataError, match=f"prompt file not found: .*{name}"):
            read_rows(str(tmp_path / name))
    (tmp_path / "plain").mkdir()
    with pytest.raises(TaskDataError, match="plain: a folder, but not one saved by `datasets`"):
        read_rows(str(tmp_path / "plain"))
    (tmp_path / "x.csv").write_text("prompt,answer\n")
    with pytest.raises(TaskDataError, match="x.csv: unknown prompt file format"):
        read_rows(str(tmp_path / "x.csv"))
    folder = write_dataset_dict(tmp_path / "ds", {"train": TEST, "test": TEST})
    with pytest.raises(TaskDataError, match=r"no split 'validation' \(task.eval_split\); its splits: train, test"):
        file_task(folder, folder, eval_split="validation")
    # without eval_file the folder's eval_split is held out: one named and missing (a typo) used to mean none
    with pytest.raises(TaskDataError, match=r"ds: no split 'tst' \(task.eval_split\) to hold out; its splits: "
                                            "train, test"):
        load_task(TaskConfig(name="file", train_file=folder, eval_split="tst"))
    no_test = write_dataset_dict(tmp_path / "no_test", {"train": TEST})
    assert file_task(no_test, None).eval_rows == []  # the default split, absent: no held-out set, as before
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(TaskDataError, match="broken.parquet: not a readable parquet file"):
        read_rows(str(tmp_path / "broken.parquet"))


@pytest.mark.parametrize("with_datasets", [True, False])
def test_a_damaged_datasets_folder_is_named_with_its_file(tmp_path, monkeypatch, with_datasets):
    """A `datasets` folder copied in part or damaged failed with a bare JSONDecodeError (dataset_dict.json, and
    state.json without the `datasets` package), KeyError, FileNotFoundError or ArrowInvalid, naming no file."""
    import shutil

    saved = write_dataset_dict(tmp_path / "saved", {"train": TEST, "test": TEST})
    if not with_datasets:  # the Arrow files read with pyarrow alone
        monkeypatch.setitem(sys.modules, "datasets", None)

    def damaged(name, edit):
        folder = tmp_path / name
        shutil.copytree(saved, folder)
        edit(folder)
        return str(folder)

    arrow = next(f.name for f in (tmp_path / "saved" / "train").iterdir() if f.suffix == ".arrow")
    cases = [("cut_dict", lambda f: (f / "dataset_dict.json").write_text('{"splits": ["tra'),
              r"cut_dict/dataset_dict.json: not valid JSON \(.*\); the folder was not saved whole"),
             ("list_dict", lambda f: (f / "dataset_dict.json").write_text("[1]"),
              r"list_dict/dataset_dict.json: expected a JSON object with a list 'splits'"),
             ("cut_state", lambda f: (f / "train" / "state.json").write_text("{"),
              r"cut_state/train/state.json: not valid JSON"),
             ("no_state", lambda f: (f / "train" / "state.json").unlink(),
              r"no_state: its dataset_dict.json lists the split 'train', but .*train holds no state.json"),
             ("no_arrow", lambda f: (f / "train" / arrow).unlink(),
              rf"no_arrow/train/state.json: lists the data file '{arrow}', which .*train does not hold"),
             ("bad_arrow", lambda f: (f / "train" / arrow).write_bytes(b"not arrow"),
              r"bad_arrow/train.*(cannot be read|not a readable Arrow file) \(ArrowInvalid: .*\); damaged or "
              "incomplete")]
    for name, edit, match in cases:
        with pytest.raises(TaskDataError, match=match):
            read_rows(damaged(name, edit))
    assert data(read_rows(saved)) == data(TEST)


def test_task_names_and_their_config_keys():
    assert load_config(None, ["task.name=file", "task.train_file=x.jsonl"]).task.name == "file"
    assert load_config(None, ["task.name=jsonl", "task.train_file=x.jsonl"]).task.name == "jsonl"
    valid = "valid values: arithmetic, multiply, multistep, functions, grading, web, file, jsonl"
    with pytest.raises(ConfigError, match=valid):
        load_config(None, ["task.name=csv"])
    with pytest.raises(ConfigError, match="task.name=file needs task.train_file"):
        load_config(None, ["task.name=file"])
    with pytest.raises(ConfigError, match="'task.prompt_key' must be a non-empty string"):
        load_config(None, ["task.prompt_key="])


# ---------------------------------------------------------------------------- chain-of-thought demonstrations

def test_cot_demonstrations_are_kept_whole_and_scored_by_the_run_reward(tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "(3+4)*2=", "answer": "14",
                                                    "completion": "3+4=7, 7*2=14. The answer is 14"}])
    held = write_jsonl(tmp_path / "held.jsonl", [
        {"prompt": "(1+1)*3=", "answer": "6", "completion": "1+1=2, 2*3=6. The answer is 6"},
        {"prompt": "(2+2)*2=", "answer": "8", "completion": "2+2=4, 4*2=9. The answer is 9"}])
    (tmp_path / "last_number.py").write_text(
        "def score(completion, row):\n    return float(completion.rstrip('.').split()[-1] == row['answer'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task(TaskConfig(name="file", train_file=train, eval_file=held))
    assert task.demonstrations[0]["completion"] == "3+4=7, 7*2=14. The answer is 14"  # SFT imitates all of it
    assert task.demonstrator_accuracy == 0.0  # the exact verifier reads the first line: never just the answer
    task = load_task(TaskConfig(name="file", train_file=train, eval_file=held, reward="last_number:score"))
    assert task.demonstrator_accuracy == 0.5  # the run's reward finds the final answer: 1 right of 2


# ---------------------------------------------------------------------------- chat template and system prompt

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def raw_tokenizer():
    tok = train_tiny_tokenizer(["<|system|>Be brief.\n<|user|>2+3=\n<|assistant|>", "7-1=", "4*2="] * 4)
    tok.chat_template = TEMPLATE
    return tok


def ids(raw, text):
    return raw(text, add_special_tokens=False)["input_ids"]


def test_one_encoder_for_strings_messages_and_system_prompts(raw_tokenizer):
    raw = raw_tokenizer
    chat, plain = HFTokenizer(raw, chat_template=True), HFTokenizer(raw)
    user = [{"role": "user", "content": "2+3="}]
    # hand-rendered: the template's text, tokenised bare (the template carries its own markers)
    assert encode_prompt(chat, "2+3=") == ids(raw, "<|user|>2+3=\n<|assistant|>")
    assert encode_prompt(chat, "2+3=", "Be brief.") == ids(raw, "<|system|>Be brief.\n<|user|>2+3=\n<|assistant|>")
    assert encode_prompt(plain, user, "Be brief.") == ids(raw, "<|system|>Be brief.\n<|user|>2+3=\n<|assistant|>")
    own = [{"role": "system", "content": "Terse."}, *user]  # a row's own system message is not doubled
    assert encode_prompt(chat, own, "Be brief.") == ids(raw, "<|system|>Terse.\n<|user|>2+3=\n<|assistant|>")
    assert encode_prompt(plain, "2+3=") == raw("2+3=")["input_ids"]  # no template: bos + text
    with pytest.raises(ValueError, match="task.system_prompt needs the chat template"):
        encode_prompt(plain, "2+3=", "Be brief.")


def test_run_context_prompt_ids_apply_the_template_and_the_system_prompt(tmp_path, raw_tokenizer):
    raw = raw_tokenizer
    task = load_task(TaskConfig(name="file", train_file=write_jsonl(tmp_path / "t.jsonl", TRAIN[:3]),
                                system_prompt="Be brief."))
    assert task.system_prompt == "Be brief."
    ctx = RunContext(run_dir=str(tmp_path), seed=0, model=None, tokenizer=HFTokenizer(raw, chat_template=True),
                     task=task, engine=None, weight_sync=None, verifier=None, log=None, summary={})
    assert ctx.prompt_ids(task.train_rows) == [
        ids(raw, "<|system|>Be brief.\n<|user|>2+3=\n<|assistant|>"),
        ids(raw, "<|system|>Be brief.\n<|user|>4*2=\n<|assistant|>"),
        ids(raw, "<|system|>Be brief.\n<|user|>7-1=\n<|assistant|>")]


def test_gpt_mini_refuses_message_rows_naming_the_row(tmp_path):
    task = file_task(write_jsonl(tmp_path / "t.jsonl", TRAIN[:3]), None)
    with pytest.raises(ValueError) as e:  # sizing a fresh gpt_mini encodes every prompt first
        load_model(ModelConfig(), task.alphabet, rows=task.train_rows, max_new_tokens=4)
    msg = str(e.value)
    assert "row 2 (line 3): cannot encode the prompt 'user: 7-1='" in msg
    assert "needs a tokenizer with a chat template, and CharTokenizer (gpt_mini's) has none" in msg
    model, tok = load_model(ModelConfig(block_size=32), task.alphabet)
    ctx = RunContext(run_dir=str(tmp_path), seed=0, model=model, tokenizer=tok, task=task, engine=None,
                     weight_sync=None, verifier=None, log=None, summary={})
    assert ctx.prompt_ids(task.train_rows[:1]) == [[tok.BOS] + tok.encode("2+3=")]
    with pytest.raises(ValueError, match="CharTokenizer"):
        ctx.prompt_ids(task.train_rows[2:])
