"""The web environment: the policy searches a local corpus and opens its pages, then answers.

    task: {env: web, max_turns: 4}      # corpus: generated (rlpost/web/corpus.py), a folder or a .jsonl file

A turn holding a call gets the tool's answer appended, `result_open` ... `result_close`, and the episode
goes on:

    <search>Zerak born</search>   ->  <result>Zerak (wiki/Zerak): Zerak was born in Molvo in 1843.
                                       ...the next results, one a line...</result>
    <open>wiki/Molvo</open>       ->  <result>Molvo\nMolvo is a town in the north. ...\nLinks: wiki/Tesh</result>

A turn without a call is the final answer: the text between `answer_open` and `answer_close` (the whole
turn when answer_open is "") is scored by `reward(answer, row)` (task.reward; default the exact first-line
match against row["answer"]); a final turn without the answer markers scores 0. A close marker "" means
"to the end of the turn", so a character model can use one-character markers (recipes/web.yaml:
`?Zerak born` searches, `@wiki/Molvo` opens, `=...;` is the result, a bare turn is the answer).

Limits, each a constructor option: `max_calls` tool calls per episode (a call past it ends the episode
with reward 0), `max_obs_chars` per observation, `max_query_chars` per query, `top_k` results of
`snippet_chars` each. `open` answers only a url of the corpus (checked here, before any request; the
server only looks urls up in memory), and every request goes to the corpus server on 127.0.0.1: the
policy's text never reaches the network or the file system.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

from rlpost.env.base import Env, Step
from rlpost.tasks import answer_match_reward
from rlpost.web.corpus import load_corpus
from rlpost.web.server import WebClient, shared_server

FIELDS = ("title", "url", "snippet")


@lru_cache(maxsize=8)
def _corpus_facts(source: str, seed: int) -> tuple[frozenset, str]:
    """(the corpus's urls, every character its pages, titles and urls hold)."""
    docs = load_corpus(source, seed)
    chars = set()
    for d in docs:
        chars.update(d.url, d.title, d.text, *d.links)
    return frozenset(d.url for d in docs), "".join(sorted(chars))


class WebEnv(Env):
    """search(query) and open(url) against a corpus served on 127.0.0.1 (see the module docstring)."""

    def __init__(self, reward: Callable[[str, dict], float] | None = None, *, corpus: str = "generated",
                 corpus_seed: int = 0, server_url: str | None = None, search_open: str = "<search>",
                 search_close: str = "</search>", open_open: str = "<open>", open_close: str = "</open>",
                 answer_open: str = "<answer>", answer_close: str = "</answer>", result_open: str = "<result>",
                 result_close: str = "</result>", top_k: int = 3, fields: list[str] | tuple[str, ...] = FIELDS,
                 snippet_chars: int = 160, max_obs_chars: int = 600, max_calls: int = 4, max_query_chars: int = 200,
                 error_text: str = "error", alphabet: str | None = None, timeout_s: float = 10.0):
        if reward is None:
            reward = answer_match_reward
        if not search_open or not open_open:
            raise ValueError("web env: search_open and open_open must be non-empty markers")
        markers = {"search_open": search_open, "open_open": open_open, "answer_open": answer_open}
        same = [(a, b) for i, a in enumerate(markers) for b in list(markers)[i + 1:] if markers[a] == markers[b]]
        if same:  # the turn's call would be read as either; an answer behind a call's marker, as a call
            (a, b), = same[:1]
            raise ValueError(f"web env: {a} and {b} are both {markers[a]!r}: each must be a marker of its own")
        bad = [f for f in fields if f not in FIELDS]
        if bad or not fields:
            raise ValueError(f"web env: fields must be some of {FIELDS}, got {list(fields)}")
        for name, value in (("top_k", top_k), ("max_calls", max_calls), ("max_obs_chars", max_obs_chars),
                            ("max_query_chars", max_query_chars), ("snippet_chars", snippet_chars)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"web env: {name} must be a whole number >= 1, got {value!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
            raise ValueError(f"web env: timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if server_url is not None:
            WebClient(server_url)  # a non-loopback url is refused here, when the run is configured
        self.reward, self.corpus, self.corpus_seed, self.server_url = reward, corpus, corpus_seed, server_url
        self.search_open, self.search_close, self.open_open, self.open_close = (search_open, search_close,
                                                                                open_open, open_close)
        self.answer_open, self.answer_close = answer_open, answer_close
        self.result_open, self.result_close, self.error_text = result_open, result_close, error_text
        self.top_k, self.fields, self.snippet_chars = top_k, tuple(fields), snippet_chars
        self.max_obs_chars, self.max_calls, self.max_query_chars = max_obs_chars, max_calls, max_query_chars
        self.timeout_s = timeout_s
        self.urls, corpus_chars = _corpus_facts(corpus, corpus_seed)
        self.observation_tokens = len(result_open) + max_obs_chars + len(result_close)
        if alphabet is None:  # what an observation may hold: the corpus, the layout and the error texts
            alphabet = corpus_chars + result_open + result_close + " ():|\n" + "no results" + error_text + \
                ": no such page in the corpus" + ": empty query"
        self.alphabet = "".join(dict.fromkeys(alphabet))
        self.client = None
        self.calls = 0

    def reset(self, row: dict) -> str | list[dict]:
        self.row, self.calls, self.info = row, 0, {"searches": 0, "opens": 0, "refused": 0}
        self._connect()
        return row["messages"] if "messages" in row and "prompt" not in row else row["prompt"]

    def _connect(self) -> None:
        url = self.server_url or shared_server(self.corpus, self.corpus_seed).url
        self.client = WebClient(url, self.timeout_s)

    def _request(self, method: str, *args):
        """A client call; the process's shared server may have stopped while idle: started again, once."""
        try:
            return getattr(self.client, method)(*args)
        except OSError:
            if self.server_url:
                raise
            self._connect()
            return getattr(self.client, method)(*args)

    @staticmethod
    def _last(turn: str, open_: str, close: str) -> tuple[int, str | None]:
        """(where the turn's last `open_` marker starts, the text up to `close`), or (-1, None)."""
        start = turn.rfind(open_)
        if start < 0:
            return -1, None
        body = turn[start + len(open_):]
        if close:
            end = body.find(close)
            if end < 0:
                return -1, None
            body = body[:end]
        return start, body

    def find_call(self, turn: str) -> tuple[str, str] | None:
        """("search", query) or ("open", url) for the turn's last call, or None when it makes none."""
        s_at, query = self._last(turn, self.search_open, self.search_close)
        o_at, url = self._last(turn, self.open_open, self.open_close)
        if query is None and url is None:
            return None
        return ("search", query) if s_at > o_at else ("open", url)

    def answer(self, turn: str) -> str | None:
        """The final turn's answer: between the answer markers (None without them), or the whole turn."""
        if not self.answer_open:
            return turn
        return self._last(turn, self.answer_open, self.answer_close)[1]

    def search(self, query: str) -> str:
        """The search tool: the top_k results, one a line (their `fields`, " | " between), or an error text."""
        query = query.strip()
        if not query:
            self.info["refused"] += 1
            return f"{self.error_text}: empty query"
        if len(query) > self.max_query_chars:
            query, self.info["query_cut"] = query[:self.max_query_chars], True
        self.info["searches"] += 1
        hits = self._request("search", query, self.top_k, self.snippet_chars)
        lines = [" | ".join(str(h[f]) for f in self.fields) for h in hits]
        return "\n".join(lines) if lines else "no results"

    def open(self, url: str) -> str:
        """The open tool: a corpus page's title, text and links, or an error text for a url outside the corpus."""
        url = url.strip()
        if url not in self.urls:  # outside the corpus (a web address, a path, ../): refused before any request
            self.info["refused"] += 1
            return f"{self.error_text}: no such page in the corpus"
        self.info["opens"] += 1
        page = self._request("page", url)
        if page is None:
            return f"{self.error_text}: no such page in the corpus"
        links = f"\nLinks: {' '.join(page['links'])}" if page["links"] else ""
        return f"{page['title']}\n{page['text']}{links}"

    def step(self, turn: str) -> Step:
        call = self.find_call(turn)
        if call is None:
            answer = self.answer(turn)
            reward = 0.0 if answer is None else float(self.reward(answer, self.row))
            return Step(reward=reward, done=True, info={**self.info, "calls": self.calls})
        if self.calls >= self.max_calls:  # the budget is spent: the episode ends unscored
            return Step(reward=0.0, done=True, info={**self.info, "calls": self.calls, "over_budget": True})
        self.calls += 1
        kind, body = call
        text = self.search(body) if kind == "search" else self.open(body)
        return Step(observation=f"{self.result_open}{text[:self.max_obs_chars]}{self.result_close}",
                    info={**self.info, "calls": self.calls})
