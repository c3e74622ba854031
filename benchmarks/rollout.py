"""Rollout throughput: rlpost's native engine vs transformers.generate (and vLLM), same model, same prompts.

    .venv/bin/python benchmarks/rollout.py          # native vs transformers.generate: 8 prompts x K=8, 64 tokens
    .venv-vllm/bin/python benchmarks/rollout.py     # the same, plus the vLLM column (vLLM's CPU build)
    .venv/bin/python benchmarks/rollout.py --prompt-words 100   # long prompts (~120 tokens), no shared prefix

Every engine samples at temperature 1 with old_logp captured (generate returns its logits for it,
exactly as rlpost's `hf` engine does; vLLM returns its processed log-probs), and every sample is
exactly --max-new-tokens tokens long (min_new_tokens on the native and generate engines; vLLM's
ignore_eos, since with min_new_tokens vLLM's log-probs are the masked distribution's), so the work is equal; the token
counts are checked. Engine start-up (construction + the first call, which pays one-off costs) is
reported apart from the steady state. Repetitions rotate the engines' order so that load from other
processes on a shared machine hits all alike; the speed-ups are medians of per-repetition ratios
against transformers.generate, measured in this run. CPU seconds are printed next to wall-clock.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import build_llama, env_line, load_line, median, n_params, prompts, train_tokenizer


def matmul_floor(cfg, prompt_lens: list[int], k: int, new_tokens: int, reps: int = 3) -> float:
    """Seconds that the matrix products of one rollout call take alone, as plain torch calls: the prefill
    of each prompt once, then new_tokens - 1 decode steps of all rows, each with every layer's projections
    (q/k/v, o, gate/up, down) and its two attention products over the cache as long as it is at that step,
    then the LM head. Every engine that reads each row's whole sequence in attention does at least these
    products, so generate's time over this floor bounds what such an engine written with torch's kernels can
    gain over it (shared-prompt attention reads a long prompt once per prompt, and can go below it). Best
    of `reps`."""
    C, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size  # F: the MLP's inner width
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = C // H
    B, P = len(prompt_lens) * k, max(prompt_lens)
    weights = [torch.randn(n_in, n_out) for n_in, n_out in ((C, (H + 2 * Hkv) * D), (H * D, C), (C, 2 * F), (F, C))]
    head = torch.randn(C, V)
    cache = torch.randn(2, B, Hkv, P + new_tokens, D)
    rows_max = max(B, sum(prompt_lens))
    inputs = {n: torch.randn(rows_max, n) for n in {w.shape[0] for w in weights} | {C}}  # made outside the timing
    q = torch.randn(B, Hkv, H // Hkv, D)

    def projections(rows: int):
        for w in weights:
            torch.mm(inputs[w.shape[0]][:rows], w)

    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _layer in range(cfg.num_hidden_layers):
            projections(sum(prompt_lens))                                   # prefill, each prompt once
        for step in range(1, new_tokens):
            end = P + step
            for _layer in range(cfg.num_hidden_layers):
                projections(B)
                scores = torch.matmul(q, cache[0, :, :, :end].transpose(-1, -2))
                torch.matmul(scores, cache[1, :, :, :end])
            torch.mm(inputs[C][:B], head)
        best = min(best, time.perf_counter() - t0)
    return best


def vllm_engine(model, tok):
    """rlpost's VLLMEngine, made to produce exactly max_new_tokens per sample (ignore_eos, no stop ids)."""
    from vllm import SamplingParams as VSamplingParams

    from rlpost.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(model, tok, max_model_len=256)

    def equal_work_params(params, k, seed):
        return VSamplingParams(n=k, temperature=params.temperature, top_p=1.0, top_k=0,
                               max_tokens=params.max_new_tokens, logprobs=0, seed=seed, detokenize=False,
                               ignore_eos=True)

    engine.sampling_params = equal_work_params
    return engine


def vllm_missing() -> str | None:
    if not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                       "rlpost", "rollout", "vllm_engine.py")):
        return "rlpost/rollout/vllm_engine.py does not exist"
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001  (a broken install is as good as none here)
        return f"not installed in this environment ({type(e).__name__}: {str(e).splitlines()[0][:80]}); " \
               f"run this script with .venv-vllm/bin/python for that column"
    return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prompt-words", type=int, default=0,
                    help="start each prompt with this many random words of its own (long prompts)")
    ap.add_argument("--max-num-seqs", type=int, default=0,
                    help="native engine: at most this many sequences decode at once (0: all; generate ignores it)")
    ap.add_argument("--shared-attention-min", type=int, default=None,
                    help="the native engine's shared_attention_min (prompt columns from which decode reads each "
                         "prompt once; a huge value turns shared-prompt attention off; default: the engine's)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM column even when vLLM imports")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from rlpost.models import HFCausalLM, HFTokenizer
    from rlpost.rollout import SamplingParams
    from rlpost.rollout.hf_generate import HFGenerateEngine
    from rlpost.rollout.hf_native import HFNativeEngine

    hf_tok = train_tokenizer()
    model = HFCausalLM(build_llama(hf_tok, args.hidden, args.layers, args.heads, args.intermediate)).eval()
    model.requires_grad_(False)
    tok = HFTokenizer(hf_tok)
    ids = [tok.encode_prompt(p) for p in prompts(args.prompts, words=args.prompt_words)]
    R = args.max_new_tokens
    params = SamplingParams(max_new_tokens=R, temperature=1.0, min_new_tokens=R, max_num_seqs=args.max_num_seqs)
    no_vllm = "skipped (--no-vllm)" if args.no_vllm else vllm_missing()
    print(f"# {env_line()}")
    print(f"# load average before: {load_line()}")
    print(f"# Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate {args.intermediate}, "
          f"vocab {len(hf_tok)}: {n_params(model) / 1e6:.2f} M params; {args.prompts} prompts x K={args.k}, "
          f"prompts {min(map(len, ids))}-{max(map(len, ids))} tokens, {R} new tokens each; {args.reps} repetitions")

    def native():
        engine = HFNativeEngine(model, tok)
        if args.shared_attention_min is not None:
            engine.shared_attention_min = args.shared_attention_min
        return engine

    builders = {"native": native, "hf_generate": lambda: HFGenerateEngine(model, tok)}
    if no_vllm is None:
        builders["vllm"] = lambda: vllm_engine(model, tok)
    engines, startup = {}, {}
    for name, build in builders.items():
        t0 = time.perf_counter()
        engines[name] = build()
        engines[name].generate(ids, args.k, params, seed=0)
        startup[name] = time.perf_counter() - t0

    names = list(engines)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    tokens = {n: set() for n in names}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            batch = engines[name].generate(ids, args.k, params, seed=rep + 1)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            tokens[name].add(int(batch.response_mask.sum()))
    expected = args.prompts * args.k * R
    equal = all(t == {expected} for t in tokens.values())

    res = {"load_after": load_line(), "equal_work": equal}
    print(f"{'engine':<12}{'start-up s':>11}{'median s':>9}{'min s':>8}{'CPU s':>7}{'tokens':>7}{'tokens/s':>9}"
          f"{'vs generate':>12}")
    for name in names:
        ratios = [g / w for w, g in zip(wall[name], wall["hf_generate"])]
        r = res[name] = {"startup_s": startup[name], "median_s": median(wall[name]), "min_s": min(wall[name]),
                         "cpu_median_s": median(cpu[name]), "tokens": expected,
                         "tokens_per_s": expected / median(wall[name]), "speedup_median": median(ratios),
                         "ratios": ratios}
        print(f"{name:<12}{r['startup_s']:>11.2f}{r['median_s']:>9.3f}{r['min_s']:>8.3f}{r['cpu_median_s']:>7.2f}"
              f"{expected:>7d}{r['tokens_per_s']:>9.0f}{r['speedup_median']:>11.2f}x")
    if no_vllm:
        print(f"vLLM: {no_vllm}")
    print(f"equal work checked (every sample {R} tokens, every engine): {'yes' if equal else 'NO: ' + str(tokens)}")
    for name in names:
        if name != "hf_generate":
            print(f"{name} / transformers.generate tokens/s, median of per-repetition ratios: "
                  f"{res[name]['speedup_median']:.2f}x (per repetition: "
                  f"{', '.join(f'{x:.2f}' for x in res[name]['ratios'])}; ratio of minima "
                  f"{min(wall['hf_generate']) / min(wall[name]):.2f}x)")
    floor = res["matmul_floor_s"] = matmul_floor(model.hf.config, [len(p) for p in ids], args.k, R)
    print(f"matmul floor (the call's matrix products alone, best of 3): {floor:.3f} s; transformers.generate's "
          f"median over it: {res['hf_generate']['median_s'] / floor:.2f}x = the most any engine built on these "
          f"kernels can gain; native's time over it: {res['native']['median_s'] / floor:.2f}x")
    print(f"# load average after: {res['load_after']}")
    if "vllm" in engines:
        engines["vllm"].close()
    return res


if __name__ == "__main__":
    main()
