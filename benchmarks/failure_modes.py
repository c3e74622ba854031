"""The failure modes of RL post-training, each shown by a run with one knob set wrong.

    .venv/bin/python benchmarks/failure_modes.py            # SFT once per recipe, then one short RL run per row
    .venv/bin/python benchmarks/failure_modes.py --steps 40 --out runs/failures
    .venv/bin/python benchmarks/failure_modes.py --only "healthy cot_math (its recipe),entropy collapse"

Every row starts from its recipe's SFT checkpoint (made once and reused by every row of that recipe) and
runs `--steps` GRPO steps of that recipe with one change. Four rows use the default recipe (4-token answers);
the entropy and length rows and their healthy run use `recipes/cot_math.yaml` (chain of thought, ~30-token
responses), with rollout.max_new_tokens=64 and an SFT of 400 steps (made with the same max_new_tokens, which
sizes the model's context). The script prints, for each run, the metric of `rlpost report` that shows the symptom:
its mean over the first and the last fifth of the steps, next to the healthy run's, and the held-out pass@1
at the end.

    symptom              knob set wrong                          metric that shows it
    stalled reward       rollout.k=1 (a group of one sample)     rollout/degenerate_group_frac = 1, reward flat
    KL blow-up           trainer.lr x 25                         loss/kl_ref
    log-prob mismatch    rl.topology=async, max_staleness=4,     rollout/logp_mismatch_max (samples from
                         no rollout correction                   weights 4 versions old)
    entropy collapse     cot_math, algorithm.entropy_coef=-1.0   train/entropy towards 0,
                         (an entropy penalty, not a bonus)       rollout/degenerate_group_frac towards 1
    length explosion     cot_math, task.rewards = the verifier   rollout/response_len_mean and
                         + 0.02 per character (length_bonus)     rollout/truncated_frac, reward/math falling

Reward hacking needs a reward model: `recipes/rlhf.yaml` is that run (docs/preference.md). On the default
task neither a 5x learning rate, nor an entropy penalty, nor a reward paid per character moved entropy or
length within 40 steps; on cot_math a 5x or 10x learning rate blows the KL up (entropy rises) instead of
collapsing it, and a milder penalty (-0.05, -0.2), rollouts at temperature 0.5 or symmetric clipping
(clip_high=0.2 with trainer.minibatches=4) did not collapse it (docs/watching.md has the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlpost.config import load_config  # noqa: E402
from rlpost.run import train  # noqa: E402


COT = "recipes/cot_math.yaml"
# recipe -> (its SFT run's name, the SFT run's overrides, every RL run's overrides). cot_math's responses may be
# 64 tokens long (its recipe: 32), so that a length explosion has room; the model's context is sized from it at SFT.
RECIPES = {None: ("sft", [], []),
           COT: ("sft_cot_math", ["sft.steps=400", "rollout.max_new_tokens=64"], ["rollout.max_new_tokens=64"])}


def length_bonus(completion: str, row: dict, per_char: float = 1.0) -> float:
    """A reward term that pays for length: `per_char` per character of the completion (a "thoroughness"
    bonus, or a reward model that prefers long answers). In task.rewards beside the verifier it is the
    wrong knob of the length-explosion row."""
    return per_char * len(completion)


LENGTH_REWARD = ("task.rewards=[{name: math, weight: 1.0, extract: hash}, "
                 "{name: 'benchmarks.failure_modes:length_bonus', weight: 0.02}]")

ROWS = [  # name, recipe (None: the default), overrides, metrics to show
    ("healthy (the default)", None, [], ["reward/mean", "loss/kl_ref", "train/entropy", "rollout/logp_mismatch_max",
                                         "rollout/response_len_mean"]),
    ("stalled reward", None, ["rollout.k=1"], ["reward/mean", "rollout/degenerate_group_frac"]),
    ("KL blow-up", None, ["trainer.lr=5e-3"], ["loss/kl_ref", "reward/mean"]),
    ("log-prob mismatch", None, ["rl.topology=async", "rl.max_staleness=4"],
     ["rollout/logp_mismatch_max", "rollout/staleness_max"]),
    ("healthy cot_math (its recipe)", COT, [], ["reward/mean", "train/entropy", "rollout/degenerate_group_frac",
                                                "rollout/response_len_mean", "rollout/truncated_frac"]),
    ("entropy collapse", COT, ["algorithm.entropy_coef=-1.0"],
     ["train/entropy", "reward/mean", "rollout/degenerate_group_frac"]),
    ("length explosion", COT, ["task.reward=null", "task.reward_options={}", LENGTH_REWARD,  # pass@1: the verifier's
                               "eval.reward=math", "eval.reward_options={extract: hash}"],
     ["rollout/response_len_mean", "rollout/truncated_frac", "reward/math", "reward/mean"]),
]


def fifths(lines: list[dict], key: str) -> tuple[float, float]:
    vals = [m[key] for m in lines if isinstance(m.get(key), (int, float))]
    if not vals:
        return float("nan"), float("nan")
    n = max(len(vals) // 5, 1)
    return statistics.mean(vals[:n]), statistics.mean(vals[-n:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="RL steps per run (default 40)")
    p.add_argument("--out", default="runs/failures", help="where the runs go (default runs/failures)")
    p.add_argument("--only", help="comma-separated row names to run (default all)")
    args = p.parse_args()

    rows = [r for r in ROWS if not args.only or r[0] in args.only.split(",")]
    sfts = {}
    for recipe in dict.fromkeys(r[1] for r in rows):  # each recipe's SFT once, reused by its rows
        sft_run, sft_overrides, _ = RECIPES[recipe]
        sfts[recipe] = os.path.join(args.out, sft_run, "checkpoints", "sft")
        if not os.path.isdir(sfts[recipe]):
            train(load_config(recipe, [f"out_dir={args.out}", f"run_name={sft_run}", "rl.steps=0", *sft_overrides]))
    results = []
    for name, recipe, overrides, keys in rows:
        run = name.split(" (")[0].replace(" ", "_").replace("-", "_")
        base = [f"model.name={sfts[recipe]}", "sft.steps=0", f"rl.steps={args.steps}", "rl.eval_every=0",
                "rl.save_every=0", f"out_dir={args.out}", "eval.samples_per_prompt=2", *RECIPES[recipe][2]]
        if not os.path.exists(os.path.join(args.out, run, "summary.json")):
            train(load_config(recipe, [*base, *overrides, f"run_name={run}"]))
        with open(os.path.join(args.out, run, "metrics.jsonl")) as f:
            lines = [m for m in map(json.loads, f) if m.get("stage") == "rl"]
        with open(os.path.join(args.out, run, "summary.json")) as f:
            summary = json.load(f)
        results.append((name, recipe, overrides, {k: fifths(lines, k) for k in keys}, summary.get("pass@1_rl")))

    print(f"\n{args.steps} GRPO steps from {', '.join(sfts.values())}; each metric: mean of the first -> the "
          "last fifth of the steps\n")
    for name, recipe, overrides, shown, pass1 in results:
        knobs = " ".join([*([recipe] if recipe else []), *overrides]) or "-"
        cells = "; ".join(f"{k} {a:.3g} -> {b:.3g}" for k, (a, b) in shown.items())
        print(f"{name:<30} {knobs:<60} {cells}; held-out pass@1 {pass1 if pass1 is None else f'{100 * pass1:.1f}%'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
