"""One whole GRPO step, rlpost vs TRL's GRPOTrainer, at equal work, measured in the same process.

    .venv/bin/pip install -e '.[bench]'              # TRL (keeps torch 2.13.0+cpu and transformers 5.23)
    .venv/bin/python benchmarks/grpo_step_vs_trl.py  # 2 warm-up + 8 measured steps each, interleaved

Equal work, both sides:
- the same tiny Llama (hidden 256, 4 layers, 4 heads, intermediate 1024, a 512-token BPE trained on
  the spot: 4.46 M parameters), fp32, gradient checkpointing off, loaded from the same saved folder;
- 8 prompts x 8 samples, exactly 32 completion tokens each (min_new_tokens = max = 32 on both sides,
  checked after the run), temperature 1, no top-k / top-p;
- GRPO with beta = 0.04 (a frozen reference model scores every batch), clip 0.2 / 0.28, token-mean
  loss (TRL loss_type="dapo"), one AdamW step per batch, gradient clipping at 1.0, no accumulation;
- the same reward function (a cheap function of the decoded completion text);
- the same torch thread count (--threads; default: torch's own, 2 on this machine).

rlpost runs its real controller (rlpost.controller.Controller.step: native rollout engine, Reward,
Reference, get_algorithm("grpo"), Trainer, WeightSync), whose own per-role timing is reported.
TRL runs GRPOTrainer.train(); its step is timed from on_step_begin to on_step_end (generation,
reference, loss, backward and optimizer step; its logging between steps is not counted). The two
alternate step by step (each rlpost step runs inside TRL's on_step_end callback, outside TRL's timed
span), so load from other processes on this shared machine hits both alike. Reported: the medians and
minima of each side, and the median of the per-step ratios (TRL time / rlpost time of the same pair).
CPU seconds (process time) are reported next to wall-clock: they are less sensitive to other load.

FLOP/s: see benchmarks/matmul_peak.py for the counting rule, applied to the token positions each role
computes (the reference and the trainer score each distinct prompt once); the matmul peak is measured in
this run (before and after the steps, the best of both), and each rlpost role's achieved FLOP/s is
printed as a fraction of it, for the median step and for the fastest. The last line is the bound this
sets: the fraction of the peak the whole step would have to sustain to be 3x faster than TRL's median.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import env_line, load_line, median, n_params, prompts, save_llama  # noqa: E402

import torch  # noqa: E402

ROLES = ("rollout", "reward", "reference", "advantages", "train", "sync", "other")


def reward_text(text: str) -> float:
    """A cheap deterministic reward: the fraction of digits in the completion (same on both sides)."""
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def build_rlpost(folder: str, prompt_texts: list[str], lr: float, n_prompts: int, k: int, new_tokens: int,
                 compile: bool = False, precision: str = "fp32", rollout_dtype: str = "auto"):
    """rlpost's controller with every role, as `rlpost train` wires it for an HF model (rollout_dtype: the
    engine's rollout.dtype, 'auto' being the trainer's precision)."""
    from rlpost.algorithms import get_algorithm
    from rlpost.config import ModelConfig, RLConfig, RolloutConfig, TrainerConfig
    from rlpost.controller import Controller, Roles
    from rlpost.models import compile_model, load_model
    from rlpost.packing import shared_prompt
    from rlpost.reference import Reference
    from rlpost.env.reward import Reward
    from rlpost.rollout import SamplingParams, build_engine
    from rlpost.trainer import Trainer
    from rlpost.weight_sync import WeightSync

    model, tok = load_model(ModelConfig(name=folder))
    engine = build_engine("auto", model, tok, dtype=precision if rollout_dtype == "auto" else rollout_dtype)
    rows = [{"prompt": p, "answer": ""} for p in prompt_texts]
    reference = Reference(model, TrainerConfig(precision=precision))
    if compile:  # as `rlpost train trainer.compile=true` does it
        compile_model(model)
        compile_model(reference.model)
    roles = Roles(engine=engine, reward=Reward(lambda completion, row: reward_text(completion), tok),
                  algorithm=get_algorithm("grpo", clip_low=0.2, clip_high=0.28, beta=0.04),
                  trainer=Trainer(model, TrainerConfig(lr=lr, grad_clip=1.0, precision=precision)),
                  weight_sync=WeightSync(model, engine), reference=reference)
    ctl = Controller(roles, RLConfig(),
                     SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=1.0),
                     RolloutConfig(prompts_per_step=n_prompts, k=k), rows=rows,
                     prompt_ids=[tok.encode_prompt(p) for p in prompt_texts], seed=0)
    # instrumentation, outside the roles' own code: the batch shapes the FLOP count needs, and the CPU
    # seconds (process time) of the three roles that do the FLOPs, next to the controller's wall-clock
    ctl.cpu = {}
    generate, train_step = engine.generate, ctl.roles.trainer.step

    def cpu_timed(role, fn):
        def timed(*a, **kw):
            c0 = time.process_time()
            out = fn(*a, **kw)
            ctl.cpu[role] = time.process_time() - c0
            return out
        return timed

    def generate_and_record(prompt_ids, k, params, seed=0):
        batch = generate(prompt_ids, k, params, seed=seed)
        lens = [len(p) for p in prompt_ids]
        # positions the reference and the trainer compute: each distinct prompt once, then every response
        # (rlpost.models.token_logprobs' shared-prompt path; all B x T when nothing is shared)
        split = shared_prompt(batch)
        B, T = batch.input_ids.shape
        scored = B * T if split is None else len(split[1]) * split[0] + B * (T - split[0])
        engine.sizes = {"prompt_tokens": sum(lens), "prompt_min": min(lens), "P": max(lens), "T": T,
                        "scored": scored}
        return batch

    class CPUTimedReference:
        def __init__(self, ref):
            self.ref, self.call = ref, cpu_timed("reference", ref.__call__)

        def __call__(self, batch):
            return self.call(batch)

    engine.generate = cpu_timed("rollout", generate_and_record)
    ctl.roles.trainer.step = cpu_timed("train", train_step)
    ctl.roles.reference = CPUTimedReference(ctl.roles.reference)
    return ctl, type(engine).__name__


def build_trl(folder: str, prompt_texts: list[str], steps: int, lr: float, n_prompts: int, k: int,
              new_tokens: int, out: str, compile: bool = False, bf16: bool = False):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    def reward_fn(completions, **kw):
        return [reward_text(c) for c in completions]

    cfg = GRPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=n_prompts * k,  # completions per step
        gradient_accumulation_steps=1, num_generations=k, max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens}, temperature=1.0, top_k=0, top_p=1.0,
        beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", num_iterations=1, learning_rate=lr,
        max_grad_norm=1.0, weight_decay=0.0, gradient_checkpointing=False, bf16=bf16, fp16=False, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        seed=0, lr_scheduler_type="constant", warmup_steps=0, torch_compile=compile,
    )
    tok = AutoTokenizer.from_pretrained(folder)
    ds = Dataset.from_list([{"prompt": p} for p in prompt_texts])
    return GRPOTrainer(model=folder, reward_funcs=reward_fn, args=cfg, train_dataset=ds, processing_class=tok)


def llama_size(args) -> dict:
    return {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "intermediate": args.intermediate}


def size_name(args) -> str:
    return f"{args.hidden}/{args.layers}/{args.heads}/{args.intermediate}"


def compare_precisions(args) -> dict:
    """--precision bf16: rlpost's step under trainer.precision=bf16 against its own fp32 step, and both
    against TRL's GRPOTrainer with bf16=True and in fp32, in one run.

    Two rlpost controllers (fp32 and bf16, each its own copy of the model) and two TRL trainers (bf16=False,
    then bf16=True) run at equal work as in the fp32 comparison. TRL's trainers run one after the other (each
    owns its training loop); inside every TRL step's on_step_end callback both rlpost controllers take one
    step, in alternating order, so each TRL step has an fp32 and a bf16 rlpost step beside it, under the
    same load. Ratios are medians of per-step ratios within those triples. rlpost's bf16 covers the
    reference and the trainer (rlpost.models.autocast) and, as rollout.dtype=auto does, the rollout
    engine (bf16 autocast over the shared fp32 weights, bf16 KV cache); `--rollout-dtype fp32` keeps the
    bf16 controller's engine in fp32. The bf16 / fp32 matmul throughput of this CPU at the step's MLP shapes
    is printed too: it decides what bf16 can gain here.
    """
    import transformers
    from transformers import PrinterCallback, TrainerCallback

    from benchmarks.matmul_peak import _gflops

    transformers.logging.set_verbosity_error()
    total, w = args.steps + args.warmup, args.warmup
    all_prompts = prompts(args.prompts * total, words=args.prompt_words)
    load_before = load_line()
    # the MLP's two matmul shapes (up, then down) on 512 token rows: what bf16 autocast speeds up, or not
    rows = 512
    shapes = ((rows, args.intermediate, args.hidden), (rows, args.hidden, args.intermediate))
    mm = {dt: [_gflops(m, n, k, 3, dt)[0] for m, n, k in shapes] for dt in (torch.float32, torch.bfloat16)}
    rl = {"fp32": [], "bf16": []}           # rlpost metrics per step, in step order
    paired = {"fp32": [], "bf16": []}       # per TRL phase: (TRL s, rlpost fp32 s, rlpost bf16 s) per step
    lengths = {"fp32": [], "bf16": []}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        hf, _ = save_llama(folder, **llama_size(args))
        N_all = n_params(hf)
        ctls = {p: build_rlpost(folder, all_prompts, args.lr, args.prompts, args.k, args.new_tokens, precision=p,
                                rollout_dtype=args.rollout_dtype)[0] for p in ("fp32", "bf16")}
        for trl_precision in ("fp32", "bf16"):
            class Interleave(TrainerCallback):
                phase = trl_precision

                def on_step_begin(self, a, state, control, **kw):
                    self.t0 = time.perf_counter()

                def on_step_end(self, a, state, control, **kw):
                    trl_s = time.perf_counter() - self.t0
                    step = len(rl["fp32"]) + 1
                    order = ("fp32", "bf16") if step % 2 else ("bf16", "fp32")
                    for p in order:
                        rl[p].append(ctls[p].step(step))
                    paired[self.phase].append((trl_s, rl["fp32"][-1]["time/step"], rl["bf16"][-1]["time/step"]))

            class Lengths(TrainerCallback):
                phase = trl_precision

                def on_log(self, a, state, control, logs=None, **kw):
                    if logs and "completions/mean_length" in logs:
                        lengths[self.phase].append((logs["completions/min_length"], logs["completions/max_length"]))

            trainer = build_trl(folder, all_prompts, total, args.lr, args.prompts, args.k, args.new_tokens,
                                os.path.join(tmp, f"trl-{trl_precision}"), bf16=trl_precision == "bf16")
            trainer.add_callback(Interleave())
            trainer.add_callback(Lengths())
            trainer.remove_callback(PrinterCallback)
            trainer.train()
    wall = time.perf_counter() - t_start
    load_after = load_line()

    trl_ok = all(lo == hi == args.new_tokens for p in lengths for lo, hi in lengths[p]) and \
        all(len(lengths[p]) == total for p in lengths)
    rl_ok = all(m["rollout/response_len_mean"] == m["rollout/response_len_max"] == args.new_tokens
                for p in rl for m in rl[p])
    measured = {p: paired[p][w:] for p in paired}            # TRL warm-up steps dropped in each phase
    kept = [i for phase in range(2) for i in range(phase * total + w, (phase + 1) * total)]
    rl_m = {p: [rl[p][i] for i in kept] for p in rl}
    both = [x for p in measured for x in measured[p]]

    def ratio(pairs):
        return median([a / b for a, b in pairs])

    res = {
        "trl_fp32_median_s": median([t for t, _, _ in measured["fp32"]]),
        "trl_bf16_median_s": median([t for t, _, _ in measured["bf16"]]),
        "rlpost_fp32_median_s": median([f for _, f, _ in both]),
        "rlpost_bf16_median_s": median([b for _, _, b in both]),
        "bf16_speedup_vs_rlpost_fp32": ratio([(f, b) for _, f, b in both]),
        "bf16_speedup_vs_trl_bf16": ratio([(t, b) for t, _, b in measured["bf16"]]),
        "bf16_speedup_vs_trl_fp32": ratio([(t, b) for t, _, b in measured["fp32"]]),
        "fp32_speedup_vs_trl_fp32": ratio([(t, f) for t, f, _ in measured["fp32"]]),
        "roles_median_s": {p: {r: median([m[f"time/{r}"] for m in rl_m[p]]) for r in ROLES} for p in rl_m},
        "matmul_gflops": {str(dt).replace("torch.", ""): g for dt, g in mm.items()},
        "equal_work": trl_ok and rl_ok, "load_before": load_before, "load_after": load_after,
        "steps_s": {p: [{"trl": t, "rlpost_fp32": f, "rlpost_bf16": b} for t, f, b in paired[p]] for p in paired},
        "roles_s": {p: [{r: m[f"time/{r}"] for r in ROLES} for m in rl[p]] for p in rl},
    }
    print(f"# {env_line()}")
    print(f"# load average before: {load_before}; after: {load_after}")
    print(f"# Llama {size_name(args)}, {N_all / 1e6:.2f} M params; {args.prompts} prompts x {args.k} samples x "
          f"{args.new_tokens} tokens; beta 0.04; {args.warmup} warm-up + {args.steps} measured steps per TRL "
          f"precision, each paired with one rlpost fp32 and one rlpost bf16 step; whole run {wall:.0f} s; "
          f"rlpost bf16 rollout.dtype={args.rollout_dtype}")
    print(f"# equal work checked (every completion {args.new_tokens} tokens, all four): "
          f"{'yes' if trl_ok and rl_ok else 'NO'}")
    print(f"{'':<36}{'median s':>9}{'min s':>8}")
    trl = f"TRL {__import__('trl').__version__} GRPOTrainer"
    for name, xs in ((f"{trl}, fp32", [t for t, _, _ in measured["fp32"]]),
                     (f"{trl}, bf16=True", [t for t, _, _ in measured["bf16"]]),
                     ("rlpost Controller.step, fp32", [f for _, f, _ in both]),
                     ("rlpost Controller.step, bf16", [b for _, _, b in both])):
        print(f"{name:<36}{median(xs):>9.3f}{min(xs):>8.3f}")
    target = res["bf16_speedup_vs_rlpost_fp32"]
    print(f"rlpost bf16 vs rlpost fp32 (fp32 s / bf16 s, same TRL step): {target:.2f}x   "
          f"target >= 2x: {'met' if target >= 2 else 'missed'}")
    print(f"rlpost bf16 vs TRL bf16=True: {res['bf16_speedup_vs_trl_bf16']:.2f}x;  rlpost bf16 vs TRL fp32: "
          f"{res['bf16_speedup_vs_trl_fp32']:.2f}x;  "
          f"rlpost fp32 vs TRL fp32: {res['fp32_speedup_vs_trl_fp32']:.2f}x;  "
          f"TRL bf16 vs TRL fp32: {res['trl_fp32_median_s'] / res['trl_bf16_median_s']:.2f}x (ratio of medians)")
    for p in ("fp32", "bf16"):
        print(f"  per step beside TRL {p} (TRL / rlpost fp32 / rlpost bf16 s): "
              + ", ".join(f"{t:.2f}/{f:.2f}/{b:.2f}" for t, f, b in paired[p]))
    roles = res["roles_median_s"]
    print("rlpost per role, median s fp32 -> bf16: " + ", ".join(
        f"{r} {roles['fp32'][r]:.3f} -> {roles['bf16'][r]:.3f}" for r in ROLES if roles["fp32"][r] >= 0.001))
    print(f"matmul GFLOP/s on this CPU ({torch.get_num_threads()} threads), {rows}x{args.hidden} @ "
          f"{args.hidden}x{args.intermediate} and {rows}x{args.intermediate} @ {args.intermediate}x{args.hidden}: "
          f"fp32 {mm[torch.float32][0]:.1f} / {mm[torch.float32][1]:.1f}, "
          f"bf16 {mm[torch.bfloat16][0]:.1f} / {mm[torch.bfloat16][1]:.1f}; "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="measured steps (each side)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured first steps (each side)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=0,
                    help="start each prompt with this many random words of its own (long prompts)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile both sides: rlpost's trainer.compile, TRL's torch_compile (compiling "
                         "happens in the warm-up steps; raise --warmup if shapes keep recompiling)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: rlpost's trainer.precision=bf16 against its fp32 step and against TRL in "
                         "bf16=True and in fp32, all in one run (see compare_precisions)")
    ap.add_argument("--rollout-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                    help="--precision bf16: what rlpost's bf16 controller samples in (rollout.dtype; auto: bf16)")
    ap.add_argument("--hidden", type=int, default=256, help="the Llama's hidden size")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 4 x hidden)")
    args = ap.parse_args(argv)
    args.intermediate = args.intermediate or 4 * args.hidden
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "bf16":
        return compare_precisions(args)
    import transformers
    from transformers import PrinterCallback, TrainerCallback

    from benchmarks.matmul_peak import matmul_peak

    transformers.logging.set_verbosity_error()
    total = args.steps + args.warmup
    all_prompts = prompts(args.prompts * total, words=args.prompt_words)
    load_before = load_line()
    peak_before = matmul_peak(quick=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        hf, _ = save_llama(folder, **llama_size(args))
        N_all, N_emb = n_params(hf), hf.get_input_embeddings().weight.numel()
        ctl, engine_name = build_rlpost(folder, all_prompts, args.lr, args.prompts, args.k, args.new_tokens,
                                        args.compile)
        trl_wall, trl_cpu, rl_metrics, rl_cpu = [], [], [], []

        class Interleave(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                self.c0, self.t0 = time.process_time(), time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                trl_wall.append(time.perf_counter() - self.t0)
                trl_cpu.append(time.process_time() - self.c0)
                c0 = time.process_time()
                m = ctl.step(len(rl_metrics) + 1)
                rl_metrics.append({**m, **{f"cpu/{r}": v for r, v in ctl.cpu.items()}})
                rl_cpu.append(time.process_time() - c0)

        logged = []

        class Lengths(TrainerCallback):
            def on_log(self, a, state, control, logs=None, **kw):
                if logs and "completions/mean_length" in logs:
                    logged.append((logs["completions/min_length"], logs["completions/max_length"]))

        trainer = build_trl(folder, all_prompts, total, args.lr, args.prompts, args.k, args.new_tokens,
                            os.path.join(tmp, "trl"), args.compile)
        trainer.add_callback(Interleave())
        # TRL's phases, timed around its own methods: generation (transformers.generate), and generation +
        # scoring (rewards, reference log-probs, advantages); the rest of its step is the loss, backward
        # and optimizer step
        trl_phase = {"generate": [], "generate_and_score": []}
        for method, key in (("_generate_single_turn", "generate"), ("_generate_and_score_completions",
                                                                    "generate_and_score")):
            def timed(*a, _fn=getattr(trainer, method), _key=key, **kw):
                t0 = time.perf_counter()
                out = _fn(*a, **kw)
                trl_phase[_key].append(time.perf_counter() - t0)
                return out
            setattr(trainer, method, timed)
        trainer.add_callback(Lengths())
        trainer.remove_callback(PrinterCallback)  # TRL's per-step log dicts: Lengths reads what it needs
        t_start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t_start
    peak_after = matmul_peak(quick=True)
    peak = max(peak_before["peak_gflops"], peak_after["peak_gflops"])
    load_after = load_line()

    # equal work, checked: every completion on both sides has exactly new_tokens tokens
    trl_ok = all(lo == hi == args.new_tokens for lo, hi in logged) and len(logged) == total
    rl_ok = all(m["rollout/response_len_mean"] == m["rollout/response_len_max"] == args.new_tokens
                for m in rl_metrics)
    if not (trl_ok and rl_ok):
        print(f"WARNING: unequal work: TRL completion lengths (min, max) per step {logged}; rlpost "
              f"{[(m['rollout/response_len_mean'], m['rollout/response_len_max']) for m in rl_metrics]}")

    w = args.warmup
    trl_s, trl_c = trl_wall[w:], trl_cpu[w:]
    rl_m, rl_c = rl_metrics[w:], rl_cpu[w:]
    rl_s = [m["time/step"] for m in rl_m]
    ratios = [a / b for a, b in zip(trl_s, rl_s)]
    cpu_ratios = [a / b for a, b in zip(trl_c, rl_c)]
    med = {r: median([m[f"time/{r}"] for m in rl_m]) for r in ROLES}
    share = {r: median([m[f"time_share/{r}"] for m in rl_m]) for r in ROLES}

    # FLOPs by the 2N / 6N rule, N = parameters that take part in matmuls (all but the input embedding)
    N = N_all - N_emb
    B = args.prompts * args.k
    sizes = ctl.roles.engine.sizes
    # rollout: each prompt prefilled once, then new_tokens - 1 decode forwards of B rows (the last token
    # drawn needs no forward)
    flops = {"rollout": 2 * N * (sizes["prompt_tokens"] + B * (args.new_tokens - 1)),
             "reference": 2 * N * sizes["scored"], "train": 6 * N * sizes["scored"]}
    step_flops = sum(flops.values())

    print(f"# {env_line()}")
    print(f"# load average before: {load_before}; after: {load_after}")
    print(f"# Llama {size_name(args)}, {N_all / 1e6:.2f} M params ({N / 1e6:.2f} M in matmuls); "
          f"{args.prompts} prompts x "
          f"{args.k} samples x {args.new_tokens} tokens (prompts {sizes['prompt_min']}-{sizes['P']} tokens, rows "
          f"{sizes['T']}; reference and train compute {sizes['scored']} of the {B * sizes['T']} positions, "
          f"each prompt once); beta 0.04; fp32; {args.warmup} warm-up + {args.steps} measured steps each, "
          f"interleaved; whole run {wall:.0f} s; rlpost rollout engine: {engine_name}; "
          f"torch.compile: {'both sides' if args.compile else 'off'}")
    print(f"# equal work checked (every completion {args.new_tokens} tokens on both sides): "
          f"{'yes' if trl_ok and rl_ok else 'NO'}")
    print(f"{'':<28}{'median s':>9}{'min s':>8}{'median CPU s':>14}")
    print(f"{'TRL ' + __import__('trl').__version__ + ' GRPOTrainer step':<28}{median(trl_s):>9.3f}{min(trl_s):>8.3f}"
          f"{median(trl_c):>14.3f}")
    print(f"{'rlpost Controller.step':<28}{median(rl_s):>9.3f}{min(rl_s):>8.3f}{median(rl_c):>14.3f}")
    print(f"speed-up rlpost vs TRL (TRL s / rlpost s, same pair): median {median(ratios):.2f}x, "
          f"ratio of minima {min(trl_s) / min(rl_s):.2f}x, CPU-seconds median {median(cpu_ratios):.2f}x")
    print(f"  per step: {', '.join(f'{x:.2f}' for x in ratios)}")
    if len(trl_phase["generate"]) == len(trl_phase["generate_and_score"]) == total:
        gen, gas = trl_phase["generate"][w:], trl_phase["generate_and_score"][w:]
        trl_train = [t - g for t, g in zip(trl_s, gas)]
        rl_score = [m["time/reward"] + m["time/reference"] + m["time/advantages"] for m in rl_m]
        rl_train = [m["time/train"] + m["time/sync"] + m["time/other"] for m in rl_m]
        print("phase medians, TRL vs rlpost (same steps):")
        for phase, a, b in (("rollout (generation)", gen, [m["time/rollout"] for m in rl_m]),
                            ("reward + reference + advantages", [x - y for x, y in zip(gas, gen)], rl_score),
                            ("train (loss, backward, step) + rest", trl_train, rl_train)):
            res_phase = median([x / y for x, y in zip(a, b)])
            print(f"  {phase:<36} TRL {median(a):7.3f} s   rlpost {median(b):7.3f} s   ratio {res_phase:5.2f}x")
    else:
        print(f"(TRL's phases could not be timed: {len(trl_phase['generate'])} generate calls for {total} steps)")
    print("rlpost per role (median s, median share of the step): "
          + ", ".join(f"{r} {med[r]:.3f} ({100 * share[r]:.0f}%)" for r in ROLES))
    print(f"rlpost rollout {median([m['rollout/tokens_per_s'] for m in rl_m]):.0f} tokens/s (median); "
          f"engine/trainer |dlogp| max {max(m['rollout/logp_mismatch_max'] for m in rl_m):.1e}, "
          f"mean {median([m['rollout/logp_mismatch_mean'] for m in rl_m]):.1e}")
    print(f"fp32 matmul peak (this run, {torch.get_num_threads()} threads, best before/after): {peak:.0f} GFLOP/s "
          f"(before {peak_before['peak_gflops']:.0f}, after {peak_after['peak_gflops']:.0f})")
    peak_cpu = max(peak_before["peak_gflops_per_cpu_s"], peak_after["peak_gflops_per_cpu_s"])
    print(f"  GFLOP per CPU-second (process time, a measure less disturbed by other load): peak {peak_cpu:.0f}")
    frac, frac_cpu = {}, {}
    for role in (*flops, "step"):
        f = step_flops if role == "step" else flops[role]
        walls = rl_s if role == "step" else [m[f"time/{role}"] for m in rl_m]
        cpus = rl_c if role == "step" else [m[f"cpu/{role}"] for m in rl_m]
        g_med, g_best, g_cpu = f / median(walls) / 1e9, f / min(walls) / 1e9, f / median(cpus) / 1e9
        frac[role], frac_cpu[role] = g_med / peak, g_cpu / peak_cpu
        print(f"  {role:<10} {f / 1e9:6.1f} GFLOP: median {g_med:5.1f} GFLOP/s = {100 * g_med / peak:3.0f}% of peak, "
              f"best {g_best:5.1f} = {100 * g_best / peak:3.0f}%; per CPU-second {g_cpu:5.1f} = "
              f"{100 * frac_cpu[role]:3.0f}% of the CPU-second peak")
    need = step_flops / (median(trl_s) / 3) / 1e9
    print(f"bound: {step_flops / 1e9:.1f} GFLOP per step at the {peak:.0f} GFLOP/s peak take "
          f"{step_flops / peak / 1e9:.3f} s; 3x TRL's median ({median(trl_s) / 3:.3f} s) needs {need:.0f} GFLOP/s = "
          f"{100 * need / peak:.0f}% of the peak, sustained over the whole step")
    res = {"trl_median_s": median(trl_s), "trl_min_s": min(trl_s), "rlpost_median_s": median(rl_s),
           "rlpost_min_s": min(rl_s), "speedup_median": median(ratios), "speedup_cpu_median": median(cpu_ratios),
           "rlpost_roles_median_s": med, "rlpost_roles_median_share": share, "peak_gflops": peak,
           "train_frac_of_peak": frac["train"], "step_frac_of_peak": frac["step"], "frac_of_peak_for_3x": need / peak,
           "train_frac_of_peak_cpu": frac_cpu["train"], "peak_gflops_per_cpu_s": peak_cpu, "trl_steps_s": trl_s,
           "rlpost_steps_s": rl_s, "equal_work": trl_ok and rl_ok, "load_before": load_before,
           "load_after": load_after}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
