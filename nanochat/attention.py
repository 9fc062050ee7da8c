"""
Attention for every caller of the model, and the KV cache it reads in inference. Pure functions
over tensors; the nn.Modules that call them live in gpt.py.

- `attention`: one entry point. flash-attn when installed, else SDPA; a FlexAttention BlockMask
  (MegaAttention on CUDA); lower-right causal for chunked prefill; and a single query (KV-cached
  decode) as two GEMVs (`decode_attention`).
- MegaAttention's layout (which entries a query sees in full, which through block summaries) as
  one predicate, `mega_mask_mod`, giving the dense SDPA mask and the FlexAttention BlockMask.
- `KVCache`: preallocated per-layer K/V (gpt-fast style), with a static mode for CUDA-graph
  decode steps. Its slot write and the decode GEMVs are custom ops (`nanochat::cache_write`,
  `nanochat::decode_bmm`) so that a compiled decode step stays one graph.
"""
import warnings
import functools
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.nn.attention.bias import causal_lower_right

try:  # optional: flash-attn 2 on CUDA; everything works without it
    from flash_attn import flash_attn_func
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_func = None

try:  # FlexAttention (MegaAttention's CUDA path); SDPA with a dense mask works everywhere
    from torch.nn.attention.flex_attention import flex_attention, create_block_mask, BlockMask
except Exception:
    flex_attention = create_block_mask = BlockMask = None

# -----------------------------------------------------------------------------
# Attention: one function for every caller

_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


_FIXED_SHAPE = False   # fixed_shape(): the caller's shapes never change, so cuDNN's per-shape plan is built once


@contextlib.contextmanager
def fixed_shape(on=True):
    """Calls inside may use cuDNN SDPA in inference too (self-attention, no mask): for a forward
    whose shapes never change (MemorySession's whole-window recompute, window_cudnn), where the
    per-shape plan cost is paid once. Read when a compiled caller is traced."""
    global _FIXED_SHAPE
    prev, _FIXED_SHAPE = _FIXED_SHAPE, bool(on)
    try:
        yield
    finally:
        _FIXED_SHAPE = prev


def _avoid_cudnn(q, Tq, Tk, attn_mask):
    if _FIXED_SHAPE and Tq == Tk and attn_mask is None:
        return False
    return q.is_cuda and (Tq != Tk or attn_mask is not None or not torch.is_grad_enabled())


def attention(q, k, v, causal=True, attn_mask=None):
    """q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D). attn_mask: bool (B or 1, 1, Tq, Tk), True = attend,
    an additive float bias (static decode, Tq = 1), or a FlexAttention BlockMask (then `causal` is
    ignored: the mask says everything).
    Causal with Tq < Tk means the queries are the *last* Tq positions (chunked prefill)."""
    if BlockMask is not None and isinstance(attn_mask, BlockMask):
        return _flex_attention(q, k, v, attn_mask)
    Tq, Tk = q.size(1), k.size(1)
    if flash_attn_func is not None and q.is_cuda and attn_mask is None and q.dtype in (torch.bfloat16, torch.float16):
        return flash_attn_func(q, k, v, causal=causal)  # bottom-right aligned causal, native GQA
    if Tq == 1 and Tk > 1:  # KV-cached decode: one new query sees the (masked) cache
        return decode_attention(q, k, v, attn_mask)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    if attn_mask is None and causal and Tq != Tk:  # chunked prefill (a single query took decode_attention)
        # the Tq queries are the last Tq of Tk positions: lower-right causal. Without GQA a
        # CausalBias runs the flash / memory-efficient kernels with no (Tq, Tk) mask to build
        # and read; a dense bool mask sends SDPA to its masked memory-efficient kernel
        attn_mask = causal_lower_right(Tq, Tk) if not gqa else \
            torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    if attn_mask is not None:
        causal = False
    # SDPA's cuDNN backend builds an execution plan per new shape: 1.46 ms of CPU per KV-cached
    # call, and 28 ms per call for a full-window recompute or a LensNet pass (Tq == Tk, new length
    # at every refocus), measured on an H100. So inference (no grad) and KV-cached calls never use
    # it; training (grad on, Tq == Tk, no mask, fixed shapes) keeps the default choice and its MFU.
    with sdpa_kernel(_NO_CUDNN) if _avoid_cudnn(q, Tq, Tk, attn_mask) else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=gqa)
    return y.transpose(1, 2)


@torch.library.custom_op("nanochat::decode_bmm", mutates_args=())
def _decode_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a, b)


@_decode_bmm.register_fake
def _(a, b):
    return a.new_empty(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.size(-2), b.size(-1)))


def decode_attention(q, k, v, attn_mask=None):
    """One query per row (q: (B, 1, H, D)) as two batched GEMVs around a softmax. SDPA's fused
    kernels tile over queries: with a single query they run one thread block per head that walks
    all Tk keys alone (measured on an H100, d20, 4k keys: 0.25 ms per layer, 5 ms per token).
    A GEMV spreads the keys over the whole GPU, and reads K and V straight from the cache's
    (B, Tk, Hkv, D) layout (no copy at B = 1). attn_mask (B or 1, 1, 1, Tk): bool, True = attend,
    or a float additive bias (0 / -inf; static decode): one add that also makes the scores fp32."""
    # Inside a compiled decode step the two GEMVs are an opaque op (nanochat::decode_bmm): Inductor
    # would fold single-query bmms into its own reduction loops (seen in its output code), and a
    # torch.compiler.disable here broke the graph in every layer, so that dynamo recompiled the
    # per-layer frames up to its cache limit and ran the rest eagerly (measured on an H200:
    # --step-breakdown). Eagerly they are plain matmuls.
    bmm = _decode_bmm if torch.compiler.is_compiling() else torch.matmul
    B, _, H, D = q.shape
    Hkv = k.size(2)
    qg = (q * D ** -0.5).view(B, Hkv, H // Hkv, D)  # query heads grouped by the kv head they share
    s = bmm(qg, k.permute(0, 2, 3, 1))                                 # (B, Hkv, G, Tk)
    if attn_mask is None:
        s = s.float()
    else:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, device=s.device).masked_fill(~attn_mask, float("-inf"))
        s = s + attn_mask.reshape(attn_mask.size(0), 1, 1, k.size(1)).float()
    y = bmm(torch.softmax(s, dim=-1).to(v.dtype), v.transpose(1, 2))   # (B, Hkv, G, D)
    return y.reshape(B, 1, H, D)


_flex_compiled = None


def _flex_attention(q, k, v, block_mask):
    """FlexAttention on (B, T, H, D) tensors. CUDA: the compiled (fused, block-sparse) kernel.
    Elsewhere: flex's eager path (unfused, materializes the scores; for tests and debugging)."""
    global _flex_compiled
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    if q.is_cuda and torch.compiler.is_compiling():  # inside a compiled model: dynamo fuses it
        y = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    elif q.is_cuda:
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        y = _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            y = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# MegaAttention: layout, masks, summary positions (pure functions; GPT.mega_inputs uses them)

def mega_local_start(i, w, K):
    """First entry query i sees in full: i-w+1 rounded down to a block boundary, so the local
    window holds w..w+K-1 entries and everything before it is covered by whole blocks' summaries
    (no entry is left unseen between the summaries and the window). Works on ints and tensors."""
    return ((i - w + 1) // K) * K


def mega_num_summaries(T, w, K):
    """Summaries worth making for T entries, local window w, block size K: block b (entries
    [bK, (b+1)K)) is visible to query i iff (b+1)K <= mega_local_start(i), so the last query T-1
    sees (T-w)//K blocks. Blocks no query can see get no summary (w >= T -> none: plain causal)."""
    return max(0, (T - w) // K)


def mega_mask_mod(T, w, K):
    """The MegaAttention predicate over (T + S) x (T + S) query/key indices (entries 0..T-1, then
    summaries T..T+S-1; summary T+b covers entries [bK, (b+1)K)). A FlexAttention mask_mod; also
    evaluated on broadcast index grids for the dense mask, so both paths share one definition."""
    def mask_mod(b, h, q_idx, kv_idx):
        q_win, kv_win = q_idx < T, kv_idx < T
        start = mega_local_start(q_idx, w, K)
        local = (kv_idx <= q_idx) & (kv_idx >= start)                   # entry -> entries in window
        far = (kv_idx - T + 1) * K <= start                             # entry -> summary of a far block
        own = kv_idx // K == q_idx - T                                  # summary -> its block's entries
        return ((q_win & kv_win & local) | (q_win & ~kv_win & far)
                | (~q_win & kv_win & own) | (~q_win & (kv_idx == q_idx)))
    return mask_mod


def mega_attention_mask(T, w, K, device=None):
    """Dense boolean MegaAttention mask (L, L), L = T + mega_num_summaries(T, w, K); True = attend."""
    L = T + mega_num_summaries(T, w, K)
    i = torch.arange(L, device=device)
    return mega_mask_mod(T, w, K)(None, None, i[:, None], i[None, :])


@torch.compiler.disable
def mega_mask(T, w, K, device, impl="sdpa"):
    """The mask for one layout, built once and cached: a dense bool (L, L) for impl "sdpa", a
    FlexAttention BlockMask for "flex"."""
    return _mega_mask(T, w, K, str(torch.device(device)), impl)


@functools.lru_cache(maxsize=8)  # dense masks are L^2 bytes (85 MB at L = 9216)
def _mega_mask(T, w, K, device, impl):
    if impl != "flex":
        return mega_attention_mask(T, w, K, device)
    if create_block_mask is None:
        raise RuntimeError("FlexAttention is not available in this torch build")
    L = T + mega_num_summaries(T, w, K)
    return create_block_mask(mega_mask_mod(T, w, K), None, None, L, L, device=device)


def mega_summary_positions(pos, sigma, K, S):
    """Position and spread of the S summaries over the first S*K entries. pos (B, T), sigma (B, T)
    or None. A summary sits at the mean position of its K entries with sigma^2 = variance of their
    positions + mean of their sigma^2 (a span as a mixture): for K tokens at consecutive integers
    this is exactly the working context's gaussian convention for a gist, centre start + (K-1)/2
    and sigma = sqrt((K^2-1)/12) (and for K such gists, that of their parent). Returns float64
    (float32 on mps) tensors (B, S)."""
    fdt = torch.float32 if pos.device.type == "mps" else torch.float64
    p = pos[:, :S * K].to(fdt).unflatten(1, (S, K))
    mean = p.mean(-1)
    var = (p - mean[..., None]).square().mean(-1)
    if sigma is not None:
        var = var + sigma[:, :S * K].to(fdt).unflatten(1, (S, K)).square().mean(-1)
    return mean, var.sqrt()


@torch.library.custom_op("nanochat::cache_write", mutates_args=("cache",))
def _cache_write(cache: torch.Tensor, slot: torch.Tensor, x: torch.Tensor) -> None:
    """cache[:, slot] = x, in place. An op of its own so that a compiled decode step writes one
    entry: Inductor functionalized index_copy_ on a view of the cache into a copy of the whole
    layer's cache, in every layer (4.6 ms per d20 step at 4k entries on an H200, 1.8 eager)."""
    cache.index_copy_(1, slot, x)


@_cache_write.register_fake
def _(cache, slot, x):
    return None


@torch.library.custom_op("nanochat::cache_write_at", mutates_args=("cache",))
def _cache_write_at(cache: torch.Tensor, start: int, x: torch.Tensor) -> None:
    """cache[:, start:start + T] = x, in place: what a compiled multi-entry forward (the engine's
    whole-window recompute) writes. A slice assignment there is functionalized: Inductor keeps each
    layer's K/V in a buffer of its own and copies all of them into the cache at the end of the graph
    (a second write of the whole cache); an opaque in-place op writes each layer once."""
    cache[:, start:start + x.size(1)].copy_(x)


@_cache_write_at.register_fake
def _(cache, start, x):
    return None


class KVCache:
    """Preallocated per-layer K/V buffers (gpt-fast style). `pos` counts entries written.
    `truncate(j)` drops entries >= j so that an edit at working-context entry j recomputes
    from j forward only.
    Static mode (`slot` = a (1,) long device tensor, set by the caller, e.g. decode_step.DecodeStep):
    a one-entry forward writes at that slot and attends over the whole buffer under a mask, so
    every decode step has the same shapes and no host int (a CUDA graph can replay it). `pos` is
    then the caller's to keep."""

    def __init__(self, batch_size, num_kv_heads, seq_len, head_dim, num_layers, device, dtype):
        shape = (num_layers, batch_size, seq_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = seq_len
        self.num_layers = num_layers
        self.slot = None

    def insert_kv(self, layer, k, v):
        if k.requires_grad or v.requires_grad:
            # an in-place write of a graph tensor would chain every step's autograd graph (with
            # autocast's bf16 weight copies) to the cache: ~1 GB per decode step at d20
            raise RuntimeError("KV-cached forwards must run under torch.no_grad() (or inference_mode)")
        if self.slot is not None:  # static: GPT.forward masks the slots past `slot`
            _cache_write(self.k[layer], self.slot, k.to(self.k.dtype))
            _cache_write(self.v[layer], self.slot, v.to(self.v.dtype))
            return self.k[layer], self.v[layer]
        t0, t1 = self.pos, self.pos + k.size(1)
        if t1 > self.max_len:
            raise ValueError(f"KV cache overflow: {t1} > {self.max_len}")
        if torch.compiler.is_compiling():
            _cache_write_at(self.k[layer], t0, k.to(self.k.dtype))
            _cache_write_at(self.v[layer], t0, v.to(self.v.dtype))
        else:
            self.k[layer, :, t0:t1] = k
            self.v[layer, :, t0:t1] = v
        if layer == self.num_layers - 1:
            self.pos = t1
        return self.k[layer, :, :t1], self.v[layer, :, :t1]

    def truncate(self, pos):
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot truncate KV cache at {pos} (holds {self.pos})")
        self.pos = pos

    def expand_batch(self, n):
        """Replicate a batch-1 cache into n rows (prefill once, sample n continuations)."""
        assert self.k.size(1) == 1
        self.k = self.k.expand(-1, n, -1, -1, -1).contiguous()
        self.v = self.v.expand(-1, n, -1, -1, -1).contiguous()
