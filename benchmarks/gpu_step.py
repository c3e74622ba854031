"""One GRPO step of a Qwen2.5-0.5B-shaped random model on one GPU: rlpost (native engine, then vLLM) and TRL.

    python benchmarks/gpu_step.py                          # CUDA, bf16, the Qwen2.5-0.5B shape (gpu_check.sh runs it)
    python benchmarks/gpu_step.py --device cpu --tiny      # the same code path on a tiny Qwen2 in seconds (a test)

The model is Qwen2.5-0.5B's architecture written out literally (QWEN25_05B: hidden 896, 24 layers, 14 heads,
2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings, rope_theta 1e6) with random weights; nothing is
downloaded. Its tokenizer is a byte-level BPE trained here on the spot with Qwen2's own normaliser (NFC) and
pre-tokeniser (its split regex, then byte-level), saved as a Qwen2Tokenizer: AutoTokenizer loads exactly what
was trained (a Qwen2Tokenizer installs those two itself, so a BPE trained with other ones would tokenize
differently after a reload). The config's vocabulary is padded to 151,936 rows as the real checkpoint's is
(151,665 tokens in its tokenizer): ids past the tokenizer decode to nothing.

Each side runs --warmup unmeasured steps then --steps measured ones on the same prompts, with the same work:
--prompts prompts x --k samples x --new-tokens tokens, GRPO (beta 0.04, a frozen reference; clip 0.2 / 0.28,
token-mean loss), one AdamW step, gradient clipping 1.0, bf16 parameters (rlpost model.dtype=bfloat16;
TRL bf16=True). Printed per side: the step's median seconds; generated tokens per second (rollout alone and
the whole step); MFU = 6 * N * tokens / seconds / peak, with N the parameters and tokens the trained positions
(every row's prompt + response), against --peak-tflops (H100 SXM bf16 dense: 989 TFLOP/s; the value used is
printed); rlpost's memory peak per role (mem/peak_<role>, CUDA max_memory_allocated reset per role) next to
`rlpost plan memory`'s per-GPU figure for the same job (rlpost.plan.memory.plan, rlpost's own layout); and
TRL GRPOTrainer's median step over rlpost's (same GPU, same work). The vLLM step runs with min_new_tokens = 0
(vLLM folds the min-tokens mask into its log-probs, and the step would then add a proximal forward of the
trainer), so it samples up to --new-tokens and the tokens it made are counted. A part whose package is missing
(vllm, trl) prints why and is skipped.

The part `vllm_features` (gpu_check.sh runs it on its own: --skip native vllm trl) checks the vLLM engine's
options on the GPU with one engine over a LoRA policy: sleep mode (GPU memory in use before the engine, awake
and asleep, and after each RL step), top-p (the samples lie in the nucleus of a fresh forward of the trainer,
rollout_logp is its renormalised log-prob, and RL steps recompute old_logp: ratio 1) and LoRA (greedy through
the LoRARequest against the policy's own forward, adapter-only syncs, new adapters that change the output).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# Qwen2.5-0.5B's config.json, written out (no hub access)
QWEN25_05B = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                  tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  hidden_act="silu", use_sliding_window=False, attention_dropout=0.0)
# the same architecture at toy size, for --tiny (the tests run it on the CPU; head_dim 32, as vLLM's CPU attention
# needs at least that)
TINY = {**QWEN25_05B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 128, "vocab_size": 1024, "max_position_embeddings": 512}
H100_BF16_DENSE_TFLOPS = 989.0
ROLES = ("rollout", "reward", "reference", "advantages", "train", "sync")
MiB = 2 ** 20


def build_tokenizer(vocab_size: int, texts: int = 4000):
    """A byte-level BPE trained with Qwen2's normaliser and pre-tokeniser, as a Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    from benchmarks.common import corpus

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                          "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(texts), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    qwen = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    probe = "Question: what is 12+34? Answer: 46."
    if qwen.encode(probe) != tok.encode(probe).ids:  # the trap this function exists for
        raise RuntimeError("the Qwen2Tokenizer does not tokenize as the trained BPE does")
    return qwen


def save_model(folder: str, shape: dict, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> int:
    """Save a random Qwen2 of `shape` (initialised on `device`: seconds on a GPU) and its tokenizer to `folder`;
    returns the parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    small = shape["vocab_size"] <= 2000
    tok = build_tokenizer(shape["vocab_size"] // 2 if small else 2000, texts=500 if small else 4000)
    if len(tok) > shape["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the config's {shape['vocab_size']}")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen2Config(**{k: v for k, v in shape.items() if k not in ("model_type", "architectures")},
                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = Qwen2ForCausalLM(cfg).to(dtype)
    n = sum(p.numel() for p in hf.parameters())
    hf.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    del hf
    return n


def reward_text(text: str) -> float:
    """A cheap deterministic reward of the completion text (the same function on both sides)."""
    return (sum(map(ord, text)) % 11) / 10


def sync_device(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def rlpost_side(folder: str, prompt_texts: list[str], args, engine_kind: str) -> dict:
    """rlpost's Controller.step with `engine_kind` ('native' or 'vllm'), as `rlpost train` wires it."""
    from rlpost.algorithms import get_algorithm
    from rlpost.config import ModelConfig, RLConfig, RolloutConfig, TrainerConfig
    from rlpost.controller import Controller, Roles
    from rlpost.models import load_model
    from rlpost.reference import Reference
    from rlpost.env.reward import Reward
    from rlpost.rollout import SamplingParams, build_engine
    from rlpost.rollout.vllm_engine import VLLMEngine
    from rlpost.trainer import Trainer
    from rlpost.weight_sync import WeightSync

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model, tok = load_model(ModelConfig(name=folder, dtype="bfloat16", device=args.device))
    if engine_kind == "vllm":  # vLLM beside the trainer on the same GPU: it gets a share of the memory
        engine = VLLMEngine(model, tok, gpu_memory_utilization=args.vllm_memory, max_model_len=args.max_len)
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    else:
        engine = build_engine("native", model, tok)
        params = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, temperature=1.0)
    rows = [{"prompt": p, "answer": ""} for p in prompt_texts]
    roles = Roles(engine=engine, reward=Reward(lambda completion, row: reward_text(completion), tok),
                  algorithm=get_algorithm("grpo", clip_low=0.2, clip_high=0.28, beta=0.04),
                  trainer=Trainer(model, TrainerConfig(lr=1e-6, grad_clip=1.0, micro_batch_size=args.micro_batch)),
                  weight_sync=WeightSync(model, engine), reference=Reference(model))
    ctl = Controller(roles, RLConfig(), params, RolloutConfig(prompts_per_step=args.prompts, k=args.k), rows=rows,
                     prompt_ids=[tok.encode_prompt(p) for p in prompt_texts], seed=0)
    steps, trained_tokens = [], []
    for i in range(args.warmup + args.steps):
        sync_device(args.device)
        m = ctl.step(i + 1)
        sync_device(args.device)
        steps.append(m)
        trained_tokens.append(ctl.sampled.input_ids.numel())  # every row's prompt + response positions
    measured, tokens = steps[args.warmup:], trained_tokens[args.warmup:]
    out = {
        "engine": type(engine).__name__,
        "step_s": statistics.median(m["time/step"] for m in measured),
        "train_s": statistics.median(m["time/train"] for m in measured),
        "rollout_tokens_per_s": statistics.median(m["rollout/tokens_per_s"] for m in measured),
        "step_tokens_per_s": statistics.median(m["step/tokens_per_s"] for m in measured),
        "response_len_mean": statistics.mean(m["rollout/response_len_mean"] for m in measured),
        "trained_tokens": statistics.median(tokens),
        "row_len": ctl.sampled.input_ids.shape[1],
        "roles_s": {r: statistics.median(m[f"time/{r}"] for m in measured) for r in ROLES},
        "mem_peak_mib": {r: max(m.get(f"mem/peak_{r}", m.get(f"mem/peak_so_far_{r}", float("nan")))
                                for m in measured) for r in ROLES},
        "gpu_util": statistics.mean(m["gpu/util"] for m in measured) if "gpu/util" in measured[0] else None,
    }
    out["run_peak_mib"] = run_peak_mib(steps)
    if hasattr(engine, "close"):
        engine.close()
    del ctl, engine, model
    free(args.device)
    return out


def run_peak_mib(steps: list[dict]) -> float:
    """The largest memory peak of any role in any of `steps` (each an RL step's metrics), in MiB. CUDA's own
    max_memory_allocated cannot say it at the end: the controller resets that peak as each role starts, so it holds
    only the last role's (sync)."""
    return max((v for m in steps for k, v in m.items() if k.startswith("mem/peak_")), default=math.nan)


def gpu_used_mib() -> float:
    """GPU memory in use on the device, by anyone (vLLM's sleep mode maps and unmaps its memory outside
    torch's caching allocator, so torch.cuda.memory_allocated would not see it)."""
    free_b, total_b = torch.cuda.mem_get_info()
    return (total_b - free_b) / MiB


@torch.no_grad()
def nucleus_check(model, batch, top_p: float) -> tuple[float, float]:
    """(fraction of sampled tokens inside the top-p nucleus of a fresh forward at temperature 1, max |rollout_logp -
    that nucleus's renormalised log-prob| over the tokens inside it)."""
    P, inside, worst, n = batch.prompt_width, 0, 0.0, 0
    device = next(model.parameters()).device
    for i in range(len(batch)):
        keep = batch.attention_mask[i].bool()
        logits = model.hf(batch.input_ids[i][keep][None].to(device)).logits[0].float()
        pos = keep.nonzero().squeeze(1)
        for j in range(int(batch.response_mask[i].sum())):
            z = logits[(pos == P + j).nonzero().item() - 1].clone()
            sz, order = z.sort()
            drop = sz.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[-1] = False
            z[order[drop]] = float("-inf")
            lp = float(z.log_softmax(-1)[batch.input_ids[i, P + j]])
            n += 1
            if lp != float("-inf"):
                inside += 1
                worst = max(worst, abs(lp - float(batch.rollout_logp[i, P + j])))
    return inside / max(n, 1), worst


@torch.no_grad()
def greedy_agreement(engine, model, ids: list[list[int]]) -> tuple[float, list]:
    """(fraction of the engine's greedy tokens that the LoRA model's own forward, base + adapters, also picks
    after the same prefix, the engine's token ids): the engine samples through its LoRARequest."""
    from rlpost.rollout import SamplingParams

    got = engine.generate(ids, 1, SamplingParams(max_new_tokens=16, temperature=0.0))
    device = next(model.parameters()).device
    hits = total = 0
    for i in range(len(got)):  # one unpadded row at a time
        row = got.input_ids[i][got.attention_mask[i].bool()]
        want = model.hf(row[None].to(device)).logits[0, :-1].argmax(-1).cpu()
        n = int(got.response_mask[i].sum())
        hits += int((want[-n:] == row[-n:]).sum()) if n else 0
        total += n
    return hits / max(total, 1), got.input_ids.tolist()


def vllm_features(folder: str, prompt_texts: list[str], args) -> dict:
    """One vLLM engine over a LoRA policy (rank 16), started with sleep mode where vLLM has it: GPU memory in
    use before the engine, awake and asleep; top-p samples against a fresh forward's nucleus; greedy through the
    LoRARequest against the policy's own forward; two RL steps with top-p (ratio, sleep state and memory after
    each, the adapters synced alone); then an adapter change that must change the greedy output."""
    from rlpost.algorithms import get_algorithm
    from rlpost.config import ModelConfig, RLConfig, RolloutConfig, TrainerConfig
    from rlpost.controller import Controller, Roles
    from rlpost.models import load_model
    from rlpost.models.lora import adapter_state, apply_lora
    from rlpost.env.reward import Reward
    from rlpost.rollout import SamplingParams
    from rlpost.rollout.vllm_engine import VLLMEngine, sleep_unavailable_reason
    from rlpost.trainer import Trainer
    from rlpost.weight_sync import WeightSync

    cuda = args.device.startswith("cuda")
    dtype = "bfloat16" if cuda else "float32"  # --device cpu: vLLM's CPU build, to check this code path
    out: dict = {"sleep_unavailable": sleep_unavailable_reason()}
    sleep = out["sleep_unavailable"] is None
    used = gpu_used_mib if cuda else (lambda: float("nan"))
    prompts, k = prompt_texts[:args.prompts], min(args.k, 4)
    model, tok = load_model(ModelConfig(name=folder, dtype=dtype, device=args.device))
    apply_lora(model, r=16, alpha=32.0, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])

    def randomize(seed: int, std: float) -> None:  # 0.05: a delta of about the weights' own scale (0.02)
        torch.manual_seed(seed)
        with torch.no_grad():
            for t in adapter_state(model).values():
                t.copy_(torch.randn_like(t) * std)

    randomize(0, 0.05)
    ids = [tok.encode_prompt(p) for p in prompts]
    before_engine = used()
    t0 = time.perf_counter()
    engine = VLLMEngine(model, tok, sleep=sleep, gpu_memory_utilization=args.vllm_memory, max_model_len=args.max_len)
    out["startup_s"] = time.perf_counter() - t0
    out["mib_used"] = {"before_engine": before_engine, "engine_after_start": used()}
    engine.wake()
    out["mib_used"]["engine_awake"] = used()
    engine.sleep()
    out["mib_used"]["engine_asleep"] = used()
    print(f"vllm_features: engine start-up {out['startup_s']:.1f} s; GPU memory in use, MiB: "
          + ", ".join(f"{k} {v:,.0f}" for k, v in out["mib_used"].items())
          + ("" if sleep else f" (no sleep mode here: {out['sleep_unavailable']})"), flush=True)

    params = SamplingParams(max_new_tokens=min(args.new_tokens, 16), temperature=1.0, top_p=0.9)
    batch = engine.generate(ids, k, params, seed=1)
    if engine.asleep != sleep or batch.rollout_logp is None:
        raise RuntimeError(f"after generate: asleep {engine.asleep} (sleep mode {sleep}), rollout_logp "
                           f"{'set' if batch.rollout_logp is not None else 'missing'}")
    inside, worst = nucleus_check(model, batch, 0.9)
    out["top_p"] = {"inside_nucleus_frac": inside, "logp_max_abs_diff": worst}
    print(f"vllm_features: top_p=0.9: {100 * inside:.1f}% of the sampled tokens inside the fresh forward's nucleus "
          f"(bf16: a token at the nucleus' edge may fall either side), max |rollout_logp - truncated logp| "
          f"{worst:.2e}", flush=True)

    rows = [{"prompt": p, "answer": ""} for p in prompts]
    sync = WeightSync(model, engine)  # a full push: base and adapters
    roles = Roles(engine=engine, reward=Reward(lambda completion, row: reward_text(completion), tok),
                  algorithm=get_algorithm("grpo", beta=0.0), weight_sync=sync,
                  trainer=Trainer(model, TrainerConfig(lr=1e-6, grad_clip=1.0, micro_batch_size=args.micro_batch)))
    first, before = greedy_agreement(engine, model, ids)
    ctl = Controller(roles, RLConfig(), params, RolloutConfig(prompts_per_step=len(prompts), k=k), rows=rows,
                     prompt_ids=ids, seed=0)
    out["rl_steps"] = []
    for i in range(2):
        m = ctl.step(i + 1)
        out["rl_steps"].append({"ratio_mean": m["loss/ratio_mean"], "asleep_after": engine.asleep,
                                "mib_used_after": used(), "sync_bytes": m["sync/bytes"], "step_s": m["time/step"]})
    print(f"vllm_features: RL steps with top_p (adapters synced alone): {out['rl_steps']}", flush=True)
    trained, _ = greedy_agreement(engine, model, ids)
    randomize(1, 0.15)  # a delta about 9x the weights' scale: the greedy output must change
    sync.sync()
    changed, after = greedy_agreement(engine, model, ids)
    out["lora"] = {"greedy_agrees": first, "after_rl_steps_agrees": trained, "after_new_adapters_agrees": changed,
                   "output_changed": before != after}
    print(f"vllm_features: LoRA r=16: greedy tokens that the policy's own forward also picks: {100 * first:.1f}% "
          f"at first, {100 * trained:.1f}% after the RL steps, {100 * changed:.1f}% after new adapters; the new "
          f"adapters changed the output: {before != after}", flush=True)
    engine.close()
    engine = model = ctl = roles = sync = None  # noqa: F841 (frees the GPU for the next part)
    free(args.device)
    return out


def trl_side(folder: str, prompt_texts: list[str], args) -> dict:
    """TRL's GRPOTrainer at the same work, each step timed from on_step_begin to on_step_end."""
    import transformers
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    total = args.warmup + args.steps
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync_device(args.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync_device(args.device)
            times.append(time.perf_counter() - self.t0)

    # TRL's own calls of names transformers has deprecated (gradient_checkpointing, is_gradient_checkpointing) warn:
    # shown, not raised where warnings are errors (pytest's filterwarnings), so that the baseline still runs
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("default", FutureWarning)
        cfg = GRPOConfig(
            output_dir=out, max_steps=total, per_device_train_batch_size=args.prompts * args.k,
            gradient_accumulation_steps=1, num_generations=args.k, max_completion_length=args.new_tokens,
            generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, top_k=0, top_p=1.0, beta=0.04,
            epsilon=0.2, epsilon_high=0.28, loss_type="dapo", num_iterations=1, learning_rate=1e-6,
            max_grad_norm=1.0, weight_decay=0.0, gradient_checkpointing=False, bf16=True, fp16=False,
            use_cpu=not args.device.startswith("cuda"), report_to="none", save_strategy="no", logging_steps=1,
            disable_tqdm=True, dataloader_num_workers=0, seed=0, lr_scheduler_type="constant", warmup_steps=0,
            model_init_kwargs={"dtype": "bfloat16"})

        def reward_fn(completions, **kw):
            return [reward_text(c) for c in completions]

        trainer = GRPOTrainer(model=folder, reward_funcs=reward_fn, args=cfg,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompt_texts]),
                              processing_class=AutoTokenizer.from_pretrained(folder))
        trainer.add_callback(Timer())
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        del trainer
    free(args.device)
    if len(times) != total:
        raise RuntimeError(f"TRL ran {len(times)} steps, not {total}")
    return {"step_s": statistics.median(times[args.warmup:]), "version": __import__("trl").__version__}


def plan_figure(folder: str, args, row_len: int, engine_kind: str) -> dict:
    """`rlpost plan memory`'s figure for this step, in MiB: rlpost's own layout (rlpost.plan.memory.plan, what the
    command prints by default) of the same job as a config: bf16 parameters, one process, the same prompts,
    samples, response tokens, micro-batch and engine, prompts of the step's longest prompt. Its peak is what the
    largest measured mem/peak_<role> is checked against (the generic ZeRO-3 layout, which rlpost does not
    implement, counted a second copy of the weights for the engine and 8 B/param of state)."""
    from rlpost.plan.memory import plan, plan_inputs

    total = torch.cuda.get_device_properties(0).total_memory if args.device.startswith("cuda") else 80e9
    inputs = [f"model.name={folder}", "model.dtype=bfloat16", f"rollout.prompts_per_step={args.prompts}",
              f"rollout.k={args.k}", f"rollout.max_new_tokens={args.new_tokens}",
              f"trainer.micro_batch_size={args.micro_batch}", f"rollout.engine={engine_kind}"]
    p = plan(*plan_inputs(inputs, prompt_tokens=max(row_len - args.new_tokens, 1), gpu_memory_gb=total / 1e9),
             suggest=False)
    return {"per_gpu_mib": p.peak / MiB, "peak_phase": p.peak_phase, "params": p.params, "notes": p.job.notes,
            "terms_mib": {f"{t.name} ({t.phase})": t.bytes / MiB for t in p.terms}}


def mfu(n_params: int, tokens: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: 6 * N * tokens / seconds / peak."""
    return 6 * n_params * tokens / seconds / (peak_tflops * 1e12)


def skip_reason(part: str, args) -> str | None:
    """Why a part cannot run here (None: it can)."""
    if part in ("vllm", "vllm_features"):
        from rlpost.rollout.vllm_engine import vllm_unavailable_reason

        if part == "vllm_features" and vllm_unavailable_reason() is None:
            return None  # on the CPU too, with vLLM's CPU build (its code path, without sleep mode)
        if not args.device.startswith("cuda"):
            return "vLLM runs here on CUDA only (its CPU build has its own venv: make test-vllm)"
        return vllm_unavailable_reason()
    if part == "trl":
        try:
            import datasets  # noqa: F401
            import trl  # noqa: F401
        except ImportError as e:
            return f"TRL is not installed ({e}): pip install -e '.[bench]'"
    return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="a toy Qwen2 (hidden 64, 2 layers) instead of the 0.5B shape")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default 8; --tiny 2)")
    ap.add_argument("--k", type=int, default=None, help="samples per prompt (default 8; --tiny 2)")
    ap.add_argument("--new-tokens", type=int, default=None, help="completion tokens (default 256; --tiny 8)")
    ap.add_argument("--micro-batch", type=int, default=None, help="rlpost trainer rows per backward (default 16)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                    help="the device's dense bf16 peak for MFU (default: H100 SXM, 989)")
    ap.add_argument("--vllm-memory", type=float, default=0.35, help="vLLM's gpu_memory_utilization beside the trainer")
    ap.add_argument("--skip", nargs="*", default=[], choices=["native", "vllm", "vllm_features", "trl"],
                    help="parts not to run")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    small = {"prompts": 2, "k": 2, "new_tokens": 8, "micro_batch": 2} if args.tiny else \
        {"prompts": 8, "k": 8, "new_tokens": 256, "micro_batch": 16}
    for key, value in small.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; use --device cpu --tiny for the CPU check")
    from benchmarks.common import prompts

    shape = TINY if args.tiny else QWEN25_05B
    prompt_texts = prompts(args.prompts * (args.warmup + args.steps))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# device: {device_name}; torch {torch.__version__}; model: {'tiny Qwen2' if args.tiny else 'Qwen2.5-0.5B'}"
          f"-shaped, random weights, bf16; {args.prompts} prompts x {args.k} samples x {args.new_tokens} tokens; "
          f"{args.warmup} warm-up + {args.steps} measured steps per side", flush=True)
    res = {"device": device_name, "peak_tflops": args.peak_tflops, "sides": {}, "skipped": {}, "failed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "qwen2")
        t0 = time.perf_counter()
        n = save_model(folder, shape, torch.bfloat16, args.device)
        res["params"] = n
        args.max_len = max(len(p) for p in prompt_texts) * 2 + args.new_tokens + 64  # a generous token bound
        print(f"# model built and saved in {time.perf_counter() - t0:.1f} s: {n / 1e6:.1f} M parameters; "
              f"MFU peak used: {args.peak_tflops:.0f} TFLOP/s (bf16 dense)", flush=True)
        for part in ("native", "vllm", "vllm_features", "trl"):
            reason = "--skip" if part in args.skip else skip_reason(part, args)
            if reason:
                res["skipped"][part] = reason
                print(f"{part}: skipped: {reason}", flush=True)
                continue
            t0 = time.perf_counter()
            try:  # one part failing must not cost the others their numbers (a GPU run is one call)
                if part == "vllm_features":
                    res["vllm_features"] = vllm_features(folder, prompt_texts, args)
                    print(f"vllm_features: ok in {time.perf_counter() - t0:.0f} s", flush=True)
                    continue
                side = trl_side(folder, prompt_texts, args) if part == "trl" else \
                    rlpost_side(folder, prompt_texts, args, part)
            except Exception as e:
                res["failed"][part] = f"{type(e).__name__}: {e}"
                print(f"{part}: FAILED after {time.perf_counter() - t0:.0f} s:\n{traceback.format_exc()[-3000:]}",
                      flush=True)
                free(args.device)
                continue
            side["wall_s"] = time.perf_counter() - t0
            res["sides"][part] = side
            if part != "trl":
                side["mfu_step"] = mfu(n, side["trained_tokens"], side["step_s"], args.peak_tflops)
                side["mfu_train"] = mfu(n, side["trained_tokens"], side["train_s"], args.peak_tflops)
                side["plan"] = plan_figure(folder, args, side["row_len"], part)
                print_side(part, side)
            else:
                print(f"TRL {side['version']} GRPOTrainer: median step {side['step_s']:.3f} s "
                      f"({side['wall_s']:.0f} s with loading)", flush=True)
    if "trl" in res["sides"] and "native" in res["sides"]:
        res["trl_over_rlpost"] = res["sides"]["trl"]["step_s"] / res["sides"]["native"]["step_s"]
        print(f"TRL step / rlpost native step (same GPU, same work): {res['trl_over_rlpost']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


def print_side(part: str, side: dict) -> None:
    name = f"rlpost, {'native engine' if part == 'native' else 'vLLM'} ({side['engine']})"
    print(f"{name}: median step {side['step_s']:.3f} s, train {side['train_s']:.3f} s; tokens/s rollout "
          f"{side['rollout_tokens_per_s']:.0f}, whole step {side['step_tokens_per_s']:.0f} (mean response "
          f"{side['response_len_mean']:.1f} tokens); MFU {100 * side['mfu_step']:.2f}% over the step, "
          f"{100 * side['mfu_train']:.2f}% in train ({side['trained_tokens']:.0f} trained positions)"
          + (f"; gpu/util {side['gpu_util']:.0f}%" if side["gpu_util"] is not None else ""), flush=True)
    plan = side["plan"]
    measured = max((v for v in side["mem_peak_mib"].values() if math.isfinite(v)), default=math.nan)
    print(f"  memory, MiB: measured peak per role (mem/peak_<role>, largest {measured:,.0f}) vs `rlpost plan "
          f"memory` per GPU {plan['per_gpu_mib']:,.0f} (its {plan['peak_phase']} phase): plan / measured "
          f"{plan['per_gpu_mib'] / measured:.2f}" + "".join(f"\n    note: {n}" for n in plan["notes"]))
    for role, peak in side["mem_peak_mib"].items():
        print(f"    {role:<11}{peak:>10,.0f}")
    print(f"    {'any step':<11}{side['run_peak_mib']:>10,.0f}  (the largest role peak of any step, warm-up too)")
    print("  plan terms (phase), MiB per GPU: " + ", ".join(f"{k} {v:,.0f}" for k, v in plan["terms_mib"].items()))


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
