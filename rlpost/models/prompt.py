"""The one place that turns a row's prompt (a string or chat messages, with the task's system prompt) into token
ids, deciding between the tokenizer's plain encoding and its chat template."""

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
