"""One decode step of the native engine: where its time goes, and whether torch.compile helps.

    .venv/bin/python benchmarks/decode_step.py      # 64 rows, a 45-column cache, the benchmark Llama

Times one `HFNativeEngine.forward` decode step (every row feeds one token and attends to `--end` cached
columns) four ways, best-of medians over `--iters` calls:
- eager: the engine as it is;
- matmuls only: the step's projections and attention products alone, as bare torch calls (its floor);
- compiled regions: each layer's work before and after attention (RMSNorm, q/k/v, RoPE; o, RMSNorm,
  gate/up, SiLU, down) through torch.compile with static shapes, the cache write and attention eager;
- compiled step: the whole step through torch.compile with static shapes (the cache write included).
Compile times are printed apart. Every variant's output is checked against the eager step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from benchmarks.common import build_llama, env_line, load_line, median, train_tokenizer


def timed(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    runs = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return median(runs)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--end", type=int, default=45, help="cached columns each row attends to")
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args(argv)

    from rlpost.models import HFCausalLM, HFTokenizer
    from rlpost.rollout.families.base import rms_norm as _rms_norm
    from rlpost.rollout.hf_native import HFNativeEngine, _rotate_half
    from rlpost.rollout.scheduler import write_kv

    hf_tok = train_tokenizer()
    model = HFCausalLM(build_llama(hf_tok)).eval().requires_grad_(False)
    engine = HFNativeEngine(model, HFTokenizer(hf_tok))
    L, end = args.rows, args.end
    ctx = engine.prepare(end + 1)
    w, (cos_t, sin_t) = ctx[0], ctx[1][None]
    H, D = w.n_head, w.head_dim
    if w.n_kv != H:
        raise SystemExit("this benchmark's compiled regions assume no grouped-query attention")
    kv = engine.new_cache(L, end + 1).normal_()
    ids = torch.randint(0, len(hf_tok), (L, 1), generator=torch.Generator().manual_seed(0))
    pos = torch.full((L, 1), end - 1)

    def eager():
        return engine.forward(ctx, ids, pos, kv, end - 1, end, None)

    C, inner = w.embed.shape[1], w.layers[0].wd.shape[1]
    h_c, h_i = torch.randn(L, C), torch.randn(L, inner)
    q = torch.randn(L, H, 1, D)

    def matmuls_only():
        for layer in w.layers:
            for weight, x in ((layer.wqkv, h_c), (layer.wo, h_c), (layer.wgu, h_c), (layer.wd, h_i)):
                torch.mm(x, weight.t())
            scores = torch.matmul(q, kv[0, 0, :, :, :end].transpose(-1, -2))
            torch.matmul(scores, kv[1, 0, :, :, :end])

    def pre(x, ln1, eps1: float, wqkv, cos, sin):
        h = _rms_norm(x, ln1, eps1)
        qkv = F.linear(h, wqkv).view(L, 1, 3 * H, D).transpose(1, 2)
        qk = qkv[:, :2 * H]
        qk = qk * cos + _rotate_half(qk) * sin
        return qk[:, :H], qk[:, H:], qkv[:, 2 * H:]

    def post(x, a, wo, ln2, eps2: float, wgu, wd, act):
        x = x + F.linear(a.transpose(1, 2).reshape(L, 1, H * D), wo)
        g, u = F.linear(_rms_norm(x, ln2, eps2), wgu).chunk(2, dim=-1)
        return x + F.linear(act(g) * u, wd)

    def regions(pre_fn, post_fn):
        cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]
        x = F.embedding(ids, w.embed)
        for i, layer in enumerate(w.layers):
            (ln1, eps1), (ln2, eps2) = layer.ln_attn, layer.ln_mlp
            wqkv, wo, wgu, wd, act = layer.wqkv, layer.wo, layer.wgu, layer.wd, layer.act
            q_, k_, v_ = pre_fn(x, ln1, eps1, wqkv, cos, sin)
            keys, values = write_kv(kv[0, i], kv[1, i], k_, v_, end - 1, end)
            a = F.scaled_dot_product_attention(q_, keys, values, scale=w.scaling)
            x = post_fn(x, a, wo, ln2, eps2, wgu, wd, act)
        return x

    if any(layer.bqkv is not None or layer.bo is not None or layer.bgu is not None for layer in w.layers):
        raise SystemExit("this benchmark's compiled regions assume projections without bias (Llama)")
    reference = eager()
    rows, compile_s = {}, {}
    rows["eager"] = timed(eager, args.iters)
    rows["matmuls only"] = timed(matmuls_only, args.iters)
    cpre, cpost = torch.compile(pre, dynamic=False), torch.compile(post, dynamic=False)
    t0 = time.perf_counter()
    out = regions(cpre, cpost)
    compile_s["compiled regions"] = time.perf_counter() - t0
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-4)
    rows["compiled regions"] = timed(lambda: regions(cpre, cpost), args.iters)
    whole = torch.compile(lambda: engine.forward(ctx, ids, pos, kv, end - 1, end, None), dynamic=False)
    t0 = time.perf_counter()
    out = whole()
    compile_s["compiled step"] = time.perf_counter() - t0
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-4)
    rows["compiled step"] = timed(whole, max(args.iters // 10, 5))

    print(f"# {env_line()}; load average {load_line()}")
    print(f"# decode step of the benchmark Llama (hidden 256, 4 layers): {L} rows, {end} cached columns")
    for name, s in rows.items():
        extra = f"   (compile {compile_s[name]:.1f} s)" if name in compile_s else ""
        print(f"{name:<18}{1000 * s:8.2f} ms  {s / rows['eager']:5.2f}x eager{extra}")
    print(f"eager over its matmul floor: {rows['eager'] / rows['matmuls only']:.2f}x")
    return {"ms": {k: 1000 * v for k, v in rows.items()}, "compile_s": compile_s}


if __name__ == "__main__":
    main()
