"""The command line's shape (rlpost/cli.py: a table of subcommands, each in rlpost/commands/) and `rlpost dpo`
as a stage list. What each command does is tested with its feature (test_preference.py, test_evaluate.py, ...)."""

import ast
import json
import pathlib
import random

import pytest
import yaml

from rlpost.cli import COMMANDS, build_parser, main

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI_FILES = [ROOT / "rlpost" / "cli.py", *sorted((ROOT / "rlpost" / "commands").glob("*.py"))]


def test_no_function_of_the_command_line_is_over_80_lines():
    long = []
    for path in CLI_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into smaller functions: " + ", ".join(long)


def test_the_command_line_imports_rlpost_modules_at_the_top():
    local = []
    for path in CLI_FILES:
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                local += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.startswith("rlpost")]
    assert not local, "import these at the top of the module: " + ", ".join(local)


def test_every_subcommand_is_one_entry_of_the_table():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS)  # the table's order is `rlpost --help`'s
    for name, (add, cmd) in COMMANDS.items():
        assert (add.__name__, cmd.__name__) == (f"add_{name}", f"cmd_{name}")


def test_dpo_stages_follow_the_sections_that_switch_stages_on():
    from rlpost.commands.dpo import dpo_stages
    from rlpost.config import load_config

    assert dpo_stages(load_config(None, ["sft.steps=0"])) == ["eval", "preference", "eval"]
    assert dpo_stages(load_config(None, [])) == ["sft", "eval", "preference", "eval"]
    assert dpo_stages(load_config(None, ["sft.steps=0", "rejection.enabled=true"])) == [
        "eval", "preference", "eval", "rejection", "eval"]


TINY = ["sft.steps=0", "task.num_eval=16", "eval.samples_per_prompt=1", "model.n_layer=1",
        "model.n_embd=32", "model.n_head=2", "preference.batch_size=16", "preference.epochs=1"]


def preference_file(path, n=40):
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randrange(100), rng.randrange(100)
            f.write(json.dumps({"prompt": f"{a:02d}+{b:02d}=", "chosen": f"{a + b:03d}",
                                "rejected": f"{(a + b + rng.choice([1, 10, -1])) % 200:03d}"}) + "\n")
    return str(path)


def test_rlpost_dpo_gives_the_run_a_stage_list_and_runs_what_a_preference_only_config_runs(tmp_path):
    from rlpost.config import load_config
    from rlpost.run import train

    common = [*TINY, f"preference.train_file={preference_file(tmp_path / 'prefs.jsonl')}", f"out_dir={tmp_path}"]
    assert main(["dpo", "--loss", "ipo", *common, "run_name=dpo"]) == 0
    saved = yaml.safe_load((tmp_path / "dpo" / "config.yaml").read_text())
    assert saved["stages"] == ["eval", "preference", "eval"]  # the run's config says what ran, as given
    assert saved["preference"]["enabled"] is False and saved["rl"]["steps"] == load_config().rl.steps
    # the same run as the default stage order with the preference stage switched on and RL off
    ref = load_config(None, [*common, "preference.loss={name: ipo}", "preference.enabled=true", "rl.steps=0",
                             "run_name=ref"])
    train(ref, "ref")
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("dpo", "ref"))
    numbers = [k for k, v in b.items() if isinstance(v, (int, float)) and "seconds" not in k and "time" not in k]
    assert set(a) == set(b) and {"pass@1_start", "pass@1_dpo", "preference_examples"} <= set(numbers)
    assert {k: a[k] for k in numbers} == {k: b[k] for k in numbers}


def test_a_model_that_cannot_load_is_one_error_line_in_every_command_that_loads_one(tmp_path, capsys):
    """rlpost eval, export, search and curate caught ValueError and OSError, and a ModelLoadError (a RuntimeError:
    a weights file cut short, a folder without its tokenizer) came out as a traceback."""
    from rlpost.models import save_model
    from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig

    tok = CharTokenizer("0123456789+=")
    folder = tmp_path / "cut"
    save_model(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=1, n_head=1, n_embd=8)), tok, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "1+2=", "answer": "3"}\n')
    for argv in (["eval", str(folder)], ["export", str(folder), "--out", str(tmp_path / "out")],
                 ["search", str(folder)], ["curate", "--model", str(folder), "--train", str(train),
                                           "--out", str(tmp_path / "kept.jsonl")]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith(f"rlpost: error: gpt_mini model folder '{folder}': ") and "Traceback" not in err, argv
        assert "model.safetensors cannot be read" in err


def test_nproc_takes_a_count_of_processes(capsys):
    """--nproc 0 read as "unset": the run trained in one process, unsharded; --nproc -1 reached torchrun, which
    failed with a bare AssertionError."""
    for value in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as e:
            main(["train", "--nproc", value])
        assert e.value.code == 2 and "argument --nproc: " in capsys.readouterr().err
