"""`rlpost dpo`: offline preference optimisation without RL, as a stage list given to the run.

The run is `rlpost train`'s with the `stages` key set to [sft, eval, preference, eval] (sft only when
sft.steps > 0): the config is loaded with that list, not changed after loading, so it is validated as the
run it is and saved as such in the run directory.
"""

from __future__ import annotations

import argparse
import json

from rlpost.commands.common import error, recipe_and_overrides, recipe_arguments, recipe_base, run_job
from rlpost.config import Config, ConfigError, load_config
from rlpost.preference import available as preference_losses
from rlpost.run import train


def add_dpo(sub) -> None:
    p = sub.add_parser(
        "dpo", help="offline preference optimisation (DPO, IPO, KTO, ORPO, SimPO): SFT (sft.steps) then the loss",
        description="Run a recipe with the preference stage and without RL: SFT when sft.steps > 0, then the "
                    "preference loss on preference.train_file (JSONL or a `datasets` dataset) or, without one, on "
                    "pairs built from the model's own samples scored by the task's verifier. Same keys as "
                    "`rlpost train --help` (section preference.*).",
        epilog="preference losses:\n" + "\n".join(f"  {n:<8} {d}" for n, d in preference_losses().items())
               + "\n\ne.g. rlpost dpo --loss ipo preference.loss.beta=0.5 preference.train_file=prefs.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe_arguments(p)
    p.add_argument("--loss", choices=sorted(preference_losses()), help="the preference loss, with its defaults")


def dpo_stages(cfg: Config) -> list[str]:
    """The stages of `rlpost dpo` for a config without a stage list: [sft, eval, preference, eval], sft only when
    sft.steps > 0; a reward_model or rejection stage its section switches on stays where `rlpost train` puts it
    (the run is the default order with the preference stage in and the RL stage out)."""
    names = (["sft"] if cfg.sft.steps > 0 else []) + ["eval", "preference", "eval"]
    if cfg.reward_model.train or cfg.reward_model.path:
        names.append("reward_model")
    if cfg.rejection.enabled:
        names += ["rejection", "eval"]
    return names


def dpo_config(recipe: str | None, overrides: list[str]) -> Config:
    """The recipe and overrides loaded with `dpo_stages` as their `stages` list; a recipe or override that
    gives a stage list of its own is refused (it runs with `rlpost train`)."""
    cfg = load_config(recipe, overrides)
    if cfg.stages is not None:
        raise ConfigError("`rlpost dpo` runs SFT then the preference stage; a recipe with a `stages` "
                          "list runs with `rlpost train`")
    return load_config(recipe, [*overrides, "stages=" + json.dumps(dpo_stages(cfg))])


def cmd_dpo(args) -> int:
    recipe, overrides = recipe_and_overrides(args)
    if args.loss:
        overrides = [f"preference.loss={{name: {args.loss}}}", *overrides]
    try:
        cfg = dpo_config(recipe, overrides)
    except (ConfigError, ValueError) as e:
        return error(e, 2)
    return run_job(lambda: train(cfg, f"{recipe_base(recipe)}-dpo"))
