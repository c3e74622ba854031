"""Corpora: the pages the web environment serves. A `Doc` is (url, title, text, links); the url is the page's
name in the corpus (what `open(url)` takes), never an address that anything connects to.

- `generate_world(seed)` invents an encyclopedia, deterministic from its seed: rivers, the towns on them and
  the people born in one town and working in another, one short page each. The facts are drawn at random,
  so no model can know them without looking them up, and the pages link to each other (a person's page to
  the towns, a town's to its river), so a question can need two look-ups: "which river flows where Zerak
  was born?" is Zerak's page, then the town's.
- `load_corpus(source)`: "generated" (that encyclopedia), a folder of .txt/.md files (url: the path inside
  the folder, title: the first heading or line), or a JSONL file of {"url", "title", "text"} rows.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

CONSONANTS, VOWELS, ENDINGS = "bdfgklmnprstvz", "aeiou", ["", "", "k", "n", "r", "s", "l"]
JOBS = ("weaver", "smith", "potter", "baker", "miller", "sailor", "painter", "farmer", "mason", "tailor",
        "brewer", "carver")
REGIONS = ("north", "south", "east", "west")


@dataclass(frozen=True)
class Doc:
    url: str
    title: str
    text: str
    links: tuple[str, ...] = ()


@dataclass
class Person:
    name: str
    birthplace: str
    workplace: str
    job: str
    year: int


@dataclass
class World:
    """The generated encyclopedia: its entities (for questions and their gold answers) and its pages."""

    rivers: list[str]
    towns: dict[str, str]            # town -> the river it lies on
    people: list[Person]
    docs: list[Doc] = field(default_factory=list)


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """n new invented names ("Zerak", "Molvo"): two syllables and an optional last consonant, each unique."""
    out = []
    while len(out) < n:
        name = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(2)) + rng.choice(ENDINGS)
        name = name.capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def url_of(name: str) -> str:
    return f"wiki/{name}"


def generate_world(seed: int = 0, n_people: int = 3000, n_towns: int = 96, n_rivers: int = 24) -> World:
    """The invented encyclopedia of `seed` (see the module docstring); the same seed gives the same pages."""
    rng = random.Random(seed)
    taken: set[str] = set()
    rivers = _names(rng, n_rivers, taken)
    town_names = _names(rng, n_towns, taken)
    towns = {t: rivers[i % n_rivers] for i, t in enumerate(town_names)}  # every river has towns
    people = []
    for name in _names(rng, n_people, taken):
        birth, work = rng.sample(town_names, 2)
        people.append(Person(name, birth, work, rng.choice(JOBS), rng.randint(1700, 1899)))
    docs = []
    for p in people:
        docs.append(Doc(url_of(p.name), p.name,
                        f"{p.name} was a {p.job} who lived in {p.workplace}. "
                        f"{p.name} was born in {p.birthplace} in {p.year}.",
                        (url_of(p.workplace), url_of(p.birthplace))))
    for t, r in towns.items():
        docs.append(Doc(url_of(t), t,
                        f"{t} is a town in the {rng.choice(REGIONS)}. {t} lies on the river {r}. "
                        f"It has {rng.randint(2, 90) * 100} inhabitants.", (url_of(r),)))
    for r in rivers:
        on = [t for t, tr in towns.items() if tr == r]
        docs.append(Doc(url_of(r), r, f"The {r} is a river, {rng.randint(20, 900)} km long. "
                                      f"It flows through {', '.join(on[:-1])} and {on[-1]}.",
                        tuple(url_of(t) for t in on)))
    return World(rivers, towns, people, docs)


def _title_of(text: str, fallback: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip().lstrip("#").strip() or fallback
    return fallback


def _folder(path: str) -> list[Doc]:
    docs = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if not name.endswith((".txt", ".md")):
                continue
            full = os.path.join(root, name)
            try:
                with open(full, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"web corpus: cannot read {full} as UTF-8 text: {e}") from None
            url = os.path.relpath(full, path).replace(os.sep, "/")
            docs.append(Doc(url, _title_of(text, os.path.splitext(name)[0]), text))
    if not docs:
        raise ValueError(f"web corpus: the folder {path} holds no .txt or .md file")
    return docs


def _jsonl(path: str) -> list[Doc]:
    docs = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"web corpus {path} line {n}: not UTF-8 text ({e})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"web corpus {path} line {n}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"web corpus {path} line {n}: each row must be an object with a string 'text' "
                                 f"(and optional 'url', 'title'), got {line.strip()[:80]!r}")
            for key in ("url", "title"):  # a number is its digits; a list or an object has no one text to be
                value = row.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
                    raise ValueError(f"web corpus {path} line {n}: '{key}' must be a string, got {value!r}")
            url = str(row.get("url") or f"doc/{len(docs)}")
            docs.append(Doc(url, str(row.get("title") or _title_of(row["text"], url)), row["text"]))
    if not docs:
        raise ValueError(f"web corpus {path} holds no rows")
    return docs


@lru_cache(maxsize=8)
def load_corpus(source: str = "generated", seed: int = 0) -> tuple[Doc, ...]:
    """The pages of `source`: "generated" (generate_world(seed)), a folder of .txt/.md files, or a .jsonl file
    of {"url", "title", "text"} rows (url default "doc/<row>", title default the text's first line). Urls must
    be unique. Cached: one process reads a corpus once."""
    if source == "generated":
        docs = generate_world(seed).docs
    elif os.path.isdir(source):
        docs = _folder(source)
    elif os.path.isfile(source):
        docs = _jsonl(source)
    else:
        raise ValueError(f"web corpus {source!r}: not 'generated', a folder of .txt/.md files or a .jsonl file")
    seen: set[str] = set()
    for d in docs:
        if d.url in seen:
            raise ValueError(f"web corpus {source}: the url {d.url!r} is used by two pages; urls name pages, "
                             "so each must be unique")
        seen.add(d.url)
    return tuple(docs)


def sentences(text: str) -> list[str]:
    """The text's sentences (split after . ! ? and at line breaks), stripped, empty ones dropped."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]
