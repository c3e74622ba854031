"""`rlpost plan memory` and `rlpost plan throughput`: estimates made before (or from) a run
(rlpost/plan/memory.py, rlpost/plan/throughput.py)."""

from __future__ import annotations

import argparse
import json
import math

from rlpost.commands.common import error
from rlpost.plan import throughput
from rlpost.plan.memory import LAYOUTS, Setup, estimate, format_plan, format_report, plan, plan_inputs, shape_for


def _number(kind: type, low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False):
    """An argparse `type`: a finite `kind` in [low, high] (an end open when asked). A flag given NaN, inf, 0 or a
    negative number where none means anything is refused by argparse (exit 2, naming the flag), not turned
    into a table of nan or a ZeroDivisionError."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        below = value <= low if open_low else value < low
        above = value >= high if open_high else value > high
        if not math.isfinite(value) or below or above:
            lo, hi = "(" if open_low else "[", ")" if open_high or high == math.inf else "]"
            raise argparse.ArgumentTypeError(f"must be in {lo}{low:g}, {high:g}{hi}, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


COUNT, SIZE = _number(int, 1), _number(int, 0)  # at least one; zero allowed
POSITIVE, NONNEG = _number(float, 0, open_low=True), _number(float, 0)
FRACTION = _number(float, 0, 1, open_low=True)  # (0, 1]
GPU_GB = _number(float, 0, 1e6, open_low=True)  # up to a petabyte: 1e300 GB overflowed to an 'inf GB usable' plan
HEADROOM = _number(float, 0, 1, open_high=True)  # [0, 1)


def add_plan(sub) -> None:
    """`rlpost plan SUBCOMMAND`: estimates made before a run (each estimate is one subcommand)."""
    p = sub.add_parser("plan", help="estimate a job: `plan memory MODEL`, `plan throughput RUN_DIR`",
                       description="Estimates made before a run, from the model's shape and the job's settings.")
    plan_sub = p.add_subparsers(dest="plan_command", metavar="ESTIMATE")
    p.set_defaults(plan_help=p.print_help)
    add_plan_memory(plan_sub)
    add_plan_throughput(plan_sub)


def add_plan_memory(plan_sub) -> None:
    m = plan_sub.add_parser(
        "memory", help="GPU memory of an RL job: what each rlpost rank holds, term by term, and whether it fits",
        description="What each rank (one process, one GPU) of `rlpost train` holds for a config, with each term's "
                    "formula: the policy's weights, gradients and AdamW state (sharded under trainer.strategy="
                    "fsdp2), the full reference and engine copies every rank keeps, the native engine's fused "
                    "matrices, and the largest phase on top (rollout: KV cache; reference: its forward over the "
                    "rank's batch; train: one micro-batch's activations and the log-prob head's chunk). "
                    "`--layout zero3` prints the generic ZeRO-3 / FSDP estimate (18 B/param, sharded frozen copies) "
                    "instead, which rlpost itself does not implement.",
        epilog="INPUT: a recipe (.yaml), key=value overrides as `rlpost train` takes them, and MODEL: a size "
               "(0.5b 1.5b 3b 7b 14b 32b 72b: Qwen2.5; 8b 70b: Llama 3.1), a name (qwen2.5-7b, llama3.1-8b, ...) "
               "or a local folder with a config.json (default: the config's model.name)\n"
               "e.g. rlpost plan memory 7b trainer.strategy=fsdp2 rl.weight_sync=copy --ranks 8\n"
               "     rlpost plan memory 7b --layout zero3 --gpus 8 --critic --reward-model",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("inputs", nargs="*", metavar="INPUT", help="MODEL, RECIPE.yaml and key=value overrides")
    m.add_argument("--layout", choices=list(LAYOUTS), default="rlpost",
                   help="rlpost: what rlpost's own roles hold (default); zero3: the generic ZeRO-3 estimate, "
                        "whose own settings are listed below")
    m.add_argument("--ranks", type=COUNT, default=1, help="rlpost: torchrun ranks of trainer.strategy=fsdp2 "
                                                        "(default 1)")
    m.add_argument("--prompt-tokens", type=COUNT, default=128,
                   help="rlpost: tokens of the longest prompt (default 128)")
    z = m.add_argument_group("--layout zero3: the generic estimate's settings")
    z.add_argument("--seq-len", type=COUNT, default=4096, help="prompt + response tokens per sequence (default 4096)")
    z.add_argument("--batch", type=COUNT, default=64, help="rollout sequences in flight over all engines (default 64)")
    z.add_argument("--micro-batch", type=COUNT, default=1, help="sequences per training forward/backward (default 1)")
    z.add_argument("--gpus", type=COUNT, default=1, help="GPUs of the job, trainer and rollout (default 1)")
    m.add_argument("--gpu-memory-gb", "--gpu-gb", type=GPU_GB, default=80.0,
                   help="memory of one GPU in GB (default 80)")
    z.add_argument("--topology", choices=["colocated", "disaggregated", "async"], default="colocated",
                   help="colocated: every copy on every GPU; disaggregated / async: rollout engines on "
                        "--rollout-gpus of the GPUs, the rest train (default colocated)")
    z.add_argument("--rollout-gpus", type=COUNT, help="disaggregated / async: GPUs of the rollout engines "
                                                    "(default half of --gpus)")
    z.add_argument("--rollout-tp", type=COUNT, default=1,
                   help="tensor-parallel size of one rollout engine (default 1)")
    z.add_argument("--critic", action="store_true", help="a critic (PPO-style algorithms): a second trained copy")
    z.add_argument("--reward-model", action="store_true", help="a learned reward model (a verifier needs none)")
    z.add_argument("--lora-rank", type=SIZE, default=0, help="train LoRA adapters of this rank (0: full; default 0)")
    z.add_argument("--checkpointing", action="store_true", help="full activation checkpointing")
    z.add_argument("--precision", choices=["mixed", "fp32", "bf16"], default="mixed",
                   help="mixed: bf16 compute with fp32 master weights and AdamW (18 B/param); fp32 (16); "
                        "bf16: pure bf16 (8) (default mixed)")
    z.add_argument("--no-shard", action="store_true", help="do not shard the training state (no ZeRO-3 / FSDP)")
    z.add_argument("--no-flash-attention", action="store_true",
                   help="activations of attention that stores its s x s scores")
    m.add_argument("--headroom", type=HEADROOM, default=0.10,
                   help="fraction of each GPU kept free for the CUDA context and fragmentation (default 0.10)")
    m.add_argument("--json", action="store_true", help="print a JSON dict instead of the table")


def add_plan_throughput(plan_sub) -> None:
    t = plan_sub.add_parser(
        "throughput", help="a run's step time per role, predicted for other topologies and worker counts",
        description="Fits the step equation's terms (rollout, verifier, reference, train, sync) to RUN_DIR's own "
                    "per-role timings, composes them by topology (sum colocated, max async), predicts the step "
                    "time for other topologies and rollout worker counts, and names the bottleneck with what to "
                    "change (formulas: `python -c 'import rlpost.plan.throughput as m; help(m)'`).")
    t.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a run directory with RL steps in its metrics.jsonl")
    r = t.add_argument_group("before any run: a roofline of MODEL on GPUs (instead of RUN_DIR)")
    r.add_argument("--model", help="a size (7b), a named model or a model folder, as `plan memory` takes")
    r.add_argument("--gpus", type=COUNT, default=8, help="GPUs of the job (default 8)")
    r.add_argument("--rollout-gpus", type=COUNT, help="disaggregated / async: GPUs of the engines (default half)")
    r.add_argument("--prompts", type=COUNT, default=128, help="prompts per step (default 128)")
    r.add_argument("--k", type=COUNT, default=8, help="samples per prompt (default 8)")
    r.add_argument("--prompt-len", type=COUNT, default=512, help="prompt tokens (default 512)")
    r.add_argument("--response-len", type=COUNT, default=1024, help="mean response tokens (default 1024)")
    r.add_argument("--length-sigma", type=NONNEG, default=0.0,
                   help="response lengths log-normal with this sigma: the long tail (default 0: all equal)")
    r.add_argument("--max-response-len", type=COUNT, help="the length cap (default 4 x the mean)")
    r.add_argument("--verifier-s", type=NONNEG, default=0.0, help="seconds of scoring per step (default 0)")
    r.add_argument("--no-reference", action="store_true", help="no KL term: no reference forward")
    r.add_argument("--tflops", type=POSITIVE, default=989.0,
                   help="peak dense bf16 TFLOP/s of one GPU (default H100 989)")
    r.add_argument("--hbm-tbs", type=POSITIVE, default=3.35, help="HBM TB/s of one GPU (default H100 3.35)")
    r.add_argument("--mfu", type=FRACTION, default=0.4, help="fraction of peak FLOP/s reached (default 0.4)")
    r.add_argument("--decode-efficiency", type=FRACTION, default=0.6,
                   help="fraction of HBM bandwidth a decode step reaches (default 0.6)")
    r.add_argument("--network-gbs", type=POSITIVE, default=50.0,
                   help="GB/s of the weight broadcast to engines on other GPUs (default 50)")
    t.add_argument("--warmup", type=SIZE, default=3, help="first RL steps left out of the medians (default 3)")
    t.add_argument("--workers", type=COUNT, nargs="+", default=[1, 2, 4], help="rollout worker counts to predict")
    t.add_argument("--sync-gbps", type=POSITIVE, default=1.0,
                   help="GB/s of a weight transfer to a worker's own copy, when the run itself moved nothing "
                        "(default 1.0)")
    t.add_argument("--json", action="store_true", help="print a JSON dict instead of the table")


def cmd_plan(args) -> int:
    """`plan memory` prints rlpost.plan.memory's estimate (exit 0 whether or not it fits), `plan throughput` a
    run's step time per role or a roofline; `rlpost plan` alone prints its help."""
    if args.plan_command == "throughput":
        return plan_throughput(args)
    if args.plan_command == "memory":
        return plan_memory(args)
    args.plan_help()
    return 0


def plan_memory(args) -> int:
    """The table (or JSON) of what each rank holds: rlpost's own layout, or the generic ZeRO-3 estimate."""
    try:
        if args.layout == "rlpost":
            p = plan(*plan_inputs(args.inputs, args.ranks, args.prompt_tokens, args.gpu_memory_gb, args.headroom))
            print(json.dumps(p.to_dict(), indent=2) if args.json else format_plan(p))
            return 0
        if len(args.inputs) != 1 or "=" in args.inputs[0]:
            raise ValueError(f"--layout zero3 takes one MODEL (a size, a name or a folder), got {args.inputs}")
        shape = shape_for(args.inputs[0])
        setup = Setup(seq_len=args.seq_len, batch=args.batch, micro_batch=args.micro_batch, gpus=args.gpus,
                      gpu_memory_gb=args.gpu_memory_gb, topology=args.topology, rollout_gpus=args.rollout_gpus,
                      rollout_tp=args.rollout_tp, critic=args.critic, reward_model=args.reward_model,
                      lora_rank=args.lora_rank, checkpointing=args.checkpointing, precision=args.precision,
                      shard=not args.no_shard, flash_attention=not args.no_flash_attention, headroom=args.headroom)
        est = estimate(shape, setup)
    except (ValueError, KeyError, OSError) as e:
        return error(e, 2)
    print(json.dumps(est.to_dict(), indent=2) if args.json else format_report(est))
    return 0


def plan_throughput(args) -> int:
    """rlpost.plan.throughput's report of RUN_DIR's timings, or with --model a roofline before any run."""
    try:
        if args.model:
            work = throughput.Workload(
                prompts=args.prompts, k=args.k, prompt_len=args.prompt_len, response_len=args.response_len,
                length_sigma=args.length_sigma, max_response_len=args.max_response_len,
                verifier_s=args.verifier_s, reference=not args.no_reference, rollout_gpus=args.rollout_gpus)
            hw = throughput.Hardware(tflops=args.tflops, hbm_tbs=args.hbm_tbs, mfu=args.mfu,
                                     decode_efficiency=args.decode_efficiency, network_gbs=args.network_gbs)
            # one GPU cannot be split into rollout and training GPUs: only colocated applies
            tops = throughput.TOPOLOGIES if args.gpus > 1 else ("colocated",)
            rs = [throughput.roofline(shape_for(args.model), args.gpus, top, work, hw) for top in tops]
            print(json.dumps(rs, indent=2) if args.json else throughput.format_roofline(rs))
            return 0
        if not args.run_dir:
            raise ValueError("plan throughput needs RUN_DIR (a run's timings) or --model (a roofline)")
        r = throughput.report(args.run_dir, args.warmup, args.sync_gbps, args.workers)
    except (ValueError, OSError) as e:
        return error(e, 2)
    print(json.dumps(r, indent=2) if args.json else throughput.format_report(r))
    return 0
