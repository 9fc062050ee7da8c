"""
Benchmark the on-disk MegaContext tree: bulk append MB/s (durable on and off), small-append
latency (chat-style, K tokens per append), sequential read MB/s and random gist-read latency.
Prints one JSON object. gist_fn is a cheap random generator: "append_MBps" excludes its time
(storage only), "append_MBps_incl_gist" includes it. Reads are after close + reopen but with the
page cache warm (dropping it needs root), so they measure memmap + decode, not the disk.

    python -m scripts.bench_tree --tokens 1000000 --dim 768
"""
import os
import json
import time
import shutil
import argparse
import tempfile

import numpy as np
import torch

from nanochat.common import main_guard
from megacontext.tree import MegaContextTree


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--small_appends", type=int, default=256, help="number of K-token appends timed")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed after)")
    args = ap.parse_args()

    root = args.dir or tempfile.mkdtemp(prefix="bench_tree_")
    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, 65536, size=args.tokens, dtype=np.int64)
    gist_fn = lambda level, children: torch.randn(children.shape[0], args.dim)  # noqa: E731
    out = {"tokens": args.tokens, "dim": args.dim, "K": args.K, "dtype": args.dtype, "dir": root,
           "torch_threads": torch.get_num_threads()}
    try:
        for durable in (True, False):
            tag = "durable" if durable else "nondurable"
            path = os.path.join(root, tag)
            shutil.rmtree(path, ignore_errors=True)
            tree = MegaContextTree.create(path, K=args.K, dim=args.dim, max_level=2, dtype=args.dtype,
                                          model_id="bench", durable=durable)
            tel = tree.append(ids, gist_fn)
            tree.close()
            nbytes = sum(os.path.getsize(os.path.join(path, f"LOD{l}.ctx")) for l in range(3))
            store_s = tel["total_s"] - tel["gist_s"]
            out[tag] = {
                "bytes": nbytes,
                "nodes": tel["new_nodes"],
                "gist_calls": tel["gist_calls"],
                "append_s": round(tel["total_s"], 4),
                "gist_s": round(tel["gist_s"], 4),
                "append_MBps": round(nbytes / store_s / 1e6, 1),
                "append_MBps_incl_gist": round(nbytes / tel["total_s"] / 1e6, 1),
            }

            # chat-style streaming: K tokens per append, each one completes a LOD1 node
            tree = MegaContextTree.open(path, model_id="bench", durable=durable)
            small = np.random.default_rng(1).integers(0, 65536, size=args.K * args.small_appends)
            t0 = time.perf_counter()
            for i in range(args.small_appends):
                tree.append(small[i * args.K:(i + 1) * args.K], gist_fn)
            out[tag]["small_append_ms"] = round((time.perf_counter() - t0) / args.small_appends * 1e3, 3)
            # a decode step: append one token, read it back (MemorySession._materialize)
            one = np.random.default_rng(3).integers(0, 65536, size=2000)
            ts = []
            for i, t in enumerate(one):
                tree.append(one[i:i + 1], gist_fn)
                t0 = time.perf_counter()
                got = tree.tokens(tree.num_tokens - 1, tree.num_tokens)
                ts.append(time.perf_counter() - t0)
                assert got[0] == t
            out[tag]["read_back_us_median"] = round(float(np.median(ts)) * 1e6, 2)
            tree.close()

        # reads: reopen, then sequential chunks of tokens and gists, then random single gists
        tree = MegaContextTree.open(os.path.join(root, "nondurable"), model_id="bench")
        t0 = time.perf_counter()
        for s in range(0, tree.num_tokens, 65536):
            tree.tokens(s, min(s + 65536, tree.num_tokens))
        tok_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        gist_bytes = 0
        for l in (1, 2):
            n = tree.num_nodes(l)
            for s in range(0, n, 4096):
                gist_bytes += tree.gists(l, s, min(s + 4096, n)).shape[0] * tree.levels[l].record_bytes
        gist_s = time.perf_counter() - t0
        idx = np.random.default_rng(2).integers(0, tree.num_nodes(1), size=2000)
        t0 = time.perf_counter()
        for i in idx:
            tree.gists(1, int(i), int(i) + 1)
        rand_us = (time.perf_counter() - t0) / len(idx) * 1e6
        out["read"] = {
            "tokens_MBps": round(tree.num_tokens * 4 / tok_s / 1e6, 1),
            "gists_MBps_stored_bytes": round(gist_bytes / gist_s / 1e6, 1),
            "random_gist_read_us": round(rand_us, 2),
            "page_cache": "warm",
        }
        tree.close()
        out["note"] = "append_MBps excludes gist_fn time (random gists); append_MBps_incl_gist includes it"
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main_guard(main)
