"""Curate a prompt set for RL: drop duplicates and overlap with the eval set, keep the prompts a model
sometimes solves.

    rlpost curate --model runs/sft-X/checkpoints/sft --train train.jsonl --eval test.jsonl --out curated.jsonl
    rlpost curate --no-model --train train.parquet --eval test.parquet --out curated.parquet

Why the pass-rate band: a GRPO-style group of K samples of one prompt learns only from how its rewards
differ. A prompt the model always solves (p = 1) or never solves (p = 0) gives every sample the same
reward, so zero advantage and no gradient: it costs a rollout and teaches nothing. With 0/1 rewards the
reward variance of a prompt is p(1 - p), the "signal density" the histogram reports (at most 0.25).

The filters, in this order (each reports how many rows it dropped, with examples):

1. exact duplicates: the same prompt text after normalising (Unicode NFKC, lower case, runs of
   whitespace as one space); the first occurrence is kept.
2. near duplicates: Jaccard similarity >= --near-dup of the prompts' character 5-gram sets, against every
   earlier kept prompt. Candidates come from MinHash (128 permutations) + LSH banding, tuned so a pair
   at the threshold is found with probability >= 0.99; each candidate is confirmed on the exact sets, so
   every drop is a true near duplicate. Cost: linear in the prompts plus the candidate checks, which
   grow with the number of pairs near the threshold (templated prompts have many).
3. contamination: a training prompt that shares a word n-gram (--ngram words, 13 as in GPT-3 and Tulu;
   words are runs of letters and digits, and each other non-space character alone) with any eval prompt
   is dropped. A prompt shorter than n words falls back to the whole prompt: it overlaps when it appears,
   word for word, inside the other prompt.
4. too long: with a model, prompts whose tokens + rollout.max_new_tokens exceed its context.
5. pass-rate band: with a model, K samples of each remaining prompt through the rollout engine, scored
   by the run's reward (task.reward / task.rewards, else the exact-answer verifier); a sample passes when
   its reward >= --pass-threshold; prompts with pass rate p outside [lo, hi] (--band) are dropped.

The kept rows are written (JSON Lines, or parquet by extension) under the columns they were read from
(task.prompt_key, task.answer_key, ...) and, with a model, their `pass_rate`; `rlpost train` with the
same task keys and task.train_file=OUT reads them.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

from rlpost.checkpoint import resolve_model
from rlpost.config import ConfigError, apply_override, load_config, read_recipe
from rlpost.env import check_vocabulary, response_budget
from rlpost.env.verifiers import gold_check, reward_from_config, reward_role
from rlpost.models import encode_prompt, load_model, model_context
from rlpost.rollout import SamplingParams, build_engine
from rlpost.rollout.episodes import episodes_in_chunks
from rlpost.tasks import (Columns, TaskDataError, answer_match_reward, dataset_splits, load_task, read_rows,
                          uses_own_verifier)
from rlpost.tasks.files import check_rows_writable, check_writable, prompt_text, write_rows

SHINGLE = 5          # characters per shingle of the near-duplicate filter
EXAMPLES = 3         # examples shown per filter in the report
_WORD = re.compile(r"\w+|[^\w\s]")


# ---------------------------------------------------------------------------- text

def normalise(text: str) -> str:
    """NFKC, lower case, whitespace runs as one space, stripped: what 'the same prompt' means here."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def row_text(row: dict) -> str:
    """A row's prompt, normalised (chat messages: their contents, one per line)."""
    return normalise(prompt_text(row["prompt"]))


def words(text: str) -> list[str]:
    """Runs of letters and digits, and every other non-space character alone: '12+34=' -> 12 + 34 =."""
    return _WORD.findall(text.lower())


def shingles(text: str, n: int = SHINGLE) -> set[str]:
    """The text's character n-grams (a text shorter than n is one shingle)."""
    return {text} if len(text) <= n else {text[i:i + n] for i in range(len(text) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


# ---------------------------------------------------------------------------- filters

def exact_duplicates(texts: list[str]) -> list[int | None]:
    """For each text, the index of the first earlier text equal to it (None: the first of its kind)."""
    first: dict[str, int] = {}
    out: list[int | None] = []
    for i, t in enumerate(texts):
        out.append(first.get(t))
        first.setdefault(t, i)
    return out


NUM_PERM = 128       # MinHash permutations of the near-duplicate filter
MINHASH_CHUNK = 4096  # shingles hashed at once: a [chunk, NUM_PERM] uint64 temporary of 4 MB


def lsh_bands(threshold: float, num_perm: int = NUM_PERM, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band) for LSH: the most rows per band (the fewest chance collisions below the
    threshold) with which a pair of Jaccard `threshold` still collides in some band with probability
    >= `recall`: 1 - (1 - t^r)^b."""
    for r in range(num_perm, 0, -1):
        b = num_perm // r
        if 1 - (1 - threshold ** r) ** b >= recall:
            return b, r
    return num_perm, 1


def minhash_signatures(sets: list[set[str]], num_perm: int = NUM_PERM, seed: int = 0):
    """[N, num_perm] MinHash signatures: for each of `num_perm` random hash functions h(x) = ((a x + b) mod
    2^64) >> 32 (multiply-shift, a odd; x the shingle's crc32), the minimum over the set. Two signatures
    agree at a position with probability about J(x, y)."""
    import random
    import zlib

    import numpy as np

    rng = random.Random(seed)
    a = np.array([rng.randrange(1 << 64) | 1 for _ in range(num_perm)], dtype=np.uint64)
    b = np.array([rng.randrange(1 << 64) for _ in range(num_perm)], dtype=np.uint64)
    sigs = np.empty((len(sets), num_perm), dtype=np.uint64)
    for i, x in enumerate(sets):  # uint64 arithmetic wraps: the mod 2^64 of multiply-shift
        h = np.fromiter((zlib.crc32(s.encode()) for s in x), dtype=np.uint64, count=len(x))
        # a chunk of shingles at a time: all at once is len(x) * num_perm * 8 bytes, 1 GB for a 1 MB prompt
        sigs[i] = np.minimum.reduce([((h[j:j + MINHASH_CHUNK, None] * a + b) >> np.uint64(32)).min(0)
                                     for j in range(0, max(len(h), 1), MINHASH_CHUNK)])
    return sigs


def near_duplicates(texts: list[str], threshold: float, n: int = SHINGLE) -> list[tuple[int, float] | None]:
    """For each text, (index of an earlier kept text, their Jaccard) when the Jaccard of their character
    n-gram sets is >= `threshold`, else None (the text is kept and later texts are compared with it).

    MinHash + LSH finds the candidates: the signature is cut into b bands of r rows (`lsh_bands`), and two
    texts are candidates when a band agrees, which a pair at the threshold does with probability >= 0.99
    (more above it; a pair far below it rarely). A candidate whose MinHash estimate of the Jaccard is not
    far below the threshold is then checked exactly on the shingle sets, so nothing is dropped that is
    not a near duplicate. Cost: linear in the texts, plus the candidate checks."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    sets = [shingles(t, n) for t in texts]
    sigs = minhash_signatures(sets)
    bands, rows = lsh_bands(threshold)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    margin = 4 * math.sqrt(threshold * (1 - threshold) / NUM_PERM) + 1e-9  # four standard errors of the estimate
    out: list[tuple[int, float] | None] = []
    for i, x in enumerate(sets):
        keys = [sigs[i, k * rows:(k + 1) * rows].tobytes() for k in range(bands)]
        candidates = sorted({j for k, key in enumerate(keys) for j in buckets[k].get(key, ())})
        found = None
        if candidates:
            estimate = (sigs[candidates] == sigs[i]).mean(1)
            for j, e in zip(candidates, estimate.tolist()):
                if e >= threshold - margin:
                    sim = jaccard(x, sets[j])
                    if sim >= threshold - 1e-12:
                        found = (j, sim)
                        break
        out.append(found)
        if found is None:
            for k, key in enumerate(keys):
                buckets[k].setdefault(key, []).append(i)
    return out


def contamination(train_texts: list[str], eval_texts: list[str], n: int = 13) -> list[int | None]:
    """For each training text, the index of an eval text it overlaps (None: clean). Two texts overlap when
    they share a word n-gram, or when the shorter of them, under n words, appears whole in the other."""
    if n < 1:
        raise ValueError(f"--ngram must be >= 1, got {n}")
    evals = [tuple(words(t)) for t in eval_texts]
    grams: dict[tuple, int] = {}              # n-grams of the long eval texts
    short: dict[int, dict[tuple, int]] = {}   # length -> whole short eval texts
    for e, w in enumerate(evals):
        if len(w) >= n:
            for i in range(len(w) - n + 1):
                grams.setdefault(w[i:i + n], e)
        elif w:
            short.setdefault(len(w), {}).setdefault(w, e)
    subgrams: dict[int, dict[tuple, int]] = {}  # m -> every m-gram of every eval text (built on demand)

    def inside_eval(w: tuple) -> int | None:
        m = len(w)
        if m not in subgrams:
            table: dict[tuple, int] = {}
            for e, ew in enumerate(evals):
                for i in range(len(ew) - m + 1):
                    table.setdefault(ew[i:i + m], e)
            subgrams[m] = table
        return subgrams[m].get(w)

    out: list[int | None] = []
    for text in train_texts:
        w = tuple(words(text))
        hit = None
        if len(w) >= n:
            hit = next((grams[w[i:i + n]] for i in range(len(w) - n + 1) if w[i:i + n] in grams), None)
        elif w:
            hit = inside_eval(w)  # a short training prompt inside an eval prompt
        for m, table in short.items():  # a short eval prompt inside this training prompt
            if hit is not None or m > len(w):
                continue
            hit = next((table[w[i:i + m]] for i in range(len(w) - m + 1) if w[i:i + m] in table), None)
        out.append(hit)
    return out


def in_band(p: float, band: tuple[float, float]) -> bool:
    return band[0] - 1e-9 <= p <= band[1] + 1e-9


# ---------------------------------------------------------------------------- pass rates

def estimate_pass_rates(engine, reward, rows: list[dict], prompt_ids: list[list[int]], k: int, params, *,
                        threshold: float = 0.5, seed: int = 0, batch_prompts: int = 256) -> list[float]:
    """Each row's pass rate: the fraction of its `k` samples (rollout engine, then the reward role, through
    the same episode function as training) whose reward is >= `threshold`."""
    from tqdm import tqdm

    rates = [0.0] * len(rows)
    chunks = episodes_in_chunks(engine, reward, rows, prompt_ids, k, params, seed, batch_prompts)
    for idx, batch in tqdm(chunks, total=math.ceil(len(rows) / batch_prompts), desc="pass rates", unit="chunk",
                           file=sys.stderr):
        scores = batch.rewards.float()
        if scores.dim() == 2:  # per-token rewards: the episode's reward is their sum
            scores = scores.sum(-1)
        passed = (scores >= threshold).float().view(len(idx), k).mean(1).tolist()  # rows are prompt-major
        for j, i in enumerate(idx):
            rates[i] = passed[j]
    return rates


# ---------------------------------------------------------------------------- the histogram

BUCKETS = ["p = 0", "0 < p < 0.1"] + [f"{b / 10:.1f} <= p < {(b + 1) / 10:.1f}" for b in range(1, 9)] + \
          ["0.9 <= p < 1", "p = 1"]


def bucket(p: float) -> int:
    """Index into BUCKETS: p = 0 and p = 1 alone (no signal), tenths in between."""
    if p <= 0.0:
        return 0
    if p >= 1.0:
        return len(BUCKETS) - 1
    return 1 + min(int(p * 10 + 1e-9), 9)


def histogram(rates: list[float], band: tuple[float, float], width: int = 30) -> str:
    """The signal-density histogram: per p bucket, the number of prompts and their mean p(1-p)."""
    counts, signal = [0] * len(BUCKETS), [0.0] * len(BUCKETS)
    for p in rates:
        b = bucket(p)
        counts[b] += 1
        signal[b] += p * (1 - p)
    top = max(counts, default=0) or 1
    lines = [f"  {'pass rate':<16} {'prompts':>7}  {'share':>6}  {'mean p(1-p)':>11}"]
    for label, c, s in zip(BUCKETS, counts, signal):
        mean = f"{s / c:.3f}" if c else "-"
        lines.append(f"  {label:<16} {c:>7}  {c / max(len(rates), 1):>6.1%}  {mean:>11}  "
                     f"{'#' * round(width * c / top)}".rstrip())
    kept = [p for p in rates if in_band(p, band)]
    mean_all = sum(p * (1 - p) for p in rates) / len(rates) if rates else 0.0
    mean_kept = sum(p * (1 - p) for p in kept) / len(kept) if kept else 0.0
    lines.append(f"  signal density (mean p(1-p), at most 0.25): {mean_all:.3f} over all {len(rates)} prompts, "
                 f"{mean_kept:.3f} over the {len(kept)} in the band [{band[0]:g}, {band[1]:g}]")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the whole pass

@dataclass
class Curation:
    """What `curate` did: the kept rows and, per filter, the dropped rows with what they matched."""

    read: int
    kept: list[dict] = field(default_factory=list)
    exact: list[tuple[dict, dict]] = field(default_factory=list)             # (row, the row it repeats)
    near: list[tuple[dict, dict, float]] = field(default_factory=list)       # (row, earlier row, Jaccard)
    contaminated: list[tuple[dict, dict]] = field(default_factory=list)      # (row, eval row)
    too_long: list[tuple[dict, int]] = field(default_factory=list)           # (row, prompt tokens)
    out_of_band: list[tuple[dict, float]] = field(default_factory=list)      # (row, pass rate)
    rates: list[float] | None = None                                         # of every row estimated
    rated: list[dict] = field(default_factory=list)                          # those rows, in the same order

    def counts(self) -> dict[str, int]:
        return {"read": self.read, "exact_duplicates": len(self.exact), "near_duplicates": len(self.near),
                "contaminated": len(self.contaminated), "too_long": len(self.too_long),
                "out_of_band": len(self.out_of_band), "kept": len(self.kept)}


def curate(rows: list[dict], eval_rows: list[dict] = (), *, near_dup: float | None = 0.9, ngram: int = 13,
           pass_rates: Callable[[list[dict]], list[float]] | None = None, band: tuple[float, float] = (0.1, 0.9),
           too_long: Callable[[list[dict]], list[int | None]] | None = None) -> Curation:
    """Run the filters (module docstring) over `rows`. `near_dup` None or 0 skips the near-duplicate filter,
    `pass_rates(rows) -> [p]` (None: skip) scores what the earlier filters kept, and `too_long(rows)`
    gives each row's prompt length in tokens when it does not fit the model (None where it does)."""
    if not 0.0 <= band[0] <= band[1] <= 1.0:
        raise ValueError(f"--band must satisfy 0 <= lo <= hi <= 1, got {band[0]} {band[1]}")
    result = Curation(read=len(rows))
    texts = [row_text(r) for r in rows]
    keep = []
    for i, j in enumerate(exact_duplicates(texts)):
        if j is None:
            keep.append(i)
        else:
            result.exact.append((rows[i], rows[j]))
    if near_dup:
        found = near_duplicates([texts[i] for i in keep], near_dup)
        result.near = [(rows[keep[a]], rows[keep[f[0]]], f[1]) for a, f in enumerate(found) if f is not None]
        keep = [i for i, f in zip(keep, found) if f is None]
    if eval_rows:
        hits = contamination([texts[i] for i in keep], [row_text(r) for r in eval_rows], ngram)
        result.contaminated = [(rows[i], eval_rows[h]) for i, h in zip(keep, hits) if h is not None]
        keep = [i for i, h in zip(keep, hits) if h is None]
    if too_long is not None:
        lengths = too_long([rows[i] for i in keep])
        result.too_long = [(rows[i], n) for i, n in zip(keep, lengths) if n is not None]
        keep = [i for i, n in zip(keep, lengths) if n is None]
    if pass_rates is None:
        result.kept = [rows[i] for i in keep]
        return result
    result.rated = [rows[i] for i in keep]
    rates = pass_rates(result.rated) if keep else []
    result.rates = rates
    for i, p in zip(keep, rates):
        if in_band(p, band):
            result.kept.append({**rows[i], "pass_rate": p})
        else:
            result.out_of_band.append((rows[i], p))
    return result


# ---------------------------------------------------------------------------- the report

def where(row: dict) -> str:
    """'line 4' / 'row 4': a row's place in its file."""
    return f"line {row['line']}" if "line" in row else f"row {row['row']}" if "row" in row else "?"


def report(c: Curation, *, train: str, eval_file: str | None, out: str, near_dup: float | None, ngram: int,
           band: tuple[float, float], k: int | None, threshold: float) -> str:
    """Every count, with a few examples of each filter, and the histogram when pass rates were estimated."""

    def examples(items, show) -> str:
        shown = "; ".join(show(x) for x in items[:EXAMPLES])
        return f"   e.g. {shown}" if items else ""

    lines = [f"rlpost curate: {train} -> {out}",
             f"  read                 {c.read:>7}",
             f"  exact duplicates     {-len(c.exact):>7}"
             + examples(c.exact, lambda x: f"{where(x[0])} = {where(x[1])}")]
    if near_dup:
        lines.append(f"  near duplicates      {-len(c.near):>7}"
                     + examples(c.near, lambda x: f"{where(x[0])} ~ {where(x[1])} ({x[2]:.2f})")
                     + f"   (Jaccard >= {near_dup:g} of character {SHINGLE}-grams)")
    else:
        lines.append("  near duplicates            -   (off)")
    if eval_file:
        lines.append(f"  contaminated         {-len(c.contaminated):>7}"
                     + examples(c.contaminated, lambda x: f"{where(x[0])} ~ eval {where(x[1])}")
                     + f"   ({ngram}-gram overlap with {eval_file})")
    else:
        lines.append("  contaminated               -   (no --eval)")
    if c.rates is not None:
        lines.append(f"  too long             {-len(c.too_long):>7}"
                     + examples(c.too_long, lambda x: f"{where(x[0])} ({x[1]} tokens)"))
        lines.append(f"  out of band          {-len(c.out_of_band):>7}"
                     + examples(c.out_of_band, lambda x: f"{where(x[0])} (p={x[1]:.2f})")
                     + f"   (pass rate outside [{band[0]:g}, {band[1]:g}], {k} samples, pass: reward >= "
                       f"{threshold:g})")
    else:
        lines.append("  out of band                -   (--no-model)")
    lines.append(f"  kept                 {len(c.kept):>7}")
    if c.rates is not None:
        lines += ["", f"  pass rates of the {len(c.rates)} prompts the filters above kept:",
                  histogram(c.rates, band)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- gold answers

@dataclass
class GoldCheck:
    """`check_gold`'s result: the rows whose own gold did not verify, each with why, out of `checked`."""
    checked: int
    failed: list[dict] = field(default_factory=list)
    why: list[str] = field(default_factory=list)


def gold_completion(row: dict) -> str:
    """What a row itself says is right: its demonstration (`completion`; a multi-turn one's assistant turns),
    else its gold `answer` as the whole completion."""
    done = row.get("completion")
    if isinstance(done, list):
        return "".join(t.get("content", "") for t in done if t.get("role", "assistant") == "assistant")
    return str(done if done is not None else row.get("answer", ""))


def check_gold(rows: list[dict], verify: Callable[[str, dict], float], threshold: float) -> GoldCheck:
    """Score each row's own gold (`gold_completion`) with `verify`; a row whose gold scores below `threshold`
    (or on which the verifier raises) is a data bug: a wrong answer, an answer the verifier cannot read, a
    demonstration that ends on something else."""
    out = GoldCheck(checked=len(rows))
    for row in rows:
        try:
            score = float(verify(gold_completion(row), row))
        except Exception as e:  # noqa: BLE001 - the verifier's failure on this row is what the check reports
            why = f"the verifier raised {type(e).__name__}: {e}"
        else:
            if score >= threshold:
                continue
            why = f"scored {score:g} < {threshold:g}"
        out.failed.append(row)
        out.why.append(why)
    return out


def gold_report(g: GoldCheck, *, train: str, reward: str, threshold: float, shown: int = 5) -> str:
    """How many rows' gold did not verify, and the first `shown` of them, each by its place in the file."""
    lines = [f"rlpost curate --check-gold: {train}: {g.checked - len(g.failed)} of {g.checked} rows' gold verifies "
             f"under {reward} (a row passes when its gold scores >= {threshold:g})"]
    if g.failed:
        lines.append(f"  {len(g.failed)} row(s) whose own gold does not verify (a data bug: a wrong answer, or one "
                     f"the reward cannot read):")
        for row, why in list(zip(g.failed, g.why))[:shown]:
            lines.append(f"    {where(row)}: {why}; gold {gold_completion(row)[:80]!r}")
        if len(g.failed) > shown:
            lines.append(f"    ... and {len(g.failed) - shown} more")
        if len(g.failed) == g.checked > 1 and not any(why.startswith("the verifier raised") for why in g.why):
            # no row at all: more likely the reward cannot read this form of gold than every row being wrong
            lines.append("  every row fails: does the reward read the gold in this form? A reward that looks for "
                         "a format (math with extract: boxed) finds none in a bare answer or a worked solution: "
                         "check with one that reads it (task.reward_options={extract: auto}), or on "
                         "demonstrations (task.completion_key)")
    return "\n".join(lines)


def run_check_gold(cfg, args, rows: list[dict], cols) -> int:
    """`rlpost curate --check-gold`: every row's gold through the run's reward (task.reward / task.rewards, else
    the exact first-line match); the failing rows are written to --out when given. Returns the exit code: 1
    when some gold does not verify and --strict is set, else 0."""
    if cfg.task.env:
        raise ValueError("rlpost curate --check-gold scores one completion with the reward; a task.env scores "
                         "episodes: unset task.env")
    verify = reward_from_config(cfg.task, answer_match_reward)
    try:
        result = check_gold(rows, verify, args.pass_threshold)
    finally:
        getattr(verify, "close", lambda: None)()
    name = cfg.task.reward or ("task.rewards" if cfg.task.rewards else "the exact first-line match")
    print(gold_report(result, train=args.train, reward=name, threshold=args.pass_threshold))
    if args.out:
        write_rows(result.failed, args.out, cols)
        print(f"rlpost curate: wrote the {len(result.failed)} row(s) whose gold does not verify to {args.out}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"checked": result.checked, "failed": len(result.failed), "rows": _gold_rows(result)}, f,
                      indent=2)
    return 1 if result.failed and args.strict else 0


def _gold_rows(result: GoldCheck) -> list[dict]:
    return [{"where": where(r), "why": w} for r, w in zip(result.failed, result.why)]


def source_out(out: str, name: str) -> str:
    """Where --out puts one source's failing rows under task.sources: 'bad.jsonl' -> 'bad.<name>.jsonl' (the
    sources' columns differ, so each gets a file it reads back from with its own task.sources[i] keys)."""
    stem, ext = os.path.splitext(out)
    return f"{stem}.{name}{ext}"


def source_gold_rows(source) -> tuple[list[dict], Columns, Callable[[str, dict], float]]:
    """A task.sources entry's (TaskConfig) training rows, its columns, and the verifier that scores them when the
    entry sets no reward: a file's rows read under the entry's own columns (exact first-line match), an
    embedded task's generated rows (its own verifier), each named 'row i' in the order it makes them."""
    cols = Columns.from_config(source)
    if source.train_file:  # only the file task reads a file (every other task refuses one)
        return (read_rows(source.train_file, cols, split=source.train_split, require_answer=uses_own_verifier(source)),
                cols, answer_match_reward)
    task = load_task(source)
    rows = [r if "line" in r or "row" in r else {**r, "row": i + 1} for i, r in enumerate(task.train_rows)]
    return rows, cols, task.verify


def run_check_gold_sources(cfg, args) -> int:
    """`rlpost curate --check-gold` under task.sources: each source's rows through that source's own reward
    (its reward / rewards, else its task's verifier), reported per source; with --out, each source's failing
    rows go to `source_out(--out, name)` under its own columns. A source with an env (episodes, not one
    completion) is refused before anything is scored. Returns the exit code as `run_check_gold` does."""
    sources = cfg.task.source_configs()
    for i, (name, _, source) in enumerate(sources):
        if source.env:
            raise ValueError(f"rlpost curate --check-gold scores one completion with a source's reward; "
                             f"task.sources[{i}] ({name!r}) names an env ({source.env}), which scores episodes: "
                             f"leave that source out of task.sources to check the others")
    if args.out and not args.out.endswith((".jsonl", ".json", ".parquet")):
        raise ValueError(f"cannot write {args.out}: the extension must be .jsonl, .json or .parquet")
    checked = failed = 0
    per_source: dict[str, dict] = {}
    for i, (name, _, source) in enumerate(sources):
        key = f"task.sources[{i}]"
        try:
            rows, cols, default = source_gold_rows(source)
        except ValueError as e:
            raise ValueError(f"{key} ({name!r}): {e}") from None
        verify = reward_from_config(source, default)
        try:
            result = check_gold(rows, verify, args.pass_threshold)
        finally:
            getattr(verify, "close", lambda: None)()
        own = source.reward or (f"{key}.rewards" if source.rewards else None)
        if own is None:
            own = "the exact first-line match" if source.train_file else f"the {source.name} task's verifier"
        print(gold_report(result, train=f"{key} {name!r} ({source.train_file or 'task ' + source.name})",
                          reward=own, threshold=args.pass_threshold))
        out = source_out(args.out, name) if args.out else None
        if out:
            write_rows(result.failed, out, cols)
            print(f"rlpost curate: wrote the {len(result.failed)} row(s) of {name!r} whose gold does not verify "
                  f"to {out}")
        checked, failed = checked + result.checked, failed + len(result.failed)
        per_source[name] = {"checked": result.checked, "failed": len(result.failed), "out": out,
                            "rows": _gold_rows(result)}
    print(f"rlpost curate --check-gold: {checked - failed} of {checked} rows' gold verifies over the "
          f"{len(sources)} sources")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"checked": checked, "failed": failed, "sources": per_source}, f, indent=2)
    return 1 if failed and args.strict else 0


def sources_requested(recipe: str | None, overrides: list[str]) -> bool:
    """Whether the recipe and overrides set task.sources, read as `load_config` reads them (a recipe or override
    it cannot read answers False: loading the config then names what is wrong)."""
    data: object = {}
    if recipe:
        try:
            data = read_recipe(recipe)
        except ConfigError:
            return False
    if not isinstance(data, dict):
        return False
    for o in overrides:
        try:
            apply_override(data, o)
        except ConfigError:
            return False
    task = data.get("task")
    return isinstance(task, dict) and bool(task.get("sources"))


# ---------------------------------------------------------------------------- the command

def run(args) -> int:
    """`rlpost curate` with parsed `args` (see rlpost/cli.py): read, filter, report, write."""
    check = getattr(args, "check_gold", False)
    if args.out:  # before any work: a bad extension used to fail only when the rows were written
        check_writable(args.out)
    if sources_requested(args.recipe, args.overrides):  # every source names its own file, columns and reward
        if not check:
            raise ValueError("rlpost curate filters one file (--train) under one task's columns and reward; with "
                             "task.sources, curate each source's file on its own (--train FILE with that source's "
                             "keys), or check every source's gold with --check-gold")
        if args.train:
            raise ValueError("--train names the one file to check; with task.sources each source names its own "
                             "(task.sources[i].file): leave out --train")
        return run_check_gold_sources(load_config(args.recipe, args.overrides), args)
    if not args.train:
        raise ValueError("give --train: the training prompts (.jsonl, .json, .parquet or a `datasets` folder)")
    if args.model is None and not args.no_model and not check:
        raise ValueError("give --model (a checkpoint, model folder, run directory or hub id) to estimate pass "
                         "rates, or --no-model to only deduplicate and decontaminate")
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    cfg = load_config(args.recipe, ["task.name=file", f"task.train_file={json.dumps(args.train)}",
                                    *args.overrides])
    task = cfg.task
    cols = Columns.from_config(task)
    if check:  # the gold check only: the rows need their answers, whatever the reward
        rows = read_rows(args.train, cols, split=task.train_split, require_answer=uses_own_verifier(task))
        return run_check_gold(cfg, args, rows, cols)
    if not args.out:
        raise ValueError("give --out: where the kept rows go (.jsonl, .json or .parquet)")
    for flag, path in (("--train", args.train), ("--eval", args.eval)):
        if path and os.path.realpath(path) == os.path.realpath(args.out):
            raise ValueError(f"--out {args.out} is the {flag} file: writing the kept rows there would lose the rows "
                             "the filters drop, and the input itself; write to another file")
    use_model = not args.no_model
    # a row the run's reward cannot score (no gold) fails here, before any sampling: the kept rows are for that
    # reward, and training would refuse the row anyway
    needs_answer, row_check = gold_check(task, task.answer_key)
    rows = read_rows(args.train, cols, split=task.train_split,
                     require_answer=(use_model and uses_own_verifier(task)) or needs_answer, check=row_check)
    eval_file = args.eval
    if not eval_file and task.eval_split != task.train_split and task.eval_split in (dataset_splits(args.train) or []):
        eval_file = args.train  # a DatasetDict's held-out split, as training holds it out: decontaminate against it
    eval_rows = (read_rows(eval_file, cols, split=task.eval_split, split_key="task.eval_split", require_answer=False,
                           held_out=True) if eval_file else [])
    check_rows_writable(rows, args.out, cols)  # a column --out cannot hold fails now, not after the sampling
    band = (args.band[0], args.band[1])
    pass_rates = too_long = None
    close = lambda: None  # noqa: E731
    if use_model:
        pass_rates, too_long, close = _model_filters(cfg, args)
    try:
        result = curate(rows, eval_rows, near_dup=args.near_dup, ngram=args.ngram, pass_rates=pass_rates, band=band,
                        too_long=too_long)
    finally:
        close()
    if eval_file and dataset_splits(eval_file):
        eval_file = f"{eval_file} [split {task.eval_split}]"
    print(report(result, train=args.train, eval_file=eval_file, out=args.out, near_dup=args.near_dup,
                 ngram=args.ngram, band=band, k=args.k if use_model else None, threshold=args.pass_threshold))
    if not result.kept:
        raise TaskDataError("no rows were kept; nothing written")
    write_rows(result.kept, args.out, cols)  # the input's column names: the same recipe reads the output
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)  # as write_rows does for --out
        with open(args.report, "w") as f:
            json.dump({"counts": result.counts(), "pass_rates": result.rates, "band": list(band),
                       "pass_rate_rows": [where(r) for r in result.rated] if result.rates is not None else None},
                      f, indent=2)
    how = f"{args.recipe} " if args.recipe else "task.name=file "
    # the output is one file: the folder's held-out split must now be named as the eval file
    held_out = f" task.eval_file={args.train}" if eval_rows and not args.eval else ""
    print(f"rlpost curate: wrote {len(result.kept)} rows to {args.out}; train on them with `rlpost train "
          f"{how}task.train_file={args.out}{held_out}`")
    return 0


def _model_filters(cfg, args):
    """(pass_rates, too_long, close) for the model of --model, with the run's reward and sampling settings."""
    import torch

    cfg.model.name = resolve_model(args.model)
    if cfg.model.name == "gpt_mini":
        raise ValueError("--model gpt_mini is an untrained model; give a trained checkpoint or model folder")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model)
    model.eval()
    check_vocabulary(cfg.task, tokenizer)  # with task.env: the model must spell what the environment answers
    engine = build_engine(cfg.rollout.engine, model, tokenizer, share_weights=True,
                          vllm_gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization)
    rc = cfg.rollout
    # task.env's episodes (its reward on the final turn) or one turn scored by the reward, as training samples
    reward = reward_role(cfg.task, answer_match_reward, tokenizer, rc.max_new_tokens)
    budget = response_budget(cfg.task, rc.max_new_tokens)  # tokens after the prompt: every turn of an episode
    params = SamplingParams(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_k=rc.top_k,
                            top_p=rc.top_p, stop=list(rc.stop), max_num_seqs=rc.max_num_seqs)
    context = model_context(model)
    encoded: dict[int, list[int]] = {}

    def ids(row: dict) -> list[int]:
        if id(row) not in encoded:
            try:
                encoded[id(row)] = encode_prompt(tokenizer, row["prompt"], cfg.task.system_prompt)
            except ValueError as e:
                raise ValueError(f"{args.train} {where(row)}: cannot encode the prompt: {e}") from None
        return encoded[id(row)]

    def too_long(rows: list[dict]) -> list[int | None]:
        return [len(ids(r)) if context and len(ids(r)) + budget > context else None for r in rows]

    def pass_rates(rows: list[dict]) -> list[float]:
        with torch.no_grad():
            return estimate_pass_rates(engine, reward, rows, [ids(r) for r in rows], args.k, params,
                                       threshold=args.pass_threshold, seed=cfg.seed,
                                       batch_prompts=args.batch_prompts or cfg.eval.batch_prompts)

    def close() -> None:
        engine.close()
        reward.close()  # the reward's worker processes, a judge's engine

    return pass_rates, too_long, close
