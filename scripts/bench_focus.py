"""
CPU timings of the working-context machinery that runs outside the model, as one JSON line:
refocus (at W=8192, K=32, N=1M, random LensNet-like scores), single-token append (the decode
loop's per-token cost), a bulk 1M-token ingest, and the training-time sampler (n=8).

    python -m scripts.bench_focus [--W 8192] [--K 32] [--N 1000000] [--calls 2000]
"""
import argparse
import json
import platform
import time

import numpy as np

from megacontext.focus import FocusAllocator, sample_working_contexts
from megacontext.working_context import WorkingContext


def stats(ms):
    ms = np.asarray(ms)
    return {"median": round(float(np.median(ms)), 4), "p99": round(float(np.percentile(ms, 99)), 4),
            "mean": round(float(ms.mean()), 4), "n": len(ms)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--W", type=int, default=8192)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--N", type=int, default=1_000_000)
    ap.add_argument("--max-level", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    K, W, N, L = args.K, args.W, args.N, args.max_level
    rng = np.random.default_rng(args.seed)

    # refocus: scores drawn ahead of time so that only the allocator is timed
    wc = WorkingContext.recency(N, K, W, L)
    fa = FocusAllocator()
    pool = [rng.normal(size=W) for _ in range(64)]
    refocus_ms, edits = [], 0
    for i in range(args.calls):
        t = time.perf_counter()
        tel = fa.refocus(wc, pool[i % len(pool)][: len(wc)])
        refocus_ms.append((time.perf_counter() - t) * 1e3)
        edits += tel["expanded"] + tel["collapsed"]
    wc.validate()

    # append: one token at a time from a full window (collapses every ~K-1 tokens)
    wc = WorkingContext.recency(N, K, W, L)
    append_ms = []
    for _ in range(args.calls * 4):
        t = time.perf_counter()
        wc.append(1)
        append_ms.append((time.perf_counter() - t) * 1e3)
    wc.validate()

    t = time.perf_counter()
    bulk = WorkingContext(K, W, L)
    bulk.append(N)
    bulk_ms = (time.perf_counter() - t) * 1e3

    sampler_ms = []
    for _ in range(10):
        t = time.perf_counter()
        wcs = sample_working_contexts(N, K, W, L, 8, rng)
        sampler_ms.append((time.perf_counter() - t) * 1e3)

    print(json.dumps({
        "hardware": f"CPU ({platform.processor() or platform.machine()}), numpy {np.__version__}",
        "config": {"K": K, "W": W, "N": N, "max_level": L},
        "refocus_ms": stats(refocus_ms), "refocus_edits_per_call": round(edits / args.calls, 3),
        "append1_ms": stats(append_ms),
        "bulk_append_N_ms": round(bulk_ms, 1), "bulk_equals_recency": bool(bulk == WorkingContext.recency(N, K, W, L)),
        "sampler_n8_ms": stats(sampler_ms),
        "sampler_entries_per_level": [w.level_counts().tolist() for w in wcs],
        "recency_entries_per_level": WorkingContext.recency(N, K, W, L).level_counts().tolist(),
    }))


if __name__ == "__main__":
    main()
