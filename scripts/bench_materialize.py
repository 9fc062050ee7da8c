"""
Time one whole-window materialize (MemorySession._materialize: the window's entry embeddings after
a refocus) piece by piece, each piece synced, at several history lengths:

    python -m scripts.bench_materialize --depth 20 --W 4096 --histories 131072,1048576

Pieces: the tree reads (one per run of same-level consecutive entries), building the gist rows on
the device, entry_embeddings, the copy into the session's buffer; then _materialize itself and one
refocus, for comparison. `--reps` repeats (the first read after ingest can be cold).
With a GPU, also the whole-window recompute (decode="fused"/"compiled"'s compiled forward over W
slots) per torch.compile mode in --window-modes: warm time, and its kernels by kind (GEMMs,
attention, Inductor's fused kernels, the rest) with their share of the FLOP-bound time. Prints JSON.
"""
import time
import json
import shutil
import argparse
import tempfile

import numpy as np
import torch

from nanochat.common import main_guard, synchronize, autodetect_device_type
from nanochat.engine import MemorySession
from scripts.bench_decode import build


def timed(device, fn):
    synchronize(device.type)
    t = time.perf_counter()
    r = fn()
    synchronize(device.type)
    return r, round((time.perf_counter() - t) * 1e3, 3)


def probe(model, s, device):
    lv, ix = s._sync()
    n = len(lv)
    runs = int(((np.diff(lv) != 0) | (np.diff(ix) != 1)).sum()) + 1
    (tok, rows, parts), t_reads = timed(device, lambda: s._tree_rows(lv, ix))

    g, t_rows = timed(device, lambda: s._gist_rows(n, rows, parts))
    emb, t_emb = timed(device, lambda: model.entry_embeddings(torch.from_numpy(lv)[None].to(device),
                                                             torch.from_numpy(tok)[None].to(device), g[None]))
    _, t_copy = timed(device, lambda: s.emb[:n].copy_(emb[0].to(s.emb.dtype)))
    s._known = s._emb_n = 0   # nothing to reuse: the whole window from the tree
    _, t_mat = timed(device, lambda: s._materialize(lv, ix, n))
    _, t_ref = timed(device, s.refocus)
    return dict(entries=n, runs=runs, reads_ms=t_reads, gist_rows_ms=t_rows, entry_embeddings_ms=t_emb,
                copy_ms=t_copy, materialize_ms=t_mat, refocus_ms=t_ref)


def kernel_kind(name):
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")):
        return "gemm"
    if n.startswith("triton_"):
        return "inductor"
    return "other"


@torch.no_grad()
def window_recompute(model, s, device, modes, reps=5):
    """The whole-window recompute per compile mode: median warm ms, TFLOP/s by the model's
    matmul + causal-attention FLOPs over the window, and the kernels of one run by kind."""
    c = model.config
    lv, ix = s._sync()
    E, W = len(lv), s.W
    s._materialize(lv, ix, E)
    d, L = c.n_embd, c.n_layer
    block = sum(p.numel() for p in model.transformer.h[0].parameters() if p.dim() == 2)
    flops = 2 * block * L * W + 2 * W * W * d * L   # matmuls (all W slots run) + causal QK^T and PV
    out = {"entries": E, "slots": W, "tflop": round(flops / 1e12, 3), "modes": {}}
    first = None
    for mode in modes:
        try:
            torch._dynamo.reset()
            # "cudnn": the default compile with cuDNN attention allowed (MemorySession.window_cudnn)
            s._window, MemorySession.window_mode = None, (None if mode in ("default", "cudnn") else mode)
            MemorySession.window_cudnn = mode == "cudnn"
            t0 = time.perf_counter()
            s.cache.truncate(0)
            logits = s._forward_window(E).float()   # compile (and autotune)
            synchronize(device.type)
            compile_s = time.perf_counter() - t0
            diff = None if first is None else round((logits - first).abs().max().item(), 5)
            first = logits if first is None else first
            ts = []
            for _ in range(reps):
                s.cache.truncate(0)
                ts.append(timed(device, lambda: s._forward_window(E))[1])
            s.cache.truncate(0)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                s._forward_window(E)
                synchronize(device.type)
            kinds, names = {}, {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
                    for table, key in ((kinds, kernel_kind(e.name)), (names, e.name[:100])):
                        k = table.setdefault(key, [0, 0.0])
                        k[0] += 1
                        k[1] += e.device_time_total / 1e3
            ms = float(np.median(ts))
            out["modes"][mode] = {"compile_s": round(compile_s, 1), "ms": round(ms, 3), "ms_all": ts,
                                  "max_abs_diff_vs_first_mode": diff,
                                  "tflop_per_s": round(flops / ms / 1e9, 1),
                                  "kernels": {k: {"calls": n, "ms": round(t, 3)} for k, (n, t) in
                                              sorted(kinds.items(), key=lambda kv: -kv[1][1])},
                                  # where the elementwise time goes: the kernels that take most of it
                                  "top_kernels": [{"kernel": k, "kind": kernel_kind(k), "calls": n, "ms": round(t, 3)}
                                                  for k, (n, t) in sorted(names.items(), key=lambda kv: -kv[1][1])[:12]]}
        except Exception as e:   # one mode failing (an autotune, a compile) leaves the others' figures
            out["modes"][mode] = {"error": f"{type(e).__name__}: {e}"[:600]}
    MemorySession.window_mode, MemorySession.window_cudnn = None, False
    s.cache.truncate(0)
    s._window = None
    s.logits()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--width", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--W", type=int, default=4096)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--max-level", type=int, default=3)
    ap.add_argument("--histories", default="131072,1048576")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--window-modes", default="default,cudnn", help="GPU: torch.compile modes to time the whole-window "
                    "recompute under, comma-separated (e.g. default,cudnn,max-autotune-no-cudagraphs; cudnn = default "
                    "with cuDNN attention, MemorySession.window_cudnn); empty = skip")
    args = ap.parse_args()
    device = torch.device(args.device or autodetect_device_type())
    args.pos_scheme, args.lens_match = "entry", False
    args.dtype = "bf16" if device.type == "cuda" else "fp32"
    model = build(args, device)
    out = {"bench": "materialize", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "depth": args.depth, "W": args.W, "histories": {}}
    for h in (int(x) for x in args.histories.split(",")):
        d = tempfile.mkdtemp()
        s = MemorySession(model, W=args.W, path=d, model_id="bench", focus="union")
        try:
            s.ingest(np.random.default_rng(h).integers(0, args.vocab, h))
            s.refocus()
            s.logits()
            for _ in s.generate(s.K + 8, temperature=1.0, top_k=50, seed=1):
                pass
            out["histories"][str(h)] = [probe(model, s, device) for _ in range(args.reps)]
            modes = [m for m in args.window_modes.split(",") if m]
            if device.type == "cuda" and modes and "window_recompute" not in out:   # the same at every history
                out["window_recompute"] = window_recompute(model, s, device, modes)
        finally:
            s.close()
            shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main_guard(main)
