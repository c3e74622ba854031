"""The embedded web task: questions about the generated encyclopedia (rlpost/web/corpus.py), answered with
one or two look-ups in the `web` environment.

    rlpost train recipes/web.yaml

"Where was Zerak born?" needs Zerak's page ("Zerak was born in Molvo in 1843."); "Which river flows where
Zerak was born?" needs it and then the town's ("Molvo lies on the river Tesh."). The facts are random
draws, so a model cannot know them, and the held-out questions are about people that no training
question names. In the recipe's one-character syntax an episode of the second kind is

    ?Zerak born -> =Zerak was born in Molvo in 1843.; -> ?Molvo river -> =Molvo lies on the river Tesh.; -> Tesh

(top result only, its snippet, 40 characters). The demonstrations replay what the corpus server answers
(the same index and snippets). The demonstrator errs on a fraction `error_rate` of the questions, as
careless searchers do: half of those it answers without searching (a town or river picked at random),
a quarter it searches for a misspelled name and copies what comes back, and a quarter it stops after the
first look-up and answers the town (a one-look-up question: it guesses). SFT imitates that mix; RL
against the exact verifier learns to search every time, and twice when the question needs it.
"""

from __future__ import annotations

import random
import re

from rlpost.tasks.base import TASKS, Task, TaskSource, answer_match
from rlpost.web.corpus import generate_world
from rlpost.web.server import corpus_index, search_results

CORPUS, CORPUS_SEED = "generated", 0
SEARCH, RESULT_OPEN, RESULT_CLOSE = "?", "=", ";"
TOP_K, SNIPPET_CHARS = 1, 40
ENV_OPTIONS = {"corpus": CORPUS, "corpus_seed": CORPUS_SEED, "search_open": SEARCH, "search_close": "",
               "open_open": "@", "open_close": "", "answer_open": "", "result_open": RESULT_OPEN,
               "result_close": RESULT_CLOSE, "top_k": TOP_K, "fields": ["snippet"], "snippet_chars": SNIPPET_CHARS,
               "max_obs_chars": SNIPPET_CHARS, "max_calls": 2}
"""recipes/web.yaml's task.env_options: the syntax and sizes the demonstrations are written in"""


def _snippet(index, query: str) -> str:
    hits = search_results(index, query, TOP_K, SNIPPET_CHARS)
    return hits[0]["snippet"] if hits else "no results"


def _look_up(index, query: str, pattern: str) -> tuple[list[dict], str | None]:
    """One search as demonstration turns, and the name the pattern reads from its snippet (None: none)."""
    snippet = _snippet(index, query)
    found = re.search(pattern, snippet)
    return ([{"role": "assistant", "content": f"{SEARCH}{query}"},
             {"role": "tool", "content": f"{RESULT_OPEN}{snippet}{RESULT_CLOSE}"}], found and found.group(1))


def demonstrate(row: dict, index, world, error_rate: float, rng: random.Random) -> list[dict]:
    """One demonstration as turns: the look-ups (search, the server's snippet) and the answer."""
    name, hops = row["person"], row["hops"]
    guess = rng.choice(list(world.towns) if hops == 1 else world.rivers)
    kind = "right"
    if rng.random() < error_rate:
        kind = rng.choices(["guess", "typo", "early"], [0.5, 0.25, 0.25])[0]
        if kind == "guess" or (kind == "early" and hops == 1):
            return [{"role": "assistant", "content": guess}]
        if kind == "typo":
            i = rng.randrange(1, len(name))
            name = name[:i] + rng.choice([c for c in "abdefgiklmnoprstuvz" if c != name[i]]) + name[i + 1:]
    turns, town = _look_up(index, f"{name} born", r"born in (\w+)")
    if town is None or hops == 1 or kind == "early":
        return turns + [{"role": "assistant", "content": town or guess}]
    more, river = _look_up(index, f"{town} river", r"river (\w+)")
    return turns + more + [{"role": "assistant", "content": river or guess}]


def web_task(seed: int = 1234, num_eval: int = 200, error_rate: float = 0.5, num_train: int | None = None) -> Task:
    """Questions with their gold answers, held-out people apart, and the demonstrator's turns (see above)."""
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"task.demonstrator_error must be in [0, 1], got {error_rate}")
    world, index = generate_world(CORPUS_SEED), corpus_index(CORPUS, CORPUS_SEED)
    people = list(world.people)
    rng = random.Random(seed)
    rng.shuffle(people)
    if not 0 < num_eval < len(people):
        raise ValueError(f"task.num_eval must be between 1 and {len(people) - 1} (people in the corpus), "
                         f"got {num_eval}")

    def question(p, hops: int) -> dict:
        if hops == 1:
            return {"prompt": f"Where was {p.name} born?", "answer": p.birthplace, "person": p.name, "hops": 1}
        return {"prompt": f"Which river flows where {p.name} was born?", "answer": world.towns[p.birthplace],
                "person": p.name, "hops": 2}

    eval_rows = [question(p, 1 + i % 2) for i, p in enumerate(people[:num_eval])]
    train_rows = [question(p, hops) for p in people[num_eval:] for hops in (1, 2)]
    if num_train is not None:
        train_rows = train_rows[:num_train]
    demos = [{**r, "completion": demonstrate(r, index, world, error_rate, rng)} for r in train_rows]
    held_out = [answer_match(demonstrate(r, index, world, error_rate, rng)[-1]["content"], r["answer"])
                for r in eval_rows]
    chars = {c for r in train_rows + eval_rows for c in r["prompt"] + r["answer"]}
    chars |= {c for d in demos for t in d["completion"] for c in t["content"]}
    return Task("web", train_rows, eval_rows, demos, "".join(sorted(chars)), sum(held_out) / len(held_out))


@TASKS.register("web")
class Web(TaskSource):
    description = "questions about invented people, towns and rivers that need one or two look-ups (task.env: web)"

    def load(self, cfg) -> Task:
        return web_task(seed=cfg.seed, num_eval=cfg.num_eval, error_rate=cfg.demonstrator_error)
