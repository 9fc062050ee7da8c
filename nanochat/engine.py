"""
KV-cached generation, plain and with MegaContext memory.

Engine, plain KV-cached generation, lives in nanochat/kv_engine.py (re-exported here). One-token
steps run through DecodeStep (nanochat/decode_step.py): the same shapes at every step, captured
once as a CUDA graph on CUDA and replayed.

MemorySession: one conversation's memory and the MegaContext decode loop (DESIGN §9):
ingest -> refocus -> decode, chunked by K.
- ingest(ids): tokens -> tree (GistNet, batched, no grad) -> working context (WC): wc.append
  collapses oldest-first when over W. Nothing is decoded.
- refocus(): LensNet scores every WC entry, given the last K tokens -> FocusAllocator edits.
- logits(): the KV cache holds the model's K/V for a prefix of the WC, and we remember which
  node (level, index) sits in each cached slot. The valid prefix is the common prefix of that
  layout and the current WC, so any edit (append-collapse, refocus, or a direct WC edit)
  invalidates exactly the entries from its first changed one; those are recomputed in one
  chunked forward. This is exact: a node's content never changes (the tree is append-only) and
  its position depends only on its slot ("entry") or on the node itself ("gaussian"). For the
  same reason the entry embeddings behind an edit move within the window buffer (emb) instead of
  being read from the tree again (_materialize).
- generate(): sample, append the token to memory (tree + WC), refocus every K generated tokens.
  Pipelined (MemorySession.pipeline): when the next token is a plain tail append, its step is
  queued on the device before the host reads the token, so the host's tree/WC append overlaps it.
  The host is what bounds this loop on a GPU (bench_decode host_wait_ms_per_tok), so the per-token
  and per-refocus work is kept to few launches: the step embeds the token into emb itself
  (DecodeStep emb_out), and the one-block GistNet calls and refocus's LensNet call (over the window
  padded to a multiple of 256 entries: few shapes) replay CUDA graphs (decode_step.GraphedFn).
- Model inputs come only from model.entry_embeddings (LOD0 ids from tree.tokens, gists from
  tree.gists), so inference sees what training sees. LensNet gets those entry embeddings,
  lens_features(starts, widths, N, query match) and the token embeddings of the last K tokens;
  the query match comes from a MatchIndex of the history's bigrams (megacontext/match.py).
  focus="match" / "match_top" score the entries by the query match alone, "union" by the max of
  that and LensNet (focus.focus_scores, as mc_eval's policies of the same names).
- Device memory: the model, a W-entry KV cache and a W-entry embedding buffer: O(W), whatever
  the history length. The tree lives in RAM or on disk.
A plain (non-MC) model gets the same API over a token list; its window is the last <= W tokens
(W <= sequence_len). When it overflows, it is re-anchored to the last 3W/4 tokens and recomputed:
positions shift, so a plain window cannot slide one token at a time without a full recompute.
"""
import os
import json
import time
import array
import hashlib
import contextlib
import collections

import numpy as np
import torch

from nanochat.common import fail, atomic_write_json, atomic_write_bytes, autocast_ctx, lock_dir, to_device
from nanochat.gpt import lens_features
from nanochat.decode_step import DecodeStep, DECODE_MODES, sample_next, qkv_modules, cache_dtype, check_decode, GraphedFn, no_cache_autocast, Sampler  # noqa: F401 (re-exported)
from nanochat.attention import KVCache, fixed_shape
from nanochat.kv_engine import Engine  # noqa: F401 (re-exported: the plain engine lives there)
from megacontext.match import MatchIndex
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext
from megacontext.focus import lens_allocator, focus_scores, reads_match, FOCUS_POLICIES, DEFAULT_FOCUS


Queued = collections.namedtuple("Queued", "slot logits read")   # a pipelined step (MemorySession._queue_step)
_NO_PHASE = contextlib.nullcontext()
_profiling = getattr(torch.autograd, "_profiler_enabled", lambda: True)   # (older torch: always named)


def _phase(name):
    """A named range in a profile (bench_decode --profile). record_function costs ~12 us even with
    no profiler running (on this repo's 2-core CPU), a few of them per generated token: only
    when one runs."""
    return torch.profiler.record_function(name) if _profiling() else _NO_PHASE


STATE_FILE = "session.json"   # small JSON state beside the tree files, rewritten atomically
TOKENS_FILE = "tokens.u32"    # plain models only: the token history
STATE_VERSION = 1


def compute_model_id(model) -> str:
    """32 hex chars naming what stored memory depends on: the config and, for an MC model, the
    token embedding (LOD0 children are embedded with it) and GistNet. A memory made by another
    model fails to open instead of feeding it foreign gists."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    mods = [("wte", model.transformer.wte), ("gistnet", model.gistnet)] if model.config.megacontext else []
    for prefix, mod in mods:
        for name, t in sorted(mod.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _token_array(ids, vocab_size):
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        fail(f"token ids must be a 1-D integer sequence, got shape {a.shape} dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        fail(f"token ids must lie in [0, {vocab_size}), got [{a.min()}, {a.max()}]")
    return a


class MemorySession:
    """One conversation's memory. For an MC model: a MegaContextTree (on disk if path given, else
    RAM) + a WorkingContext of budget W + a FocusAllocator + a KVCache over the working context.
    For a plain (non-MC) model: a token list and a sliding window of the last sequence_len tokens
    (same API). On disk, gists are written without fsync per token (durable=False) and flushed by
    save(); a crash loses at most the unsaved tail, which open() reconciles."""
    chunk = 4096          # entries per forward when many are recomputed (bounds activations; a W=4096 window is one call)
    ingest_chunk = 16384  # tokens per tree append during ingest (one progress callback each)
    pipeline = True       # generate(): queue each step before the host appends the token (_queue_step)
    window_mode = None    # torch.compile mode of the whole-window recompute (bench_materialize --window-modes)
    window_cudnn = False  # let that recompute (one fixed shape) use cuDNN attention (opt-in until measured)
    lens_bucket = 256     # refocus pads the window to a multiple of this (<= W) for LensNet: few shapes, few graphs

    def __init__(self, model, W=None, path=None, model_id=None, autocast=None, n_diff=4, tail=None, durable=False,
                 decode="static", focus=DEFAULT_FOCUS):
        """decode: "static" = one-entry forwards (every generated token) go through a DecodeStep
        (a CUDA graph on CUDA), "compiled", "fused" and "dynamic" as in Engine ("compiled" and
        "fused" also run a recompute of the whole window as one compiled forward). focus: who scores the
        entries at refocus (focus.FOCUS_POLICIES): "lens" (LensNet), "match" (the query-match
        feature alone: it finds a needle in a phrasing LensNet never saw), "match_top" (only the
        best-matched spans) or "union" (max of lens and match_top, the default: README, Results)."""
        c = model.config
        self._setup(model, model_id, autocast, path, decode, focus)
        if path is not None and os.path.exists(os.path.join(path, STATE_FILE)):
            fail(f"{path} already holds a memory; reopen it with MemorySession.open")
        if self.mc:
            self.W = int(W or c.sequence_len)
            self.tree = MegaContextTree(K=self.K, dim=c.n_embd, max_level=c.mc_max_level,
                                        model_id=self.model_id, path=path, durable=durable)
            self.wc = WorkingContext(self.K, self.W, c.mc_max_level, tail)
            self.focus = lens_allocator(n_diff)
        else:
            self.W = min(int(W or c.sequence_len), c.sequence_len)
            self.tokens, self.w0 = array.array("I"), 0
            self._lock_dir()
        self._init_buffers()
        self.save()

    @classmethod
    def open(cls, model, path, model_id=None, autocast=None, durable=False, decode="static", focus=DEFAULT_FOCUS):
        """Reopen a memory that save() wrote: tree files + session.json. Another model -> UserError."""
        sp = os.path.join(path, STATE_FILE)
        if not os.path.isfile(sp):
            fail(f"no memory at {path} ({STATE_FILE} missing)")
        try:
            with open(sp) as f:
                state = json.load(f)
            assert state["version"] == STATE_VERSION
        except Exception as e:
            fail(f"corrupt memory state {sp}: {type(e).__name__}: {e}")
        self = cls.__new__(cls)
        self._setup(model, model_id, autocast, path, decode, focus)
        if state.get("model_id") != self.model_id:
            fail(f"memory at {path} was made by model {state.get('model_id')!r}, not by this one "
                 f"({self.model_id!r}); its gists do not fit this model")
        if state.get("kind") != ("mc" if self.mc else "plain"):
            fail(f"memory at {path} is for a {state.get('kind')} model, this one is {'mc' if self.mc else 'plain'}")
        self.W, self.recovered = int(state["W"]), {}
        if self.mc:
            self.tree = MegaContextTree.open(path, model_id=self.model_id, durable=durable)
            self.recovered.update(self.tree.recovered)
            wc, N = WorkingContext.from_dict(state["wc"]), self.tree.num_tokens
            if wc.num_tokens < N:    # tokens appended after the last save: cover them
                wc.append(N - wc.num_tokens)
                self.recovered["wc_appended"] = N - wc.num_tokens
            elif wc.num_tokens > N:  # the tree lost an unflushed tail (OS crash): fall back to recency
                wc = WorkingContext.recency(N, wc.K, wc.W, wc.max_level, wc.tail)
                self.recovered["wc_rebuilt"] = True
            self.wc = wc
            self.focus = lens_allocator(state["n_diff"])
            self.focus.calls = int(state.get("focus_calls", 0))  # hysteresis memory is not persisted
        else:
            self._lock_dir()
            self.tokens = array.array("I")
            with open(os.path.join(path, TOKENS_FILE), "rb") as f:
                self.tokens.frombytes(f.read())
            self.w0 = int(state["w0"])
        self._init_buffers()
        self.counters.update(state.get("counters", {}))
        return self

    def _setup(self, model, model_id, autocast, path, decode, focus):
        self.decode = check_decode(decode, next(model.parameters()).device, model)
        if focus not in FOCUS_POLICIES:
            fail(f"focus must be one of {', '.join(FOCUS_POLICIES)}, got {focus!r}")
        self.focus_by = focus
        self.model, self.config, self.path = model, model.config, path
        self.mc = bool(model.config.megacontext)
        self.K = model.config.mc_block_size
        self.device = next(model.parameters()).device
        self.autocast = autocast if autocast is not None else autocast_ctx(self.device.type)
        self.model_id = model_id if model_id is not None else compute_model_id(model)
        self.tree, self._lock_fd, self.closed, self.recovered = None, None, False, {}
        self._gist_graphs = {}   # (level, weights) -> GraphedFn: one-block gists while decoding
        self._match = None   # MatchIndex of the history's bigrams (when focus.reads_match), built lazily

    def _lock_dir(self):
        if self.path is None:
            return
        os.makedirs(self.path, exist_ok=True)
        self._lock_fd = lock_dir(self.path, "memory")

    def _init_buffers(self):
        c = self.config
        self.cache = KVCache(1, c.n_kv_head, self.W, c.n_embd // c.n_head, c.n_layer, self.device, cache_dtype(self.model))
        wte = self.model.transformer.wte.weight
        self.emb = torch.zeros(self.W, c.n_embd, device=self.device, dtype=wte.dtype) if self.mc else None
        self._lv = np.full(self.W, -1, np.int64)   # node (level, index) in each slot of emb/cache
        self._ix = np.full(self.W, -1, np.int64)
        self._known = 0                            # slots [0, _known) hold what _lv/_ix say
        self._emb_n = 0                            # MC: emb rows [0, _emb_n) are those of nodes _lv/_ix (-1: none)
        self._logits = None                        # logits of the last cached entry
        self._step = None                          # the DecodeStep, made at the first one-entry forward
        self._host_tok = self._tok_ready = None    # pipelined decode's pinned token buffer and its event
        self._window = None                        # decode="compiled"/"fused": the whole-window recompute (_forward_window)
        self._lens_fn = None                       # refocus's LensNet call (_lens_scores; a GraphedFn unless dynamic)
        self._since_refocus = 0
        self.last_recomputed = 0
        self.last_decode = (0, 0.0)                # tokens and seconds of the last generate() call
        self.last_sampler = None                   # the last generate() call's Sampler
        self._sample_fns = {}                      # its calls per (temperature, top_k), graphs on CUDA
        self.wait_s = 0.0                          # generate(): host seconds spent waiting for sampled tokens
        self.counters = dict(ingested=0, generated=0, forwards=0, recomputed=0, reused=0,
                             refocus_calls=0, refocus_ms=0.0, edits=0)

    # ---- the window, whatever the model ---------------------------------------------------------

    def __len__(self):
        return len(self.wc) if self.mc else len(self.tokens) - self.w0

    @property
    def num_tokens(self):
        return self.wc.num_tokens if self.mc else len(self.tokens)

    def _layout(self):
        if self.mc:
            return self.wc.levels, self.wc.indices
        n = len(self.tokens)
        return np.zeros(n - self.w0, np.int64), np.arange(self.w0, n, dtype=np.int64)

    def _sync(self):
        """Drop cached slots from the first one whose node differs from the current window."""
        lv, ix = self._layout()
        m = min(self._known, len(lv))
        bad = np.flatnonzero((self._lv[:m] != lv[:m]) | (self._ix[:m] != ix[:m]))
        self._known = int(bad[0]) if len(bad) else m
        if self.cache.pos > self._known:
            self.cache.truncate(self._known)
            self._logits = None
        return lv, ix

    def _materialize(self, lv, ix, E):
        """Entry embeddings for slots [_known, E) into self.emb (MC only). An edit shifts the
        entries after it to other slots: rows emb already holds (slots [0, _emb_n) hold the rows
        of nodes _lv/_ix, -1 = none) move on the device, exactly (a row depends only on its node).
        The rest comes from the tree."""
        a = self._known
        if a >= E:
            return
        lv_, ix_, n = lv[a:E], ix[a:E], E - a
        if n == 1 and lv_[0] == 0:  # every generated token: its embedding row, no host->device copies
            t = int(self.tree.tokens(int(ix_[0]), int(ix_[0]) + 1)[0])
            self.emb[a] = self.model.transformer.wte.weight[t]  # = entry_embeddings at LOD0
            self._lv[a], self._ix[a] = 0, ix_[0]
            self._known, self._emb_n = E, max(self._emb_n, E)
            return
        # nodes emb already holds (slots [0, _emb_n)): an edit before them moved them to other
        # slots. Found by their first token (increasing along any layout) and level
        o = self._emb_n
        src = np.full(n, -1, np.int64)
        if o:
            old_lv = self._lv[:o]
            old_start = np.maximum.accumulate(np.where(old_lv >= 0, self._ix[:o] * self.K ** np.maximum(old_lv, 0), -1))
            start = ix_ * self.K ** lv_
            p = np.minimum(np.searchsorted(old_start, start), o - 1)
            hit = (old_start[p] == start) & (old_lv[p] == lv_)
            src[hit] = p[hit]
        moved = np.flatnonzero(src >= 0)
        if len(moved):
            self._move_rows(src[moved], moved + a)
        self.counters["emb_reused"] = self.counters.get("emb_reused", 0) + len(moved)
        fresh = np.flatnonzero(src < 0)
        self.counters["fresh_rows"] = self.counters.get("fresh_rows", 0) + len(fresh)
        if len(fresh):   # the rest from the tree, in runs of one level with consecutive indices
            lvf, ixf = lv_[fresh], ix_[fresh]
            with _phase("mc.tree_read"):
                tree_rows = self._tree_rows(lvf, ixf)
            self._fresh_rows(lvf, fresh + a, tree_rows, whole=len(fresh) == n)
        self._lv[a:E], self._ix[a:E] = lv_, ix_
        self._known, self._emb_n = E, max(o, E)

    def _move_rows(self, src, dst):
        """emb rows src -> dst on the device, exactly: one gather, then one scatter (source and
        target rows may overlap)."""
        with _phase("mc.emb_move"):
            rows = to_device([src, dst], self.device)
            self.emb[rows[len(src):]] = self.emb[rows[:len(src)]]

    def _fresh_rows(self, lv, dst, tree_rows, whole=False):
        """Entry embeddings of the tree's rows (_tree_rows of entries at levels lv) into emb rows
        dst: every index in one host->device copy (common.to_device: pinned, non-blocking)."""
        tok, rows, parts = tree_rows
        with _phase("mc.emb_fresh"):
            nf = len(dst)
            grow = np.concatenate(rows) if rows else np.zeros(0, np.int64)
            meta = to_device([lv, tok, dst, grow], self.device)
            lvd, tokd, dstd, growd = meta.split([nf, nf, nf, len(grow)])
            gists = self._gist_rows(nf, rows, parts, idx=growd)
            emb = self.model.entry_embeddings(lvd[None], tokd[None], gists[None])[0].to(self.emb.dtype)
            if whole:
                self.emb[int(dst[0]):int(dst[0]) + nf] = emb
            else:
                self.emb.index_copy_(0, dstd, emb)

    def _tree_rows(self, lv, ix):
        """The tree's data for entries (lv, ix): token ids (0 at gist entries) and, for the gist
        entries, their row numbers and gists (only those cross to the device: a window is mostly
        LOD0). Runs of one level with consecutive indices are one contiguous tree read each."""
        n = len(lv)
        tok, rows, parts = np.zeros(n, np.int64), [], []
        cut = np.flatnonzero((np.diff(lv) != 0) | (np.diff(ix) != 1)) + 1
        for s, e in zip(np.r_[0, cut].tolist(), np.r_[cut, n].tolist()):
            lvl, i0 = int(lv[s]), int(ix[s])
            if lvl == 0:
                tok[s:e] = self.tree.tokens(i0, i0 + e - s)
            else:
                rows.append(np.arange(s, e))
                parts.append(self.tree.gists_raw(lvl, i0, i0 + e - s))   # as stored: widened on the device
        return tok, rows, parts

    def _gist_rows(self, n, rows, parts, idx=None):
        """(n, D) on the device, in the tree's gist dtype: _tree_rows' gists at their rows, zeros
        elsewhere. idx: those rows already on the device (np.concatenate(rows)). The stored bits
        cross as they are (bf16: half of fp32's bytes), in one copy: on CUDA concatenated straight
        into pinned memory (an H200 profile at 128k had the host's cat, bf16->fp32 widening and
        pinning copies at ~2.5 ms per refocus)."""
        dt = self.tree.gist_dtype
        gists = torch.zeros(n, self.config.n_embd, device=self.device, dtype=dt)
        if parts:
            if idx is None:
                idx = to_device(rows, self.device)
            # bf16 bits are uint16 in numpy, which has no bfloat16: int16 crosses, viewed as bf16 there
            gists[idx] = to_device([p.view(np.int16) if p.dtype == np.uint16 else p for p in parts], self.device).view(dt)
        self.counters["fresh_gists"] = self.counters.get("fresh_gists", 0) + sum(map(len, parts))
        return gists

    def _positions(self, j, E, wc=None):
        if self.mc and self.config.pos_scheme == "gaussian":
            p, s = (wc or self.wc).positions("gaussian")
            to = lambda x: to_device(np.ascontiguousarray(x[j:E]), self.device)[None]  # noqa: E731
            return to(p), to(s)
        return torch.arange(j, E, device=self.device)[None], None

    def _step_positions(self, j, wc=None):
        """pos, sigma of a one-entry step at slot j: None, None (the step's device slot is the
        position, no launch) unless positions are Gaussian."""
        if self.mc and self.config.pos_scheme == "gaussian":
            return self._positions(j, j + 1, wc)
        return None, None

    # ---- the public API -------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self):
        """Next-token logits (V,) float32 for the current state. Cached slots [0, cache.pos) that
        still match the window are reused; the rest is recomputed."""
        self._check_open()
        lv, ix = self._sync()
        E = len(lv)
        if E == 0:
            fail("memory is empty: ingest some tokens first")
        if self.cache.pos == E and self._logits is not None:
            self.last_recomputed = 0
            return self._logits
        if self.cache.pos == E:  # cached but its logits were not kept: redo the last entry
            self.cache.truncate(E - 1)
        j = self.cache.pos
        step = E - j == 1 and self.decode != "dynamic"   # every generated token: one static-shape step
        embeds_token = self.mc and step and lv[j] == 0   # a token (as the tail always is): the step embeds it, into emb too
        if embeds_token:
            x = torch.full((1, 1), int(self.tree.tokens(int(ix[j]), int(ix[j]) + 1)[0]), device=self.device)
            self._lv[j], self._emb_n = -1, max(self._emb_n, E)   # no known row until the step has written it
        elif self.mc:
            with _phase("mc.materialize"):
                self._materialize(lv, ix, E)
            x = self.emb[j:E][None]
        else:
            self._known = j  # plain: the layout is written below, as slots get cached
            x = to_device(np.asarray(self.tokens[self.w0 + j:self.w0 + E], dtype=np.int64), self.device)[None] if step else None
        if step:
            if self._step is None:  # the cache lives as long as the session: one graph serves it
                self._step = DecodeStep(self.model, self.cache, self.autocast, compile=self.decode == "compiled",
                                        fused=self.decode == "fused", emb_out=self.emb)
            pos, sigma = self._step_positions(j)
            with _phase("mc.step"):
                logits = self._step(x, j, pos, sigma)[0]
            if embeds_token:
                self._lv[j], self._ix[j], self._known = 0, ix[j], E
        elif self.mc and self.decode in ("compiled", "fused") and j < self.W // 4:
            with _phase("mc.recompute"):
                logits = self._forward_window(E)
        else:
            with _phase("mc.recompute"):
                logits = self._forward(j, E, *self._positions(j, E))
        if not self.mc:
            self._lv[j:E], self._ix[j:E] = lv[j:E], ix[j:E]
            self._known = E
        self.last_recomputed = E - j
        self.counters["forwards"] += 1
        self.counters["recomputed"] += E - j
        self.counters["reused"] += j
        self._logits = logits
        return logits

    def _forward(self, j, E, pos, sigma):
        """Entries [j, E) through the model in chunked KV-cached forwards: the last one's logits."""
        h = None
        with self.autocast:
            for a in range(j, E, self.chunk):
                b = min(a + self.chunk, E)
                kw = dict(pos=pos[:, a - j:b - j], sigma=None if sigma is None else sigma[:, a - j:b - j],
                          kv_cache=self.cache, return_hidden=True)
                if self.mc:
                    h = self.model(embeds=self.emb[a:b][None], **kw)
                else:
                    ids = to_device(np.asarray(self.tokens[self.w0 + a:self.w0 + b], dtype=np.int64), self.device)
                    h = self.model(ids[None], **kw)
            return self.model.logits_and_loss(h[:, -1])[0]

    def _window_fn(self, x, pos, sigma, last):
        h = self.model(embeds=x, pos=pos, sigma=sigma, kv_cache=self.cache, return_hidden=True)
        return self.model.logits_and_loss(h[0].index_select(0, last))[0]

    def _forward_window(self, E):
        """decode="compiled" or "fused" (MC): a recompute that starts in the first quarter of the window (a
        refocus, or a collapse, edits old entries, so nearly every one does) runs all W slots in
        one torch.compile'd forward of fixed shape, compiled at its first use in a process (later
        sessions of the same model reuse the code; 10-20 s at d20 on an H200): fused norms,
        rotary and MLP, where the chunked eager forward runs a kernel per op. Entries [0, E) are
        exactly the eager forward's: attention is causal, so the slots past E (stale embeddings)
        change nothing before them; their K/V are past cache.pos, masked and overwritten by the
        next steps. The logits are entry E - 1's, picked on the device (no recompile per E)."""
        if self._window is None:
            dev = self.device
            self._window = torch.compile(self._window_fn, dynamic=False, mode=self.window_mode)
            self._qkv_modules = qkv_modules(self.model)
            self._last, self._pos_w = torch.zeros(1, dtype=torch.long, device=dev), torch.arange(self.W, device=dev)[None]
        if self.config.pos_scheme == "gaussian":   # the window's positions, padded to W (values past E are unused)
            p, s = self.wc.positions("gaussian")
            pos, sigma = (to_device(np.pad(a, (0, self.W - len(a)), mode="edge"), self.device)[None] for a in (p, s))
        else:
            pos, sigma = self._pos_w, None
        for m in self._qkv_modules:   # the stacked q/k/v weights, fresh and set: the graph reads them as they are
            m.qkv_weight()
        self._last.fill_(E - 1)
        self.cache.truncate(0)
        with self.autocast, fixed_shape(self.window_cudnn):
            logits = self._window(self.emb[None], pos, sigma, self._last)
        self.cache.truncate(E)
        return logits

    @torch.no_grad()
    def _gist_fn(self, child_level, children):
        # one block while decoding: pinned and non-blocking; ingest's big batches stay pageable
        # (pinned blocks stay cached by the host allocator)
        children = to_device(children, self.device) if children.size(0) == 1 else children.to(self.device)
        if children.is_floating_point():  # the tree widens gists to fp32; bf16 weights want bf16
            children = children.to(self.model.transformer.wte.weight.dtype)
        if children.size(0) == 1 and self.decode != "dynamic":
            # one block per 32 generated tokens, on the refocus's critical path: a CUDA graph per
            # level on CUDA (GraphedFn: the eager call's result, 2 launches instead of ~60)
            key = (child_level, self.model.transformer.wte.weight.data_ptr())
            if key not in self._gist_graphs:
                ac = no_cache_autocast(self.autocast)

                def one(c, level=child_level, ac=ac):
                    with ac:
                        return self.model.gist(level, c)
                self._gist_graphs[key] = GraphedFn(one)
            return self._gist_graphs[key](children)
        with self.autocast:
            return self.model.gist(child_level, children)

    @torch.no_grad()
    def ingest(self, ids, progress=None):
        """Append tokens to memory without decoding. progress(done, total) after each chunk."""
        self._check_open()
        tel = self._append(_token_array(ids, self.config.vocab_size), progress)
        self.counters["ingested"] += tel["tokens"]
        return tel

    def _append(self, ids, progress=None):
        t0 = time.perf_counter()
        total, first = int(ids.size), len(self)
        tel = {"tokens": total}
        if self.mc:
            new_nodes, gist_s = [0] * (self.wc.max_level + 1), 0.0
            for a in range(0, total, self.ingest_chunk):
                part = ids[a:a + self.ingest_chunk]
                try:   # check first: a history that cannot fit changes nothing
                    self.wc.check_append(part.size)
                except ValueError as e:
                    fail(f"memory full: {e}")
                try:
                    t = self.tree.append(part, self._gist_fn)
                except BaseException:
                    self._reconcile()
                    raise
                first = min(first, self.wc.append(part.size))   # cannot fail after the check
                new_nodes = [x + y for x, y in zip(new_nodes, t["new_nodes"])]
                gist_s += t["gist_s"]
                if progress is not None:
                    progress(a + part.size, total)
            tel.update(new_nodes=new_nodes, gist_s=gist_s, per_level=self.wc.level_counts().tolist())
        else:
            self.tokens.frombytes(ids.astype(np.uint32).tobytes())
            if len(self.tokens) - self.w0 > self.W:
                self.w0 = len(self.tokens) - max(1, self.W - self.W // 4)
                first = 0
            if progress is not None:
                progress(total, total)
        tel.update(first_changed=first, len=len(self), num_tokens=self.num_tokens,
                   ms=(time.perf_counter() - t0) * 1e3)
        return tel

    def _reconcile(self):
        """After a failed tree append: cover whatever the tree did commit."""
        extra = self.tree.num_tokens - self.wc.num_tokens
        if extra > 0:
            try:
                self.wc.append(extra)
            except ValueError as e:
                fail(f"memory inconsistent after a failed append ({e}); reopen it")

    @torch.no_grad()
    def refocus(self):
        """LensNet scores over the WC entries + the last K tokens -> FocusAllocator edits.
        The KV cache is cut at the first changed entry (lazily, at the next logits())."""
        self._check_open()
        self._since_refocus = 0
        if not self.mc or len(self.wc) == 0:
            return {"expanded": 0, "collapsed": 0, "first_changed": len(self), "len": len(self), "ms": 0.0}
        t0 = time.perf_counter()
        lv, ix = self._sync()
        E, N = len(lv), self.wc.num_tokens
        self._materialize(lv, ix, E)
        t = min(self.K, N)
        r = min(self.model.lens_context(t), N)
        recent_np = self.tree.tokens(N - r, N).astype(np.int64)
        mass = None
        if reads_match(self.focus_by, self.model.config.lens_match):
            # the query-match feature from an index of the history's bigrams, caught up with the
            # tree here (built whole at the first refocus after open): no pass over the history
            if self._match is None:
                self._match = MatchIndex()
            if self._match.n < N:
                self._match.append(self.tree.tokens(self._match.n, N))
            mass = self._match.entry_mass(recent_np[-t:], N, self.wc.starts, self.wc.widths)
        prep_ms = (time.perf_counter() - t0) * 1e3

        def lens():   # LensNet's scores ("lens", "union"): "match" and "match_top" never run it
            # the window padded to a multiple of lens_bucket entries (masked: padding never reaches
            # a valid entry), so that refocus sees few shapes and on CUDA replays a graph per shape
            # (_lens_scores; a full window is one); the integer inputs in one host->device copy
            Ep = min(self.W, -(-E // self.lens_bucket) * self.lens_bucket)
            pad = Ep - E
            ints = to_device(np.concatenate([np.pad(self.wc.starts, (0, pad)), np.pad(self.wc.widths, (0, pad), constant_values=1),
                                             np.pad(lv, (0, pad)), recent_np, [E, N]]).astype(np.int64), self.device)
            # LensNet reads the match only if it was trained to (lens_match): "union" on another
            # model computes the mass for match_top alone
            match = to_device(np.pad(mass, (0, pad)).astype(np.float32), self.device) if self.model.config.lens_match else None
            if self._lens_fn is None:
                self._lens_fn = GraphedFn(self._lens_scores) if self.decode != "dynamic" else self._lens_scores
            return self._lens_fn(ints[:3 * Ep].view(3, Ep), ints[3 * Ep:], match)[:E].float().cpu().numpy()
        scores = focus_scores(self.focus_by, self.wc, mass, lens)
        lens_ms = (time.perf_counter() - t0) * 1e3
        tel = self.focus.refocus(self.wc, scores)
        tel["alloc_ms"] = tel.pop("ms")
        # prep: window sync, entry embeddings, query match; lens: prep + the scores (LensNet's GPU time
        # included: its scores come back to the host); alloc: the allocator's edits
        tel.update(prep_ms=prep_ms, lens_ms=lens_ms, ms=(time.perf_counter() - t0) * 1e3, recompute=len(self.wc) - tel["first_changed"],
                   per_level=self.wc.level_counts().tolist())
        self.counters["refocus_calls"] += 1
        self.counters["refocus_ms"] += tel["ms"]
        self.counters["edits"] += tel["expanded"] + tel["collapsed"]
        return tel

    @torch.no_grad()
    def _lens_scores(self, rows, extra, match):
        """LensNet over the first Ep slots of emb (refocus): rows (3, Ep) = the entries' starts,
        widths and levels, padded; extra = [recent tokens..., E, N]; match (Ep,) or None.
        Returns the (Ep,) scores, 0 past E."""
        Ep, r = rows.size(1), extra.numel() - 2
        starts, widths, lvd = rows
        recent, en = extra[:r], extra[r:]
        valid = torch.arange(Ep, device=rows.device) < en[0]
        with no_cache_autocast(self.autocast):
            feat = lens_features(starts[None], widths[None], en[1], None if match is None else match[None])
            sc = self.model.lensnet(self.emb[:Ep][None], lvd[None], feat, self.model.lens_queries(recent[None], min(self.K, r)),
                                    valid[None])
        return sc[0]

    @torch.no_grad()
    def generate(self, max_tokens, temperature=1.0, top_k=None, seed=42, stop_tokens=()):
        """Yields (token_id, telemetry | None): the refocus telemetry after every K-th generated
        token and after an append that had to collapse an older block (MC models), else None. Every sampled token, a stop token included, goes into
        memory; generation ends after a stop token."""
        # counter-based noise: one CUDA graph per draw, kept across calls (_sample_fns)
        sampler = self.last_sampler = Sampler(seed, self.device, fns=self._sample_fns, graph=self.decode != "dynamic")
        stop = set(stop_tokens)
        t0 = time.perf_counter()
        for i in range(max_tokens):
            with _phase("mc.logits"):
                nxt = self._sample(sampler, self.logits()[None], temperature, top_k)
            # queue the next token's step before the host reads the token (see _queue_step)
            queued = self._queue_step(nxt) if self.pipeline and i + 1 < max_tokens else None
            if queued is None:
                t = time.perf_counter()
                tok = int(nxt[0, 0])
                self.wait_s += time.perf_counter() - t
            else:
                tok = queued.read()
            with _phase("mc.append"):
                app = self._append(np.array([tok], np.uint32))   # uint32: the tree's dtype, no range check
            if queued is not None:
                self._commit_step(queued.slot, queued.logits)
            self.counters["generated"] += 1
            self._since_refocus += 1
            tel = None
            # refocus every K tokens, and also when the append itself had to collapse an older
            # block (a full window): both cut the cache, so together they cost one recompute
            forced = app["first_changed"] < app["len"] - 1
            if self.mc and (self._since_refocus >= self.K or forced):
                with _phase("mc.refocus"):
                    tel = self.refocus()
            self.last_decode = (i + 1, time.perf_counter() - t0)   # this call's tokens and seconds so far (stats)
            yield tok, tel
            if tok in stop:
                return

    def _sample(self, sampler, logits, temperature, top_k):
        """(1, V) logits -> (1, 1) token ids on the device (no host sync); bench_decode times it."""
        return sampler(logits, temperature, top_k)

    def _queue_step(self, nxt):
        """Pipelined decode: while the device runs one token's step, the host appends the token
        before it to the tree and the window (~0.3 ms of host work per token, which otherwise
        leaves the device idle between steps). Queues the step that appends `nxt` (the sampled
        (1, 1) token ids, still on the device) at the tail slot, if appending one token there
        changes nothing else: the window is fully cached, no collapse and no refocus follows this
        token (MC), no re-anchor (plain). The step embeds the token on the device (and writes its
        row into emb), as the unpipelined one-entry step does, so its logits are that loop's.
        Returns None (run unpipelined) or a Queued(slot, logits, read): read() gives the token id on
        the host without waiting for the queued step. _commit_step records the slot once the host
        append succeeded; if it fails, the slot is past the known prefix and gets dropped."""
        E = len(self)
        if self.decode == "dynamic" or self._step is None or self._logits is None or \
                self.cache.pos != E or self._known != E or E + 1 > self.W:
            return None
        if self.mc:
            if self._since_refocus + 1 >= self.K:
                return None                        # a refocus follows this token: it may edit anything
            # E + 1 <= W: the append collapses nothing (WorkingContext.append collapses only past W)
            probe = None
            if self.config.pos_scheme == "gaussian":
                probe = self.wc.copy()
                probe.append(1)
            pos, sigma = self._step_positions(E, probe)
            # the step writes the token's embedding row (DecodeStep emb_out): no known node until _commit_step
            self._lv[E], self._emb_n = -1, max(self._emb_n, E + 1)
        else:
            if len(self.tokens) - self.w0 + 1 > self.W:
                return None                        # the window re-anchors: a full recompute
            pos, sigma = None, None
        x = nxt.view(1, 1)
        if nxt.is_cuda:   # the token to pinned host memory, ordered before the step, then the step
            if self._host_tok is None:
                self._host_tok, self._tok_ready = torch.empty(1, dtype=torch.long, pin_memory=True), torch.cuda.Event()
            self._host_tok.copy_(nxt.view(1), non_blocking=True)
            self._tok_ready.record(torch.cuda.current_stream(nxt.device))   # the stream the copy went to

            def read():
                t = time.perf_counter()
                self._tok_ready.synchronize()
                self.wait_s += time.perf_counter() - t
                return int(self._host_tok[0])
        else:
            read = lambda: int(nxt[0, 0])  # noqa: E731
        with _phase("mc.step"):
            logits = self._step(x, E, pos, sigma)[0]
        return Queued(E, logits, read)

    def _commit_step(self, j, logits):
        """The queued step's slot j now holds the token the host appended (see _queue_step): a
        LOD0 entry whose index is the token's own, the history's last."""
        assert len(self) == j + 1, "a queued decode step must be a tail append"
        self._lv[j], self._ix[j] = 0, self.num_tokens - 1
        self._known, self._logits, self.last_recomputed = j + 1, logits, 1
        self.counters["forwards"] += 1
        self.counters["recomputed"] += 1
        self.counters["reused"] += j
        self.counters["pipelined"] = self.counters.get("pipelined", 0) + 1

    @torch.no_grad()
    def reference_embeddings(self):
        """(E, D) in emb's dtype on the device: entry_embeddings of the whole window from scratch,
        entry by entry from the tree (fp32 gists), with none of materialize's moves, raw reads or
        step writes: what self.emb[:E] must equal bit for bit (tests, bench_decode's emb_exact)."""
        lv, ix = self.wc.levels, self.wc.indices
        tok, gists = np.zeros(len(lv), np.int64), torch.zeros(len(lv), self.config.n_embd)
        for j, (l, i) in enumerate(zip(lv.tolist(), ix.tolist())):
            if l == 0:
                tok[j] = int(self.tree.tokens(i, i + 1)[0])
            else:
                gists[j] = self.tree.gists(l, i, i + 1)[0]
        dev = self.device
        return self.model.entry_embeddings(torch.from_numpy(lv)[None].to(dev), torch.from_numpy(tok)[None].to(dev),
                                           gists[None].to(dev))[0].to(self.emb.dtype)

    def focus_map(self):
        """Runs of consecutive entries at one level: [{"start", "end", "level", "entries"}] (tokens)."""
        lv, ix = self._layout()
        if len(lv) == 0:
            return []
        w = self.K ** lv if self.mc else np.ones_like(lv)
        starts = ix * w
        cut = np.flatnonzero(np.diff(lv)) + 1
        firsts, lasts = np.r_[0, cut], np.r_[cut, len(lv)] - 1
        return [{"start": int(starts[f]), "end": int(starts[l] + w[l]), "level": int(lv[f]), "entries": int(l - f + 1)}
                for f, l in zip(firsts.tolist(), lasts.tolist())]

    def stats(self):
        c = dict(self.counters)
        lv, _ = self._layout()
        per_level = np.bincount(lv, minlength=(self.wc.max_level + 1) if self.mc else 1).tolist()
        done = c["recomputed"] + c["reused"]
        calls = max(1, c["refocus_calls"])
        n, secs = self.last_decode
        c["decode_tok_per_s"] = n / secs if secs > 0 else None   # the last generate() call, as its caller saw it
        return dict(kind="mc" if self.mc else "plain", tokens=self.num_tokens, entries=len(self), W=self.W,
                    per_level=per_level, compression=self.num_tokens / max(1, len(self)),
                    cache_reuse=c["reused"] / done if done else 0.0,
                    recomputed_per_forward=c["recomputed"] / max(1, c["forwards"]),
                    refocus_ms_mean=c["refocus_ms"] / calls,
                    swap_rate=c["edits"] / calls,  # focus edits per refocus
                    **c)

    def save(self):
        """Flush the tree and write session.json atomically (no-op for an in-RAM memory)."""
        self._check_open()
        if self.path is None:
            return
        state = dict(version=STATE_VERSION, kind="mc" if self.mc else "plain", model_id=self.model_id,
                     W=self.W, counters=self.counters)
        if self.mc:
            self.tree.flush()
            state.update(wc=self.wc.to_dict(), n_diff=self.focus.n_diff, focus_calls=self.focus.calls)
        else:
            atomic_write_bytes(os.path.join(self.path, TOKENS_FILE), self.tokens.tobytes())
            state.update(w0=self.w0, num_tokens=len(self.tokens))
        atomic_write_json(os.path.join(self.path, STATE_FILE), state)

    def close(self):
        if self.closed:
            return
        try:
            self.save()
        finally:
            self.closed = True
            if self.tree is not None:
                self.tree.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self.cache = self.emb = self._logits = self._step = None

    def _check_open(self):
        if self.closed:
            fail("this memory session is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
