"""How a row's text becomes token ids, the same for every role: a prompt (a string or chat messages, with the
task's system prompt) through `encode_prompt`, which decides between the tokenizer's plain encoding and its chat
template; a demonstration's completion through `encode_demonstration`, which also says which tokens SFT trains."""

from __future__ import annotations


def encode_prompt(tokenizer, prompt: str | list[dict], system_prompt: str | None = None) -> list[int]:
    """The token ids of a row's prompt, as rollout, evaluation, SFT and preference training all see it.

    - a string, when the tokenizer does not use its chat template (gpt_mini, or an HF model with
      model.chat_template=false): the tokenizer's own `encode_prompt` (special tokens + text);
    - a string, with model.chat_template=true: [system, user] messages through the chat template;
    - chat messages [{role, content}, ...]: [system] + the messages through the chat template, which the
      tokenizer must have (whatever model.chat_template says: messages have no other encoding).

    `system_prompt` (task.system_prompt) becomes a system message in front, unless the messages already
    start with one. It needs the chat template: with a plain string prompt it is an error, not ignored.
    Every template ends with the assistant's generation prompt. Errors are ValueErrors; callers name the row.
    """
    if isinstance(prompt, str) and not getattr(tokenizer, "chat_template", False):
        if system_prompt:
            raise ValueError("task.system_prompt needs the chat template: set model.chat_template=true (an HF model "
                             "whose tokenizer has one), or leave task.system_prompt unset")
        return tokenizer.encode_prompt(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    encode = getattr(tokenizer, "encode_messages", None)
    if encode is None:
        raise ValueError(f"a prompt given as chat messages needs a tokenizer with a chat template, and "
                         f"{type(tokenizer).__name__} (gpt_mini's) has none: give string prompts, or use an HF "
                         "model whose tokenizer has a chat template")
    return encode(messages)


def encode_demonstration(tokenizer, completion: str | list[dict]) -> tuple[list[int], list[int]]:
    """A demonstration's completion -> (token ids, trained): what SFT imitates.

    A string is one assistant turn: its ids + eos, all trained. A multi-turn demonstration is a list of
    segments {"role", "content"}: an "assistant" segment is the policy's turn (ids + eos, trained), any
    other role (tool output, a user turn) is what an environment appends (ids encoded bare, as the
    episode function appends a text observation; not trained)."""
    if isinstance(completion, str):
        ids = tokenizer.encode_completion(completion) + [tokenizer.eos_token_id]
        return ids, [1] * len(ids)
    ids, trained = [], []
    for n, seg in enumerate(completion):
        if not isinstance(seg, dict) or not isinstance(seg.get("content"), str) or "role" not in seg:
            raise ValueError(f"completion segment {n} must be {{'role': ..., 'content': str}}, got {seg!r}")
        if seg["role"] == "assistant":
            part = tokenizer.encode_completion(seg["content"]) + [tokenizer.eos_token_id]
        else:
            part = tokenizer.encode_completion(seg["content"])
        ids += part
        trained += [int(seg["role"] == "assistant")] * len(part)
    return ids, trained
