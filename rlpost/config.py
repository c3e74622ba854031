"""Typed run configuration: dataclasses with one help line per field, filled from a YAML recipe and
`dotted.key=value` overrides. An unknown key or a wrongly typed value fails at load time, naming
the key and listing the valid ones, so no run dies after minutes of work on a typo. So does a number
outside its key's range (NaN and +-inf are outside every range): each numeric field declares its range
next to itself (`opt(default, help, range)`, rlpost/schema.py), and each section checks its own keys
(`Section.validate`) before the checks that span sections (`_validate`).

The defaults *are* the embedded default recipe (recipes/default.yaml spells them out).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from rlpost.schema import (FINITE, Range, RangeError, above, at_least, between, check_ranges, hints, type_name,
                           type_ok)


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


def opt(default: Any, help: str, range: Range | None = None) -> Any:
    """A config field with its help line (shown by `rlpost train --help`) and, for a number, the range of
    values it means something for (checked at load time; every numeric key declares one)."""
    metadata = {"help": help} if range is None else {"help": help, "range": range}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


LEARNING_RATE = above(0, what="a positive learning rate")


class Section:
    """A config section (and the whole Config): it checks its own keys. `validate` refuses a number outside
    the range its field declares, in this section and the sections nested in it, then applies `check`, the
    section's own rules that ranges cannot say (keys of the section that go together)."""

    def validate(self, prefix: str = "") -> None:
        """Raise ConfigError naming the first bad key of this section (`prefix`: its dotted path, e.g. 'model.')."""
        try:
            check_ranges(self, lambda key, value, allowed: f"config key '{prefix}{key}' must be {allowed}, "
                                                           f"got {value!r}")
        except RangeError as e:
            raise ConfigError(str(e)) from None
        self.check(prefix)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Section):
                value.validate(f"{prefix}{f.name}.")

    def check(self, prefix: str) -> None:
        """The section's own rules beyond the ranges of its numbers (none by default)."""


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # Llama / Qwen2
                "c_attn", "c_proj", "c_fc"]                                                    # gpt_mini


@dataclass
class LoRAConfig(Section):
    r: int = opt(0, "LoRA rank (0: off, full fine-tuning; > 0: only low-rank adapters train, through peft)",
                 at_least(0, "0: LoRA off"))
    alpha: float = opt(16.0, "LoRA scaling numerator: the adapter's output is scaled by alpha / r", above(0))
    dropout: float = opt(0.0, "dropout on the adapters' input in training (never in rollout or the reference)",
                         between(0, 1, "0: no dropout", high_open=True))
    target_modules: list[str] = opt(LORA_TARGETS, "names of the linear layers that get adapters (the ones this model "
                                                  "has: attention and MLP projections of Llama / Qwen2 and gpt_mini)")

    def check(self, prefix: str) -> None:
        if self.r > 0 and (not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules)):
            raise ConfigError(f"config key '{prefix}target_modules' must be a non-empty list of module names, got "
                              f"{self.target_modules!r}")


@dataclass
class ModelConfig(Section):
    name: str = opt("gpt_mini", "'gpt_mini' (embedded, trained from scratch), a checkpoint folder, or a hub id")
    n_layer: int = opt(4, "gpt_mini: transformer blocks", at_least(1))
    n_head: int = opt(4, "gpt_mini: attention heads", at_least(1))
    n_embd: int = opt(128, "gpt_mini: embedding width", at_least(1))
    block_size: int | None = opt(None, "gpt_mini: longest sequence (prompt + response) in tokens (None: the longest "
                                       "prompt + rollout.max_new_tokens, or SFT demonstration + eos, of the data)",
                                 at_least(1))
    dtype: str = opt("float32", "parameter dtype: float32 | bfloat16 (every parameter, gradient and AdamW state in "
                                "bf16: pure bf16, unlike trainer.precision=bf16)")
    device: str = opt("auto", "where the model and every role run: auto (CUDA when present, else CPU) | cpu | cuda | "
                              "cuda:N")
    chat_template: bool = opt(False, "wrap prompts in the tokenizer's chat template (HF models that have one)")
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def check(self, prefix: str) -> None:
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", self.device):
            raise ConfigError(f"config key '{prefix}device' is {self.device!r}; valid values: auto, cpu, cuda, cuda:N")
        if self.name == "gpt_mini" and self.n_embd % self.n_head:  # each head gets n_embd / n_head dimensions
            fits = [h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0]
            raise ConfigError(f"config key '{prefix}n_head' is {self.n_head}, which does not divide {prefix}n_embd="
                              f"{self.n_embd}: gpt_mini splits the embedding evenly over its heads; with this "
                              f"n_embd choose n_head among {', '.join(map(str, fits[:12]))}"
                              f"{' ...' if len(fits) > 12 else ''}, or change n_embd")


@dataclass
class TaskConfig(Section):
    name: str = opt("arithmetic", "an embedded task: arithmetic (the default), multiply (tool), multistep (chain of "
                                  "thought), functions (code), grading (a judge); or 'file' (train_file / eval_file; "
                                  "'jsonl' is an alias)")
    train_file: str | None = opt(None, "file task: training prompts {prompt, answer[, completion]}: a .jsonl, .json "
                                       "or .parquet file, or a folder saved by `datasets`")
    eval_file: str | None = opt(None, "file task: held-out prompts, same formats (None: train_file's eval_split when "
                                      "it is a DatasetDict folder that has one)")
    train_split: str = opt("train", "file task: the split of a DatasetDict folder that train_file reads")
    eval_split: str = opt("test", "file task: the split of a DatasetDict folder that eval_file reads")
    prompt_key: str = opt("prompt", "file task: the column of each row's prompt (a string, or chat messages)")
    answer_key: str = opt("answer", "file task: the column of the gold answer (the reward reads row['answer'])")
    completion_key: str = opt("completion", "file task: the column of an SFT demonstration (reasoning + answer)")
    messages_key: str = opt("messages", "file task: chat messages [{role, content}], the prompt of rows without "
                                        "one; a last assistant message becomes the completion")
    system_prompt: str | None = opt(None, "a system message before every prompt that goes through the chat "
                                          "template (message prompts, or model.chat_template=true)")
    reward: str | None = opt(None, "a shipped reward (exact | math | code | judge | format: `rlpost rewards`) or "
                                   "'module:function' scoring (completion, row) -> float; default: the task's verifier")
    reward_on_error: str = opt("raise", "when the reward function raises, returns a non-finite number or runs past "
                                        "task.reward_timeout_s: 'raise' (stop, naming the sample) | 'zero' (score "
                                        "0, or the reward's lowest value when it can be negative; counted in "
                                        "reward/errors; reward/timeouts)")
    reward_timeout_s: float | None = opt(60.0, "seconds one reward function call may take (it runs in a thread "
                                               "that is abandoned when it hangs); null: no limit", above(0))
    reward_options: dict[str, Any] = opt({}, "keyword options of task.reward (e.g. math: {extract: boxed})")
    rewards: list[dict] | None = opt(None, "a weighted sum of rewards, each logged: [{name, weight, ...options}] "
                                           "(replaces task.reward)")
    reward_workers: int = opt(1, "score this many samples at once (threads): for slow rewards (code, judge)",
                              at_least(1))
    env: str | None = opt(None, "a multi-turn environment: a shipped name (`rlpost envs`) or 'module:Class'; "
                                "None: one turn scored by the reward")
    env_options: dict[str, Any] = opt({}, "keyword options of task.env's constructor")
    max_turns: int = opt(1, "env: assistant turns per episode at most", at_least(1))
    max_episode_tokens: int | None = opt(None, "env: tokens after the prompt (policy + environment) at most "
                                               "(None: room for every turn and the observations between them, "
                                               "max_turns * rollout.max_new_tokens + (max_turns - 1) * the env's "
                                               "observation_tokens, or rollout.max_new_tokens when it declares "
                                               "none)", at_least(1))
    env_timeout_s: float = opt(30.0, "env: seconds one reset or step may take before it counts as hung", above(0))
    env_on_error: str = opt("raise", "env: when reset/step raises or hangs: 'raise' (stop, naming the episode) | "
                                     "'zero' (end that episode with reward 0, counted in env/errors)")
    seed: int = opt(1234, "embedded tasks: seed of the problem set, its split and the demonstrator",
                    at_least(0, "0: a seed like any other"))
    max_operand: int = opt(99, "embedded tasks: operands are drawn from 0..max_operand", at_least(1))
    num_eval: int = opt(500, "embedded tasks: held-out problems", at_least(1))
    demonstrator_error: float = opt(0.35, "embedded tasks: fraction of the demonstrator's answers that are wrong",
                                    between(0, 1, "0: every demonstration is right"))
    answer_format_rate: float = opt(1.0, "multistep: fraction of the demonstrations that end with '#### <answer>' "
                                         "(the rest stop after the last sum: a base model that only sometimes writes "
                                         "the answer format)",
                                    between(0, 1, "0: no demonstration ends with the answer format"))


@dataclass
class SFTConfig(Section):
    steps: int = opt(1000, "supervised steps on the demonstrations before RL (0 skips SFT)",
                     at_least(0, "0: no SFT stage"))
    batch_size: int = opt(128, "sequences per SFT step", at_least(1))
    lr: float = opt(3e-3, "peak learning rate (linear warm-up, cosine decay to lr/10)", LEARNING_RATE)
    warmup_steps: int = opt(50, "warm-up steps", at_least(0, "0: no warm-up"))
    save_every: int = opt(250, "write a resumable checkpoint every this many steps (0: only at the end); "
                               "removed once checkpoints/sft is written", at_least(0, "0: only at the end"))


@dataclass
class RolloutConfig(Section):
    engine: str = opt("auto", "'auto' (says which it picks and why) | 'native' (KV cache: gpt_mini, Llama, Mistral, "
                              "Qwen2/3, Gemma 2/3, Phi-3) | 'hf' (transformers.generate) | "
                              "'vllm' (needs vLLM and rl.weight_sync=vllm)")
    prompts_per_step: int = opt(32, "prompts sampled per RL step", at_least(1))
    k: int = opt(8, "samples per prompt (the GRPO group size)", at_least(1))
    max_new_tokens: int = opt(6, "longest response in tokens", at_least(1))
    temperature: float = opt(1.0, "sampling temperature; the trainer and the reference score tokens at the same one "
                                  "(0: greedy, whose tokens they score at temperature 1)",
                             at_least(0, "0: greedy, scored at temperature 1"))
    top_k: int = opt(0, "keep the k most likely tokens (0: off)", at_least(0, "0: off"))
    top_p: float = opt(1.0, "nucleus sampling mass (1.0: off)", between(0, 1, "1: off", low_open=True))
    max_refill_rounds: int = opt(4, "extra rollout rounds to refill groups an algorithm drops (DAPO)",
                                 at_least(0, "0: no refill"))
    max_num_seqs: int = opt(0, "native engines: at most this many sequences decode at once, the rest wait (0: all)",
                            at_least(0, "0: no cap"))
    stop: list[str] = opt([], "stop strings: a response ends with the token that completes one (native and hf engines)")
    dtype: str = opt("auto", "what the rollout engine samples in: auto (the trainer's precision) | fp32 | bf16 (bf16 "
                             "autocast over the fp32 weights, bf16 KV cache; not vllm, which uses model.dtype)")
    vllm_sleep: bool = opt(False, "rollout.engine=vllm, rl.topology=colocated: vLLM sleeps (KV cache freed, weights "
                                  "offloaded to CPU memory) whenever it is not sampling, so the trainer has the GPU; "
                                  "needs vLLM's sleep mode (CUDA, ROCm, XPU; not CPU)")

    def check(self, prefix: str) -> None:
        if not all(isinstance(x, str) and x for x in self.stop):
            raise ConfigError(f"config key '{prefix}stop' must be a list of non-empty strings, got {self.stop!r}")


@dataclass
class TrainerConfig(Section):
    lr: float = opt(2e-4, "AdamW learning rate for RL", LEARNING_RATE)
    weight_decay: float = opt(0.0, "AdamW weight decay", at_least(0, "0: none"))
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)", at_least(0, "0: off"))
    micro_batch_size: int | None = opt(None, "rows per forward/backward; gradients accumulate (None: whole batch)",
                                       at_least(1))
    epochs: int = opt(1, "passes over each rollout batch", at_least(1))
    minibatches: int = opt(1, "optimizer steps per pass (the batch is split into this many minibatches)", at_least(1))
    max_nonfinite_steps: int = opt(3, "stop after this many non-finite losses or gradients in a row", at_least(1))
    compile: bool = opt(False, "torch.compile the policy's and the reference's transformer blocks "
                              "(a one-off compile of tens of seconds, then faster scoring and training)")
    precision: str = opt("fp32", "fp32 | bf16 | auto: bf16 autocast around the forward of the trainer (RL, SFT, "
                                 "preference), the reference and the critic; fp32 weights, optimizer state, "
                                 "log-softmax and loss. auto: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, "
                                 "else fp32 (the run prints which)")
    gradient_checkpointing: bool = opt(False, "recompute each block's activations in the backward (less memory, "
                                              "about one more forward; turns shared-prompt scoring off in training)")
    lr_schedule: str = opt("constant", "RL learning-rate schedule after warm-up: constant | linear | cosine (decay to "
                                       "lr * min_lr_ratio at the last optimizer step)")
    warmup_steps: int = opt(0, "RL: linear warm-up over this many optimizer steps", at_least(0, "0: no warm-up"))
    min_lr_ratio: float = opt(0.0, "RL: linear / cosine decay ends at lr * min_lr_ratio",
                              between(0, 1, "0: decay to 0; 1: no decay"))
    strategy: str = opt("single", "RL training: 'single' (one process) | 'fsdp2' (sharded over torchrun's ranks; "
                                  "rl.weight_sync auto or copy)")
    logprob_chunk: int | None = opt(None, "tokens per chunk of the log-prob head (trainer, reference, SFT): log-probs "
                                          "and entropies come from the hidden states this many tokens at a time, "
                                          "forward and backward, never as a whole [tokens, vocabulary] tensor (None: "
                                          "sized from the vocabulary, 32 M logits per chunk)", at_least(1))
    packing: bool = opt(False, "RL: the trainer, the reference and the critic run each micro-batch's sequences packed "
                               "end to end without padding (block-diagonal attention, position ids restarting per "
                               "sequence); same loss and gradients as padded rows, fewer positions computed")
    micro_batch_tokens: int | None = opt(None, "RL: at most this many token positions per micro-batch of the trainer, "
                                               "the reference and the critic (packed: real tokens; padded: rows x "
                                               "padded length); None: micro_batch_size alone decides", at_least(1))
    profile_steps: list[int] = opt([], "RL steps to trace with torch.profiler (Chrome trace format, in the run "
                                       "directory's profile/ folder)")


@dataclass
class CriticConfig(Section):
    type: str = opt("separate", "PPO's critic: 'separate' (a copy of the policy + value head) | 'head' (shared trunk)")
    lr: float | None = opt(None, "critic learning rate (None: trainer.lr)", LEARNING_RATE)


@dataclass
class RewardModelConfig(Section):
    path: str | None = opt(None, "a reward model folder (from `rlpost rm`) to use as the RL reward; the task's "
                                 "verifier is then logged as reward/gold_mean")
    train: bool = opt(False, "train a reward model after SFT (trunk copied from the SFT policy) and use it as the "
                             "RL reward (RLHF)")
    pairs: int = opt(2000, "preference pairs built from the task's training problems (right answer vs a slip)",
                     at_least(1))
    eval_pairs: int = opt(500, "held-out pairs built from the task's held-out problems", at_least(1))
    label_noise: float = opt(0.0, "fraction of training pairs whose preference is flipped (noisy labellers)",
                             between(0, 0.5, "0: clean labels"))
    epochs: int = opt(2, "passes over the training pairs", at_least(1))
    batch_size: int = opt(64, "pairs per step", at_least(1))
    lr: float = opt(1e-4, "AdamW learning rate of the reward model", LEARNING_RATE)


@dataclass
class RLConfig(Section):
    steps: int = opt(150, "RL steps (each: rollout, reward, reference, advantages, train, sync)",
                     at_least(0, "0: no RL stage"))
    eval_every: int = opt(50, "held-out pass@1 every this many steps (0: only at the end)",
                          at_least(0, "0: only at the end"))
    save_every: int = opt(50, "write a resumable checkpoint checkpoints/step_<n> every this many steps (0: only "
                              "checkpoints/final at the end)", at_least(0, "0: only checkpoints/final"))
    keep_checkpoints: int = opt(2, "keep the newest this many step checkpoints (0: all)", at_least(0, "0: keep all"))
    weight_sync: str = opt("auto", "the transport of weights to Ray rollout workers (disaggregated/async): 'auto' "
                                   "(ray) | 'ray' (Ray object store) | 'collective' (torch.distributed broadcast); "
                                   "colocated, how they land is the engine's ('auto'), with the aliases 'pointer' "
                                   "(shared module) | 'vllm' (rollout.engine=vllm) | 'copy' (the engine's own copy)")
    topology: str = opt("colocated", "where the roles run: 'colocated' (one process, taking turns) | 'disaggregated' "
                                     "(rollout in rl.rollout_workers Ray actors) | 'async' (as disaggregated, rollout "
                                     "runs up to rl.max_staleness steps ahead of training)")
    rollout_workers: int = opt(1, "disaggregated/async: Ray actors that generate (each its own engine and weights)",
                               at_least(1))
    max_staleness: int = opt(1, "async: rollouts run this many policy versions ahead at most (0: synchronous)",
                             at_least(0, "0: synchronous"))
    max_worker_restarts: int = opt(3, "disaggregated/async: restarts of dead rollout workers before the run stops",
                                   at_least(0, "0: a dead worker stops the run"))


@dataclass
class EvalConfig(Section):
    samples_per_prompt: int = opt(4, "samples per held-out prompt for pass@1", at_least(1))
    temperature: float = opt(1.0, "sampling temperature of the pass@1 estimate", at_least(0, "0: greedy"))
    batch_prompts: int = opt(256, "held-out prompts per generation call", at_least(1))
    reward: str | None = opt(None, "score pass@1 with this reward instead of the run's (e.g. exact while RL is "
                                   "rewarded by a judge): a shipped name or 'module:function'")
    reward_options: dict[str, Any] = opt({}, "keyword options of eval.reward")
    success_threshold: float = opt(1.0, "a sample passes (pass@k) when its reward is >= this, or when its "
                                        "environment's last step says info['success']; the mean reward is logged "
                                        "beside pass@1", FINITE)


@dataclass
class LogConfig(Section):
    tensorboard: bool = opt(False, "also write every metric to TensorBoard event files (run directory's tensorboard/)")
    wandb: bool = opt(False, "also log every metric to Weights & Biases (offline mode when no API key is configured)")
    wandb_project: str = opt("rlpost", "the W&B project")
    rollouts_every: int = opt(0, "keep sampled completions (prompt, completion, reward, log-prob statistics) every "
                                 "this many RL steps in the run directory's rollouts.jsonl (0: never)",
                              at_least(0, "0: never"))


@dataclass
class PreferenceConfig(Section):
    enabled: bool = opt(False, "rlpost train: run the preference stage (DPO family) between SFT and RL; "
                               "`rlpost dpo` always runs it, and no RL")
    loss: dict[str, Any] = opt({"name": "dpo"}, "preference loss and its parameters: dpo | ipo | kto | orpo | simpo "
                                                "(e.g. preference.loss.beta=0.2)")
    train_file: str | None = opt(None, "preference data: a JSONL file, a folder saved by `datasets` or a dataset id "
                                       "(None: pairs from the model's own samples, scored by the task's verifier)")
    eval_file: str | None = opt(None, "held-out preference data (same formats): loss, accuracy, margin after training")
    split: str = opt("train", "split of a `datasets` dataset")
    on_bad_row: str = opt("skip", "a row with chosen == rejected, an empty completion or too long for the context: "
                                  "'skip' (named, counted, reported) | 'raise'")
    max_length: int | None = opt(None, "longest prompt + completion in tokens (None: the model's context)",
                                 at_least(2))
    epochs: int = opt(2, "passes over the preference data", at_least(1))
    batch_size: int = opt(64, "pairs (or unpaired rows) per optimizer step", at_least(1))
    micro_batch_size: int | None = opt(None, "pairs per forward/backward; gradients accumulate (None: whole batch)",
                                       at_least(1))
    lr: float = opt(3e-4, "AdamW learning rate (linear warm-up, then constant; tuned for gpt_mini)", LEARNING_RATE)
    warmup_steps: int = opt(10, "warm-up steps", at_least(0, "0: no warm-up"))
    num_prompts: int = opt(2000, "self-generated pairs: training prompts sampled", at_least(1))
    samples_per_prompt: int = opt(8, "self-generated pairs: samples per prompt; a prompt with a right and a wrong "
                                     "sample gives one pair (chosen: right, rejected: wrong)", at_least(1))



@dataclass
class RejectionConfig(Section):
    enabled: bool = opt(False, "rlpost train: after RL (and its evaluation), sample the policy on training prompts, "
                               "keep the verified samples and fine-tune on them (rejection-sampling SFT)")
    samples_per_prompt: int = opt(8, "samples drawn per training prompt (rollout.temperature, rollout.max_new_tokens)",
                                  at_least(1))
    num_prompts: int = opt(2000, "training prompts sampled", at_least(1))
    max_per_prompt: int = opt(1, "verified samples kept per prompt at most, distinct (the first ones drawn)",
                              at_least(1))
    success_threshold: float = opt(1.0, "a sample is verified when the task's reward is >= this", FINITE)
    steps: int = opt(200, "fine-tuning steps on the kept samples", at_least(1))
    batch_size: int = opt(128, "kept samples per fine-tuning step (drawn with replacement)", at_least(1))
    lr: float = opt(3e-4, "peak fine-tuning learning rate (linear warm-up, cosine decay to lr/10)", LEARNING_RATE)
    warmup_steps: int = opt(20, "fine-tuning warm-up steps", at_least(0, "0: no warm-up"))


@dataclass
class DistillConfig(Section):
    teacher: str | None = opt(None, "on-policy distillation: a teacher model folder (e.g. a run's checkpoints/final) "
                                    "with the policy's tokenizer; the RL reward becomes per token "
                                    "-coef * (log pi_student - log pi_teacher) of each sampled token (None: off)")
    coef: float = opt(1.0, "weight of the per-token reverse-KL reward", above(0))


PRM_REWARDS = ("score", "delta")  # prm.reward: how a step's PRM score becomes its reward (rlpost/process_reward.py)


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
                               "score itself (pays every step, so longer solutions collect more)")


@dataclass
class Config(Section):
    seed: int = opt(0, "seed of model init, sampling and data order", at_least(0, "0: a seed like any other"))
    out_dir: str = opt("runs", "parent folder of run directories")
    run_name: str | None = opt(None, "run directory name, a folder inside out_dir (default: recipe name + timestamp)")
    threads: int | None = opt(None, "torch CPU threads (None: torch's default)", at_least(1))
    stages: list[str | dict[str, Any]] | None = opt(
        None, "the run's stages in order, names may repeat: sft | preference (alias dpo) | reward_model | rl | "
              "rejection | eval, each either a name or {name: {key: value}} with the settings that stage alone runs "
              "with (e.g. {rl: {trainer.lr: 1.0e-4}}) (None: sft, eval, preference, eval, reward_model, rl, eval, "
              "rejection, eval, each when its section is on)")
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: dict[str, Any] = opt(
        {"name": "grpo", "clip_low": 0.2, "clip_high": 0.28, "beta": 0.04},
        "algorithm name and its parameters (see `rlpost algorithms`)")
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def check(self, prefix: str) -> None:
        # the run directory is out_dir/run_name: a name that leaves out_dir (or is out_dir itself) would write,
        # and on a failed start remove, files outside the folder the user gave for runs
        name = self.run_name
        if name and (not name.strip() or os.path.isabs(name)
                     or os.path.normpath(name).split(os.sep)[0] in (".", "..")):
            raise ConfigError(f"config key 'run_name' is {name!r}: it names a folder inside out_dir "
                              f"({self.out_dir!r}); give a relative name such as 'exp1' or 'sweep/lr3e-4', without "
                              "'..' or a leading '/'")


# ---------------------------------------------------------------------------- the stage list

STAGES = ("sft", "preference", "reward_model", "rl", "rejection", "eval")
STAGE_ALIASES = {"dpo": "preference"}


# The sections a stage reads itself, which a stage-list entry may set for that stage alone. What the run builds
# once before its first stage (model, task, rewards, rollout engine, weight sync, sharding) is the run's: RUN_KEYS.
STAGE_SECTIONS = {"sft": ("sft", "trainer"), "preference": ("preference", "rollout", "trainer", "eval"),
                  "reward_model": ("reward_model",), "rl": ("rl", "rollout", "algorithm", "trainer", "critic", "eval"),
                  "rejection": ("rejection", "rollout", "trainer", "eval"), "eval": ("eval",)}
RUN_KEYS = ("rollout.engine", "rollout.max_new_tokens", "rollout.dtype", "rl.topology", "rl.weight_sync",
            "trainer.strategy")


def _entry_name(entry: str | dict[str, Any]) -> str:
    name = next(iter(entry)) if isinstance(entry, dict) else entry
    return STAGE_ALIASES.get(name, name) if isinstance(name, str) else name  # not a name: _validate_stages says so


def stage_names(cfg: Config) -> list[str]:
    """The run's stages in order, aliases resolved: `stages` when given, else the fixed order, each stage
    when its section switches it on (sft.steps, preference.enabled, reward_model.train/path, rl.steps,
    rejection.enabled)."""
    if cfg.stages is not None:
        return [_entry_name(s) for s in cfg.stages]
    names = (["sft"] if cfg.sft.steps > 0 else []) + ["eval"]
    if cfg.preference.enabled:
        names += ["preference", "eval"]
    if cfg.reward_model.train or cfg.reward_model.path:
        names.append("reward_model")
    if cfg.rl.steps > 0:
        names += ["rl", "eval"]
    if cfg.rejection.enabled:
        names += ["rejection", "eval"]
    return names


def stage_configs(cfg: Config) -> list[tuple[str, Config]]:
    """Each stage's name and the config it runs with: `cfg` itself, or for a `{name: {key: value}}` entry of the
    stage list a validated copy with those keys set (dotted keys set one value, a section name merges a mapping
    into that section, `algorithm` is replaced whole as in a recipe)."""
    if cfg.stages is None:
        return [(name, cfg) for name in stage_names(cfg)]
    out = []
    for i, entry in enumerate(cfg.stages):
        name = _entry_name(entry)
        settings = next(iter(entry.values())) if isinstance(entry, dict) else None
        out.append((name, _stage_config(cfg, name, settings, f"stages[{i}] ({name})") if settings else cfg))
    return out


def _stage_config(cfg: Config, name: str, settings: dict[str, Any], where: str) -> Config:
    data = to_dict(cfg)
    data["stages"] = stage_names(cfg)  # the copy validates as one run of the same stages, without recursing
    for key, value in settings.items():
        section = key.split(".")[0]
        if section not in STAGE_SECTIONS[name]:
            raise ConfigError(f"config key '{where}' sets {key!r}, which a {name} stage does not read; it may set "
                              f"keys of {', '.join(STAGE_SECTIONS[name])}")
        if key in RUN_KEYS or (section == key and isinstance(value, dict)
                               and any(f"{key}.{k}" in RUN_KEYS for k in value)):
            raise ConfigError(f"config key '{where}' sets {key!r}: {', '.join(RUN_KEYS)} are built once for "
                              "the whole run; set them at the top of the recipe")
        if "." in key:
            _set(data, key, value, f"{where}: {key}")
        else:
            data = _merge(data, {key: value})
    try:
        stage_cfg = from_dict(Config, data)
        _validate(stage_cfg)
    except ValueError as e:  # a ConfigError, or an algorithm's own refusal
        raise ConfigError(f"{where}: {e}") from None
    if cfg.distill.teacher and stage_cfg.rollout.temperature != cfg.rollout.temperature:
        raise ConfigError(f"config key '{where}' sets rollout.temperature: the distillation teacher scores at the "
                          "run's rollout.temperature; set it at the top of the recipe")
    return stage_cfg


# ---------------------------------------------------------------------------- loading

def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{'config key ' + repr(path[:-1]) if path else 'recipe'}: expected a mapping, got "
                          f"{type(data).__name__}")
    types_of = hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}'; valid keys{' under ' + path[:-1] if path else ''}: "
                              f"{', '.join(fields)}")
        tp = types_of[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, where + ".")
            continue
        ok, converted = type_ok(value, tp)
        if not ok:
            raise ConfigError(f"config key '{where}' expects {type_name(tp)}, got {type(value).__name__} {value!r}")
        kwargs[key] = converted
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (1e-4, true, [1, 2])."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. rl.steps=20)")
    key, raw = override.split("=", 1)
    _set(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "", f"override {override!r}")


def _set(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: '{p}' is not a section")
    node[parts[-1]] = value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "algorithm" else v
    return out


def load_config(recipe: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the recipe file, then the overrides; validated, algorithm parameters included."""
    data: dict[str, Any] = to_dict(Config())
    if recipe is not None:
        try:
            with open(recipe) as f:
                loaded = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"recipe file not found: {recipe}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {recipe} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {recipe} must be a mapping of config keys, got {type(loaded).__name__}")
        data = _merge(data, loaded)
    for o in overrides:
        apply_override(data, o)
    cfg = from_dict(Config, data)
    _validate(cfg)
    return cfg


def _plugin(build, params: dict[str, Any], key: str) -> None:
    """Build a plug-in (an algorithm, a preference loss) from config key `key`'s mapping, now: an unknown name
    or parameter is its own error; a number outside the range the plug-in declares is named as a config key."""
    if "name" not in params:  # a recipe's mapping replaces the default one whole, name included
        raise ConfigError(f"config key '{key}' needs a 'name' besides its parameters, got {params!r}")
    try:
        build(**params)
    except RangeError as e:
        raise ConfigError(f"config key '{key}.{e.key}' must be {e.range.describe(e.optional)}, got {e.value!r} "
                          f"({key}.name={params.get('name')})") from None
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from None


def _validate(cfg: Config) -> None:
    from rlpost.algorithms import get_algorithm
    from rlpost.critic import CRITIC_TYPES
    from rlpost.models import DTYPES, PRECISION_CHOICES, ROLLOUT_DTYPES
    from rlpost.rollout import ENGINES
    from rlpost.schedule import SCHEDULES
    from rlpost.tasks import TASKS
    from rlpost.loops import check_config as check_topology

    cfg.validate()  # each section's own keys: the ranges of its numbers, its own rules
    _plugin(get_algorithm, cfg.algorithm, "algorithm")  # unknown algorithm / parameter / bad number: now
    choices = {  # each family's valid names live with the family
        "task.name": (cfg.task.name, TASKS),
        "task.reward_on_error": (cfg.task.reward_on_error, ("raise", "zero")),
        "rollout.engine": (cfg.rollout.engine, ENGINES),
        "rollout.dtype": (cfg.rollout.dtype, ROLLOUT_DTYPES),
        "model.dtype": (cfg.model.dtype, DTYPES),
        "trainer.precision": (cfg.trainer.precision, PRECISION_CHOICES),
        "trainer.lr_schedule": (cfg.trainer.lr_schedule, SCHEDULES),
        "critic.type": (cfg.critic.type, CRITIC_TYPES),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"config key '{key}' is {value!r}; valid values: {', '.join(valid)}")
    if cfg.reward_model.train and cfg.reward_model.path:
        raise ConfigError("set either reward_model.path (use a trained reward model) or reward_model.train, not both")
    _validate_vllm(cfg)
    _validate_task(cfg)
    if cfg.task.name in ("file", "jsonl") and not cfg.task.train_file:
        raise ConfigError(f"task.name={cfg.task.name} needs task.train_file (and usually task.eval_file)")
    for key in ("prompt_key", "answer_key", "completion_key", "messages_key", "train_split", "eval_split"):
        if not getattr(cfg.task, key):
            raise ConfigError(f"config key 'task.{key}' must be a non-empty string")
    _validate_preference(cfg.preference)
    _validate_rejection_and_distill(cfg)
    _validate_prm(cfg.prm)
    _validate_stages(cfg)
    try:  # the topology's own settings (rl.topology, rl.weight_sync, ...): its loop checks them (stages known)
        check_topology(cfg, "rl" in stage_names(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_process_reward(cfg)


def _validate_vllm(cfg: Config) -> None:
    if cfg.rollout.vllm_sleep and (cfg.rollout.engine != "vllm" or cfg.rl.topology != "colocated"):
        raise ConfigError(f"rollout.vllm_sleep frees the GPU of a vLLM engine that shares it with the trainer: it "
                          f"needs rollout.engine=vllm and rl.topology=colocated (got {cfg.rollout.engine}, "
                          f"{cfg.rl.topology}); set rollout.vllm_sleep=false")


def _validate_task(cfg: Config) -> None:
    t = cfg.task
    for key, value in (("task.env_on_error", t.env_on_error),):
        if value not in ("raise", "zero"):
            raise ConfigError(f"config key '{key}' is {value!r}; valid values: raise, zero")
    if t.answer_format_rate < 1.0 and t.name != "multistep":
        raise ConfigError(f"config key 'task.answer_format_rate' is an option of the multistep task, not of "
                          f"{t.name!r} (got {t.answer_format_rate!r}); leave it at 1.0 or set task.name=multistep")
    if t.rewards is not None and t.reward:
        raise ConfigError("set either task.reward (one reward) or task.rewards (a weighted sum), not both")
    if t.reward_options and not t.reward:
        raise ConfigError("task.reward_options are the options of task.reward, which is not set")
    if t.env_options and not t.env:
        raise ConfigError("task.env_options are the options of task.env, which is not set")
    if cfg.eval.reward and t.env:
        raise ConfigError("eval.reward scores single completions; with task.env the environment scores the episodes")
    if cfg.eval.reward_options and not cfg.eval.reward:
        raise ConfigError("eval.reward_options are the options of eval.reward, which is not set")
    _check_rewards(cfg)
    if t.env and "reward_model" in stage_names(cfg):
        raise ConfigError("task.env and a learned reward model do not go together: the environment scores its "
                          "episodes itself")
    if t.env and "preference" in stage_names(cfg) and not cfg.preference.train_file:
        raise ConfigError("preference pairs from the model's own samples are single-turn; with task.env give "
                          "preference.train_file")


def _check_rewards(cfg: Config) -> None:
    """The configured rewards checked now, as _plugin checks an algorithm: an unknown name, an entry without
    one, a weight that is not a finite number, an option the reward refuses (a code timeout_s of -5, a math
    extract method that does not exist) is a ConfigError naming the key, not a failure at the first reward
    call after the model has loaded (or, under reward_on_error=zero, every sample silently scoring 0)."""
    from rlpost.rewards import check_reward, check_weighted

    t = cfg.task
    for key, check in (("task.rewards", lambda: t.rewards is not None and check_weighted(t.rewards)),
                       ("task.reward", lambda: t.reward and check_reward(t.reward, t.reward_options)),
                       ("eval.reward", lambda: cfg.eval.reward and check_reward(cfg.eval.reward,
                                                                                cfg.eval.reward_options))):
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"config key '{key}': {e}") from None


def _validate_preference(pc: PreferenceConfig) -> None:
    from rlpost.preference import get_preference_loss

    if "name" not in pc.loss:
        raise ConfigError("config key 'preference.loss' needs a 'name' (dpo | ipo | kto | orpo | simpo)")
    _plugin(get_preference_loss, pc.loss, "preference.loss")  # unknown loss / parameter / bad number: now
    if pc.on_bad_row not in ("skip", "raise"):
        raise ConfigError(f"config key 'preference.on_bad_row' is {pc.on_bad_row!r}; valid values: skip, raise")


def _validate_rejection_and_distill(cfg: Config) -> None:
    if "rejection" in stage_names(cfg) and cfg.trainer.strategy == "fsdp2":
        raise ConfigError("the rejection stage with trainer.strategy=fsdp2 is not supported yet: the stage runs after "
                          "RL has sharded the policy; run it as a run of its own: model.name=<the RL checkpoint> "
                          "rl.steps=0 trainer.strategy=single")
    if cfg.distill.teacher is None:
        return
    if cfg.task.env:
        raise ConfigError("distill.teacher scores single-turn samples; with task.env the environment is the reward")
    if "reward_model" in stage_names(cfg):
        raise ConfigError("distill.teacher replaces the RL reward, and so does a reward model: choose one")
    if "rl" not in stage_names(cfg):
        raise ConfigError("distill.teacher is the RL stage's reward; it needs an RL stage (rl.steps >= 1)")


def _validate_stages(cfg: Config) -> None:
    """`stages`: known names, each stage's section configured; with a list, the list alone decides what runs,
    so a switch that names a stage the list leaves out is a contradiction."""
    if cfg.stages is None:
        return
    valid = ", ".join(STAGES + tuple(STAGE_ALIASES))
    if not cfg.stages:
        raise ConfigError(f"config key 'stages' is an empty list; give the stages in order ({valid}), or null "
                          "for the default order")
    for i, s in enumerate(cfg.stages):
        if isinstance(s, dict) and (len(s) != 1 or not isinstance(next(iter(s.values())), (dict, type(None)))):
            raise ConfigError(f"config key 'stages[{i}]' must be a stage name or {{name: {{key: value, ...}}}} "
                              f"(one stage and its own settings), got {s!r}")
        name = next(iter(s)) if isinstance(s, dict) else s
        if not isinstance(name, str) or (name not in STAGES and name not in STAGE_ALIASES):
            raise ConfigError(f"config key 'stages' names an unknown stage {name!r}; valid stages: {valid}")
    names = stage_names(cfg)
    for name, sc in stage_configs(cfg):  # each stage checked with the settings it runs with
        needs = {"sft": (sc.sft.steps < 1, f"sft.steps >= 1 (it is {sc.sft.steps})"),
                 "rl": (sc.rl.steps < 1, f"rl.steps >= 1 (it is {sc.rl.steps})")}
        missing, what = needs.get(name, (False, ""))
        if missing:
            raise ConfigError(f"config key 'stages' has a {name} stage, which needs {what}")
    if names.count("reward_model") > 1:
        raise ConfigError("config key 'stages' has reward_model more than once: a run trains (or loads) one reward "
                          "model, the RL reward of every rl stage after it")
    if ("reward_model" in names and not cfg.reward_model.path and not cfg.preference.train_file
            and cfg.task.name != "arithmetic"):
        raise ConfigError(f"config key 'stages' has a reward_model stage, which needs preference pairs: set "
                          f"preference.train_file or reward_model.path (task {cfg.task.name!r} cannot make wrong "
                          "answers by itself)")
    switches = {"preference.enabled": (cfg.preference.enabled, "preference"),
                "reward_model.train": (cfg.reward_model.train, "reward_model"),
                "reward_model.path": (bool(cfg.reward_model.path), "reward_model"),
                "rejection.enabled": (cfg.rejection.enabled, "rejection")}
    for key, (on, name) in switches.items():
        if on and name not in names:
            raise ConfigError(f"{key} is set but config key 'stages' has no {name} stage: with 'stages' the list "
                              "alone decides which stages run; add it to the list, or unset the key")


def _validate_prm(pc: PRMConfig) -> None:
    if not pc.separator:
        raise ConfigError("config key 'prm.separator' must be a non-empty string (the text that ends a step)")
    if pc.reward not in PRM_REWARDS:
        raise ConfigError(f"config key 'prm.reward' is {pc.reward!r}; valid values: {', '.join(PRM_REWARDS)}")


def _validate_process_reward(cfg: Config) -> None:
    if cfg.prm.path is None:
        return
    if cfg.task.env:
        raise ConfigError("prm.path scores single-turn solutions step by step; with task.env the environment is "
                          "the reward")
    if cfg.distill.teacher:
        raise ConfigError("prm.path and distill.teacher both replace the RL reward: choose one")
    if cfg.reward_model.train or cfg.reward_model.path:
        raise ConfigError("prm.path adds process rewards to the verifier's outcome, and a reward model replaces "
                          "the verifier: choose one")
    if cfg.rl.steps < 1:
        raise ConfigError("prm.path is the RL stage's reward; it needs rl.steps >= 1")


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per config key: name, default, help, and a number's allowed range. Used by `rlpost train --help`."""
    lines = []
    types_of = hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(types_of[f.name]):
            lines.extend(describe(types_of[f.name], f"{prefix}{f.name}."))
        else:
            rng = f.metadata.get("range")
            allowed = f" [{rng.bounds()}]" if rng is not None else ""
            lines.append(f"  {prefix + f.name:<28} {getattr(default, f.name)!s:<14} {f.metadata.get('help', '')}"
                         f"{allowed}")
    return lines
