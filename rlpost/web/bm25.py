"""Okapi BM25 over a corpus, and the snippet of a page for a query.

    score(q, d) = sum over the distinct terms t of q that d holds of
                  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))          (Lucene's, never negative)

A document's terms are those of its title and its text (lowercased runs of letters and digits). Ties
rank in corpus order, so a search is deterministic.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from rlpost.web.corpus import Doc, sentences


def tokenize(text: str) -> list[str]:
    """Lowercased runs of letters and digits: 'Zerak was born in Molvo.' -> ['zerak', 'was', 'born', 'in', 'molvo']"""
    return re.findall(r"[^\W_]+", text.lower())


class BM25:
    """An in-memory BM25 index over `docs` (see the module docstring for the formula)."""

    def __init__(self, docs: list[Doc] | tuple[Doc, ...], k1: float = 1.5, b: float = 0.75):
        self.docs, self.k1, self.b = list(docs), k1, b
        self.tf = [Counter(tokenize(f"{d.title} {d.text}")) for d in self.docs]
        self.length = [sum(c.values()) for c in self.tf]
        self.avgdl = sum(self.length) / max(len(self.docs), 1) or 1.0
        self.norm = [k1 * (1 - b + b * n / self.avgdl) for n in self.length]  # the length part, per document
        df: Counter = Counter()
        for c in self.tf:
            df.update(c.keys())
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        postings: dict[str, list[int]] = {}
        for i, c in enumerate(self.tf):
            for t in c:
                postings.setdefault(t, []).append(i)
        # per term: the documents that hold it and its whole BM25 term in each (a search adds these up)
        self.postings = {t: (np.array(ids), np.array([self._term(t, i) for i in ids])) for t, ids in postings.items()}

    def _term(self, t: str, i: int) -> float:
        f = self.tf[i][t]
        return self.idf[t] * f * (self.k1 + 1) / (f + self.norm[i])

    def score(self, query: str, i: int) -> float:
        """BM25 of document i for `query`."""
        return sum(self._term(t, i) for t in sorted(set(tokenize(query))) if t in self.tf[i])

    def search(self, query: str, k: int = 5) -> list[tuple[int, float]]:
        """The k best (document index, score) for `query`, best first; only documents that hold a query term."""
        totals, held = np.zeros(len(self.docs)), np.zeros(len(self.docs), dtype=bool)
        # term by term over its postings (only documents that hold it), in sorted order: float sums depend on
        # their order, and a set's order on the process's string hashing (PYTHONHASHSEED), so runs would differ
        for t in sorted(set(tokenize(query))):
            if t in self.postings:
                ids, weights = self.postings[t]
                totals[ids] += weights
                held[ids] = True
        ids = np.flatnonzero(held)
        best = ids[np.lexsort((ids, -totals[ids]))[:k]]  # by score, then corpus order
        return [(int(i), float(totals[i])) for i in best]

    def snippet(self, i: int, query: str, chars: int = 160) -> str:
        """The sentence of document i that holds the most query-term weight (summed idf of the distinct query
        terms it contains; the first such sentence on a tie), cut to `chars` characters."""
        terms = set(tokenize(query))
        best, best_w = "", -1.0
        for s in sentences(self.docs[i].text) or [self.docs[i].text]:
            w = sum(self.idf.get(t, 0.0) for t in sorted(terms & set(tokenize(s))))  # sorted: as in search
            if w > best_w:
                best, best_w = s, w
        return best[:chars]
