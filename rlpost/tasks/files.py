"""Prompt files: JSON Lines, JSON, parquet and folders saved by `datasets`, read into task rows.

    rows = read_rows("train.jsonl")
    rows = read_rows("gsm8k.parquet", Columns(prompt="question", answer="final"))
    rows = read_rows("data/my_dataset", split="test")      # a DatasetDict folder: one of its splits

The format comes from the path: `.jsonl` (one JSON object a line), `.json` (JSON Lines, or one JSON array
of objects), `.parquet`, or a folder written by `datasets` (`Dataset.save_to_disk`: state.json + Arrow
files; `DatasetDict.save_to_disk`: dataset_dict.json + a folder per split). A folder is read with
`datasets.load_from_disk` when the `datasets` package is installed, else its Arrow files are read with
pyarrow in the order its state.json lists them (the same rows either way).

Every row is normalised to the internal keys:

    prompt      a string, or chat messages [{"role": ..., "content": ...}, ...]   (task.prompt_key, or
                the messages column task.messages_key for rows without a prompt)
    answer      a string (numbers become strings)                                  (task.answer_key)
    completion  a string: an SFT demonstration, reasoning included                 (task.completion_key)
                (or a multi-turn one: [{role, content}, ...], see rlpost.models.encode_demonstration)

Every other column is kept as it is (`tests` for code, `reference` for a judge, ...); a null value is
an absent one (a table fills the keys a row lacks with nulls). A messages list
whose last message is the assistant's, in a row without a completion, splits into the prompt (the
messages before it) and the completion (its content): the usual chat SFT format. Each row also gets
its position, `line` (JSON Lines) or `row` (1-based, other formats), for error messages; a file with a
column of either name is refused (the column would be taken for the position, and left out of written files).

Every malformed row is reported at once, by file, line or row number and what is wrong (text that is not
valid UTF-8 included); a missing file names the path; a column that no row has names the columns there are.
JSON is read strictly, naming the row and the key: NaN, Infinity and numbers too large for a float (1e400,
which would read as inf) are refused (in any format, a prompt or answer that is a NaN or infinite float), as
is an object that repeats a key (which value was meant?) and a string holding an escaped lone surrogate
("\ud800" without its pair), which no UTF-8 file can hold: the run would fail writing its first checkpoint.
A file that is one pretty-printed JSON array or object (no line of it JSON) is one error saying so.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from rlpost.settings.task import TaskConfig

ROLES = ("system", "user", "assistant", "tool")
POSITION_KEYS = ("line", "row")  # added by the readers; not data
SHOWN = 20  # malformed rows listed in an error; the rest are counted


class TaskDataError(ValueError):
    """A prompt file that is missing, empty or has malformed rows (each named by line or row number)."""


@dataclass(frozen=True)
class Columns:
    """Which column holds each internal key (the task.*_key config keys)."""

    prompt: str = "prompt"
    answer: str = "answer"
    completion: str = "completion"
    messages: str = "messages"

    @classmethod
    def from_config(cls, cfg: TaskConfig) -> "Columns":
        """The columns task.prompt_key, answer_key, completion_key and messages_key name."""
        return cls(cfg.prompt_key, cfg.answer_key, cfg.completion_key, cfg.messages_key)


# ---------------------------------------------------------------------------- text of a prompt

def prompt_text(prompt: str | list[dict]) -> str:
    """A prompt as plain text: the string, or its messages' contents joined by newlines (for dedup, quoting)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)


# ---------------------------------------------------------------------------- records from each format

class _BadJSON:
    """A line that could not be read: not valid JSON, or (is_json=False) not valid UTF-8."""

    def __init__(self, msg: str, is_json: bool = True):
        self.msg = f"not valid JSON ({msg})" if is_json else msg


def _not_utf8(e: UnicodeDecodeError, column: int | None = None) -> str:
    """What a decoding error says: the bad byte, and where: the line's `column`, else its offset in the value."""
    at = f"column {column}" if column is not None else f"offset {e.start} of the value"
    return f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at {at}: {e.reason}); save the file as UTF-8"


class _Invalid:
    """A JSON value that the strict reader refuses (NaN, Infinity, 1e400); normalise_row names its row and key."""

    def __init__(self, why: str):
        self.why = why


class _Duplicates(dict):
    """A JSON object that repeats a key: the last value is kept, as json does, and `repeated` names the keys."""

    repeated: list[str]


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    obj = _Duplicates(pairs)
    if len(obj) == len(pairs):
        return dict(pairs)
    seen: set[str] = set()
    obj.repeated = list(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _float(text: str) -> float | _Invalid:
    value = float(text)
    return value if value not in (float("inf"), float("-inf")) else _Invalid(f"{text} (beyond a float: it reads "
                                                                              f"as {value})")


def _int(text: str) -> int | _Invalid:
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits, 4300): a bare ValueError
        return _Invalid(f"a whole number of {len(text.lstrip('-'))} digits (more than Python reads as a number)")


def _loads(text: str) -> Any:
    """json.loads, strict: what it would read as nan / inf, a number of thousands of digits or a repeated key is
    marked, for normalise_row."""
    return json.loads(text, parse_constant=lambda c: _Invalid(f"{c} (not a number JSON allows)"),
                      parse_float=_float, parse_int=_int, object_pairs_hook=_pairs)


def _value_problems(record: Any, where: str) -> list[str]:
    """What the strict JSON reader marked in a record, and strings that cannot be written as UTF-8, each named by
    its key path ('prompt', 'messages[2].content'). Iterative: a deeply nested value cannot overflow the stack."""
    problems, stack = [], [(record, "")]
    while stack and len(problems) < SHOWN:
        value, path = stack.pop()
        at = f"'{path}'" if path else "the row"
        if isinstance(value, _Invalid):
            problems.append(f"{where}: {at} is {value.why}; write the number as a string or fix it")
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                problems.append(f"{where}: {at} holds {value[e.start]!r} at character {e.start}, a lone surrogate "
                                f"(an escaped \\u{ord(value[e.start]):04x} without its pair) that UTF-8 cannot "
                                f"hold; fix the escape")
        elif isinstance(value, dict):
            if isinstance(value, _Duplicates):
                problems.append(f"{where}: {at} repeats the key(s) {', '.join(map(repr, value.repeated))}; keep one")
            for k, v in value.items():
                stack.append((k, f"{path} (a key)" if path else "a key"))
                stack.append((v, f"{path}.{k}" if path else str(k)))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
    return problems


def _json_records(path: str) -> tuple[list[tuple[str, dict, Any]], list[str] | None]:
    """[(where, position, raw record)], columns (None: from the rows) of a .jsonl or .json file."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        data = data[3:]
    if path.endswith(".json") and data.lstrip().startswith(b"["):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:  # name the line, as for any other malformed row
            line = data.count(b"\n", 0, e.start) + 1
            column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            raise TaskDataError(f"{path}: line {line}: {_not_utf8(e, column)}") from None
        try:
            rows = _loads(text)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        except RecursionError:
            raise TaskDataError(f"{path}: not valid JSON (nested too deep to read)") from None
        return [(f"row {i}", {"row": i}, r) for i, r in enumerate(rows, 1)], None
    out = []
    # bytes.splitlines splits at \n, \r\n and \r only; str.splitlines would also split a JSON string at U+2028
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append((f"line {n}", {"line": n}, _BadJSON(_not_utf8(e, e.start + 1), is_json=False)))
            continue
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", {"line": n}, _loads(line)))
        except json.JSONDecodeError as e:
            out.append((f"line {n}", {"line": n}, _BadJSON(e.msg)))
        except RecursionError:
            out.append((f"line {n}", {"line": n}, _BadJSON("nested too deep to read")))
    if len(out) > 1 and all(isinstance(r, _BadJSON) for _, _, r in out):
        _whole_document(path, data)
    return out, None


def _whole_document(path: str, data: bytes) -> None:
    """Raise the one error that says what is wrong when no line of a file is JSON but the whole file is: a
    pretty-printed array in a .jsonl file, or an object that holds the rows (as some datasets ship)."""
    try:
        whole = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # (bad UTF-8 or JSON, a number of thousands of digits)
        return  # not one document either: each line's error stands
    if isinstance(whole, list):
        raise TaskDataError(f"{path}: one JSON array over several lines, not JSON Lines (one object a line): "
                            "name the file .json, or write one row a line")
    if isinstance(whole, dict):
        lists = [k for k, v in whole.items() if isinstance(v, list)]
        hint = f" (its list {lists[0]!r}, say)" if lists else ""
        raise TaskDataError(f"{path}: one JSON object over several lines (keys: {', '.join(map(str, whole))}), not "
                            f"rows: write the rows{hint} as JSON Lines (one object a line) or as a JSON array")


def _table_records(table, name: str) -> tuple[list[tuple[str, dict, Any]], list[str]]:
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8: find the rows, name them
        raise TaskDataError(_report(f"{name}: text that is not valid UTF-8", _utf8_problems(table))) from None
    return [(f"row {i}", {"row": i}, r) for i, r in enumerate(rows, 1)], list(table.column_names)


def _utf8_problems(table) -> list[str]:
    """'row N: column C is not valid UTF-8 (...)' for each bad cell; row by row, only once the table failed."""
    problems = []
    for i in range(table.num_rows):
        for column in table.column_names:
            try:
                table.column(column).slice(i, 1).to_pylist()
            except UnicodeDecodeError as e:
                problems.append(f"row {i + 1}: column '{column}' is {_not_utf8(e)}")
    return problems


def _parquet_records(path: str):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - ArrowInvalid and friends: say which file
        raise TaskDataError(f"{path}: not a readable parquet file: {type(e).__name__}: {e}") from None
    return _table_records(table, path)


def _folder_json(path: str, key: str) -> list:
    """The list under `key` in a `datasets` folder's JSON file `path` (dataset_dict.json's splits, state.json's
    data files); TaskDataError naming the file when it is not such a JSON object."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskDataError(f"{path}: not valid JSON ({e}); the folder was not saved whole by `datasets` "
                            "(save_to_disk): save it again") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise TaskDataError(f"{path}: expected a JSON object with a list {key!r}, as `datasets` (save_to_disk) writes "
                            "it; save the folder again")
    return data[key]


def dataset_splits(folder: str) -> list[str] | None:
    """The splits of a DatasetDict folder, or None for a single-Dataset folder."""
    path = os.path.join(folder, "dataset_dict.json")
    if not os.path.isfile(path):
        return None
    return [str(s) for s in _folder_json(path, "splits")]


def _dataset_folder(path: str, split: str, split_key: str) -> tuple[str, str]:
    """(the single-Dataset folder to read, a name for messages) of a `datasets` folder and a split."""
    splits = dataset_splits(path)
    if splits is None:
        if not os.path.isfile(os.path.join(path, "state.json")):
            raise TaskDataError(f"{path}: a folder, but not one saved by `datasets` (no state.json or "
                                "dataset_dict.json); prompt data is a .jsonl, .json or .parquet file or such a folder")
        return _checked_dataset(path), path
    if split not in splits:
        raise TaskDataError(f"{path}: no split {split!r} ({split_key}); its splits: {', '.join(splits)}")
    folder = os.path.join(path, split)
    if not os.path.isfile(os.path.join(folder, "state.json")):
        raise TaskDataError(f"{path}: its dataset_dict.json lists the split {split!r}, but {folder} holds no "
                            "state.json: the folder was not saved whole by `datasets`; save it again")
    return _checked_dataset(folder), f"{path} [split {split}]"


def _checked_dataset(folder: str) -> str:
    """`folder`, a single-Dataset folder whose state.json lists Arrow files that are there."""
    files = _folder_json(os.path.join(folder, "state.json"), "_data_files")
    for entry in files:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not os.path.isfile(os.path.join(folder, name)):
            raise TaskDataError(f"{os.path.join(folder, 'state.json')}: lists the data file {name or entry!r}, which "
                                f"{folder} does not hold; save the folder again")
    return folder


def _arrow_records(folder: str, name: str):
    """A single-Dataset folder's rows read with pyarrow alone: the Arrow stream files state.json lists."""
    import pyarrow as pa

    with open(os.path.join(folder, "state.json")) as f:
        files = [d["filename"] for d in json.load(f)["_data_files"]]
    tables = []
    for file in files:
        try:
            with pa.memory_map(os.path.join(folder, file)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        except (pa.ArrowException, OSError) as e:
            raise TaskDataError(_unreadable_arrow(os.path.join(folder, file), e)) from None
    return _table_records(pa.concat_tables(tables) if len(tables) > 1 else tables[0], name)


def _unreadable_arrow(path: str, e: Exception) -> str:
    what = "its Arrow files cannot be read" if os.path.isdir(path) else "not a readable Arrow file"
    return (f"{path}: {what} ({type(e).__name__}: {e}); damaged or incomplete (an interrupted copy?): save the "
            "folder again")


def _datasets_records(folder: str, name: str):
    try:
        import datasets
    except ImportError:
        return _arrow_records(folder, name)
    try:
        ds = datasets.load_from_disk(folder)
    except Exception as e:  # noqa: BLE001 - ArrowInvalid and friends from a damaged file: say which folder
        raise TaskDataError(_unreadable_arrow(folder, e)) from None
    try:
        rows = ds.to_list()
    except UnicodeDecodeError:  # the same Arrow files read with pyarrow, which names the rows
        return _arrow_records(folder, name)
    return [(f"row {i}", {"row": i}, r) for i, r in enumerate(rows, 1)], list(ds.column_names)


def _records(path: str, split: str, split_key: str, fmt: str | None = None):
    """(name for messages, records, columns: None for JSON) of any supported path."""
    if os.path.isdir(path):
        folder, name = _dataset_folder(path, split, split_key)
        return (name, *_datasets_records(folder, name))
    if not os.path.exists(path):
        raise TaskDataError(f"prompt file not found: {path}")
    if fmt == "json" or path.endswith((".jsonl", ".json")):
        return (path, *_json_records(path))
    if path.endswith(".parquet"):
        return (path, *_parquet_records(path))
    raise TaskDataError(f"{path}: unknown prompt file format; expected a .jsonl, .json or .parquet file, or a folder "
                        "saved by `datasets` (save_to_disk)")


# ---------------------------------------------------------------------------- one row

def _clean_messages(messages: list) -> list[dict]:
    """Messages without the None fields a columnar format fills in (a struct column has every key)."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _check_messages(value: Any, key: str) -> str | None:
    """What is wrong with a chat-messages value (None: nothing)."""
    if not isinstance(value, list) or not value:
        return f"'{key}' must be a non-empty list of {{role, content}} messages, got {type(value).__name__}"
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            return f"'{key}' message {i} must be an object with 'role' and 'content', got {type(m).__name__}"
        if m.get("role") not in ROLES:
            return f"'{key}' message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"'{key}' message {i} ({m['role']}) needs a string 'content', got {type(m.get('content')).__name__}"
    return None


def _position_key(key: str) -> str:
    return (f"has a column {key!r}, the key that holds each row's place in its file (for messages; a file rlpost "
            "writes leaves it out, so the column would be lost): rename the column")


def _text_value(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _not_finite(value: Any, key: str) -> str | None:
    """What is wrong with a float NaN or infinity in a text key: a table's float column (pandas' missing value
    is NaN) would give the answer "nan", which JSON's strict reader refuses."""
    if isinstance(value, float) and not math.isfinite(value):
        return (f"'{key}' is {value}, not a finite number (pandas writes a float column's missing value as nan); "
                "leave the cell null, or write the value")
    return None


def normalise_row(record: Any, where: str, cols: Columns = Columns(), require_answer: bool = True
                  ) -> tuple[dict | None, list[str]]:
    """(the row with internal keys, []) or (None, [problems, each starting with `where`])."""
    if isinstance(record, _BadJSON):
        return None, [f"{where}: {record.msg}"]
    if not isinstance(record, dict):
        return None, [f"{where}: expected a JSON object, got {type(record).__name__}"]
    problems = _value_problems(record, where) + [f"{where}: {_position_key(k)}" for k in POSITION_KEYS if k in record]
    if problems:
        return None, problems
    mapped = {cols.prompt, cols.answer, cols.completion}
    row = {k: v for k, v in record.items() if k not in mapped and v is not None}  # null: absent, as in a table
    prompt, completion = record.get(cols.prompt), record.get(cols.completion)
    if prompt is None and record.get(cols.messages) is not None:  # the prompt given as chat messages
        messages = record[cols.messages]
        bad = _check_messages(messages, cols.messages)
        if bad:
            problems.append(f"{where}: {bad}")
        else:
            row.pop(cols.messages)
            messages = _clean_messages(messages)
            if messages[-1]["role"] == "assistant" and completion is None:  # chat SFT data: the reply to imitate
                messages, completion = messages[:-1], messages[-1]["content"]
                if not messages:
                    problems.append(f"{where}: '{cols.messages}' holds only an assistant message; the prompt needs "
                                    "a message before it")
            row["prompt"] = messages
    elif prompt is None:
        also = f" (or chat messages in '{cols.messages}')"
        problems.append(f"{where}: missing required key '{cols.prompt}'{also}")
    elif isinstance(prompt, list):
        bad = _check_messages(prompt, cols.prompt)
        if bad:
            problems.append(f"{where}: {bad}")
        else:
            row["prompt"] = _clean_messages(prompt)
    elif _not_finite(prompt, cols.prompt):
        problems.append(f"{where}: {_not_finite(prompt, cols.prompt)}")
    elif not _text_value(prompt):
        problems.append(f"{where}: '{cols.prompt}' must be a string or a list of {{role, content}} messages, got "
                        f"{type(prompt).__name__}")
    elif not str(prompt).strip():
        problems.append(f"{where}: '{cols.prompt}' is empty")
    else:
        row["prompt"] = str(prompt)
    answer = record.get(cols.answer)
    if answer is None:
        if require_answer:
            problems.append(f"{where}: missing required key '{cols.answer}'")
    elif _not_finite(answer, cols.answer):
        problems.append(f"{where}: {_not_finite(answer, cols.answer)}")
    elif _text_value(answer):
        if not str(answer).strip():
            problems.append(f"{where}: '{cols.answer}' is empty")
        row["answer"] = str(answer)
    elif require_answer:  # the built-in verifier compares text; a custom reward may take any value
        problems.append(f"{where}: '{cols.answer}' must be a string, got {type(answer).__name__}")
    else:
        row["answer"] = answer
    if completion is not None:
        turns = isinstance(completion, list) and all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in completion)
        if not isinstance(completion, str) and not (turns and completion):
            problems.append(f"{where}: '{cols.completion}' must be a string, or a multi-turn demonstration "
                            f"[{{role, content}}, ...], got {type(completion).__name__}")
        row["completion"] = completion
    if problems:
        return None, problems
    internal = {k: row[k] for k in ("prompt", "answer", "completion") if k in row}
    return {**internal, **row}, []


def _report(title: str, problems: list[str]) -> str:
    shown = "\n  ".join(problems[:SHOWN])
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return f"{title}:\n  {shown}{more}"


def _check_columns(name: str, columns: list[str], cols: Columns, require_answer: bool, held_out: bool) -> None:
    """A mapped column that no row has is one error naming the columns there are, not one per row. A held-out
    file needs no demonstrations: its completion column may be missing even when task.completion_key names one."""
    missing = []
    if cols.prompt not in columns and cols.messages not in columns:
        missing.append(f"'{cols.prompt}' (task.prompt_key) or '{cols.messages}' (task.messages_key)")
    if require_answer and cols.answer not in columns:
        missing.append(f"'{cols.answer}' (task.answer_key)")
    if not held_out and cols.completion != Columns.completion and cols.completion not in columns:  # named: must exist
        missing.append(f"'{cols.completion}' (task.completion_key)")
    if missing:
        raise TaskDataError(f"{name}: no column {' and no column '.join(missing)}; its columns: "
                            f"{', '.join(columns) or 'none'}")


def read_rows(path: str, cols: Columns = Columns(), *, split: str = "train", split_key: str = "task.train_split",
              require_answer: bool = True, fmt: str | None = None, held_out: bool = False,
              check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """The normalised rows of a prompt file or `datasets` folder (for a DatasetDict folder, `split`).

    `require_answer`: every row needs an answer (the built-in verifier compares against it); a custom
    reward may do without one. `fmt="json"` reads any file name as JSON Lines (else: from the path).
    `held_out`: a held-out file, whose rows need no demonstration column (task.completion_key).
    `check(row)`: what else is wrong with a normalised row (None: nothing), e.g. the run's reward's
    `rlpost.env.verifiers.gold_check`. Raises TaskDataError naming every malformed row."""
    name, records, columns = _records(path, split, split_key, fmt)
    if not records:
        raise TaskDataError(f"{name}: the file has no rows")
    if columns is None and all(isinstance(r, dict) for _, _, r in records):  # JSON: the keys any row has
        columns = list({k: None for _, _, r in records for k in r})
    if columns is not None:  # (JSON with unreadable lines: those lines are reported one by one instead)
        _check_columns(name, columns, cols, require_answer, held_out)
        for key in POSITION_KEYS:  # one error for the file, not one a row (normalise_row names the rows otherwise)
            if key in columns:
                raise TaskDataError(f"{name}: {_position_key(key)}")
    rows, problems = [], []
    for where, position, record in records:
        row, bad = normalise_row(record, where, cols, require_answer)
        if not bad and check is not None:
            bad = [f"{where}: {why}" for why in [check(row)] if why]
        if bad:
            problems.extend(bad)
        else:
            rows.append({**row, **position})
    if problems:
        raise TaskDataError(_report(f"{name}: {len(problems)} malformed row(s)", problems))
    return rows


def iter_rows_without_position(rows: list[dict]) -> Iterator[dict]:
    """Rows as data: without the `line` / `row` positions the readers add."""
    for r in rows:
        yield {k: v for k, v in r.items() if k not in POSITION_KEYS}


def write_rows(rows: list[dict], path: str, cols: Columns = Columns()) -> None:
    """Write rows where `read_rows(path, cols)` reads them back: JSON Lines (.jsonl, .json) or parquet
    (.parquet). Each internal key goes back to its column of `cols` (GSM8K's `question` stays `question`),
    so the file reads with the same task.*_key settings as the file it came from. A chat-messages prompt
    goes to the messages column, so that every prompt is a string (a parquet column holds one type);
    reading puts it back as the prompt. Rows it cannot write are a ValueError (`check_rows_writable`), before
    anything is written."""
    check_writable(path)
    out = _written(rows, cols)
    table = _table(out, path) if path.endswith(".parquet") else _check_json(out, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for r in out:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _written(rows: list[dict], cols: Columns) -> list[dict]:
    """`rows` as write_rows writes them: without their positions, under their columns' names, a messages prompt
    in the messages column."""
    out = []
    for r in iter_rows_without_position(rows):
        if isinstance(r.get("prompt"), list) and cols.messages not in r:
            r[cols.messages] = r.pop("prompt")
        names = {"prompt": cols.prompt, "answer": cols.answer, "completion": cols.completion}
        out.append({names.get(k, k): v for k, v in r.items()})
    return out


def _table(rows: list[dict], path: str):
    """The pyarrow table of `rows` (written rows, under their columns' names); ValueError naming the column when a
    column's values have no one Arrow type (an id that is 1 in one row and "a" in another)."""
    import pyarrow as pa

    keys = list({k: None for r in rows for k in r})  # from_pylist takes the columns of the first row alone
    try:
        return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        column = next((k for k in keys if _column_fails(rows, k)), None)
        which = f"column {column!r}" if column else "a column"
        raise ValueError(f"cannot write {path}: {which} holds values of more than one type, which a parquet column "
                         f"cannot ({e}); write a .jsonl file instead") from None


def _column_fails(rows: list[dict], key: str) -> bool:
    import pyarrow as pa

    try:
        pa.array([r.get(key) for r in rows])
        return False
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return True


def _check_json(rows: list[dict], path: str) -> None:
    """ValueError naming the column when a value of `rows` is none JSON holds (a parquet file's timestamp or binary
    column): json.dumps failed with a bare TypeError after the work whose rows these are."""
    for r in rows:
        for k, v in r.items():
            try:
                json.dumps(v)
            except (TypeError, ValueError):
                raise ValueError(f"cannot write {path}: column {k!r} holds {type(v).__name__} values, which JSON "
                                 "cannot hold; write a .parquet file instead") from None


def check_rows_writable(rows: list[dict], path: str, cols: Columns = Columns()) -> None:
    """Raise ValueError when `write_rows(rows, path, cols)` could not write these rows (or any of them): a value
    JSON cannot hold, a parquet column of mixed types. For a caller that writes some of `rows` after long work."""
    check_writable(path)
    out = _written(rows, cols)
    _table(out, path) if path.endswith(".parquet") else _check_json(out, path)


def check_writable(path: str) -> None:
    """Raise ValueError when `write_rows` could not write `path` (its extension, a folder in its place, a file where
    its folder would be, a folder it may not write in): a caller checks this before the work whose rows it will
    write, not after."""
    if not path.endswith((".jsonl", ".json", ".parquet")):
        raise ValueError(f"cannot write {path}: the extension must be .jsonl, .json or .parquet")
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path}: it is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # write_rows makes the missing folders: the first one that exists decides
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: the folder {folder} is not writable")
