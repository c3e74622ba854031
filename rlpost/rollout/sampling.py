"""Drawing tokens: `sample_next` (temperature / top-k / top-p) and `StopStrings`, what every in-process engine
samples with. Below the engines and the package's __init__ (which imports the engines), so an engine file
imports this module, never the package.
"""

from __future__ import annotations

import torch

from rlpost.rollout.engine import SamplingParams


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None,
                uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row from logits [N, V] under temperature / top-k / top-p. Returns [N].

    With `uniform` ([N], values in (0, 1]) the draw is by inverse CDF: row n takes the first token whose
    cumulative probability reaches uniform[n], so the caller decides which random number each row uses
    (the native engines index it by (sequence, step)). Otherwise torch.multinomial draws from `generator`.
    """
    if p.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float()
    if p.temperature != 1:  # x / 1 is x, bit for bit: at temperature 1 the division is skipped
        logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > p.top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if uniform is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cdf = probs.double().cumsum(-1)  # a token of probability 0 never strictly raises the cdf: never drawn
    target = uniform.to(cdf)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=logits.shape[-1] - 1)


class StopStrings:
    """Stop strings over a growing response. `hit(ids)` is True when the response's last token completes an
    occurrence of a stop string (the decoded text of the last tokens has one that ends in that token's text);
    checked after every token, it fires on the token that completes the first occurrence, and the response ends
    with that token (the string is kept, as the policy generated it). An occurrence completed earlier never fires
    later: under min_new_tokens, one completed within the first min_new_tokens tokens is ignored (as vLLM does),
    however far back it lies."""

    def __init__(self, stops: list[str], decode):
        self.stops, self.decode = [s for s in stops if s], decode
        self.window = max(map(len, self.stops), default=0) + 4  # tokens: any occurrence ending at the last one fits

    def hit(self, ids: list[int]) -> bool:
        text = self.decode(ids[-self.window:])
        if not any(s in text for s in self.stops):
            return False
        # the text before the last token; where a multi-byte character is split across tokens the two decodings
        # differ in their last characters, so "new" is whatever follows their common prefix
        before = self.decode(ids[-self.window:-1])
        common = next((i for i, (a, b) in enumerate(zip(before, text)) if a != b), min(len(before), len(text)))
        return any(s in text[max(common - len(s) + 1, 0):] for s in self.stops)

    def end(self, ids: list[int], min_len: int = 1) -> int | None:
        """Length (>= min_len) of the shortest prefix of a response whose last token completes a stop string
        (None: none)."""
        return next((n for n in range(max(min_len, 1), len(ids) + 1) if self.hit(ids[:n])), None)
