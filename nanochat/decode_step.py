"""
One token's forward at static shapes, and sampling it without a host sync: the pieces of a
decode step that Engine and MemorySession (nanochat/engine.py) share.

- DecodeStep: copies its inputs into buffers it owns and runs the model over a KV cache in
  static mode (KVCache.slot), so every step has the same shapes; on CUDA it is captured once as
  a CUDA graph and replayed, optionally torch.compile'd first (decode="compiled"), or run as the
  Triton kernels of nanochat/decode_kernels.py (decode="fused").
- sample_next: temperature / top-k sampling with torch.multinomial's own draw, minus the
  validity check that synced the host with the step in flight.
- GraphedFn: a small call made often at one shape (MemorySession's one-block GistNet calls and
  its refocus's LensNet call) as a CUDA graph, checked once against the eager call.
- Sampler: the same temperature / top-k distribution, drawn by inverse CDF from a counter-based
  uniform (a hash of seed and draw), so that one draw is a pure function of its inputs and runs
  as one CUDA graph
  (MemorySession.generate: sampling was the host's largest cost per token).
"""
import warnings
import contextlib

import torch

from nanochat.gpt import weight_version


def _multinomial1(probs, rng=None):
    """torch.multinomial(probs, 1, generator=rng), the same draw, without its device sync.
    multinomial's one-sample path is argmax(p / q), q ~ Exp(1) drawn from rng, after a validity
    check of p that copies a flag to the host (.item()): in a decode loop that sync waits for the
    step in flight, so the host cannot queue the next one. Here the draw is that same formula (the
    same ids and the same generator state after it: tests/test_engine.py), with no check: p comes
    from a softmax of finite logits."""
    q = torch.empty_like(probs).exponential_(1, generator=rng)
    return (probs / q).argmax(dim=-1, keepdim=True)


@torch.no_grad()
def sample_next(logits, rng=None, temperature=1.0, top_k=None):
    """logits (B, V) -> (B, 1) token ids, on the logits' device, with no host sync."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if temperature != 1.0:   # (x / 1.0 is x: one launch less per token at the default)
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = torch.softmax(vals, dim=-1)
        return idx.gather(-1, _multinomial1(probs, rng))
    return _multinomial1(torch.softmax(logits, dim=-1), rng)


_M32 = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2**32 for int64 x in [0, 2**32) and a 32-bit constant c, without int64
    overflow: the constant in two 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """A 32-bit integer hash (the "lowbias32" finalizer: xorshift-multiply rounds with good
    avalanche), on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _bits48(seed, draw, idx):
    """48 random bits per index from (seed, draw): the same arithmetic on Python ints or on int64
    tensors (values in [0, 2**32); idx * constant < 2**63 for idx < 2**31)."""
    key = _mix32(_mix32(seed & _M32) ^ (draw & _M32))
    hi = _mix32((idx * 0x9E3779B9 + key) & _M32)
    lo = _mix32(hi ^ (key >> 3) ^ 0x5BD1E995)
    return (hi >> 8) * 2 ** 24 + (lo >> 8)


def counter_uniform(state, shape):
    """Uniforms in (0, 1), float64 with 48 random bits, as a pure function of state = (seed, draw)
    (an int64 (2,) tensor) and each element's index: no generator state, so a CUDA graph can
    replay it and the same state always gives the same noise."""
    n = 1
    for d in shape:
        n *= d
    if state.device.type == "cpu" and n <= 64:   # a draw on CPU: Python ints (~30 tiny tensor ops cost ~0.4 ms there)
        seed, draw = state.tolist()
        x = torch.tensor([_bits48(seed, draw, i) for i in range(n)], dtype=torch.int64)
    else:
        x = _bits48(state[0], state[1], torch.arange(n, device=state.device, dtype=torch.int64))
    return ((x.double() + 0.5) * 2.0 ** -48).view(shape)


def sample_counter(logits, state, temperature=1.0, top_k=None):
    """sample_next's distribution, (B, V) logits -> (B, 1) token ids: softmax(logits / T) over the
    top-k (or all) tokens, drawn by inverse CDF with one counter_uniform(state) per row (a cumsum
    and a searchsorted: no noise per token). Pure: the caller advances state."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if temperature != 1.0:
        logits = logits / temperature
    idx = None
    if top_k is not None and top_k > 0:
        logits, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
    cdf = torch.softmax(logits.float(), dim=-1).double().cumsum(-1)
    r = counter_uniform(state, (cdf.size(0), 1)) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, r, right=True).clamp_(max=cdf.size(-1) - 1)
    return pick if idx is None else idx.gather(-1, pick)


class Sampler:
    """Temperature / top-k sampling for a decode loop: sample_counter with a device-side
    (seed, draw) state that each call advances by one. On CUDA each (temperature, top_k) pair is
    one CUDA graph (GraphedFn: copy in, replay, clone out; checked once against the eager call)
    instead of ~8 launches with topk's host work. The same seed gives the same tokens on every
    path (graph or eager, pipelined or not); the stream differs from torch.Generator's."""

    def __init__(self, seed, device, max_graphs=8, fns=None, graph=True):
        """fns: a dict to keep the per-(temperature, top_k) calls (and their graphs) in, shared by
        the Samplers of one session (MemorySession: one per generate() call), so that a new seed
        captures nothing: a graph copies its inputs in, the state included. graph=False: eager
        calls only (decode="dynamic", the reference path)."""
        self.state = torch.tensor([int(seed) & _M32, 0], dtype=torch.int64, device=device)
        self.draws, self.max_graphs, self.graph = 0, max_graphs, graph
        self._fns = {} if fns is None else fns

    def __call__(self, logits, temperature=1.0, top_k=None):
        key = (float(temperature), int(top_k or 0))
        fn = self._fns.get(key)
        if fn is None:
            if not (0.0 <= key[0] < float("inf")) or key[1] < 0:
                raise ValueError(f"sampling needs a finite temperature >= 0 and top_k >= 0 (got {temperature}, {top_k})")

            def one(lg, st, t=key[0], k=key[1] or None):
                return sample_counter(lg, st, t, k)
            fn = one
            if len(self._fns) < self.max_graphs:
                fn = self._fns[key] = GraphedFn(one) if self.graph else one
        out = fn(logits, self.state)
        self.state[1:].add_(1)
        self.draws += 1
        return out

    def graph_status(self):
        """{"graphs": CUDA graphs captured, "disabled": why graphs are off (or None)}."""
        fns = [f for f in self._fns.values() if isinstance(f, GraphedFn)]
        return {"graphs": sum(len(f.graphs) for f in fns),
                "disabled": next((f.disabled for f in fns if f.disabled), None)}


def no_cache_autocast(autocast):
    """The same autocast without its weight-cast cache: a captured graph must not read casts that a
    warmup run cached (make_graphed_callables refuses cached autocast for this reason)."""
    if isinstance(autocast, torch.autocast):
        return torch.autocast(autocast.device, dtype=autocast.fast_dtype, enabled=autocast._enabled, cache_enabled=False)
    return autocast if autocast is not None else contextlib.nullcontext()


class GraphedFn:
    """fn(x) -> tensor for a call made many times at a few shapes with little work each (GistNet
    on the one block that 32 generated tokens complete: ~60 eager launches, on the refocus's
    critical path): on CUDA one CUDA graph per input shape/dtype (at most max_graphs), replayed
    with a copy in and a clone out: the same kernels on the same shapes as the eager call. Each
    capture is checked once against the eager call; a capture that fails or disagrees turns
    graphs off for this fn (a warning, then eager calls). Elsewhere, or past max_graphs, it calls fn."""

    def __init__(self, fn, max_graphs=4):
        self.fn, self.max_graphs, self.graphs = fn, max_graphs, {}
        self.disabled = None   # why graphs are off for this fn (a capture failed or disagreed), else None

    def __call__(self, *xs):
        """xs: tensors (or None); the first one's device decides."""
        if not xs[0].is_cuda or self.disabled:
            return self.fn(*xs)
        key = tuple(None if x is None else (tuple(x.shape), x.dtype) for x in xs)
        g = self.graphs.get(key)
        if g is None:
            if len(self.graphs) >= self.max_graphs:
                return self.fn(*xs)
            try:
                g = self._capture(xs)
            except Exception as e:   # a graph is an optimization: never a reason to fail the call
                self.disabled = f"{type(e).__name__}: {e}"
                warnings.warn(f"GraphedFn: no CUDA graph ({self.disabled}); running eagerly")
                return self.fn(*xs)
            self.graphs[key] = g
        graph, inps, out = g
        for inp, x in zip(inps, xs):
            if inp is not None:
                inp.copy_(x)
        graph.replay()
        return out.clone()

    def _capture(self, xs):
        inps = [None if x is None else x.clone() for x in xs]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):   # warmup: lazy init, allocator (the PyTorch docs' recipe)
            for _ in range(2):
                self.fn(*inps)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.fn(*inps)
        graph.replay()   # checked once against the eager call: a broken capture must not be used
        want = self.fn(*xs)
        same = out.shape == want.shape and (
            torch.allclose(out.float(), want.float(), rtol=1e-2, atol=1e-2) if out.is_floating_point()
            else torch.equal(out, want))   # ids (Sampler): exactly
        if not same:
            raise RuntimeError(f"the replay differs from the eager call (max |diff| "
                               f"{(out.float() - want.float()).abs().max().item():.3g})")
        return graph, inps, out


def cache_dtype(model):
    p = next(model.parameters())
    return torch.bfloat16 if p.is_cuda else p.dtype


def qkv_modules(model):
    """The attention modules whose stacked q/k/v weight (CausalSelfAttention.qkv_weight) a compiled
    or captured forward reads as it is: callers refresh them eagerly before such a forward."""
    return [m for m in model.modules() if hasattr(m, "qkv_weight")]


# compiled = static + torch.compile before the capture; fused = the Triton step (decode_kernels.py)
# with compiled's whole-window recompute
DECODE_MODES = ("static", "compiled", "fused", "dynamic")


def check_decode(decode, device=None, model=None):
    """decode, if it is a mode that can run on `device` (None: do not check the device) for
    `model` (None: do not check the model), else a ValueError that says why, in one line."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if decode == "fused" and (device is not None or model is not None):
        from nanochat.decode_kernels import fused_unavailable
        why = fused_unavailable(device, model)
        if why:
            raise ValueError(why)
    return decode


class DecodeStep:
    """One decode step over `cache` with static shapes: the inputs are copied into buffers owned
    here, the cache runs in static mode (KVCache.slot), and the forward sees the same shapes at
    every step. On CUDA that step is captured once as a CUDA graph and then only replayed: an
    eager d20 step dispatches 608 ops (903 before the rotary, mask and fused-QKV changes; bench_decode
    --count-ops), and the host, not the GPU, was the bottleneck. On CPU
    the same static path runs eagerly (so CPU tests exercise it).
    step(x, slot, pos=None, sigma=None): x (B, 1) token ids or (B, 1, D) embeddings; slot, a host
    int <= cache.pos, is where the entry goes (entries >= slot are dropped, as truncate(slot) then
    a dynamic forward would); pos/sigma (1, 1) as GPT.forward (pos None = slot). Returns the
    (B, V) float32 logits (a copy: callers keep them across steps); cache.pos is then slot + 1.
    Host work per step is a few launches (the host, not the GPU, bounds an MC decode loop: bench_decode
    host_wait_ms_per_tok): the step itself bumps its device slot, so consecutive slots need no
    fill, and with emb_out it also writes the token's embedding row there (MemorySession's
    window buffer) instead of the caller."""

    def __init__(self, model, cache, autocast=None, graph=None, compile=False, fused=False, pdl=None, emb_out=None):
        """compile: torch.compile the step first (fused norms, rotary, MLP: fewer kernels per
        replay). The warmup runs before the capture compile it. fused: run the step as the Triton
        kernels of decode_kernels.FusedDecode instead of the model's forward (batch 1); pdl: its
        programmatic dependent launch (None: decode_kernels.pdl_supported). emb_out (L, D): a step
        on token ids (batch 1) also writes emb_out[slot] = the token's embedding (= entry_embeddings
        at LOD0)."""
        if compile and fused:
            raise ValueError("DecodeStep: compile and fused are two ways to run the step; pick one")
        self.model, self.cache, self.fused, self.pdl, self.emb_out = model, cache, fused, pdl, emb_out
        self._slot_next = None   # the value the device slot holds after the last step (None: unknown)
        self._fwd = torch.compile(self._forward, dynamic=False) if compile else self._forward
        self._fd = None
        # the q/k/v weights whose stacked copies (CausalSelfAttention.qkv_weight) a graph or a
        # compiled step reads: a change to any of them means a refresh and a new capture
        self._attn = qkv_modules(model)
        self._qkv_params = [w for m in self._attn for w in (m.c_q.weight, m.c_k.weight, m.c_v.weight)]
        self.graph = cache.k.is_cuda if graph is None else graph
        self._key = self._graph = None
        # a decode step uses each weight once: the cast cache would save nothing
        self.autocast = no_cache_autocast(autocast)

    def _forward(self, x, pos, sigma):
        kw = dict(embeds=x) if x.is_floating_point() else dict(idx=x)
        h = self.model(**kw, pos=pos, sigma=sigma, kv_cache=self.cache, return_hidden=True)
        return self.model.logits_and_loss(h[:, -1])

    def _run(self):
        if self.emb_out is not None and not self.x.is_floating_point():
            self.emb_out.index_copy_(0, self.slot, self.model.embed(self.x.view(1)).to(self.emb_out.dtype))
        if self.fused:
            out = self._fd(self.x, self.pos, self.sigma, self.slot)
        else:
            self.cache.slot = self.slot
            try:
                with torch.no_grad(), self.autocast:
                    out = self._fwd(self.x, self.pos, self.sigma)
            finally:
                self.cache.slot = None  # the cache is dynamic again for everyone else (prefill, recompute)
        self.slot.add_(1)   # the next step's slot, if it is the next one (__call__ refills it if not)
        return out

    def _capture(self, slot):
        """The PyTorch docs' recipe: warm up on a side stream (lazy init, autotuning, allocator),
        then capture. Warmup and capture write the same k/v to the same slot: harmless."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self.slot.fill_(slot)   # each run bumps it: keep the warmups' writes at this slot
                self._run()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        # thread_local: chat_web runs one worker thread per GPU; in the default "global" mode another
        # worker's cudaMalloc during this capture would fail (and break the capture)
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            self._out = self._run()
        return g

    @torch.no_grad()
    def __call__(self, x, slot, pos=None, sigma=None):
        c = self.cache
        if not 0 <= slot < c.max_len:
            raise ValueError(f"decode slot {slot} outside the KV cache [0, {c.max_len})")
        if slot > c.pos:
            raise ValueError(f"decode slot {slot} would leave a gap after the {c.pos} cached entries")
        # a graph bakes in buffer addresses and shapes: expand_batch (new k/v tensors) or other
        # input shapes mean new static buffers and a new capture
        sig = lambda t: None if t is None else (tuple(t.shape), t.dtype)  # noqa: E731
        # versions only grow, so their sum changes with any in-place update; a .to() moves them all
        weights = (sum(map(weight_version, self._qkv_params)), self._qkv_params[0].data_ptr() if self._qkv_params else 0)
        key = (c.k.data_ptr(), c.v.data_ptr(), tuple(c.k.shape), sig(x), sig(pos), sig(sigma), weights)
        if key != self._key:
            self._key, self._graph = key, None
            for m in self._attn:
                m.qkv_weight()   # refresh the stacked copies eagerly (a compiled step takes them as they are)
            self.x, self.pos, self.sigma = (None if t is None else torch.empty_like(t, device=c.k.device)
                                            for t in (x, pos, sigma))
            self.slot, self._slot_next = torch.zeros(1, dtype=torch.long, device=c.k.device), None
            if self.fused:
                from nanochat.decode_kernels import FusedDecode
                self._fd = FusedDecode(self.model, c, pdl=self.pdl)
        if self.emb_out is not None and not x.is_floating_point() and x.numel() != 1:
            raise ValueError("DecodeStep(emb_out=...) embeds one token per step")
        self.x.copy_(x)
        for buf, t in ((self.pos, pos), (self.sigma, sigma)):
            if buf is not None:
                buf.copy_(t)
        if self.graph and self._graph is None:
            self._graph = self._capture(slot)
            self._slot_next = None   # the warmup runs moved the device slot
        if slot != self._slot_next:
            self.slot.fill_(slot)
        self._slot_next = None   # unknown until the step has run
        if not self.graph:
            out = self._run()
            if self.fused:
                out = out.clone()   # FusedDecode's logits buffer is overwritten by the next step
        else:
            self._graph.replay()
            out = self._out.clone()
        self._slot_next = slot + 1
        c.pos = slot + 1  # as a dynamic forward leaves it
        return out
