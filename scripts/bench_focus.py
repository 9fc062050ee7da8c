"""
CPU timings of the working-context machinery that runs outside the model, as one JSON line:
refocus (at W=8192, K=32, N=1M, random LensNet-like scores), single-token append (the decode
loop's per-token cost), a bulk 1M-token ingest, and the training-time sampler (n=8).
--needle-sim instead: mc_eval's focus loop (W=512, K=32, 8 rounds) with a simulated imperfect
LensNet, with and without carried scores: in how many of 20 runs the needle ends at LOD0.
--match instead: the query-match feature at a refocus over N tokens (Zipf-distributed ids, so
common bigrams repeat as in text): MemorySession's MatchIndex (ingest, then 32 generated tokens
and one refocus per round) against one batched query_match pass over the whole history.

    python -m scripts.bench_focus [--W 8192] [--K 32] [--N 1000000] [--calls 2000]
    python -m scripts.bench_focus --needle-sim
    python -m scripts.bench_focus --match [--N 1000000] [--W 8192]
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


def noisy_lens_focus(N, needle, seed, carry, rounds=8, K=32, W=512, L=2):
    """mc_eval's focus loop with an imperfect LensNet: the needle's gists score +4, other gists
    N(-1, 1), LOD0 tokens N(0, 1) (LensNet never trains on them). Returns the needle's level after
    each round."""
    rng = np.random.default_rng(seed)
    wc = WorkingContext.recency(N, K, W, L)
    fa = FocusAllocator(n_diff=4, hysteresis=2, free_collapses=False, carry_scores=carry)
    trace = []
    for _ in range(rounds):
        hit = (wc.starts <= needle) & (wc.starts + wc.widths > needle)
        s = np.where(wc.levels >= 1, rng.normal(-1, 1, len(wc)), rng.normal(0, 1, len(wc)))
        s[hit & (wc.levels >= 1)] = 4.0
        fa.refocus(wc, s)
        wc.validate()
        trace.append(int(wc.levels[(wc.starts <= needle) & (wc.starts + wc.widths > needle)][0]))
    return trace


def needle_sim(mults=(4, 16, 64, 256), n=20, W=512):
    """{mult: {"no_carry": kept, "carry": kept}} out of n needles in [0, max(N - 2048, N/2))."""
    out = {}
    for m in mults:
        N = m * W
        needles = np.random.default_rng(100).integers(0, max(N - 2048, N // 2), size=n)
        out[m] = {name: sum(noisy_lens_focus(N, int(x), i, c)[-1] == 0 for i, x in enumerate(needles))
                  for name, c in (("no_carry", False), ("carry", True))}
    return out


def match_bench(N, W, K, L, rounds=20, vocab=32768, seed=0):
    import torch
    from megacontext.match import MatchIndex, query_match, entry_match
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.3, N + 32 * rounds), vocab) - 1
    mi = MatchIndex()
    t0 = time.perf_counter()
    for a in range(0, N, 16384):                  # MemorySession's ingest chunks
        mi.append(ids[a:min(a + 16384, N)])
    build_ms = (time.perf_counter() - t0) * 1e3
    refocus_ms, n = [], N
    for _ in range(rounds):
        mi.append(ids[n:n + 32])                  # the 32 tokens generated since the last refocus
        n += 32
        wc = WorkingContext.recency(n, K, W, L)
        t0 = time.perf_counter()
        mass = mi.entry_mass(ids[n - 32:n], n, wc.starts, wc.widths)
        refocus_ms.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    ref = entry_match(query_match(torch.from_numpy(ids[:n])[None], torch.tensor([n]), 32),
                      torch.from_numpy(wc.starts)[None], torch.from_numpy(wc.widths)[None])[0].numpy()
    pass_ms = (time.perf_counter() - t0) * 1e3
    return {"index_build_ms": round(build_ms, 1), "index_refocus_ms": stats(refocus_ms),
            "full_pass_ms": round(pass_ms, 1), "max_abs_diff": float(np.abs(mass - ref).max()),
            "index_bytes_per_token": 16, "torch_threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--W", type=int, default=8192)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--N", type=int, default=1_000_000)
    ap.add_argument("--max-level", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--needle-sim", action="store_true", help="only the carried-scores simulation (see above)")
    ap.add_argument("--match", action="store_true", help="only the query-match timings (see above)")
    args = ap.parse_args()
    if args.needle_sim:
        print(json.dumps({"needle_at_lod0_of_20": needle_sim()}))
        return
    K, W, N, L = args.K, args.W, args.N, args.max_level
    if args.match:
        print(json.dumps({"hardware": f"CPU ({platform.processor() or platform.machine()}), numpy {np.__version__}",
                          "config": {"K": K, "W": W, "N": N, "max_level": L},
                          "match": match_bench(N, W, K, L, seed=args.seed)}))
        return
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
