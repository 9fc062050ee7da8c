"""
MegaContext machinery benchmark, as one JSON object:

(a) ingest: tokens/s of a token stream (default 1M tokens) appended to an in-RAM MegaContext
    tree with the model's batched GistNet making every LOD1/LOD2 gist (bf16 autocast on CUDA,
    timed between device synchronizations, after a warm-up ingest), next to the same model's
    plain forward tokens/s at the same width and an analytic GistNet/base FLOPs-per-token ratio
    (DESIGN §4 asks for < 5%);
(b) focus: allocator refocus time at W=8192 over 1M tokens of history (scripts/bench_focus.py);
(c) tree: on-disk append and read MB/s (scripts/bench_tree.py).

    python -m scripts.bench_mc                        # CUDA: depth 20, 1M tokens
    python -m scripts.bench_mc --tokens 20000 --depth 2   # a quick CPU run

--depth is the model dial of scripts/base_train.py (width = depth * 64, head dim 128). On a CPU
the defaults shrink (depth 2, 100k tokens) unless given.
"""
import io
import sys
import json
import time
import argparse
import platform
import contextlib

import numpy as np
import torch

from nanochat.common import autocast_ctx, synchronize, main_guard
from nanochat.gpt import GPT, GPTConfig
from megacontext.tree import MegaContextTree
from scripts import bench_focus, bench_tree


def run_json(main, argv):
    """Run another bench script's main() with `argv` and parse the JSON object it prints."""
    old, buf = sys.argv, io.StringIO()
    sys.argv = [main.__module__] + [str(a) for a in argv]
    try:
        with contextlib.redirect_stdout(buf):
            main()
    finally:
        sys.argv = old
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def gist_flops_ratio(model, seq_len):
    """Analytic forward FLOPs per ingested token: GistNet (all levels) / base model.
    Level l makes one gist per K**l tokens, each a pass over K+1 positions (children + query)."""
    c, g = model.config, model.gistnet
    K, L = c.mc_block_size, c.mc_max_level
    per_pos = sum(p.numel() for p in g.proj_in.parameters()) + sum(p.numel() for p in g.blocks.parameters())
    gists_per_token = sum(K ** -l for l in range(1, L + 1))
    gist = 2 * gists_per_token * ((K + 1) * per_pos + g.proj_out.weight.numel())
    base = model.estimate_flops(seq_len) / 3  # estimate_flops is fwd + bwd (6N + attention)
    return gist / base


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--tokens", type=int, default=None, help="ingest stream length (1M on CUDA, 100k on CPU)")
    ap.add_argument("--depth", type=int, default=None, help="model depth dial (20 on CUDA, 2 on CPU)")
    ap.add_argument("--aspect-ratio", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=None, help="65536 on CUDA, 4096 on CPU")
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--max-level", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4096, help="gists per GistNet call during ingest")
    ap.add_argument("--base-seq", type=int, default=None, help="plain-forward row length (2048 CUDA, 256 CPU)")
    ap.add_argument("--base-batch", type=int, default=None, help="plain-forward rows (16 CUDA, 2 CPU)")
    ap.add_argument("--W", type=int, default=8192, help="working-context budget for the refocus timing")
    ap.add_argument("--history", type=int, default=1_000_000, help="history length for the refocus timing")
    ap.add_argument("--focus-calls", type=int, default=None, help="refocus calls timed (2000 CUDA box, 200 CPU)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: ingest,focus,tree")
    ap.add_argument("--device", default="")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    tokens = args.tokens or (1_000_000 if cuda else 100_000)
    depth = args.depth or (20 if cuda else 2)
    vocab = args.vocab or (65536 if cuda else 4096)
    base_seq = args.base_seq or (2048 if cuda else 256)
    base_batch = args.base_batch or (16 if cuda else 2)
    focus_calls = args.focus_calls or (2000 if cuda else 200)
    skip = set(filter(None, args.skip.split(",")))
    n_embd = depth * args.aspect_ratio
    n_head = max(1, n_embd // args.head_dim)
    out = {
        "command": "python -m scripts.bench_mc " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "config": {"tokens": tokens, "depth": depth, "n_embd": n_embd, "n_head": n_head, "vocab": vocab,
                   "K": args.K, "max_level": args.max_level, "batch_size": args.batch_size,
                   "dtype": "bf16 autocast" if cuda else "fp32"},
    }

    if "ingest" not in skip:
        cfg = GPTConfig(sequence_len=base_seq, vocab_size=vocab, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                        n_embd=n_embd, megacontext=True, mc_block_size=args.K, mc_max_level=args.max_level)
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device=device)
        model.init_weights()
        model.eval()
        autocast = autocast_ctx(device.type)

        @torch.no_grad()
        def gist_fn(child_level, children):
            with autocast:
                return model.gist(child_level, children.to(device, non_blocking=True))

        ids = np.random.default_rng(0).integers(0, vocab, size=tokens, dtype=np.int64)
        warm = MegaContextTree(K=args.K, dim=n_embd, max_level=args.max_level, model_id="bench")
        warm.append(ids[: min(tokens, 4 * args.K ** args.max_level)], gist_fn, args.batch_size)
        tree = MegaContextTree(K=args.K, dim=n_embd, max_level=args.max_level, model_id="bench")
        synchronize(device.type)
        t0 = time.perf_counter()
        tel = tree.append(ids, gist_fn, args.batch_size)
        synchronize(device.type)
        dt = time.perf_counter() - t0

        # the same model's plain forward at the same width, for scale
        x = torch.randint(0, vocab, (base_batch, base_seq), device=device, generator=torch.Generator(device).manual_seed(0))
        with torch.no_grad(), autocast:
            model(x)
            synchronize(device.type)
            reps, t1 = 3, time.perf_counter()
            for _ in range(reps):
                model(x)
            synchronize(device.type)
        fwd_tok_s = reps * x.numel() / (time.perf_counter() - t1)
        out["ingest"] = {
            "tokens_per_s": round(tokens / dt, 1),
            "seconds": round(dt, 4),
            "gist_seconds": round(tel["gist_s"], 4),   # GistNet calls incl. their device sync
            "gist_calls": tel["gist_calls"],
            "nodes_per_level": tel["new_nodes"],
            "base_forward_tokens_per_s": round(fwd_tok_s, 1),
            "ingest_vs_base_forward_speed": round(tokens / dt / fwd_tok_s, 3),
            "gist_vs_base_fwd_flops_per_token": round(gist_flops_ratio(model, base_seq), 4),
            "gistnet_params": model.num_params("gistnet"),
            "compiled": False,
        }
        del model, tree, warm

    if "focus" not in skip:
        out["focus"] = run_json(bench_focus.main, ["--W", args.W, "--K", args.K, "--N", args.history,
                                                   "--max-level", args.max_level, "--calls", focus_calls])

    if "tree" not in skip:
        t = run_json(bench_tree.main, ["--tokens", tokens, "--dim", n_embd, "--K", args.K])
        out["tree"] = {"append_MBps_durable": t["durable"]["append_MBps"],
                       "append_MBps_nondurable": t["nondurable"]["append_MBps"],
                       "small_append_ms_durable": t["durable"]["small_append_ms"],
                       "read": t["read"], "bytes": t["durable"]["bytes"], "raw": t}
    print(json.dumps(out))


if __name__ == "__main__":
    main_guard(main)
