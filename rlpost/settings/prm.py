"""prm.*: the process reward model: `rlpost prm` trains one, prm.path uses one as the RL reward."""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.schema import LEARNING_RATE, ConfigError, Section, above, at_least, opt

# prm.reward: how a step's PRM score becomes its reward (rlpost/env/process_reward.py)
PRM_REWARDS = ("score", "delta")


@dataclass
class PRMConfig(Section):
    problems: int = opt(1000, "`rlpost prm`: training problems whose sampled solutions are step-labelled", at_least(1))
    eval_problems: int = opt(200, "`rlpost prm`: held-out problems labelled the same way (step-label accuracy)",
                             at_least(1))
    solutions: int = opt(4, "solutions sampled per problem (rollout.temperature, rollout.max_new_tokens)", at_least(1))
    rollouts: int = opt(8, "Monte-Carlo continuations from the end of each step; a step's label is the fraction "
                           "that reach a verified answer", at_least(1))
    separator: str = opt(";", "a token holding this text ends a reasoning step (the last token ends the last step)")
    epochs: int = opt(3, "passes over the labelled solutions", at_least(1))
    batch_size: int = opt(64, "solutions per step", at_least(1))
    lr: float = opt(1e-4, "AdamW learning rate of the PRM", LEARNING_RATE)
    orm: bool = opt(True, "also fit the Bradley-Terry outcome reward model on the same samples (a right against a "
                          "wrong solution of one problem; reward_model.epochs / batch_size / lr)")
    path: str | None = opt(None, "process rewards in RL: a PRM folder (a `rlpost prm` run's checkpoints/prm) with the "
                                 "policy's tokenizer; the RL reward becomes the verifier's outcome on the last "
                                 "token plus coef x the PRM's reward of each step on the step's last token "
                                 "(None: off)")
    coef: float = opt(1.0, "weight of the PRM's step rewards against the outcome (1 on a right answer)", above(0))
    reward: str = opt("delta", "a step's reward: 'delta', its PRM score minus the previous step's (a response's "
                               "steps sum to coef x the final score, whatever their number), or 'score', the "
                               "score itself (pays every step, so longer solutions collect more)",
                      choices=PRM_REWARDS)

    def check(self, prefix: str) -> None:
        if not self.separator:
            raise ConfigError(f"config key '{prefix}separator' must be a non-empty string (the text that ends a step)")
