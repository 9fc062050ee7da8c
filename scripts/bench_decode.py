"""
Decode speed and memory versus history length: MegaContext (MemorySession, O(W) state) against
full-attention KV decode of the same model over the whole history. Prints one JSON object.

    python -m scripts.bench_decode --depth 2 --histories 4096,32768 --steps 32 --device cpu
    python -m scripts.bench_decode --depth 12 --W 4096 --histories 4096,32768,131072,1048576
    python -m scripts.bench_decode --depth 20 --decode dynamic --dtype fp32   # the eager, autocast baseline
    python -m scripts.bench_decode --depth 20 --count-ops    # ops (and CUDA kernels) of one decode step
    python -m scripts.bench_decode --depth 20 --W 4096 --step-breakdown   # one step: replay vs loop vs kernels
    python -m scripts.bench_decode --depth 20 --W 4096 --lens-match   # LensNet with the query-match feature
    python -m scripts.bench_decode --depth 20 --W 4096 --focus match  # refocus by query match alone
    python -m scripts.bench_decode --depth 20 --W 4096 --focus union --phases   # + where an MC token's time goes
    python -m scripts.bench_decode --depth 20 --W 4096 --focus union --syncs    # + where the loop waits for the GPU
    python -m scripts.bench_decode --depth 20 --W 4096 --no-pipeline  # read each token before queuing its step

Random init is fine for speed, but LensNet's head and the zero-init output projections are
perturbed so that refocus really edits the window (and the cache really gets cut), as a trained
model's would. MC: ingest the history (random tokens, on-disk tree in a temp dir), refocus,
prefill the window, then time --steps generate() steps (sampling, tree/WC append, cache reuse,
refocus every K). Full: the plain Engine's cache over history + steps tokens, chunked prefill,
then --steps one-token decode steps; "skipped" past --max-full tokens, {"oom": phase, ...} if it
does not fit. Both time --steps steps after --warmup untimed ones.
--decode static (default): one-token steps through decode_step.DecodeStep, a CUDA graph on CUDA
(eager on CPU); dynamic: a plain KV-cached forward per step. --dtype bf16 (default on CUDA)
converts the model's weights, so that autocast has no per-step weight casts to do; fp32 keeps
fp32 weights (under bf16 autocast on CUDA).
Memory: peak allocated GPU memory (CUDA), else the process's current RSS after the run. Every
measurement runs in its own child process (same seed, same weights).
"""
import os
import gc
import sys
import json
import time
import shutil
import argparse
import contextlib
import subprocess
import tempfile

import numpy as np
import torch

from nanochat.common import main_guard, fail, autocast_ctx, synchronize, autodetect_device_type
from nanochat.gpt import GPT, GPTConfig
from nanochat.engine import Engine, MemorySession, DecodeStep, DECODE_MODES, Sampler
from megacontext.focus import FOCUS_POLICIES


def mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_mem(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class PhaseTimer:
    """--phases: exclusive wall time per decode-loop phase, with the device synchronized around
    each call, so GPU time lands in the phase that queued it. The sync serializes host and device
    (and so turns pipelining off): the phases explain a run, the headline timing is the unsynced one."""
    PHASES = (("step", "_step"), ("recompute", "_forward"), ("recompute", "_forward_window"),
              ("materialize", "_materialize"), ("emb_move", "_move_rows"), ("tree_read", "_tree_rows"),
              ("emb_fresh", "_fresh_rows"), ("window_sync", "_sync"), ("append", "_append"), ("refocus", "refocus"),
              ("sample", "_sample"))

    def __init__(self, s, device, sync=True):
        self.s, self.device, self.ms, self.calls, self.stack, self.saved = s, device, {}, {}, [], {}
        self.sync = sync   # False: the host's own time per phase (what bounds a host-bound loop)

    def wrap(self, name, fn):
        def timed(*a, **kw):
            if self.sync:
                synchronize(self.device.type)
            self.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if self.sync:
                    synchronize(self.device.type)
                dt = (time.perf_counter() - t0) * 1e3
                child = self.stack.pop()
                self.ms[name] = self.ms.get(name, 0.0) + dt - child
                self.calls[name] = self.calls.get(name, 0) + 1
                if self.stack:
                    self.stack[-1] += dt
        return timed

    def __enter__(self):
        for name, attr in self.PHASES:   # (callable, set on the instance: _step; else a method)
            self.saved[attr] = (getattr(self.s, attr), attr in vars(self.s))
            setattr(self.s, attr, self.wrap(name, self.saved[attr][0]))
        return self

    def __exit__(self, *exc):
        for attr, (fn, own) in self.saved.items():
            if own:
                setattr(self.s, attr, fn)
            else:
                delattr(self.s, attr)   # back to the class's method

    def per_token(self, steps, total_ms):
        out = {k: round(v / steps, 4) for k, v in sorted(self.ms.items(), key=lambda kv: -kv[1])}
        out["other"] = round((total_ms - sum(self.ms.values())) / steps, 4)
        out["total"] = round(total_ms / steps, 4)
        return {"ms_per_tok": out, "calls": self.calls}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SyncSites:
    """--syncs: where the decode loop makes the host wait for the device. Under
    torch.cuda.set_sync_debug_mode("warn") every synchronizing CUDA call (a blocking copy,
    .item(), .cpu(), nonzero, ...) warns; each warning is charged to the innermost frame of this
    repo's packages (roots) on the stack when it was raised, as "path:line (function)". Outside
    CUDA only the recording runs (a test feeds it warnings)."""

    def __init__(self, device, roots=("nanochat", "megacontext")):
        self.device, self.roots, self.sites = device, tuple(os.path.join(REPO, r) + os.sep for r in roots), {}

    def site(self):
        import traceback
        for fr in reversed(traceback.extract_stack()[:-1]):
            if fr.filename.startswith(self.roots):
                return f"{os.path.relpath(fr.filename, REPO)}:{fr.lineno} ({fr.name})"
        return "other"

    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        self._show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                k = self.site()
                self.sites[k] = self.sites.get(k, 0) + 1
            else:
                self._show(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)

    def per_token(self, steps):
        return {"per_tok": round(sum(self.sites.values()) / steps, 3),
                "sites": dict(sorted(self.sites.items(), key=lambda kv: -kv[1]))}


def window_emb_exact(s):
    """After a run: the session's window buffer (rows moved, read from the tree and written by
    the steps) equals the window's embeddings from scratch, bit for bit."""
    s.logits()
    return bool(torch.equal(s.emb[:len(s.wc)], s.reference_embeddings()))


ALLOC_KEYS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def alloc_counts(device):
    """The CUDA caching allocator's counters that cost the host: cudaMalloc/cudaFree calls,
    retries after freeing the cache, whole-device syncs. {} off CUDA."""
    if device.type != "cuda":
        return {}
    st = torch.cuda.memory_stats(device)
    return {k: int(st.get(k, 0)) for k in ALLOC_KEYS}


def bench_mc(model, ids, args, device, autocast, root):
    path = os.path.join(root, f"mc_{len(ids)}")
    shutil.rmtree(path, ignore_errors=True)
    reset_mem(device)
    s = MemorySession(model, W=args.W, path=path, model_id="bench", autocast=autocast, decode=args.decode,
                      focus=args.focus)
    s.pipeline = not args.no_pipeline
    try:
        t0 = time.perf_counter()
        s.ingest(ids)
        synchronize(device.type)
        ingest_s = time.perf_counter() - t0
        s.refocus()
        t0 = time.perf_counter()
        s.logits()  # prefill the window
        synchronize(device.type)
        prefill_s = time.perf_counter() - t0
        # untimed: kernels, allocator, and one refocus + recompute (decode="compiled" compiles both paths here)
        for _ in s.generate(max(args.warmup, s.K + 1), temperature=1.0, top_k=50, seed=1):
            pass
        synchronize(device.type)
        c0, w0, a0 = dict(s.counters), s.wait_s, alloc_counts(device)
        r0 = [lv.remaps for lv in s.tree.levels]
        t0 = time.perf_counter()
        tels = []
        with torch.profiler.record_function("bench.generate"):
            for _, tel in s.generate(args.steps, temperature=1.0, top_k=50, seed=0):
                if tel is not None:
                    tels.append(tel)
        synchronize(device.type)
        dt = time.perf_counter() - t0
        wait = s.wait_s - w0
        alloc = {k: v - a0[k] for k, v in alloc_counts(device).items()}   # during the timed loop
        remaps = [lv.remaps - r for lv, r in zip(s.tree.levels, r0)]   # tree files mapped again (a read past the map)
        c = {k: s.counters.get(k, 0) - c0.get(k, 0) for k in
             ("recomputed", "reused", "refocus_calls", "refocus_ms", "edits", "pipelined", "fresh_rows", "fresh_gists")}
        phases = None
        if args.phases:   # the same number of steps again, each phase synchronized (PhaseTimer)
            with PhaseTimer(s, device) as pt:
                t1 = time.perf_counter()
                for _ in s.generate(args.steps, temperature=1.0, top_k=50, seed=2):
                    pass
                synchronize(device.type)
            phases = pt.per_token(args.steps, (time.perf_counter() - t1) * 1e3)
            # and once more unsynchronized: the host's time per phase, pipelining on. When the
            # device waits for the host (host_wait_ms_per_tok near 0), this is the critical path
            with PhaseTimer(s, device, sync=False) as pt:
                t1 = time.perf_counter()
                for _ in s.generate(args.steps, temperature=1.0, top_k=50, seed=3):
                    pass
                synchronize(device.type)
            phases["host_ms_per_tok"] = pt.per_token(args.steps, (time.perf_counter() - t1) * 1e3)["ms_per_tok"]
        syncs = None
        if args.syncs:   # the same number of steps again, every synchronizing call recorded (SyncSites)
            with SyncSites(device) as ss:
                for _ in s.generate(args.steps, temperature=1.0, top_k=50, seed=4):
                    pass
            syncs = ss.per_token(args.steps)
        # the decode loop's one-block gists ran as CUDA graphs (GraphedFn): the newest one must be
        # bit for bit the eager GistNet's
        n1 = s.tree.num_nodes(1)
        blk = torch.from_numpy(s.tree.tokens((n1 - 1) * s.K, n1 * s.K).astype(np.int64))[None].to(device)
        with torch.no_grad(), autocast:
            ref = s.tree._decode(s.tree._encode(model.gist(0, blk)))
        gist_exact = bool(torch.equal(s.tree.gists(1, n1 - 1, n1), ref))
        emb_exact = window_emb_exact(s)
        warm = []   # a whole-window recompute once kernels are warm (prefill_ms is the first, cold one)
        for _ in range(3):
            s.cache.truncate(0)
            synchronize(device.type)
            t1 = time.perf_counter()
            s.logits()
            synchronize(device.type)
            warm.append((time.perf_counter() - t1) * 1e3)
        return {"tok_per_s": round(args.steps / dt, 2), "ms_per_tok": round(dt / args.steps * 1e3, 3),
                "mem_mb": round(mem_mb(device), 1), "ingest_tok_per_s": round(len(ids) / ingest_s, 1),
                "prefill_ms": round(prefill_s * 1e3, 2), "prefill_warm_ms": round(float(np.median(warm)), 2), "entries": len(s), "per_level": s.wc.level_counts().tolist(),
                "recomputed_per_tok": round(c["recomputed"] / args.steps, 2), "refocus_calls": c["refocus_calls"],
                "refocus_ms_mean": round(c["refocus_ms"] / max(1, c["refocus_calls"]), 3),
                # where a refocus goes: sync + embeddings + query match, then scoring, then the allocator
                **{f"refocus_{k}_mean": round(float(np.mean([t[k] for t in tels])), 3) if tels else None
                   for k in ("prep_ms", "lens_ms", "alloc_ms")},
                "edits_per_refocus": round(c["edits"] / max(1, c["refocus_calls"]), 2),
                "pipelined_per_tok": round(c["pipelined"] / args.steps, 3),
                # the host blocked on the device for the sampled token: ~0 means the loop is host-bound
                "host_wait_ms_per_tok": round(wait / args.steps * 1e3, 3),
                "gist_graph_exact": gist_exact, "emb_exact": emb_exact, "window_cudnn": s.window_cudnn,
                # rows materialize read from the tree (the rest moved on the device), per refocus
                "fresh_rows_per_refocus": round(c["fresh_rows"] / max(1, c["refocus_calls"]), 1),
                "fresh_gists_per_refocus": round(c["fresh_gists"] / max(1, c["refocus_calls"]), 1),
                # the sampler's CUDA graphs (0 off CUDA), and why they are off if a capture failed
                "sampler": s.last_sampler.graph_status() if s.last_sampler is not None else None,
                "tree_remaps": remaps, **({"alloc": alloc} if alloc else {}), **({"syncs": syncs} if syncs else {}),
                **({"phases": phases} if phases else {})}
    finally:
        s.close()
        shutil.rmtree(path, ignore_errors=True)


@torch.no_grad()   # as Engine.generate: the bench's own decode loop must not build autograd graphs
def bench_full(model, ids, args, device, autocast):  # main() skips histories past --max-full
    reset_mem(device)
    engine = Engine(model, autocast=autocast, decode=args.decode)
    phase = "cache"
    try:
        cache = engine.new_cache(1, len(ids) + args.warmup + args.steps)
        phase = "prefill"
        logits = engine.prefill(torch.from_numpy(ids)[None].to(device), cache)
        step = engine.decoder(cache)
        synchronize(device.type)
        sampler = Sampler(0, device)   # MemorySession.generate's sampler: the same host work per token
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                synchronize(device.type)
                t0 = time.perf_counter()
            phase = f"decode step {i}"
            nxt = sampler(logits, 1.0, 50)
            int(nxt[0, 0])  # the host needs every token, as in generate()
            logits = step(nxt)
        synchronize(device.type)
        dt = time.perf_counter() - t0
        return {"tok_per_s": round(args.steps / dt, 2), "ms_per_tok": round(dt / args.steps * 1e3, 3),
                "mem_mb": round(mem_mb(device), 1)}
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        # say where and how much: an OOM is a result only when the KV cache really does not fit
        return {"oom": phase, "mem_mb": round(mem_mb(device), 1), "error": str(e).splitlines()[0][:300]}
    finally:
        cache = logits = step = None
        reset_mem(device)


def make_config(args):
    width = args.width or args.depth * 64
    return GPTConfig(sequence_len=args.W, vocab_size=args.vocab, n_layer=args.depth, n_head=max(1, width // 64),
                     n_kv_head=max(1, width // 64), n_embd=width, megacontext=True, mc_block_size=args.K,
                     mc_max_level=args.max_level, pos_scheme=args.pos_scheme, lens_match=args.lens_match)


def build(args, device):
    cfg = make_config(args)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    model.init_weights()
    with torch.no_grad():  # see the docstring: make refocus and the residual branches do something
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
        model.lensnet.head.weight.normal_(std=1.0)
    if args.dtype == "bf16":
        model.to(torch.bfloat16)
    return model.eval()


def profiler(device):
    """torch.profiler over the CPU, and CUDA kernels too on a GPU."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return torch.profiler.profile(activities=acts)


def measure(args, h, mode):
    """One (history, mode) measurement in this process: what a child prints."""
    device = torch.device(args.device or autodetect_device_type())
    MemorySession.window_cudnn = args.window_cudnn
    model = build(args, device)
    autocast = autocast_ctx(device.type)
    ids = np.random.default_rng(h).integers(0, args.vocab, size=h, dtype=np.int64)
    # --profile: where a decode run's time goes, the top ops by self time (CPU and device)
    with (profiler(device) if args.profile else contextlib.nullcontext()) as prof, \
            tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        out = bench_full(model, ids, args, device, autocast) if mode == "full" else \
            bench_mc(model, ids, args, device, autocast, args.dir or tmp)
    if prof is not None:
        out = out if isinstance(out, dict) else {"result": out}
        out["profile"] = top_ops(prof, device)
    return out


def top_ops(prof, device, n=15):
    """The top n ops by self device time (CPU: self CPU time), by self CPU time (host overhead),
    and the engine's named phases (mc.*, bench.*: inclusive times, warmup included)."""
    row = lambda e: {"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),  # noqa: E731
                     "self_device_ms": round(getattr(e, "self_device_time_total", 0) / 1e3, 2)}
    ev = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = lambda k: [row(e) for e in sorted(ev, key=lambda e: getattr(e, k, 0), reverse=True)[:n]]  # noqa: E731
    phases = [{"phase": e.key, "calls": e.count, "cpu_ms": round(e.cpu_time_total / 1e3, 2)}
              for e in ev if e.key.startswith(("mc.", "bench."))]
    events = prof.events()
    out = {"by_device": top(key), "by_cpu": top("self_cpu_time_total"), "phases": phases,
           "phase_ops": phase_ops(events)}
    if device.type == "cuda":
        out["gpu_idle"] = gpu_idle(events)
    return out


def phase_ops(events, n=6):
    """Per engine phase (mc.*), the ops whose host time it spent (self CPU time, by the phase
    each op sits in innermost): what a phase's host time is made of. Calls and ms summed."""
    cpu = torch.autograd.DeviceType.CPU
    by = {}
    for e in events:
        if e.device_type != cpu or e.name.startswith(("mc.", "bench.")):
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith("mc."):
            p = p.cpu_parent
        if p is None:
            continue
        row = by.setdefault(p.name, {}).setdefault(e.name, [0, 0.0])
        row[0] += 1
        row[1] += e.self_cpu_time_total / 1e3
    return {ph: [{"op": k[:90], "calls": c, "self_cpu_ms": round(t, 2)} for k, (c, t) in
                 sorted(ops.items(), key=lambda kv: -kv[1][1])[:n]] for ph, ops in sorted(by.items())}


def gpu_idle(events, min_gap_us=1.0):
    """Where the device waits in the timed loop (the last bench.generate range): the union of its
    kernels and copies is busy time, the rest idle; each idle gap is charged to the innermost
    engine phase (mc.*) the host was in when the gap began ("loop": none, the generator and the
    bench). The profiler's own host overhead inflates idle time: compare runs, not absolutes."""
    cpu = torch.autograd.DeviceType.CPU
    gen = [e for e in events if e.name == "bench.generate" and e.device_type == cpu]
    if not gen:
        return None
    a, b = gen[-1].time_range.start, gen[-1].time_range.end
    # kernels and copies; the engine's record_function ranges also show up on the device's
    # timeline (as user annotations spanning whole phases) and are not work
    busy = sorted((e.time_range.start, e.time_range.end) for e in events
                  if e.device_type == torch.autograd.DeviceType.CUDA and a <= e.time_range.start < b
                  and not getattr(e, "is_user_annotation", False) and not e.name.startswith(("mc.", "bench.")))
    ranges = [(e.time_range.start, e.time_range.end, e.name) for e in events
              if e.device_type == cpu and e.name.startswith("mc.") and a <= e.time_range.start < b]
    gaps, end, busy_us = [], a, 0.0
    for s, e in busy:
        if s - end >= min_gap_us:
            gaps.append((end, s))
        if e > end:
            busy_us += e - max(s, end)
            end = e
    if b - end >= min_gap_us:
        gaps.append((end, b))
    by = {}
    starts = np.array([r[0] for r in ranges], dtype=np.float64)
    order = np.argsort(starts, kind="stable")
    for g0, g1 in gaps:   # the innermost range containing g0: the latest-starting one that has not ended
        name = "loop"
        for i in order[:np.searchsorted(starts[order], g0, side="right")][::-1]:
            if ranges[i][1] > g0:
                name = ranges[i][2]
                break
        by[name] = by.get(name, 0.0) + (g1 - g0)
    return {"wall_ms": round((b - a) / 1e3, 2), "busy_ms": round(busy_us / 1e3, 2),
            "idle_ms": round(sum(g1 - g0 for g0, g1 in gaps) / 1e3, 2), "gaps": len(gaps),
            "idle_ms_by_phase": {k: round(v / 1e3, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])}}


_VIEWS = {"aten::view", "aten::reshape", "aten::as_strided", "aten::slice", "aten::select", "aten::expand",
          "aten::permute", "aten::transpose", "aten::unsqueeze", "aten::squeeze", "aten::_unsafe_view", "aten::t",
          "aten::detach", "aten::alias", "aten::_reshape_alias", "aten::empty", "aten::empty_strided",
          "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::result_type", "aten::contiguous"}


def cuda_kernels(prof):
    """The CUDA kernels a profiled region launched."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def count_step_ops(args, device):
    """--count-ops: what one static decode step of the bench's model dispatches, run eagerly (no
    CUDA graph) on a short cache: top-level aten ops that are not views, and on CUDA the kernels
    launched. In a launch-bound step each kernel costs microseconds whatever its size, so these
    counts track the step's floor."""
    model = build(args, device)
    engine = Engine(model, autocast=autocast_ctx(device.type), decode="static")
    cache = engine.new_cache(1, 64)
    engine.prefill(torch.zeros(1, 8, dtype=torch.long, device=device), cache)
    step = DecodeStep(model, cache, engine.autocast, graph=False)
    x = torch.zeros(1, 1, dtype=torch.long, device=device)
    step(x, cache.pos)                                  # warm: lazy init, buffers
    with profiler(device) as prof:
        step(x, cache.pos)
        synchronize(device.type)

    def top(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::") and p.name not in _VIEWS:
                return False
            p = p.cpu_parent
        return True
    events = prof.events()
    ops = [e.name for e in events if e.name.startswith("aten::") and e.name not in _VIEWS and top(e)]
    out = {"bench": "decode_step_ops", "n_layer": args.depth, "ops_per_step": len(ops),
           "ops_per_layer": round(len(ops) / args.depth, 1)}
    if device.type == "cuda":
        kernels = cuda_kernels(prof)
        out.update(kernels_per_step=len(kernels), kernels_per_layer=round(len(kernels) / args.depth, 1))
    return out


def step_breakdown(args, device, n=64):
    """--step-breakdown: where one decode step's time goes, over a cache of W - 1 entries (the MC
    window's shape, and full attention's at a W-token history). Per variant (static, static
    + torch.compile, the Triton step with and without programmatic dependent launch, and their
    logits' distance from the static step's): the step alone (CUDA: n graph replays queued back to back, timed with events,
    so the host is off the critical path), the bench's per-token loop (sample, host sync, step),
    and one eager run under the profiler: kernels launched, their summed device time, and the
    kernel groups that take most of it. replay >> kernel sum means gaps between kernels (launch
    bound); loop >> replay means host work per token."""
    model = build(args, device)
    autocast = autocast_ctx(device.type)
    engine = Engine(model, autocast=autocast, decode="static")
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, args.vocab, size=args.W - 1, dtype=np.int64))
    out = {"bench": "decode_step_breakdown", "n_layer": args.depth, "n_embd": model.config.n_embd,
           "cached_entries": args.W - 1, "variants": {}}
    first = {}
    # fused_pdl: the same kernels launched with programmatic dependent launch (A/B; opt-in)
    for name, compile_, fused, pdl in (("static", False, False, None), ("compiled", True, False, None),
                                       ("fused", False, True, None), ("fused_pdl", False, True, True)):
        if (compile_ or fused) and device.type != "cuda":
            continue
        try:
            cache = engine.new_cache(1, args.W)
            logits = engine.prefill(ids[None].to(device), cache)
            slot = cache.pos
            step = DecodeStep(model, cache, engine.autocast, compile=compile_, fused=fused, pdl=pdl)
            x = torch.zeros(1, 1, dtype=torch.long, device=device)
            first[name] = step(x, slot)                          # warm, compile, capture
            for _ in range(2):
                step(x, slot)
            synchronize(device.type)
            row = {"pdl": step._fd.pdl} if fused else {}
            if name != "static":   # the same entry over the same cache: how far the logits are from the static step's
                row["max_abs_diff_vs_static"] = round((first[name] - first["static"]).abs().max().item(), 5)
                row["argmax_equal"] = bool((first[name].argmax(-1) == first["static"].argmax(-1)).all())
            if step._graph is not None:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(n):
                    step._graph.replay()
                e1.record()
                synchronize(device.type)
                row["replay_ms"] = round(e0.elapsed_time(e1) / n, 4)
            sampler = Sampler(0, device)
            for i in range(n + 8):   # 8 untimed: the sampler's kernels load lazily (and its graph is captured)
                if i == 8:
                    synchronize(device.type)
                    t0 = time.perf_counter()
                nxt = sampler(logits, 1.0, 50)
                int(nxt[0, 0])
                logits = step(nxt, slot)
            synchronize(device.type)
            row["loop_ms"] = round((time.perf_counter() - t0) / n * 1e3, 4)
            # the same entry again after all those replays and steps: a race between kernels would show here
            row["repeat_max_abs_diff"] = round((step(x, slot) - first[name]).abs().max().item(), 6)
            eager = DecodeStep(model, cache, engine.autocast, graph=False, compile=compile_, fused=fused, pdl=pdl)
            eager(x, slot)
            with profiler(device) as prof:
                eager(x, slot)
                synchronize(device.type)
            if device.type == "cuda":
                ks = cuda_kernels(prof)
                groups = {}
                for e in ks:
                    g = groups.setdefault(e.name[:90], [0, 0.0])
                    g[0] += 1
                    g[1] += e.device_time_total / 1e3
                row.update(kernels=len(ks), kernel_sum_ms=round(sum(e.device_time_total for e in ks) / 1e3, 4),
                           top_kernels=[{"kernel": k, "calls": c, "ms": round(t, 4)} for k, (c, t) in
                                        sorted(groups.items(), key=lambda kv: -kv[1][1])[:14]])
            out["variants"][name] = row
        except Exception as e:   # one variant failing (a compiler, a launch) leaves the others' figures
            out["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:600]}
        cache = step = eager = None
        reset_mem(device)
    return out


def run_child(argv, h, mode):
    """Each measurement runs in a fresh process, so that no allocation of one (a 128k-token KV
    cache, a 1M-token ingest) can starve the next, and peak memory is the measurement's own."""
    r = subprocess.run([sys.executable, "-m", "scripts.bench_decode", *argv, "--child", f"{h},{mode}"],
                       capture_output=True, text=True)
    if r.returncode == 0:
        return json.loads(r.stdout.strip().splitlines()[-1])
    if "OutOfMemoryError" in r.stderr:
        return {"oom": "child", "error": r.stderr.strip()[-300:]}
    return {"error": r.stderr.strip()[-800:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--width", type=int, default=0, help="n_embd (default depth * 64)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--W", type=int, default=1024)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--max-level", type=int, default=3, help="3 lets 1M tokens fit in W=1024 at K=32")
    ap.add_argument("--pos-scheme", default="entry", choices=["entry", "gaussian"])
    ap.add_argument("--histories", default="4096,32768,131072,1048576")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=8, help="untimed decode steps first (each run is a fresh process; "
                    "MC: at least K + 1, so that one refocus and its recompute are warm)")
    ap.add_argument("--max-full", type=int, default=131072, help="longest history for full attention")
    ap.add_argument("--device", default=None)
    ap.add_argument("--decode", default="static", choices=DECODE_MODES, help="decode steps: static shapes "
                    "(a CUDA graph on CUDA), compiled (torch.compile'd), fused (Triton kernels, decode_kernels.py) "
                    "or a dynamic KV-cached forward")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                    help="model weights (default bf16 on CUDA, fp32 elsewhere)")
    ap.add_argument("--dir", default=None, help="where the MC tree goes (default: a temp dir, removed)")
    ap.add_argument("--no-pipeline", action="store_true", help="MC: read each token on the host before "
                    "queuing its step (MemorySession.pipeline = False)")
    ap.add_argument("--phases", action="store_true", help="MC: also time --steps more steps phase by phase "
                    "(device synchronized around each phase; see PhaseTimer)")
    ap.add_argument("--syncs", action="store_true", help="MC: also run --steps more steps with every synchronizing "
                    "CUDA call recorded by the source line that made it (torch.cuda.set_sync_debug_mode)")
    ap.add_argument("--profile", action="store_true", help="add each run's top ops (torch.profiler) to its result")
    ap.add_argument("--count-ops", action="store_true", help="only count the ops (and CUDA kernels) of one decode step")
    ap.add_argument("--step-breakdown", action="store_true", help="only time one decode step (replay, loop, kernels) at W")
    ap.add_argument("--lens-match", action="store_true", help="LensNet reads the query-match feature (GPTConfig.lens_match)")
    ap.add_argument("--focus", default="lens", choices=FOCUS_POLICIES,
                    help="MemorySession's refocus scorer (default lens, as the README's decode figures; chat's default is union)")
    ap.add_argument("--window-cudnn", action="store_true", help="MC: the whole-window recompute may use cuDNN "
                    "attention (MemorySession.window_cudnn; decode compiled/fused)")
    ap.add_argument("--repeat", type=int, default=1, help="measure each history's MC and full attention this many "
                    "times, alternating (the machine's drift shows in the pairs); rows report the median run")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)  # "history,mode": one measurement
    args = ap.parse_args()
    try:
        histories = [int(h) for h in args.histories.split(",")]
    except ValueError:
        fail(f"--histories must be comma-separated integers, got {args.histories!r}")
    if args.steps < 1 or args.warmup < 0 or min(histories) < 1 or args.repeat < 1:
        fail("--steps, --repeat and every history must be >= 1, --warmup >= 0")
    if args.dtype is None:
        args.dtype = "bf16" if torch.device(args.device or autodetect_device_type()).type == "cuda" else "fp32"
    if args.count_ops:
        print(json.dumps(count_step_ops(args, torch.device(args.device or autodetect_device_type()))))
        return
    if args.step_breakdown:
        print(json.dumps(step_breakdown(args, torch.device(args.device or autodetect_device_type()))))
        return
    if args.child:
        h, mode = args.child.split(",")
        print(json.dumps(measure(args, int(h), mode)))
        return
    device = torch.device(args.device or autodetect_device_type())
    cfg = make_config(args)
    argv = sys.argv[1:]
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch_threads": torch.get_num_threads(), "config": {k: getattr(cfg, k) for k in
           ("n_layer", "n_embd", "vocab_size", "mc_block_size", "mc_max_level", "pos_scheme", "lens_match")},
           "focus": args.focus,
           "W": args.W, "steps": args.steps, "decode": args.decode, "pipeline": not args.no_pipeline, "window_cudnn": args.window_cudnn, "dtype": args.dtype, "mem": "peak_gpu_mb" if device.type == "cuda" else "rss_mb",
           "isolation": "one process per measurement", "results": []}
    for h in histories:
        runs = [{"mc": run_child(argv, h, "mc"), "full": "skipped" if h > args.max_full else run_child(argv, h, "full")}
                for _ in range(args.repeat)]
        row = {"history": h, **{k: median_run([r[k] for r in runs]) for k in ("mc", "full")}}
        if args.repeat > 1:   # each pair ran back to back: full / MC per pair, then the spread
            ms = lambda r: r.get("ms_per_tok") if isinstance(r, dict) else None  # noqa: E731
            row["runs"] = [{"mc_ms_per_tok": ms(r["mc"]), "full_ms_per_tok": ms(r["full"]),
                            "mc_speedup": round(ms(r["full"]) / ms(r["mc"]), 3) if ms(r["mc"]) and ms(r["full"]) else None}
                           for r in runs]
        print(f"history {h}: {json.dumps(row)}", file=sys.stderr, flush=True)
        out["results"].append(row)
    out["vs_full"] = vs_full(out["results"], args.W)
    print(json.dumps(out, indent=1))


def median_run(runs):
    """The run with the median ms/token (the lower middle of an even count); runs that failed or
    were skipped count only when no run has a time."""
    timed = sorted((r for r in runs if isinstance(r, dict) and r.get("ms_per_tok")), key=lambda r: r["ms_per_tok"])
    return timed[(len(timed) - 1) // 2] if timed else runs[0]


def vs_full(results, W):
    """Per history with both: full attention's ms/token over MC's (mc_speedup). With full attention
    also measured at a W-token history, bound = full(h) / full(W): an MC step over W entries is a
    full-attention step over W tokens, and MC's refocus, recompute and append only add to it, so
    mc_speedup <= bound whatever the MC overheads cost (README, #5)."""
    ms = lambda r: r.get("ms_per_tok") if isinstance(r, dict) else None  # noqa: E731
    full = {r["history"]: ms(r["full"]) for r in results if ms(r["full"])}
    mc = {r["history"]: ms(r["mc"]) for r in results if ms(r["mc"])}
    out = {}
    for h in sorted(set(full) & set(mc)):
        out[str(h)] = {"mc_speedup": round(full[h] / mc[h], 3)}
        if W in full:
            out[str(h)]["bound"] = round(full[h] / full[W], 3)
    return out


if __name__ == "__main__":
    main_guard(main)
