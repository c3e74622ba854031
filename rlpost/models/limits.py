"""Length limits, checked on the data before any work is done.

A model has a context: gpt_mini its `block_size` (the size of its position table), a Hugging Face model
its config's `max_position_embeddings` (or `n_positions`). Rollout needs room for each prompt plus
`rollout.max_new_tokens`; SFT for each demonstration's prompt + completion + eos. Without a check, a
too-long row fails late (gpt_mini raises at the first rollout, after all of SFT) or not at all (a RoPE
model runs past its context and quietly computes nonsense). So:

    block_size_for(tok_or_alphabet, rows, max_new_tokens, demos)   # a fresh gpt_mini's block_size (load_model)
    check_lengths(model, tokenizer, rows, max_new_tokens, demos)   # right after loading the model

`check_lengths` names the offending rows (index, line of its file, a prefix of its text; the first
SHOWN of them, the rest counted), the numbers, and what to change: the config key where one exists.
"""

from __future__ import annotations

import json

from rlpost.models.encoding import encode_demonstration, encode_prompt
from rlpost.models.gpt_mini import GPT, CharTokenizer

SHOWN = 5        # offending rows listed in an error; the rest are counted
PREFIX = 40      # characters of a row's text quoted in an error


class ContextLengthError(ValueError):
    """A prompt or demonstration that does not fit the model's context."""


def model_context(model) -> int | None:
    """Longest sequence the model accepts: gpt_mini's block_size, an HF model's max_position_embeddings."""
    found = _context(model)
    return found[1] if found else None


def _context(model) -> tuple[str, int] | None:
    """(the config key that sets the context, its value), or None when the model states none."""
    cfg = getattr(getattr(model, "hf", None), "config", None) or getattr(model, "config", None)
    for key in ("block_size", "max_position_embeddings", "n_positions"):
        if cfg is not None and getattr(cfg, key, None):
            return key, int(getattr(cfg, key))
    return None


def block_size_for(tokenizer_or_alphabet, rows: list[dict], max_new_tokens: int,
                   demonstrations: list[dict] = (), limit: int | None = None) -> int:
    """The smallest block_size that holds every prompt of `rows` plus `max_new_tokens` + 1 (rollout and
    evaluation, and self-made preference pairs, whose completions end with an eos) and every demonstration's
    prompt + completion + eos (SFT). Pass the task's train and held-out rows and its demonstrations.
    `tokenizer_or_alphabet` is gpt_mini's tokenizer or the alphabet it will be built from. `limit`: the largest
    size to give; a ContextLengthError names the longest row when the data needs more."""
    tok = CharTokenizer(tokenizer_or_alphabet) if isinstance(tokenizer_or_alphabet, str) else tokenizer_or_alphabet
    if not rows and not demonstrations:
        raise ValueError("block_size_for needs prompt rows or demonstrations to size the model from")
    lengths = _PromptLengths(tok)
    # + 1: a response cut at max_new_tokens becomes a preference completion with an eos appended
    need = [(lengths(r, f"row {i}") + max_new_tokens + 1, "row", i, r) for i, r in enumerate(rows)]
    need += [(lengths(r, f"demonstration {i}") + _completion_length(tok, r, i), "demonstration", i, r)
             for i, r in enumerate(demonstrations)]
    size, kind, i, row = max(need, key=lambda n: n[0])
    if limit is not None and size > limit:
        prompt = lengths(row, "")
        if kind == "row":
            parts = f"prompt {_quote(row['prompt'])} ({prompt} tokens) + rollout.max_new_tokens={max_new_tokens} + 1"
        else:
            parts = (f"prompt {_quote(row['prompt'])} ({prompt} tokens) + completion {_quote(row['completion'])} "
                     f"({size - prompt - 1} tokens) + eos")
        over = sum(n > limit for n, k, *_ in need if k == "row")  # (a row's demonstration is the same row)
        more = f" (and {over - 1} more prompt row(s) above {limit})" if over > 1 else ""
        fix = "lower rollout.max_new_tokens, " if kind == "row" and max_new_tokens >= prompt else ""
        raise ContextLengthError(
            f"sizing a fresh gpt_mini from the data (model.block_size: null) would give it a context of {size} "
            f"tokens, for {_where(kind, i, row)}: {parts}{more}; it sizes itself to at most {limit} (its "
            f"attention's memory grows with the square of the context): {fix}drop or shorten such rows, or set "
            "model.block_size yourself (rows longer than it are then named)")
    return size


def check_lengths(model, tokenizer, rows: list[dict], max_new_tokens: int, demonstrations: list[dict] = (),
                  system_prompt: str | None = None) -> None:
    """Raise ContextLengthError unless every prompt of `rows` + `max_new_tokens` and every demonstration
    (prompt + completion + eos) fits `model`'s context. Call it once the model is loaded, with the task's
    train and held-out rows, rollout.max_new_tokens, the SFT demonstrations (when SFT runs) and the task's
    system prompt. A prompt that cannot be encoded (a character gpt_mini lacks, chat messages without a
    chat template) is a ValueError naming its row. A model that states no context is not checked."""
    found = _context(model)
    if found is None:
        return
    key, limit = found
    lengths = _PromptLengths(tokenizer, system_prompt)
    long_prompts, long_demos = [], []
    for i, row in enumerate(rows):
        p = lengths(row, f"row {i}")
        if p + max_new_tokens > limit:
            long_prompts.append((p + max_new_tokens, f"{_where('row', i, row)}: prompt {_quote(row['prompt'])} ({p} "
                                                     f"tokens) + rollout.max_new_tokens={max_new_tokens} = "
                                                     f"{p + max_new_tokens}"))
    for i, row in enumerate(demonstrations):
        p, c = lengths(row, f"demonstration {i}"), _completion_length(tokenizer, row, i)
        if p + c > limit:
            long_demos.append((p + c, f"{_where('demonstration', i, row)}: prompt {_quote(row['prompt'])} ({p} "
                                      f"tokens) + completion {_quote(row['completion'])} ({c - 1} tokens) + eos = "
                                      f"{p + c}"))
    if not long_prompts and not long_demos:
        return
    bad = long_prompts + long_demos
    shown = "\n  ".join(text for _, text in bad[:SHOWN])
    if len(bad) > SHOWN:
        shown += f"\n  ... and {len(bad) - SHOWN} more"
    counts = [f"{len(x)} of {len(of)} {name}" for x, of, name in
              ((long_prompts, rows, "prompt rows"), (long_demos, demonstrations, "SFT demonstrations")) if x]
    if isinstance(model, GPT):  # its position table is ours to size
        context = f"gpt_mini's block_size={limit}"
        fix = (f"Raise model.block_size to {max(n for n, _ in bad)} or more (unset, a fresh gpt_mini is sized from "
               f"the data; a saved checkpoint keeps its own)")
        fix += ", or lower rollout.max_new_tokens." if long_prompts else "."
    else:
        context = f"the model's {key}={limit}"
        fix = "The context is fixed by the checkpoint."
        if long_prompts:
            room = limit - max(lengths(r, "") for r in rows)
            fix += (f" Lower rollout.max_new_tokens to {room} or less, or shorten the prompts above." if room > 0 else
                    " Shorten the prompts above: the longest alone fills the context.")
        if long_demos:
            fix += " Shorten the demonstrations' completions, or drop those rows."
    raise ContextLengthError(f"{' and '.join(counts)} do not fit {context}:\n  {shown}\n{fix}")


class _PromptLengths:
    """Encoded prompt lengths, each distinct prompt encoded once (demonstrations repeat the rows' prompts)."""

    def __init__(self, tokenizer, system_prompt: str | None = None):
        self.tokenizer, self.system_prompt, self.seen = tokenizer, system_prompt, {}

    def __call__(self, row: dict, where: str) -> int:
        prompt = row["prompt"]
        key = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)  # messages: a list
        if key not in self.seen:
            try:
                self.seen[key] = len(encode_prompt(self.tokenizer, prompt, self.system_prompt))
            except ValueError as e:
                raise ValueError(f"{_where(where, None, row)}: cannot encode the prompt {_quote(prompt)}: "
                                 f"{e}") from None
        return self.seen[key]


def _completion_length(tokenizer, row: dict, i: int) -> int:
    """Tokens of a demonstration's completion, plus its eos."""
    try:
        return len(encode_demonstration(tokenizer, row["completion"])[0])
    except ValueError as e:
        raise ValueError(f"{_where('demonstration', i, row)}: cannot encode the completion "
                         f"{_quote(row['completion'])}: {e}") from None


def _where(kind: str, i: int | None, row: dict) -> str:
    """'row 3 (line 4)': the index in the list passed, and the line (JSON Lines) or row (other formats) of its
    file when it came from one."""
    name = kind if i is None else f"{kind} {i}"
    if "line" in row:
        return f"{name} (line {row['line']})"
    return f"{name} (row {row['row']} of its file)" if "row" in row else name


def _quote(text) -> str:
    """A prefix of a prompt or completion; chat messages as 'role: content' lines."""
    if not isinstance(text, str):
        text = " | ".join(f"{m.get('role')}: {m.get('content')}" for m in text)
    return repr(text if len(text) <= PREFIX else text[:PREFIX] + "...")
