"""
Tune and time the fused decode step's Triton kernels (nanochat/decode_kernels.py) at a model's
decode shapes, against what the static step runs (cuBLAS GEMVs; decode_attention's two bmms):

    python -m scripts.bench_decode_kernels --depth 20            # d20: width 1280, vocab 32768

Per GEMV shape (q/k/v, attention out, MLP in, MLP out, lm_head) every launch config of a small
grid, and per cache length the attention split/combine configs. Each is timed as a CUDA graph of
`--reps` launches over distinct weights (so that L2 holds none of them, as in a 20-layer step),
and reported in microseconds and GB/s of the bytes it must read. Prints one JSON object with the
best config per shape (`gemv_tuned`, `attn_tuned`): decode_kernels reads such a file at import
from NANOCHAT_DECODE_TUNING=path, and holds the H200's in GEMV_TUNED / ATTN_TUNED. Needs a CUDA GPU.
"""
import argparse
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F

from nanochat.common import main_guard, fail


def graph_time(fn, n_inner, n_replay=20):
    """Microseconds per call of fn(i) for i in range(n_inner), captured as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_inner):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_inner):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n_replay):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / (n_replay * n_inner)


def gemv_configs(N, K, sms):
    for bn, bk, (warps, stages) in itertools.product((1, 2, 4, 8, 16, 32), (256, 512, 1024),
                                                      ((4, 2), (4, 4), (8, 3))):
        if N % bn or N // bn < sms or not 1024 <= bn * bk <= 8192 or bk > K:
            continue
        yield bn, bk, warps, stages


def bench_gemv(name, N, K, kind, reps, dev, sms, dtype):
    from nanochat.decode_kernels import gemv
    n_w = max(4, min(reps, -(-400 * 2 ** 20 // (N * K * 2))))   # distinct weights: > 400 MB, past any L2
    ws = [torch.randn(N, K, device=dev, dtype=dtype) * K ** -0.5 for _ in range(n_w)]
    x = torch.randn(K, device=dev, dtype=dtype)
    out = torch.empty(N, device=dev, dtype=torch.float32 if kind == "cap" else dtype)
    res = torch.randn(N, device=dev, dtype=dtype) if kind == "res" else None
    kw = dict(norm=kind in ("norm", "act", "cap"), act=kind == "act", res=res, cap=15.0 if kind == "cap" else 0.0)
    eps = torch.finfo(dtype).eps
    mb = N * K * 2 / 1e6
    row = {"N": N, "K": K, "kind": kind, "weight_mb": round(mb, 2)}
    ref = F.linear(F.rms_norm(x, (K,)) if kw["norm"] else x, ws[0]).float()
    us = graph_time(lambda i: F.linear(x[None], ws[i % n_w]), reps)
    row["cublas_us"], row["cublas_gbps"] = round(us, 2), round(mb / us * 1e3, 1)
    runs = []
    for cfg in gemv_configs(N, K, sms):
        try:
            gemv(x, ws[0], out, eps, config=cfg, **kw)
            us = graph_time(lambda i: gemv(x, ws[i % n_w], out, eps, config=cfg, **kw), reps)
        except Exception as e:  # a config the compiler refuses (too many registers, ...)
            runs.append({"config": cfg, "error": str(e)[:120]})
            continue
        runs.append({"config": cfg, "us": round(us, 2), "gbps": round(mb / us * 1e3, 1)})
    ok = [r for r in runs if "us" in r]
    best = min(ok, key=lambda r: r["us"])
    # the best config's output against torch (plain: no epilogue), as a check that it computes the GEMV
    gemv(x, ws[0], out, eps, config=best["config"], norm=kw["norm"])
    row["best"] = best
    row["best_max_abs_diff_vs_torch"] = round((out.float() - ref).abs().max().item(), 5)
    row["configs_tried"] = len(runs)
    row["worst_us"] = max(r["us"] for r in ok)
    return name, row


def bench_attn(L, H, HKV, Dh, reps, dev, sms, dtype, layers=20):
    from nanochat import decode_kernels as dk
    from nanochat.attention import decode_attention
    kc = torch.randn(layers, L, HKV, Dh, device=dev, dtype=dtype)
    vc = torch.randn(layers, L, HKV, Dh, device=dev, dtype=dtype)
    qkv = torch.randn((H + 2 * HKV) * Dh, device=dev, dtype=dtype)
    cos, sin = torch.ones(Dh, device=dev, dtype=dtype), torch.zeros(Dh, device=dev, dtype=dtype)
    slot = torch.tensor([L - 1], device=dev)
    y = torch.empty(H * Dh, device=dev, dtype=dtype)
    mb = 2 * L * HKV * Dh * 2 / 1e6
    row = {"L": L, "kv_mb_per_layer": round(mb, 2)}
    q = torch.randn(1, 1, H, Dh, device=dev, dtype=dtype)
    bias = torch.zeros(1, 1, 1, L, device=dev)
    us = graph_time(lambda i: decode_attention(q, kc[i % layers][None], vc[i % layers][None], bias), reps)
    row["bmm_us"], row["bmm_gbps"] = round(us, 2), round(mb / us * 1e3, 1)
    runs = []
    for block_t, pps, warps in itertools.product((32, 64, 128), (2, 4, 8), (4, 8)):
        cfg = dk.attn_config(L, H, sms, block_t=block_t, programs_per_sm=pps, warps=warps)
        ns = cfg[1]
        acc = torch.empty(H * ns * Dh, device=dev, dtype=torch.float32)
        ml = torch.empty(H * ns * 2, device=dev, dtype=torch.float32)

        def run(i):
            dk.attend(qkv, kc[i % layers][None], vc[i % layers][None], cos, sin, slot, acc, ml, y, H, HKV, cfg, 1e-6)
        try:
            run(0)
            us = graph_time(run, reps)
        except Exception as e:
            runs.append({"block_t": block_t, "programs_per_sm": pps, "warps": warps, "error": str(e)[:120]})
            continue
        runs.append({"block_t": block_t, "programs_per_sm": pps, "warps": warps, "ns": ns,
                     "us": round(us, 2), "gbps": round(mb / us * 1e3, 1)})
    ok = [r for r in runs if "us" in r]
    row["best"] = min(ok, key=lambda r: r["us"])
    row["default"] = next(r for r in ok if (r["block_t"], r["programs_per_sm"], r["warps"]) == (64, 4, 4))
    row["configs_tried"] = len(runs)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--width", type=int, default=0, help="n_embd (default depth * 64)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--head-dim", type=int, default=64, help="bench_decode's models: n_head = width // 64")
    ap.add_argument("--cache-lens", default="4096,131072")
    ap.add_argument("--reps", type=int, default=40, help="launches per timed graph")
    ap.add_argument("--skip-gemv", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        fail("bench_decode_kernels times Triton kernels on a CUDA GPU")
    from nanochat.decode_kernels import fused_unavailable
    why = fused_unavailable("cuda")
    if why:
        fail(why)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    D = args.width or args.depth * 64
    H = D // args.head_dim
    import triton
    out = {"bench": "decode_kernels", "device": torch.cuda.get_device_name(), "sms": sms, "torch": torch.__version__,
           "triton": triton.__version__, "n_embd": D, "n_head": H, "vocab": args.vocab, "reps": args.reps,
           "gemv": {}, "attn": {}}
    t0 = time.time()
    if not args.skip_gemv:
        for name, N, K, kind in (("qkv", 3 * D, D, "norm"), ("attn_out", D, D, "res"), ("mlp_in", 4 * D, D, "act"),
                                 ("mlp_out", D, 4 * D, "res"), ("lm_head", args.vocab, D, "cap")):
            name, row = bench_gemv(name, N, K, kind, args.reps, dev, sms, dtype)
            out["gemv"][name] = row
            print(f"{name}: cublas {row['cublas_us']} us, best {row['best']}", file=sys.stderr, flush=True)
        out["gemv_tuned"] = {f"{r['N']},{r['K']}": r["best"]["config"] for r in out["gemv"].values()}
    for L in (int(x) for x in args.cache_lens.split(",")):
        row = bench_attn(L, H, H, args.head_dim, args.reps, dev, sms, dtype)
        out["attn"][str(L)] = row
        print(f"attn L={L}: bmm {row['bmm_us']} us, best {row['best']}", file=sys.stderr, flush=True)
    out["attn_tuned"] = {L: {k: r["best"][k] for k in ("block_t", "programs_per_sm", "warps")} for L, r in out["attn"].items()}
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main_guard(main)
