"""Preference data: load, validate, tokenise into chosen / rejected sequences, cache reference log-probs.

Two row formats, in a JSONL file (one object per line) or a Hugging Face `datasets` dataset:

    paired    {"prompt": ..., "chosen": ..., "rejected": ...}        DPO, IPO, ORPO, SimPO (and KTO)
    unpaired  {"prompt": ..., "completion": ..., "label": true}      KTO (label: desirable or not)

`prompt` is a string or a list of chat messages ({"role", "content"}); a completion is a string or a
list of messages whose last one is the assistant's reply. Prompts are encoded exactly as rollout
encodes them (`rlpost.models.encode_prompt`): a message list always through the tokenizer's chat
template (the tokenizer must have one), a string when `model.chat_template=true`, with the task's
system prompt (task.system_prompt) in front when set. Completions are encoded bare and end
with eos, as SFT and rollout do.

Two kinds of problem, kept apart:
- *malformed* rows (bad JSON, a missing key, a wrong type) are errors: every one is reported with its
  line (JSONL) or row (dataset) number, all at once, and nothing is silently dropped;
- *bad* rows (chosen equal to rejected, an empty completion, a prompt or prompt + completion longer
  than the context, a character outside gpt_mini's vocabulary) are named row by row and, with
  `on_bad_row="skip"`, skipped and counted (`PreferenceData.skipped`), or with "raise" stop the run.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from rlpost.batch import Batch
from rlpost.models import model_context  # noqa: F401 - re-exported: the preference stage's default max_length
from rlpost.models import encode_prompt  # noqa: F401 - the one prompt encoder; re-exported from here too
from rlpost.rollout.episodes import episodes_in_chunks


class PreferenceDataError(ValueError):
    """Preference data that is missing, malformed or (with on_bad_row='raise') has bad rows."""


def _report(title: str, problems: list[str]) -> str:
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    return f"{title}:\n  {shown}"


# ---------------------------------------------------------------------------- reading

def _records(source: Any, split: str) -> tuple[str, list[tuple[str, Any]]]:
    """(name of the source, [(where, raw record)]) from a JSONL path, a datasets folder / id, a Dataset, a list."""
    if isinstance(source, (list, tuple)):
        return "rows", [(f"row {i}", r) for i, r in enumerate(source, 1)]
    if not isinstance(source, str):  # a datasets.Dataset (or anything iterable of dicts)
        return "dataset", [(f"row {i}", r) for i, r in enumerate(source, 1)]
    if os.path.isfile(source):
        with open(source, "rb") as f:
            data = f.read()
        if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write: refused as line 1
            data = data[3:]
        out = []
        for n, raw in enumerate(data.splitlines(), 1):  # at \n, \r\n and \r only, not inside a JSON string
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # one row named, not the whole file failing without a name
                out.append((f"line {n}", _BadJSON(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                                  f"{e.start + 1}: {e.reason}); save the file as UTF-8")))
                continue
            if not line.strip():
                continue
            try:
                out.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((f"line {n}", _BadJSON(f"not valid JSON ({e.msg})")))
            except (ValueError, RecursionError) as e:  # a number of thousands of digits, nesting past the stack
                out.append((f"line {n}", _BadJSON(f"cannot be read ({type(e).__name__}: {str(e)[:120]})")))
        return source, out
    if source.endswith((".jsonl", ".json")) or (os.sep in source and not os.path.isdir(source)
                                                 and source.count("/") != 1):
        raise PreferenceDataError(f"preference data file not found: {source!r}")
    try:
        import datasets
    except ImportError:
        raise PreferenceDataError(f"preference data {source!r} is not a file, and the `datasets` package that "
                                  f"would load it as a dataset is not installed (pip install datasets)") from None
    try:
        if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_dict.json")):
            ds = datasets.load_from_disk(source)[split]
        elif os.path.isdir(source) and os.path.exists(os.path.join(source, "state.json")):
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - FileNotFoundError, DatasetNotFoundError, ConnectionError ...
        raise PreferenceDataError(f"preference data not found or not loadable: {source!r} (a JSONL file, a folder "
                                  f"saved by `datasets`, or a dataset id): {type(e).__name__}: {e}") from None
    return source, [(f"row {i}", r) for i, r in enumerate(ds, 1)]


class _BadJSON:
    def __init__(self, msg: str):
        self.msg = msg


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x)


def _completion_text(x: Any) -> str | None:
    """A completion as text: a string, or the content of the last (assistant) message of a list."""
    if isinstance(x, str):
        return x
    if _is_messages(x) and x[-1]["role"] == "assistant":
        return x[-1]["content"]
    return None


def read_preference_rows(source: Any, split: str = "train") -> list[dict]:
    """Validated rows, each {prompt, chosen, rejected} or {prompt, completion, label}, plus `where`.

    All rows of one source must share a format (the first well-formed row decides it). Malformed rows
    raise PreferenceDataError naming every one of them."""
    name, records = _records(source, split)
    rows, problems, fmt = [], [], None
    for where, r in records:
        if isinstance(r, _BadJSON):
            problems.append(f"{where}: {r.msg}")
            continue
        if not isinstance(r, dict):
            problems.append(f"{where}: expected an object, got {type(r).__name__}")
            continue
        row_fmt = "paired" if "chosen" in r or "rejected" in r else "unpaired" if "completion" in r else None
        if row_fmt is None:
            problems.append(f"{where}: needs 'chosen' and 'rejected' (paired) or 'completion' and 'label' "
                            f"(unpaired); has {', '.join(map(repr, r)) or 'no keys'}")
            continue
        fmt = fmt or row_fmt
        if row_fmt != fmt:
            problems.append(f"{where}: a {row_fmt} row in {fmt} data (all rows must share one format)")
            continue
        keys = ("prompt", "chosen", "rejected") if fmt == "paired" else ("prompt", "completion", "label")
        missing = [k for k in keys if k not in r or r[k] is None]
        if missing:
            problems.append(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")
            continue
        if not (isinstance(r["prompt"], str) or _is_messages(r["prompt"])):
            problems.append(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages, "
                            f"got {type(r['prompt']).__name__}")
            continue
        row = {"prompt": r["prompt"], "where": where}
        bad = False
        for k in keys[1:]:
            if k == "label":
                if isinstance(r[k], bool) or r[k] in (0, 1):
                    row[k] = bool(r[k])
                else:
                    problems.append(f"{where}: 'label' must be true or false, got {r[k]!r}")
                    bad = True
                continue
            text = _completion_text(r[k])
            if text is None:
                problems.append(f"{where}: '{k}' must be a string or a list of messages ending with the "
                                f"assistant's, got {type(r[k]).__name__}")
                bad = True
            row[k] = text
        if not bad:
            rows.append(row)
    if problems:
        raise PreferenceDataError(_report(f"{name}: {len(problems)} malformed row(s)", problems))
    if not rows:
        raise PreferenceDataError(f"{name}: the preference data has no rows")
    return rows


def write_preference_rows(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "where"}) + "\n")


# ---------------------------------------------------------------------------- tokenising

@dataclass
class PreferenceData:
    """Tokenised preference data as sequences (prompt ids, completion ids + eos).

    Paired: example i is sequences 2i (chosen, label 1) and 2i+1 (rejected, label 0).
    Unpaired: example i is sequence i; `kl_completion[i]` is the completion of another example,
    giving KTO the mismatched pair (prompt i, completion of i+1) for its KL reference point.
    `ref` / `ref_kl` hold the cached per-token reference log-probs of every sequence (filled once).
    """

    paired: bool
    prompts: list[list[int]]          # per sequence
    completions: list[list[int]]      # per sequence, eos included
    labels: list[float]               # per sequence
    pairs: list[int]                  # per sequence: the example it belongs to
    where: list[str]                  # per example
    skipped: list[str] = field(default_factory=list)
    kl_completions: list[list[int]] | None = None  # unpaired only, per sequence
    ref: list[torch.Tensor] | None = None
    ref_kl: list[torch.Tensor] | None = None
    # per sequence, 1 on the completion tokens the policy wrote (an environment's episode: its observations are
    # in the sequence but 0, so the loss never reads them); None: every completion token is the policy's
    trained: list[list[int]] | None = None
    kl_trained: list[list[int]] | None = None

    def __len__(self) -> int:
        """Examples (pairs, or unpaired rows)."""
        return len(self.where)

    def sequences(self, examples: list[int]) -> list[int]:
        return [s for e in examples for s in ((2 * e, 2 * e + 1) if self.paired else (e,))]

    def unpaired(self) -> "PreferenceData":
        """Paired data as unpaired rows (chosen: desirable, rejected: undesirable), for KTO."""
        if not self.paired:
            return self
        n = len(self.completions)
        where = [f"{self.where[self.pairs[s]]} ({'chosen' if self.labels[s] else 'rejected'})" for s in range(n)]
        return with_kl_pairs(PreferenceData(False, self.prompts, self.completions, self.labels, list(range(n)), where,
                                            self.skipped, trained=self.trained))

    def batch(self, seqs: list[int], pad_id: int, kl: bool = False) -> Batch:
        """Rows `seqs` as a Batch: the rollout layout (prompt left-padded, completion right-padded),
        labels in `rewards`, example ids in `group_ids`, cached reference log-probs in `ref_logp`."""
        comps = self.kl_completions if kl else self.completions
        trained = self.kl_trained if kl else self.trained
        b = Batch.for_sft([self.prompts[s] for s in seqs], [comps[s] for s in seqs], pad_id,
                           trained=[trained[s] for s in seqs] if trained is not None else None)
        ref = self.ref_kl if kl else self.ref
        ref_logp = None
        if ref is not None:
            ref_logp = torch.zeros(b.input_ids.shape)
            P = b.prompt_width
            for i, s in enumerate(seqs):
                ref_logp[i, P:P + len(ref[s])] = ref[s]
        return b.replace(rewards=torch.tensor([self.labels[s] for s in seqs]),
                         group_ids=torch.tensor([self.pairs[s] for s in seqs]), ref_logp=ref_logp)


def with_kl_pairs(data: PreferenceData) -> PreferenceData:
    """Give every unpaired row a mismatched completion: row i gets row (i+1) mod N's (a fixed shift)."""
    n = len(data.completions)
    data.kl_completions = [data.completions[(i + 1) % n] for i in range(n)]
    if data.trained is not None:
        data.kl_trained = [data.trained[(i + 1) % n] for i in range(n)]
    return data


def tokenize_preferences(rows: list[dict], tokenizer, *, max_length: int | None, on_bad_row: str = "skip",
                         system_prompt: str | None = None) -> PreferenceData:
    """Validated rows -> PreferenceData. Bad rows are named; skipped and counted, or raised (all at once).
    Prompts are encoded as rollout encodes them (`rlpost.models.encode_prompt`, with `system_prompt`). Rows made
    from an environment's episodes (`pairs_from_samples`) carry their token ids as sampled (`prompt_tokens`,
    `<key>_tokens`, `<key>_policy`): they are used as they are, never re-encoded, and only the policy's tokens
    are trained."""
    if on_bad_row not in ("skip", "raise"):
        raise ValueError(f"on_bad_row must be 'skip' or 'raise', got {on_bad_row!r}")
    paired, episodes = "chosen" in rows[0], "prompt_tokens" in rows[0]
    keys = ("chosen", "rejected") if paired else ("completion",)
    data = PreferenceData(paired, [], [], [], [], [], trained=[] if episodes else None)
    bad: list[str] = []
    for row in rows:
        where = row["where"]
        problems = [f"{where}: empty {k} completion" for k in keys if not row[k].strip()]
        if paired and row["chosen"] == row["rejected"]:
            problems.append(f"{where}: chosen and rejected are identical ({row['chosen'][:40]!r})")
        if problems:
            bad.extend(problems)
            continue
        if episodes:  # an episode's ids and policy mask, as sampled
            p, comps = row["prompt_tokens"], [row[f"{k}_tokens"] for k in keys]
            if paired and comps[0] == comps[1]:
                bad.append(f"{where}: chosen and rejected are the same episode")
                continue
        else:
            try:
                p = encode_prompt(tokenizer, row["prompt"], system_prompt)
                comps = [tokenizer.encode_completion(row[k]) + [tokenizer.eos_token_id] for k in keys]
            except ValueError as e:
                bad.append(f"{where}: {e}")
                continue
        if max_length is not None:
            if len(p) >= max_length:
                bad.append(f"{where}: the prompt is {len(p)} tokens, which leaves no room in the context of "
                           f"{max_length} tokens")
                continue
            long = [f"prompt + {k} is {len(p) + len(c)} tokens" for k, c in zip(keys, comps)
                    if len(p) + len(c) > max_length]
            if long:
                bad.append(f"{where}: {', '.join(long)}, longer than the context of {max_length} tokens")
                continue
        example = len(data.where)
        for k, c in zip(keys, comps):
            if data.trained is not None:
                data.trained.append(row[f"{k}_policy"])
            data.prompts.append(p)
            data.completions.append(c)
            data.labels.append(1.0 if (k == "chosen" or (k == "completion" and row["label"])) else 0.0)
            data.pairs.append(example)
        data.where.append(where)
    if bad and on_bad_row == "raise":
        raise PreferenceDataError(_report(f"{len(bad)} bad preference row(s) (preference.on_bad_row=raise)", bad))
    data.skipped = bad
    if not data.where:
        raise PreferenceDataError(_report("no usable preference rows remain; every row was bad", bad))
    return data if paired else with_kl_pairs(data)


def load_preferences(source: Any, tokenizer, *, max_length: int | None, on_bad_row: str = "skip",
                     split: str = "train", system_prompt: str | None = None) -> PreferenceData:
    """read_preference_rows + tokenize_preferences."""
    return tokenize_preferences(read_preference_rows(source, split), tokenizer, max_length=max_length,
                                on_bad_row=on_bad_row, system_prompt=system_prompt)


# ---------------------------------------------------------------------------- pairs from the model's own samples

def _episode_tokens(batch: Batch) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Each row's prompt ids, response region ids (policy and environment tokens, up to its last one) and
    policy mask (1 on the tokens the policy sampled), as the episode function laid them out."""
    P = batch.prompt_width
    attn = batch.attention_mask.bool().cpu()
    ids, policy = batch.input_ids.cpu(), batch.response_mask.cpu()
    lengths = attn[:, P:].sum(1).tolist()
    return ([ids[b, :P][attn[b, :P]].tolist() for b in range(len(batch))],
            [ids[b, P:P + n].tolist() for b, n in enumerate(lengths)],
            [policy[b, P:P + n].tolist() for b, n in enumerate(lengths)])


def _episode_pair(members: list[int], scores: list[float], prompts: list[list[int]], failed: list,
                  rng: random.Random) -> tuple[int, int] | None:
    """(chosen, rejected) among one row's episodes: one of the highest reward, one of the lowest reward below it
    with the same prompt (an environment may open episodes differently); episodes that failed are left out.
    None when no two differ."""
    ok = [m for m in members if failed[m] is None]
    if not ok:
        return None
    best = max(scores[m] for m in ok)
    chosen = rng.choice([m for m in ok if scores[m] == best])
    below = [m for m in ok if prompts[m] == prompts[chosen] and scores[m] < best]
    if not below:
        return None
    worst = min(scores[m] for m in below)
    return chosen, rng.choice([m for m in below if scores[m] == worst])


def pairs_from_samples(engine, reward, rows: list[dict], prompt_ids: list[list[int]], *, k: int, params,
                       seed: int = 0, batch_prompts: int = 256,
                       episodes: bool = False) -> tuple[list[dict], dict[str, float]]:
    """Sample k completions per prompt, score them with the verifier, and make one pair per prompt
    that has both: chosen = a correct sample, rejected = a wrong one (drawn at random among each).
    Returns (paired rows, stats).

    `episodes`: `reward` runs task.env's episodes. The k episodes of a prompt are ranked by the environment's
    reward (an episode's sum): chosen = one of the best, rejected = one of the worst below it; a prompt whose
    episodes all score alike makes no pair (counted in pairs/all_wrong when that reward is <= 0, else in
    pairs/all_right), and pairs/sample_accuracy is the mean reward. Each pair keeps its episodes' token ids
    and policy masks (`tokenize_preferences` trains only the policy's tokens, never the observations)."""
    rng = random.Random(seed)
    out, n_samples, n_right, no_right, no_wrong = [], 0, 0.0, 0, 0
    for chunk, batch in episodes_in_chunks(engine, reward, rows, prompt_ids, k, params, seed, batch_prompts,
                                           desc="preference pairs"):
        rewards = batch.rewards.float()
        texts, scores = batch.meta["completion"], (rewards.sum(1) if rewards.dim() == 2 else rewards).tolist()
        n_samples += len(scores)
        n_right += sum(scores)
        if episodes:
            prompts, regions, policy = _episode_tokens(batch)
            failed = batch.meta.get("env_error", [None] * len(batch))
        for j, i in enumerate(chunk):
            if episodes:
                pair = _episode_pair(list(range(j * k, (j + 1) * k)), scores, prompts, failed, rng)
                if pair is None:
                    tie = max((scores[m] for m in range(j * k, (j + 1) * k)), default=0.0)
                    no_right, no_wrong = (no_right + 1, no_wrong) if tie <= 0 else (no_right, no_wrong + 1)
                    continue
                c, r = pair
                out.append({"prompt": rows[i]["prompt"], "chosen": texts[c], "rejected": texts[r],
                            "where": f"prompt {i}", "prompt_tokens": prompts[c], "chosen_tokens": regions[c],
                            "chosen_policy": policy[c], "rejected_tokens": regions[r], "rejected_policy": policy[r]})
                continue
            group = list(zip(texts[j * k:(j + 1) * k], scores[j * k:(j + 1) * k]))
            right = [t for t, s in group if s >= 1.0]
            wrong = [t for t, s in group if s <= 0.0]
            if not right:
                no_right += 1
            elif not wrong:
                no_wrong += 1
            else:
                out.append({"prompt": rows[i]["prompt"], "chosen": rng.choice(right), "rejected": rng.choice(wrong),
                            "where": f"prompt {i}"})
    stats = {"pairs/prompts": float(len(rows)), "pairs/made": float(len(out)),
             "pairs/sample_accuracy": n_right / max(n_samples, 1), "pairs/all_wrong": float(no_right),
             "pairs/all_right": float(no_wrong)}
    return out, stats
