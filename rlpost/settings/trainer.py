"""trainer.*: the RL trainer (rlpost/trainer.py), its precision and learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.schema import ADAM_BETA, LEARNING_RATE, ConfigError, Section, at_least, between, opt

PRECISIONS = ("fp32", "bf16")
PRECISION_CHOICES = ("auto",) + PRECISIONS  # trainer.precision: 'auto' resolves to one of PRECISIONS at start
SCHEDULES = ("constant", "linear", "cosine")  # trainer.lr_schedule (rlpost/schedule.py)


@dataclass
class TrainerConfig(Section):
    lr: float = opt(2e-4, "AdamW learning rate for RL", LEARNING_RATE)
    weight_decay: float = opt(0.0, "AdamW weight decay", at_least(0, "0: none"))
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)", at_least(0, "0: off"))
    adam_beta1: float = opt(0.9, "AdamW beta1 (decay of the gradient's running mean)", ADAM_BETA)
    adam_beta2: float = opt(0.999, "AdamW beta2 (decay of the squared gradient's running mean)", ADAM_BETA)
    micro_batch_size: int | None = opt(None, "rows per forward/backward; gradients accumulate (None: whole batch)",
                                       at_least(1), layout=True)
    epochs: int = opt(1, "passes over each rollout batch", at_least(1))
    minibatches: int = opt(1, "optimizer steps per pass (the batch is split into this many minibatches)", at_least(1))
    max_nonfinite_steps: int = opt(3, "stop after this many non-finite losses or gradients in a row", at_least(1))
    compile: bool = opt(False, "torch.compile the policy's and the reference's transformer blocks "
                              "(a one-off compile of tens of seconds, then faster scoring and training)")
    precision: str = opt("fp32", "fp32 | bf16 | auto: bf16 autocast around the forward of the trainer (RL, SFT, "
                                 "preference), the reference and the critic; fp32 weights, optimizer state, "
                                 "log-softmax and loss. auto: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, "
                                 "else fp32 (the run prints which)", choices=PRECISION_CHOICES)
    gradient_checkpointing: bool = opt(False, "recompute each block's activations in the backward (less memory, "
                                              "about one more forward; turns shared-prompt scoring off in training)",
                                          layout=True)
    lr_schedule: str = opt("constant", "RL learning-rate schedule after warm-up: constant | linear | cosine (decay to "
                                       "lr * min_lr_ratio at the last optimizer step)",
                             choices=SCHEDULES)
    warmup_steps: int = opt(0, "RL: linear warm-up over this many optimizer steps", at_least(0, "0: no warm-up"))
    min_lr_ratio: float = opt(0.0, "RL: linear / cosine decay ends at lr * min_lr_ratio",
                              between(0, 1, "0: decay to 0; 1: no decay"))
    strategy: str = opt("single", "training: 'single' (one process) | 'fsdp2' (sharded over torchrun's ranks in "
                                  "every stage that trains: SFT, preference, reward model, RL and PPO's critic; "
                                  "rl.weight_sync auto or copy; with model.lora the frozen base is sharded too)")
    logprob_chunk: int | None = opt(None, "tokens per chunk of the log-prob head (trainer, reference, SFT): log-probs "
                                          "and entropies come from the hidden states this many tokens at a time, "
                                          "forward and backward, never as a whole [tokens, vocabulary] tensor (None: "
                                          "sized from the vocabulary, 32 M logits per chunk)", at_least(1),
                                    layout=True)
    packing: bool | str = opt("auto", "RL: the trainer, the reference, the critic and the learned rewards run each "
                                      "micro-batch's sequences packed end to end without padding (block-diagonal "
                                      "attention, position ids restarting per sequence; same loss and gradients as "
                                      "padded rows). auto: each role packs a batch when its model can and packing "
                                      "computes fewer positions than padded rows with each prompt once (the run "
                                      "says which at start) | true: always (an error on a model that cannot) | "
                                      "false: padded rows", layout=True)
    micro_batch_tokens: int | None = opt(None, "RL: at most this many token positions per micro-batch of the trainer, "
                                               "the reference, the critic and the learned rewards (packed: real "
                                               "tokens; padded: rows x padded length); None: micro_batch_size alone "
                                               "decides", at_least(1), layout=True)
    profile_steps: list[int] = opt([], "RL steps to trace with torch.profiler (Chrome trace format, in the run "
                                       "directory's profile/ folder; the first step is 1)")

    def check(self, prefix: str) -> None:
        if any(step < 1 for step in self.profile_steps):  # RL steps count from 1: a step 0 would never be traced
            raise ConfigError(f"config key '{prefix}profile_steps' lists RL steps, which count from 1, got "
                              f"{self.profile_steps!r}")
        if self.packing not in (True, False, "auto"):
            raise ConfigError(f"config key '{prefix}packing' is {self.packing!r}; valid values: auto, true, false")
