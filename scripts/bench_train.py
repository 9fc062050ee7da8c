"""
Training throughput benchmark: tokens/s and MFU of a full optimizer step (fwd + bwd + Muon/AdamW)
for a given depth and batch, on random tokens. Prints one JSON object.

  python -m scripts.bench_train --depth 20 --batch 32 --seq 2048
  torchrun --standalone --nproc_per_node=2 -m scripts.bench_train --depth 20   # weak scaling
  python -m scripts.bench_train --depth 8 --batch 8 --megacontext --mc-context-len 16384 --mc-W 512
  python -m scripts.bench_train --like-train "--config mc_h100"   # the shapes of a base_train run

--like-train takes base_train's flags (a --config preset and overrides, as scripts/mc_run.sh passes
them) and benches that run's shapes: depth, width, heads, sequence length, contexts per step, W, H,
rows per context, LensNet inputs and compile mode; the vocab is the preset's tok_train vocab_size.

With --megacontext the same process also times the MegaContext training step (MCStep: tree with
gradients + full-detail loss + packed working-context rows + LensNet) on the same model, and
reports MC tokens/s (context tokens per second) next to the plain path's and their ratio.

MFU counts the model's FLOPs/token (6N + attention, nanochat's estimate) against the GPU's bf16
dense peak (989 TFLOP/s for H100/H200 SXM).
"""
import json
import time
import shlex
import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.common import compute_init, compute_cleanup, autocast_ctx, synchronize, peak_flops, print0
from nanochat.gpt import GPT, GPTConfig, LENS_QUERIES
from nanochat.optim import build_optimizers
from megacontext.mctrain import COMPILE_MODES


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--aspect-ratio", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32, help="sequences per GPU per micro-step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--loss-chunk", type=int, default=0, help="rows per chunk of the loss (0: whole; see GPT.logits_and_loss)")
    ap.add_argument("--device", default="")
    ap.add_argument("--megacontext", action="store_true", help="also time the MC step; report the ratio")
    ap.add_argument("--mc-context-len", type=int, default=16384)
    ap.add_argument("--mc-W", type=int, default=512)
    ap.add_argument("--mc-H", type=int, default=64)
    ap.add_argument("--mc-block-size", type=int, default=32)
    ap.add_argument("--mc-max-level", type=int, default=2)
    ap.add_argument("--mc-random-wcs", type=int, default=2)
    ap.add_argument("--mc-probes", type=int, default=4)
    ap.add_argument("--mc-collapse-probes", action="store_true", help="+ one collapse counterfactual row per context")
    ap.add_argument("--mc-compile", default="pieces", choices=COMPILE_MODES,
                    help="torch.compile the model/GistNet/LensNet forwards, or the whole MC step")
    ap.add_argument("--like-train", default="", metavar="FLAGS",
                    help="base_train flags (e.g. '--config mc_h100 --mc-probes 2'): bench that run's shapes "
                         "(they replace the shape and MC flags given here)")
    ap.add_argument("--mc-lens-match", action="store_true", help="LensNet reads the query-match feature")
    ap.add_argument("--mc-lens-query", default="tokens", choices=LENS_QUERIES)
    ap.add_argument("--gqa-ratio", type=int, default=1)
    args = ap.parse_args()
    if args.like_train:
        like_train(args)
    if args.megacontext and args.mc_context_len % args.seq:
        raise SystemExit("error: --mc-context-len must be a multiple of --seq")

    ddp, rank, local_rank, world, device = compute_init(args.device or None)
    n_embd = args.depth * args.aspect_ratio
    n_head = max(1, n_embd // args.head_dim)

    def build(megacontext):
        cfg = GPTConfig(sequence_len=args.seq, vocab_size=args.vocab, n_layer=args.depth, n_head=n_head,
                        n_kv_head=n_head // args.gqa_ratio, n_embd=n_embd, megacontext=megacontext,
                        mc_block_size=args.mc_block_size, mc_max_level=args.mc_max_level,
                        lens_query=args.mc_lens_query, lens_match=args.mc_lens_match)
        with torch.device("meta"):
            m = GPT(cfg)
        m.to_empty(device=device)
        m.init_weights()
        m.loss_chunk = args.loss_chunk
        return m, build_optimizers(m)

    # The plain path is a plain GPT: an MC model's GistNet/LensNet get no gradient from a plain
    # step, which DDP rejects (and which would not be the plain path's cost anyway).
    raw, opts = build(False)
    model = raw
    if args.compile and device.type == "cuda":
        model = torch.compile(model, dynamic=False)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    autocast = autocast_ctx(device.type)
    g = torch.Generator(device=device).manual_seed(rank)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device, generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device=device, generator=g)

    def step(fwd, *inputs, raw_opts=None):
        m, os_ = raw_opts or (raw, opts)
        with autocast:
            loss = fwd(*inputs)
            loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        for o in os_:
            o.step()
        m.zero_grad(set_to_none=True)
        return loss

    def timed(fwd, make_inputs, raw_opts=None):
        for i in range(args.warmup):
            step(fwd, *make_inputs(i), raw_opts=raw_opts)
        synchronize(device.type)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        inputs = [make_inputs(i) for i in range(args.steps)]  # CPU-side prep is not timed (training prefetches it)
        synchronize(device.type)
        t0 = time.time()
        for inp in inputs:
            step(fwd, *inp, raw_opts=raw_opts)
        synchronize(device.type)
        mem = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
        return (time.time() - t0) / args.steps, mem

    dt, peak_mem = timed(model, lambda i: (x, y))
    tok_s = args.batch * args.seq * world / dt
    flops = raw.estimate_flops(args.seq)
    peak = peak_flops(device)
    out = {
        "bench": "train", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "world_size": world, "depth": args.depth, "n_embd": n_embd, "n_head": n_head, "batch": args.batch,
        "seq": args.seq, "vocab": args.vocab, "loss_chunk": args.loss_chunk, "params": raw.num_params(), "flops_per_token": flops,
        "step_ms": round(dt * 1000, 2), "tok_per_s": round(tok_s), "tok_per_s_per_gpu": round(tok_s / world),
        "mfu": round(100 * flops * tok_s / (peak * world), 2) if peak else None,
        "peak_mem_gb": peak_mem,
        "compiled": bool(args.compile and device.type == "cuda"), "torch": torch.__version__,
    }
    if args.like_train:
        out["like_train"] = args.like_train
    if args.megacontext:
        model = opts = raw = None  # free the plain model before the MC one is built
        out["mc"] = bench_mc_step(args, build(True), timed, device, rank, ddp, local_rank, world)
        out["mc_over_plain_tok_per_s"] = round(out["mc"]["tok_per_s"] / out["tok_per_s"], 3)
    print0(json.dumps(out))
    model = None  # the DDP wrapper must go before the process group: see compute_cleanup
    compute_cleanup()


def like_train(args):
    """Fill args from base_train's flags: the shapes and MC settings of that run (a plain step of
    the same rows, then the MC step over device_batch_size contexts of mc_context_len tokens)."""
    from scripts.base_train import TrainConfig
    from nanochat.configurator import parse_config, load_toml, config_preset
    argv = shlex.split(args.like_train)
    cfg = parse_config(TrainConfig, argv, section="base_train")
    preset = config_preset(argv)
    if preset is not None:   # base_train takes its vocab from the tokenizer: the preset's tok_train trains it
        args.vocab = load_toml(preset, "tok_train")[0].get("vocab_size") or args.vocab
    args.depth, args.aspect_ratio, args.head_dim, args.gqa_ratio = cfg.depth, cfg.aspect_ratio, cfg.head_dim, cfg.gqa_ratio
    args.seq, args.megacontext = cfg.max_seq_len, cfg.megacontext
    args.batch = cfg.device_batch_size * (cfg.mc_context_len // cfg.max_seq_len if cfg.megacontext else 1)
    args.mc_context_len, args.mc_W, args.mc_H = cfg.mc_context_len, cfg.mc_W, cfg.mc_H
    args.mc_block_size, args.mc_max_level = cfg.mc_block_size, cfg.mc_max_level
    args.mc_random_wcs, args.mc_probes, args.mc_collapse_probes = cfg.mc_random_wcs, cfg.mc_probes, cfg.mc_collapse_probes
    args.mc_compile, args.mc_lens_match, args.mc_lens_query = cfg.mc_compile, cfg.mc_lens_match, cfg.mc_lens_query
    args.compile = int(cfg.compile)


def bench_mc_step(args, raw_opts, timed, device, rank, ddp, local_rank, world):
    """Times MCStep on an MC model of the plain one's shape (raw_opts: that GPT and its optimizers):
    B = --batch // (mc_context_len / seq) contexts, so that a step sees the same number of context
    tokens as a plain step."""
    import numpy as np
    from megacontext.mctrain import MCStep, make_plan, compile_mc
    B = max(1, args.batch * args.seq // args.mc_context_len)
    T = args.mc_context_len
    raw = raw_opts[0]
    mc = MCStep(raw, args.mc_W, args.mc_H, args.mc_random_wcs, args.mc_probes)
    if args.compile and device.type == "cuda":  # as scripts/base_train.py does
        compile_mc(mc, args.mc_compile)
    fwd = DDP(mc, device_ids=[local_rank] if device.type == "cuda" else None) if ddp else mc
    rng = np.random.default_rng(rank)
    N = np.full(B, T - args.mc_H, np.int64)

    def make_inputs(i):
        ids = torch.from_numpy(rng.integers(0, args.vocab, (B, T))).to(device)
        plan = make_plan(N, T, args.mc_block_size, args.mc_W, args.mc_H, args.mc_max_level, args.mc_random_wcs, rng,
                         n_probe=args.mc_probes, collapse=args.mc_collapse_probes)
        plan = {k: torch.from_numpy(v).to(device) for k, v in plan.items()}
        return ids, torch.from_numpy(N).to(device), plan

    dt, mem = timed(fwd, make_inputs, raw_opts)
    fwd = None  # the DDP wrapper must go before the process group: see compute_cleanup
    rows = B * (1 + args.mc_random_wcs + 1 + args.mc_probes + int(args.mc_collapse_probes))
    return {"contexts": B, "context_len": T, "W": args.mc_W, "H": args.mc_H, "compile": args.mc_compile,
            "random_wcs": args.mc_random_wcs, "probes": args.mc_probes, "lens_match": args.mc_lens_match, "rows_per_step": rows,
            "row_tokens_per_step": rows * (args.mc_W + args.mc_H - 1), "step_ms": round(dt * 1000, 2),
            "tok_per_s": round(B * T * world / dt), "peak_mem_gb": mem}


if __name__ == "__main__":
    main()
