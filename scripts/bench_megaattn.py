"""
MegaAttention benchmark (DESIGN section 7): forward+backward tokens/s and peak memory of the GPT at
window sizes W, plain causal attention vs MegaAttention (local window w = W/frac + GistNet summaries
of the older K-blocks), bf16 autocast. Prints one JSON object.

  python -m scripts.bench_megaattn                        # CUDA: d12, W in {2048, 8192}, w = W/8
  python -m scripts.bench_megaattn --W 2048,8192,16384 --impls full,flex,sdpa
  python -m scripts.bench_megaattn --device cpu           # tiny config, a smoke test

Modes: "full" = plain causal attention (flash-attn if installed, else SDPA is_causal); "flex" =
MegaAttention through FlexAttention (block mask built once per layout); "sdpa" = MegaAttention
through SDPA with the dense boolean mask (the reference path). tokens/s counts window tokens only
(summaries are extra work, not extra tokens). On CUDA, `check` reports the max |logit| difference
between the flex and sdpa MegaAttention paths on one sequence (bf16), and `attention_only` times
the attention op alone (fwd+bwd per layer call): SDPA causal, flex causal, flex MegaAttention.

Seen on one H100 (torch 2.11, d12, 32k window tokens per step, K=32, w=W/8, compiled): whole-step
tokens/s flex/full = 0.87 (W=2048), 1.07 (8192), 1.23 (16384); attention op alone at W=8192:
SDPA causal 2.77 ms, flex causal 3.85 ms, flex MegaAttention 2.39 ms.
"""
import json
import time
import argparse

import torch

from nanochat.common import compute_init, autocast_ctx, synchronize
from nanochat.gpt import GPT, GPTConfig
from nanochat.attention import mega_num_summaries, mega_mask


def parse_ints(s):
    return [int(x) for x in s.split(",") if x]


def attention_only(args, device, H, D):
    """fwd+bwd ms of the attention op alone at the model's shapes (bf16): SDPA causal (what "full"
    runs without flash-attn), FlexAttention causal, FlexAttention MegaAttention over T + S."""
    from nanochat.attention import attention, create_block_mask

    def bench(fn, L, B):
        q, k, v = (torch.randn(B, L, H, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        go = torch.randn(B, L, H, D, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            torch.autograd.grad(fn(q, k, v), (q, k, v), go)
        synchronize(device.type)
        t0 = time.time()
        n = 20
        for _ in range(n):
            torch.autograd.grad(fn(q, k, v), (q, k, v), go)
        synchronize(device.type)
        return round((time.time() - t0) / n * 1000, 3)

    rows = []
    for W in args.W:
        w, B = max(1, W // args.frac), max(1, args.tokens // W)
        L = W + mega_num_summaries(W, w, args.K)
        causal_bm = create_block_mask(lambda b, h, q, kv: kv <= q, None, None, W, W, device=device)
        mega_bm = mega_mask(W, w, args.K, device, "flex")
        row = dict(W=W, batch=B, heads=H, head_dim=D)
        row["sdpa_causal_ms"] = bench(lambda q, k, v: attention(q, k, v, causal=True), W, B)
        row["flex_causal_ms"] = bench(lambda q, k, v: attention(q, k, v, attn_mask=causal_bm), W, B)
        row["flex_mega_ms"] = bench(lambda q, k, v: attention(q, k, v, attn_mask=mega_bm), L, B)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="", help="cuda | cpu (default: autodetect)")
    ap.add_argument("--depth", type=int, default=None, help="layers (CUDA 12, CPU 2)")
    ap.add_argument("--aspect-ratio", type=int, default=None, help="n_embd = depth * this (CUDA 64, CPU 32)")
    ap.add_argument("--head-dim", type=int, default=None, help="(CUDA 128, CPU 32)")
    ap.add_argument("--vocab", type=int, default=None, help="(CUDA 32768, CPU 512)")
    ap.add_argument("--W", type=parse_ints, default=None, help="window sizes, comma-separated (CUDA 2048,8192; CPU 256,512)")
    ap.add_argument("--frac", type=int, default=8, help="local window w = W / frac")
    ap.add_argument("--K", type=int, default=None, help="block size (CUDA 32, CPU 16)")
    ap.add_argument("--tokens", type=int, default=None, help="window tokens per step; batch = tokens // W (CUDA 32768, CPU 1024)")
    ap.add_argument("--impls", default="full,flex", help="comma-separated: full, flex, sdpa")
    ap.add_argument("--warmup", type=int, default=None, help="(CUDA 3, CPU 1)")
    ap.add_argument("--steps", type=int, default=None, help="(CUDA 10, CPU 2)")
    ap.add_argument("--compile", type=int, default=1, help="torch.compile the model on CUDA")
    ap.add_argument("--check", type=int, default=1, help="CUDA: compare flex vs sdpa MegaAttention logits")
    ap.add_argument("--attn-only", type=int, default=1, help="CUDA: also time the attention op alone (fwd+bwd)")
    args = ap.parse_args()

    _, _, _, _, device = compute_init(args.device or None)
    cuda = device.type == "cuda"
    dflt = dict(depth=12, aspect_ratio=64, head_dim=128, vocab=32768, W=[2048, 8192], K=32, tokens=32768,
                warmup=3, steps=10) if cuda else \
        dict(depth=2, aspect_ratio=32, head_dim=32, vocab=512, W=[256, 512], K=16, tokens=1024, warmup=1, steps=2)
    for k, v in dflt.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    impls = [s for s in args.impls.split(",") if s]
    compiled = bool(args.compile and cuda)

    n_embd = args.depth * args.aspect_ratio
    n_head = max(1, n_embd // args.head_dim)
    cfg = GPTConfig(sequence_len=max(args.W), vocab_size=args.vocab, n_layer=args.depth, n_head=n_head,
                    n_kv_head=n_head, n_embd=n_embd, megacontext=True, mc_block_size=args.K)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():  # nonzero output projections: a realistic backward through every branch
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "proj_out.weight")):
                p.normal_(0, 0.02)
    if compiled:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    fwd = torch.compile(model, dynamic=False) if compiled else model
    autocast = autocast_ctx(device.type)

    results = []
    for W in args.W:
        w = max(1, W // args.frac)
        B = max(1, args.tokens // W)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randint(0, args.vocab, (B, W), device=device, generator=g)
        y = torch.randint(0, args.vocab, (B, W), device=device, generator=g)
        S = mega_num_summaries(W, w, args.K)
        keys_mega = sum(min(i + 1, w) + max(0, i - w + 1) // args.K for i in range(W)) / W
        for impl in impls:
            mega = 0 if impl == "full" else w
            row = dict(W=W, impl=impl, batch=B, w=(w if mega else None), summaries=(S if mega else 0),
                       keys_per_query=round(keys_mega if mega else (W + 1) / 2, 1))
            model.config.mega_attn_impl = "sdpa" if impl == "sdpa" else "flex"
            if impl == "flex" and not cuda:
                model.config.mega_attn_impl = "sdpa"
                row["note"] = "FlexAttention has no backward on CPU: ran the sdpa path"
            try:
                def step():
                    with autocast:
                        loss = fwd(x, y, mega=mega)
                    loss.backward()
                    model.zero_grad(set_to_none=True)
                    return loss
                t_c = time.time()
                for _ in range(args.warmup):
                    step()
                synchronize(device.type)
                row["warmup_s"] = round(time.time() - t_c, 1)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
                for _ in range(args.steps):
                    loss = step()
                synchronize(device.type)
                dt = (time.time() - t0) / args.steps
                row.update(step_ms=round(dt * 1000, 2), tok_per_s=round(B * W / dt), loss=round(loss.item(), 4),
                           peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None)
                if impl == "flex" and cuda:
                    bm = mega_mask(W, w, args.K, device, "flex")
                    row["block_sparsity_pct"] = round(float(bm.sparsity()), 1)
            except Exception as e:  # report and go on: one failing config must not hide the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            results.append(row)
            if cuda:
                torch.cuda.empty_cache()
        if cuda and args.check and "flex" in impls:
            with torch.no_grad(), autocast:
                outs = []
                for impl in ("flex", "sdpa"):
                    model.config.mega_attn_impl = impl
                    outs.append(model(x[:1], mega=w).float())
                results.append(dict(W=W, check="flex_vs_sdpa_max_abs_logit_diff",
                                    value=round((outs[0] - outs[1]).abs().max().item(), 5),
                                    logit_abs_max=round(outs[1].abs().max().item(), 3)))
            del outs
            torch.cuda.empty_cache()

    attn = attention_only(args, device, n_head, args.head_dim if cuda else n_embd // n_head) if cuda and args.attn_only else []

    by = {(r["W"], r.get("impl")): r for r in results if "tok_per_s" in r}
    speedup = {f"W{W}": round(by[(W, "flex")]["tok_per_s"] / by[(W, "full")]["tok_per_s"], 3)
               for W in args.W if (W, "flex") in by and (W, "full") in by}
    out = {
        "bench": "megaattn", "device": torch.cuda.get_device_name(device) if cuda else device.type,
        "depth": args.depth, "n_embd": n_embd, "n_head": n_head, "vocab": args.vocab, "K": args.K,
        "frac": args.frac, "tokens_per_step": args.tokens, "compiled": compiled, "torch": torch.__version__,
        "speedup_flex_over_full": speedup, "results": results, "attention_only": attn,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
