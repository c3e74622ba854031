"""SEARCH at test time: spend about N samples' worth of generated tokens on a problem, answer once.

    rlpost search runs/<sft run> --prm runs/<prm run>/checkpoints/prm --orm runs/<prm run>/checkpoints/orm \\
        --n 1 4 16 64

Methods (each picks one final solution per problem; accuracy is the verifier's on that one):

    greedy            one solution at temperature 0 (the N = 1 baseline)
    majority          N samples, the most common final answer (self-consistency; no reward model)
    bon_orm           N samples, the one the outcome reward model scores highest
    bon_prm_min       N samples, ranked by the PRM's step scores aggregated by their minimum ...
    bon_prm_last      ... by the last step's score (the PRM's estimate that the solution ends right) ...
    bon_prm_product   ... by their product
    beam              PRM-guided beam search over steps: N candidates for the first step, the best N/W by
                      the PRM kept, each extended by W samples of its next step, again and again until the
                      kept beams have finished; the finished solution with the best last-step score wins
    mcts              Monte-Carlo tree search over steps: select by UCT down the tree of step prefixes,
                      expand one step, roll out to the end, back up the PRM's score of the finished
                      solution; stops when its tokens reach N times the mean solution length; the answer is
                      the best-scored solution under the most visited path

Compute is counted in generated tokens (the policy's forward passes; the reward models' scoring is not
counted), and reported beside every accuracy: best-of-N methods generate N solutions, beam search about
N solutions' worth (each kept beam continues W ways), MCTS exactly its token budget. A step ends at the
separator (`prm.separator`) or at the end of the solution, as in rlpost/env/process_reward_model.py.

Best-of-N for every N reuses the first N of one set of `max(N)` samples per problem, as is usual (the
estimate for small N has the same samples as for large N). Beam search and MCTS run once per N.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rlpost.batch import Batch
from rlpost.env.process_reward_model import ProcessRewardModel, holds_separator, responses, step_ends
from rlpost.env.reward_model import RewardModel
from rlpost.env.verifiers import reward_from_config
from rlpost.heldout import checkpoint_config, majority_answer
from rlpost.models import encode_prompt, load_model
from rlpost.progress import progress
from rlpost.rollout import SamplingParams, build_engine
from rlpost.tasks import load_task
from rlpost.tasks.multistep import step_truth

METHODS = ("greedy", "majority", "bon_orm", "bon_prm_min", "bon_prm_last", "bon_prm_product", "beam", "mcts")
AGGREGATES = {"min": min, "last": lambda s: s[-1], "product": math.prod}


@dataclass
class Node:
    """A step prefix of one problem's solution in the MCTS tree."""
    response: list[int]
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0                 # sum of backed-up scores
    solutions: list[tuple[float, list[int]]] = field(default_factory=list)  # (score, finished solution) made here
    terminal: bool = False

    def q(self) -> float:
        return self.value / self.visits if self.visits else 0.0


class Searcher:
    """The policy's engine, the reward models and the budgets: each method takes the problems' prompts and
    returns, per problem, (the chosen response's token ids, the tokens generated for it)."""

    def __init__(self, engine, tokenizer, *, max_new_tokens: int, prm: ProcessRewardModel | None = None,
                 orm: RewardModel | None = None, sep: str = ";", temperature: float = 1.0, width: int = 4,
                 c_uct: float = 1.0, seed: int = 0, answer_key: Callable[[str], object] | None = None):
        self.engine, self.tokenizer, self.prm, self.orm = engine, tokenizer, prm, orm
        self.max_new_tokens, self.sep, self.temperature, self.width, self.c_uct = (max_new_tokens, sep, temperature,
                                                                                  width, c_uct)
        self.seed, self.answer_key = seed, answer_key or (lambda text: text.strip() or None)
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        self._calls = 0
        self._answers: dict[str, object] = {}  # completion text -> its final answer (majority vote)
        self._scores: dict[str, dict[tuple, object]] = {}  # "orm"/"prm" -> (prompt, response) -> its score(s)

    # -- generation ---------------------------------------------------------------------------------------

    def finished(self, response: list[int]) -> bool:
        """Is this (partial) solution over: ended by eos, by the token budget, or by anything but a separator?"""
        return bool(response) and (response[-1] == self.eos or len(response) >= self.max_new_tokens
                                   or not holds_separator(response[-1], self.tokenizer, self.sep))

    def extend(self, prompts: list[list[int]], partials: list[list[int]], k: int, one_step: bool,
               temperature: float | None = None) -> list[list[list[int]]]:
        """k continuations of each partial response: its next step (`one_step`) or the rest of the solution."""
        out: list[list[list[int]]] = [[] for _ in prompts]
        left = [self.max_new_tokens - len(p) for p in partials]
        for budget in sorted(set(left)):  # one generate per distinct number of tokens left
            idx = [i for i, b in enumerate(left) if b == budget]
            self._calls += 1
            batch = self.engine.generate(
                [prompts[i] + partials[i] for i in idx], k,
                SamplingParams(max_new_tokens=budget, temperature=self.temperature if temperature is None
                               else temperature, stop=[self.sep] if one_step else []),
                seed=self.seed + 104729 * self._calls)
            rs = responses(batch)
            for j, i in enumerate(idx):
                out[i] = rs[j * k:(j + 1) * k]
        return out

    # -- scoring ------------------------------------------------------------------------------------------

    def prm_scores(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        if self.prm is None:
            raise ValueError("this search method needs a process reward model (--prm)")
        return self.prm.step_scores(prompts, responses, [step_ends(r, self.tokenizer, self.sep) for r in responses],
                                    self.pad)

    @torch.no_grad()
    def orm_scores(self, prompts: list[list[int]], responses: list[list[int]], batch_size: int = 256) -> list[float]:

        if self.orm is None:
            raise ValueError("bon_orm needs an outcome reward model (--orm)")
        out = []
        for i in range(0, len(prompts), batch_size):
            rows = Batch.for_sft(prompts[i:i + batch_size], responses[i:i + batch_size], self.pad)
            out += self.orm.score(rows).tolist()
        return out

    # -- methods ------------------------------------------------------------------------------------------

    def greedy(self, prompts: list[list[int]]) -> list[tuple[list[int], int]]:
        sols = self.extend(prompts, [[] for _ in prompts], 1, one_step=False, temperature=0.0)
        return [(s[0], len(s[0])) for s in sols]

    def sample(self, prompts: list[list[int]], n: int) -> list[list[list[int]]]:
        """n solutions of each problem (what every best-of-N method reranks)."""
        return self.extend(prompts, [[] for _ in prompts], n, one_step=False)

    def best_of_n(self, prompts: list[list[int]], samples: list[list[list[int]]], n: int,
                  method: str) -> list[tuple[list[int], int]]:
        """Pick one of the first n samples of each problem by `method` (majority, bon_orm, bon_prm_<agg>)."""
        cands = [s[:n] for s in samples]
        flat_p = [p for p, c in zip(prompts, cands) for _ in c]
        flat_r = [r for c in cands for r in c]
        if method == "majority":  # answers extracted once per distinct text (every N reuses the same samples)
            texts = [self.tokenizer.decode(r) for r in flat_r]
            for t in set(texts) - self._answers.keys():
                self._answers[t] = self.answer_key(t)
            keys = [self._answers[t] for t in texts]
        else:  # each sample is scored once, whatever the N and the aggregate
            model = "orm" if method == "bon_orm" else "prm"
            score = self.orm_scores if model == "orm" else self.prm_scores
            cache = self._scores.setdefault(model, {})
            new = list({(tuple(p), tuple(r)): (p, r) for p, r in zip(flat_p, flat_r)
                        if (tuple(p), tuple(r)) not in cache}.items())
            for (key, _), value in zip(new, score([p for _, (p, _) in new], [r for _, (_, r) in new])):
                cache[key] = value
            keys = [cache[(tuple(p), tuple(r))] for p, r in zip(flat_p, flat_r)]
            if model == "prm":
                keys = [AGGREGATES[method.rsplit("_", 1)[1]](s) for s in keys]
        picks, at = [], 0
        for c in cands:
            ks = keys[at:at + len(c)]
            if method == "majority":  # the first sample that gives the winning answer (the first if none has one)
                winner = majority_answer(ks)
                best = ks.index(winner) if winner is not None else 0
            else:
                best = max(range(len(c)), key=lambda i: (ks[i], -i))
            picks.append((c[best], sum(len(r) for r in c)))
            at += len(c)
        return picks

    def beam(self, prompts: list[list[int]], n: int) -> list[tuple[list[int], int]]:
        """PRM-guided beam search: keep max(n // width, 1) beams, each extended n // beams ways per step."""
        keep = max(n // self.width, 1)
        beams: list[list[list[int]]] = [[[]] for _ in prompts]  # per problem: the partial responses still growing
        done: list[list[tuple[float, list[int]]]] = [[] for _ in prompts]
        tokens = [0] * len(prompts)
        k = n  # the first step: n samples of the empty prefix; every later step: n // keep of each kept beam
        while any(beams):
            todo = [(i, b) for i, bs in enumerate(beams) for b in bs]
            conts = self.extend([prompts[i] for i, _ in todo], [b for _, b in todo], k, one_step=True)
            k = n // keep
            cands = []
            for (i, b), cs in zip(todo, conts):
                tokens[i] += sum(len(c) for c in cs)
                cands += [(i, b + c) for c in cs]
            scores = self.prm_scores([prompts[i] for i, _ in cands], [r for _, r in cands])
            ranked: list[list[tuple[float, list[int]]]] = [[] for _ in prompts]
            for (i, r), s in zip(cands, scores):
                ranked[i].append((s[-1], r))
            for i, rs in enumerate(ranked):
                if not rs:
                    continue
                best = sorted(rs, key=lambda x: -x[0])[:keep - len(done[i])]  # stable: ties keep sampling order
                done[i] += [x for x in best if self.finished(x[1])]
                beams[i] = [r for _, r in best if not self.finished(r)]
        return [(max(d, key=lambda x: x[0])[1], t) for d, t in zip(done, tokens)]

    def mcts(self, prompts: list[list[int]], budget: float) -> list[tuple[list[int], int]]:
        """MCTS over steps until each problem has generated `budget` tokens (see the module docstring)."""
        roots = [Node([]) for _ in prompts]
        tokens = [0] * len(prompts)
        stalls = [0] * len(prompts)        # iterations that only revisited finished leaves (no tokens)
        while True:
            live = [i for i in range(len(prompts)) if tokens[i] < budget and stalls[i] < 64]
            if not live:
                break
            leaves = {i: self._select(roots[i]) for i in live}
            grow = [i for i in live if not leaves[i].terminal]
            for i in live:
                if leaves[i].terminal:      # a finished solution: back up its score again, nothing generated
                    stalls[i] += 1
                    self._backup(leaves[i], leaves[i].q())
            if not grow:
                continue
            steps = self.extend([prompts[i] for i in grow], [leaves[i].response for i in grow], 1, one_step=True)
            children = []
            for i, s in zip(grow, steps):
                tokens[i] += len(s[0])
                child = Node(leaves[i].response + s[0], parent=leaves[i])
                child.terminal = self.finished(child.response)
                leaves[i].children.append(child)
                children.append(child)
            finals = [c.response for c in children]  # each child's finished solution: itself, or its rollout
            need = [j for j, c in enumerate(children) if not c.terminal]
            rolls = self.extend([prompts[grow[j]] for j in need], [finals[j] for j in need], 1, one_step=False)
            for j, r in zip(need, rolls):
                tokens[grow[j]] += len(r[0])
                finals[j] = finals[j] + r[0]
            scores = self.prm_scores([prompts[i] for i in grow], finals)
            for c, final, s in zip(children, finals, scores):
                c.solutions.append((s[-1], final))
                self._backup(c, s[-1])
        return [(self._answer(r), t) for r, t in zip(roots, tokens)]

    def _select(self, node: Node) -> Node:
        while not node.terminal and len(node.children) >= self.width:
            log_n = math.log(node.visits)
            node = max(node.children, key=lambda c: c.q() + self.c_uct * math.sqrt(log_n / (1 + c.visits)))
        return node

    @staticmethod
    def _backup(node: Node | None, value: float) -> None:
        while node is not None:
            node.visits += 1
            node.value += value
            node = node.parent

    @staticmethod
    def _answer(root: Node) -> list[int]:
        """The best-scored finished solution under the most visited path's end."""
        node = root
        while node.children:
            node = max(node.children, key=lambda c: (c.visits, c.q()))
        stack, best = [node], None
        while stack:
            x = stack.pop()
            stack += x.children
            for s in x.solutions:
                best = s if best is None or s[0] > best[0] else best
        return best[1] if best is not None else node.response


class StepCheckPRM:
    """The chain-of-thought task's own step check as a PRM (`rlpost search --prm step-check`): a step scores 1
    when it and every step before it write the right partial sums, else 0. No learned PRM can do better, so
    it separates what a search method gains from what its PRM gets wrong."""

    def __init__(self, tokenizer, sep: str = ";"):
        self.tokenizer, self.sep = tokenizer, sep

    def step_scores(self, prompts: list[list[int]], responses: list[list[int]], ends: list[list[int]],
                    pad_id: int) -> list[list[float]]:
        out = []
        for p, r, e in zip(prompts, responses, ends):
            truth = step_truth(self.tokenizer.decode(r), {"prompt": self.tokenizer.decode(p)}, self.sep)
            out.append([float(all(truth[:j + 1])) for j in range(len(e))])
        return out


# ---------------------------------------------------------------------------- the table

def run_search(searcher: Searcher, rows: list[dict], prompts: list[list[int]], verify: Callable[[str, dict], float],
               ns: list[int], methods: list[str], success: float = 1.0,
               log: Callable[[str], None] = print) -> list[dict]:
    """Every method at every N: held-out accuracy and generated tokens per problem, one dict per cell."""
    tok = searcher.tokenizer

    def cell(method, n, picks):
        acc = sum(verify(tok.decode(r), row) >= success for (r, _), row in zip(picks, rows)) / len(rows)
        res = {"method": method, "n": n, "accuracy": acc, "tokens_per_problem": sum(t for _, t in picks) / len(rows)}
        log(f"  {method:<16} N={n:<3} accuracy {100 * acc:5.1f}%  tokens/problem {res['tokens_per_problem']:7.1f}")
        return res

    results = []
    if "greedy" in methods:
        results.append(cell("greedy", 1, searcher.greedy(prompts)))
    bon = [m for m in methods if m == "majority" or m.startswith("bon_")]
    mean_len = None
    if bon or "mcts" in methods:
        samples = searcher.sample(prompts, max(ns))
        mean_len = sum(len(r) for s in samples for r in s) / sum(len(s) for s in samples)
        for n in ns:
            for m in bon:
                results.append(cell(m, n, searcher.best_of_n(prompts, samples, n, m)))
    bar = progress(total=len(ns) * (("beam" in methods) + ("mcts" in methods)), desc="search")
    for n in ns:
        if "beam" in methods:
            results.append(cell("beam", n, searcher.beam(prompts, n)))
            bar.update()
        if "mcts" in methods:
            results.append(cell("mcts", n, searcher.mcts(prompts, n * mean_len)))
            bar.update()
    bar.close()
    return results


def markdown_table(results: list[dict], ns: list[int]) -> str:
    """Methods as rows, N as columns: 'accuracy % (tokens per problem)'."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    lines = ["| method | " + " | ".join(f"N = {n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    for m in methods:
        cells = []
        for n in ns:
            r = next((r for r in results if r["method"] == m and r["n"] == n), None)
            cells.append(f"{100 * r['accuracy']:.1f} % ({r['tokens_per_problem']:.0f})" if r else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the command

def search_command(policy: str, recipe: str | None, overrides: list[str], *, prm: str | None, orm: str | None,
                   ns: list[int], methods: list[str] | None, problems: int | None, width: int,
                   out: str | None) -> dict:
    """`rlpost search POLICY`: every method at every N on the task's held-out problems; writes search.json
    (every cell, the markdown table, the wall-clock) and returns it."""
    import json
    import os
    import time

    t0 = time.perf_counter()
    cfg, run_dir = checkpoint_config(policy, recipe, overrides, "rlpost search")
    for name, folder in (("--prm", prm), ("--orm", orm)):
        if folder and folder != "step-check" and not os.path.isdir(folder):
            raise ValueError(f"rlpost search: {name} {folder}: no such model folder")
    if not ns or min(ns) < 1:
        raise ValueError(f"rlpost search: --n takes budgets >= 1, got {ns}")
    if width < 1 or (problems is not None and problems < 1):
        raise ValueError(f"rlpost search: --width and --problems must be >= 1, got {width} and {problems}")
    methods = methods or [m for m in METHODS if (orm or m != "bon_orm")
                          and (prm or not (m.startswith("bon_prm") or m in ("beam", "mcts")))]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"rlpost search: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.task)
    model, tokenizer = load_model(cfg.model, task.alphabet)
    model.eval()
    if prm == "step-check" and task.name != "multistep":
        raise ValueError(f"--prm step-check is the chain-of-thought task's own step check; task {task.name!r} "
                         "has none")
    prm_model = (StepCheckPRM(tokenizer, cfg.prm.separator) if prm == "step-check"
                 else ProcessRewardModel.load(prm)[0] if prm else None)
    orm_model = RewardModel.load(orm)[0] if orm else None
    verify = reward_from_config(cfg.task, task.verify)
    rows = task.eval_rows[:problems] if problems is not None else task.eval_rows
    prompts = [encode_prompt(tokenizer, r["prompt"], task.system_prompt) for r in rows]
    engine = build_engine(cfg.rollout.engine, model, tokenizer, share_weights=True,
                          vllm_gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization)
    searcher = Searcher(engine, tokenizer, max_new_tokens=cfg.rollout.max_new_tokens, prm=prm_model, orm=orm_model,
                        sep=cfg.prm.separator, temperature=cfg.rollout.temperature, width=width, seed=cfg.seed,
                        answer_key=verify.final_answer)
    print(f"rlpost search: {len(rows)} held-out problems of {task.name!r}, N in {ns}, methods {', '.join(methods)}")
    try:
        with torch.no_grad():
            results = run_search(searcher, rows, prompts, verify, sorted(ns), methods,
                                 success=cfg.eval.success_threshold)
    finally:
        engine.close()
    table = markdown_table(results, sorted(ns))
    summary = {"policy": cfg.model.name, "prm": prm, "orm": orm, "task": task.name, "problems": len(rows),
               "width": width, "temperature": cfg.rollout.temperature, "results": results, "table": table,
               "wall_seconds": time.perf_counter() - t0}
    path = out or os.path.join(run_dir or ".", "search.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    summary["written_to"] = path
    return summary
