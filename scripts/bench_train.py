"""
Training throughput benchmark: tokens/s and MFU of a full optimizer step (fwd + bwd + Muon/AdamW)
for a given depth and batch, on random tokens. Prints one JSON object.

  python -m scripts.bench_train --depth 20 --batch 32 --seq 2048
  torchrun --standalone --nproc_per_node=2 -m scripts.bench_train --depth 20   # weak scaling

MFU counts the model's FLOPs/token (6N + attention, nanochat's estimate) against the GPU's bf16
dense peak (989 TFLOP/s for H100/H200 SXM).
"""
import json
import time
import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.common import compute_init, compute_cleanup, autocast_ctx, synchronize, peak_flops, print0
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizers


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
    ap.add_argument("--device", default="")
    args = ap.parse_args()

    ddp, rank, local_rank, world, device = compute_init(args.device or None)
    n_embd = args.depth * args.aspect_ratio
    n_head = max(1, n_embd // args.head_dim)
    cfg = GPTConfig(sequence_len=args.seq, vocab_size=args.vocab, n_layer=args.depth, n_head=n_head,
                    n_kv_head=n_head, n_embd=n_embd)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    opts = build_optimizers(model)
    raw = model
    if args.compile and device.type == "cuda":
        model = torch.compile(model, dynamic=False)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    autocast = autocast_ctx(device.type)
    g = torch.Generator(device=device).manual_seed(rank)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device, generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device=device, generator=g)

    def step():
        with autocast:
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    synchronize(device.type)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(args.steps):
        step()
    synchronize(device.type)
    dt = (time.time() - t0) / args.steps
    tok_s = args.batch * args.seq * world / dt
    flops = raw.estimate_flops(args.seq)
    peak = peak_flops(device)
    out = {
        "bench": "train", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "world_size": world, "depth": args.depth, "n_embd": n_embd, "n_head": n_head, "batch": args.batch,
        "seq": args.seq, "vocab": args.vocab, "params": raw.num_params(), "flops_per_token": flops,
        "step_ms": round(dt * 1000, 2), "tok_per_s": round(tok_s), "tok_per_s_per_gpu": round(tok_s / world),
        "mfu": round(100 * flops * tok_s / (peak * world), 2) if peak else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "compiled": bool(args.compile and device.type == "cuda"), "torch": torch.__version__,
    }
    print0(json.dumps(out))
    compute_cleanup()


if __name__ == "__main__":
    main()
