"""preference.*: offline preference optimisation, the DPO family (rlpost/preference/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlpost.schema import LEARNING_RATE, Section, at_least, opt

ON_BAD_ROW = ("skip", "raise")  # preference.on_bad_row


@dataclass
class PreferenceConfig(Section):
    enabled: bool = opt(False, "rlpost train: run the preference stage (DPO family) between SFT and RL; "
                               "`rlpost dpo` always runs it, and no RL")
    loss: dict[str, Any] = opt({"name": "dpo"}, "preference loss and its parameters: dpo | ipo | kto | orpo | simpo "
                                                "(e.g. preference.loss.beta=0.2)",
                               plugin="rlpost.preference:get_preference_loss")
    train_file: str | None = opt(None, "preference data: a JSONL file, a folder saved by `datasets` or a dataset id "
                                       "(None: pairs from the model's own samples, scored by the task's verifier)")
    eval_file: str | None = opt(None, "held-out preference data (same formats): loss, accuracy, margin after training")
    split: str = opt("train", "split of a `datasets` dataset")
    on_bad_row: str = opt("skip", "a row with chosen == rejected, an empty completion or too long for the context: "
                                  "'skip' (named, counted, reported) | 'raise'",
                          choices=ON_BAD_ROW)
    max_length: int | None = opt(None, "longest prompt + completion in tokens (None: the model's context)",
                                 at_least(2))
    epochs: int = opt(2, "passes over the preference data", at_least(1))
    batch_size: int = opt(64, "pairs (or unpaired rows) per optimizer step", at_least(1))
    micro_batch_size: int | None = opt(None, "pairs per forward/backward; gradients accumulate (None: whole batch)",
                                       at_least(1), layout=True)
    lr: float = opt(3e-4, "AdamW learning rate (linear warm-up, then constant; tuned for gpt_mini)", LEARNING_RATE)
    warmup_steps: int = opt(10, "warm-up steps", at_least(0, "0: no warm-up"))
    num_prompts: int = opt(2000, "self-generated pairs: training prompts sampled", at_least(1))
    samples_per_prompt: int = opt(8, "self-generated pairs: samples per prompt; a prompt with a right and a wrong "
                                     "sample gives one pair (chosen: right, rejected: wrong)", at_least(1))
