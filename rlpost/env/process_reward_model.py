"""A PROCESS reward model: a score for every reasoning step, learned from Monte-Carlo step labels.

An outcome reward model (rlpost/env/reward_model.py) scores a whole solution. A process reward model
(PRM) scores each step: the probability that a solution which has reached the end of this step will
end with a right answer. Nobody labels steps by hand here; the labels are made the way Math-Shepherd
(Wang et al. 2024, arXiv:2312.08935) makes them:

1. the policy samples `solutions` complete solutions of each training problem;
2. a solution's steps end at each token that writes the separator (";" in the chain-of-thought task
   "57+32=089;089+18=107;#### 107"), and at its last token;
3. from the end of every step but the last, the policy samples `rollouts` continuations; the step's
   label is the fraction that reach a verified answer (Math-Shepherd's "soft estimation"). The last
   step's label is the solution's own verified outcome.

The PRM is a causal-LM trunk (copied from the policy) with a linear head read at every step's last
token, trained by binary cross-entropy against the soft labels:

    loss = mean over labelled steps of  BCE(sigmoid(head(h_t)), q_t)

Held out, a step counts as right when its label is > 0.5, and the PRM's accuracy is how often
sigmoid > 0.5 agrees; where the task can check steps itself (the chain-of-thought task can:
`rlpost.tasks.multistep.step_truth`), the labels' and the PRM's agreement with the truth is reported too.

    examples = mc_step_labels(engine, verify, tokenizer, rows, prompts, solutions=4, rollouts=8, max_new_tokens=32)
    prm = ProcessRewardModel.from_policy(policy)
    fit_prm(prm, train_examples, held_out_examples, pad_id=tokenizer.pad_token_id, epochs=3, batch_size=64, lr=1e-4)
    prm.step_scores(prompts, responses, ends)      # [[p_step1, p_step2, ...], ...]

`rlpost prm` runs all of it (rlpost/commands/prm.py) and trains the Bradley–Terry outcome model on the
same samples (a right against a wrong solution of one problem), so both rerankers of `rlpost search`
have seen the same data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlpost.batch import Batch
from rlpost.models import trunk_hidden_states
from rlpost.packing import micro_batches
from rlpost.progress import progress
from rlpost.env.reward_model import RewardModel, fit_epochs
from rlpost.rollout import SamplingParams

PRM_HEAD_FILE = "prm_head.safetensors"


_SEPARATOR_TOKENS: dict[tuple[int, str], tuple[object, dict[int, bool]]] = {}  # (tokenizer, sep) -> id -> holds sep


def holds_separator(token: int, tokenizer, sep: str) -> bool:
    """Does this token's text hold the separator? (decoded once per token id and tokenizer)"""
    key = (id(tokenizer), sep)
    if key not in _SEPARATOR_TOKENS or _SEPARATOR_TOKENS[key][0] is not tokenizer:
        _SEPARATOR_TOKENS[key] = (tokenizer, {})
    known = _SEPARATOR_TOKENS[key][1]
    if token not in known:
        known[token] = sep in tokenizer.decode([token])
    return known[token]


def step_ends(response: list[int], tokenizer, sep: str = ";") -> list[int]:
    """Indices into `response` of the tokens that end a step: every token whose text holds `sep`, and the last
    token (the eos of a finished response), which ends the final step."""
    ends = [i for i, t in enumerate(response) if holds_separator(t, tokenizer, sep)]
    if response and (not ends or ends[-1] != len(response) - 1):
        ends.append(len(response) - 1)
    return ends


def responses(batch) -> list[list[int]]:
    """Every row's sampled response tokens (eos included when the response finished)."""
    P = batch.prompt_width
    lengths = batch.response_mask.sum(1).tolist()
    return [ids[:n] for ids, n in zip(batch.input_ids[:, P:].tolist(), lengths)]


@dataclass
class StepExample:
    """One solution with its step labels: `ends` index the last token of each step in `response`."""
    row: dict
    prompt: list[int]
    response: list[int]
    ends: list[int]
    labels: list[float]          # Monte-Carlo estimate that the solution ends right, per step
    truth: list[int] | None = None  # the task's own check of each step, where it has one


class ProcessRewardModel(RewardModel):
    """A causal-LM trunk and a linear head read at the last token of every step."""

    head_file = PRM_HEAD_FILE
    kind, command = "process reward model", "prm"

    def step_logits(self, prompts: list[list[int]], responses: list[list[int]], ends: list[list[int]],
                    pad_id: int) -> list[torch.Tensor]:
        """Per solution, the head's logit at each step end (a [n_steps] tensor, with grad)."""
        batch = Batch.for_sft(prompts, responses, pad_id).to(self.head.weight.device)
        h = trunk_hidden_states(self.trunk, batch)
        P = batch.prompt_width
        rows = torch.cat([torch.full((len(e),), i) for i, e in enumerate(ends)]).to(h.device)
        cols = torch.tensor([P + j for e in ends for j in e], device=h.device)
        logits = self.head(h[rows, cols].float()).squeeze(-1)
        return list(logits.split([len(e) for e in ends]))

    @torch.no_grad()
    def step_scores(self, prompts: list[list[int]], responses: list[list[int]], ends: list[list[int]], pad_id: int,
                    batch_size: int = 256, micro_batch_size: int | None = None, micro_batch_tokens: int | None = None,
                    packing: bool | str = False) -> list[list[float]]:
        """Per solution, sigmoid(logit) at each step end: the PRM's probability that the solution ends right.
        `batch_size` solutions are laid out at a time; with `micro_batch_size` / `micro_batch_tokens` /
        `packing` (the trainer's: rlpost.packing.micro_batches) the trunk runs them one micro-batch at a time,
        so no forward holds more than one micro-batch's activations; the scores are the same."""
        out: list[list[float]] = []
        micro = micro_batch_size or micro_batch_tokens or packing
        for i in range(0, len(prompts), batch_size):
            s = slice(i, i + batch_size)
            if micro:
                logits = self._micro_batched_logits(prompts[s], responses[s], ends[s], pad_id, micro_batch_size,
                                                    micro_batch_tokens, packing)
            else:
                logits = self.step_logits(prompts[s], responses[s], ends[s], pad_id)
            out += [torch.sigmoid(x).tolist() for x in logits]
        return out

    def _micro_batched_logits(self, prompts, responses, ends, pad_id, size, max_tokens, packing) -> list[torch.Tensor]:
        """`step_logits`, the trunk run one micro-batch at a time (the head read off each micro-batch's values)."""
        batch = Batch.for_sft(prompts, responses, pad_id).to(self.head.weight.device)
        P = batch.prompt_width
        values = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
        share = getattr(self.trunk, "can_share_prompt", False)  # as head_values' trunk_hidden_states will
        for rows, mb, packed in micro_batches(batch, size, max_tokens, packing, share):
            values[rows] = self.head_values(mb, packed)
        return [values[b, [P + j for j in e]] for b, e in enumerate(ends)]


# ---------------------------------------------------------------------------- Monte-Carlo labels

@torch.no_grad()
def mc_step_labels(engine, verify: Callable[[str, dict], float], tokenizer, rows: list[dict],
                   prompt_ids: list[list[int]], *, solutions: int, rollouts: int, max_new_tokens: int,
                   sep: str = ";", temperature: float = 1.0, seed: int = 0, batch_prompts: int = 256,
                   truth: Callable[[str, dict], list[int]] | None = None, success: float = 1.0,
                   desc: str = "prm labels") -> list[StepExample]:
    """`solutions` sampled solutions of each row, each step labelled by `rollouts` continuations from its end
    (the fraction verified: reward >= `success`); the last step by the solution's own outcome."""
    examples: list[StepExample] = []
    bar = progress(total=len(rows), desc=desc)
    for c in range(0, len(rows), batch_prompts):
        chunk_rows, chunk_prompts = rows[c:c + batch_prompts], prompt_ids[c:c + batch_prompts]
        batch = engine.generate(chunk_prompts, solutions, SamplingParams(max_new_tokens=max_new_tokens,
                                                                         temperature=temperature), seed=seed + c)
        todo = []  # (example index, step index, prefix prompt ids, tokens left)
        for i, response in enumerate(responses(batch)):
            row, prompt = chunk_rows[i // solutions], chunk_prompts[i // solutions]
            text = tokenizer.decode(response)
            ends = step_ends(response, tokenizer, sep)
            outcome = float(verify(text, row) >= success)
            ex = StepExample(row, prompt, response, ends, [0.0] * (len(ends) - 1) + [outcome],
                             truth(text, row)[:len(ends)] if truth else None)
            if ex.truth is not None and len(ex.truth) < len(ends):
                ex.truth += [0] * (len(ends) - len(ex.truth))
            examples.append(ex)
            for j, e in enumerate(ends[:-1]):
                todo.append((len(examples) - 1, j, prompt + response[:e + 1], max_new_tokens - e - 1))
        for budget in sorted({t[3] for t in todo}):  # one generate per distinct number of tokens left
            group = [t for t in todo if t[3] == budget]
            out = engine.generate([t[2] for t in group], rollouts,
                                  SamplingParams(max_new_tokens=max(budget, 1), temperature=temperature),
                                  seed=seed + 7919 * (c + 1) + budget)
            conts = responses(out)
            for g, (ex_i, j, _, _) in enumerate(group):
                ex = examples[ex_i]
                head = tokenizer.decode(ex.response[:ex.ends[j] + 1])
                hits = [verify(head + tokenizer.decode(conts[g * rollouts + r]), ex.row) >= success
                        for r in range(rollouts)]
                ex.labels[j] = sum(hits) / rollouts
        bar.update(len(chunk_rows))
    bar.close()
    return examples


# ---------------------------------------------------------------------------- fitting

def prm_loss(prm: ProcessRewardModel, examples: list[StepExample],
             pad_id: int) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE of the step logits against the soft labels, mean over the labelled steps of `examples`."""
    logits = torch.cat(prm.step_logits([e.prompt for e in examples], [e.response for e in examples],
                                       [e.ends for e in examples], pad_id))
    target = torch.tensor([q for e in examples for q in e.labels], device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, target)
    return loss, {"prm/loss": loss.item()}


@torch.no_grad()
def evaluate_prm(prm: ProcessRewardModel, examples: list[StepExample], pad_id: int,
                 batch_size: int = 256) -> dict[str, float]:
    """Held-out step accuracy against the Monte-Carlo labels (right: label > 0.5), BCE, and, where the task
    checks steps itself, the PRM's and the labels' agreement with that truth."""
    prm.eval()
    scores = prm.step_scores([e.prompt for e in examples], [e.response for e in examples],
                             [e.ends for e in examples], pad_id, batch_size)
    p = torch.tensor([s for ss in scores for s in ss])
    q = torch.tensor([x for e in examples for x in e.labels])
    out = {"prm/eval_step_accuracy": ((p > 0.5) == (q > 0.5)).float().mean().item(),
           "prm/eval_bce": F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), q).item(),
           "prm/eval_steps": float(len(q)), "prm/eval_label_mean": q.mean().item()}
    if all(e.truth is not None for e in examples):
        t = torch.tensor([x for e in examples for x in e.truth]).bool()
        out["prm/eval_truth_accuracy"] = ((p > 0.5) == t).float().mean().item()
        out["prm/label_truth_agreement"] = ((q > 0.5) == t).float().mean().item()
    return out


def fit_prm(prm: ProcessRewardModel, train: list[StepExample], held_out: list[StepExample] | None, *, pad_id: int,
            epochs: int, batch_size: int, lr: float, seed: int = 0,
            log: Callable[[dict], None] | None = None) -> dict[str, float]:
    """BCE training of the step head (and trunk) with AdamW (the reward model's loop,
    `rlpost.env.reward_model.fit_epochs`); held-out metrics after every epoch. Returns the last epoch's."""
    if not train:
        raise ValueError("the PRM has no labelled solutions to train on")
    return fit_epochs(prm, len(train), lambda idx: prm_loss(prm, [train[i] for i in idx], pad_id),
                      (lambda: evaluate_prm(prm, held_out, pad_id)) if held_out else None,
                      name="prm", epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, log=log)
