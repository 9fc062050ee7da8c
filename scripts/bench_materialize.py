"""
Time one whole-window materialize (MemorySession._materialize: the window's entry embeddings after
a refocus) piece by piece, each piece synced, at several history lengths:

    python -m scripts.bench_materialize --depth 20 --W 4096 --histories 131072,1048576

Pieces: the tree reads (one per run of same-level consecutive entries), building the gist rows on
the device, entry_embeddings, the copy into the session's buffer; then _materialize itself and one
refocus, for comparison. `--reps` repeats (the first read after ingest can be cold). Prints JSON.
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
    s._known = 0
    _, t_mat = timed(device, lambda: s._materialize(lv, ix, n))
    _, t_ref = timed(device, s.refocus)
    return dict(entries=n, runs=runs, reads_ms=t_reads, gist_rows_ms=t_rows, entry_embeddings_ms=t_emb,
                copy_ms=t_copy, materialize_ms=t_mat, refocus_ms=t_ref)


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
        finally:
            s.close()
            shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main_guard(main)
