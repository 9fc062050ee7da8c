"""
GPT model plus the learned MegaContext modules. Every nn.Module of the model lives here.

Base model (nanochat-style):
- rotary position embeddings computed from *explicit* positions (any float position, optional
  Gaussian damping per entry), so the same model reads plain tokens or a mixed-LOD working context
- QK norm (applied before rotary so that damping survives), parameter-free RMSNorm everywhere
- relu^2 MLP, no biases, untied token embedding / lm_head, GQA/MQA via n_kv_head
- logit soft-capping; attention through one function (flash-attn if installed, else SDPA)
- forward accepts input ids *or* input embeddings, so gists can stand in for tokens

MegaContext modules (created when config.megacontext is true):
- GistNet: K children (token embeddings or gists) + one query slot -> one vector in the input
  embedding space. Bidirectional inside the block, same weights at every level + level embedding.
  Starts as mean-pooling (zero-initialised residual), so untrained gists are already sensible.
- LensNet: a small non-causal transformer over working-context entries plus the recent tail
  tokens; one signed score per entry (>0 wants detail, <0 less). No positional rotary: order
  enters only through per-entry features, so it is permutation-equivariant over entries.

MegaAttention (config.mega_attn_window = w > 0; off by default, needs config.megacontext):
- every complete block of K input entries that lies entirely before some query's local window
  gets a GistNet summary (level 1, the same weights as the tree's LOD1 gists, + lod_emb[1]),
  appended after the T input entries and positioned like the span it covers (mean position,
  Gaussian spread sigma^2 = var(positions) + mean(sigma^2): exactly the working context's
  "gaussian" convention for a gist);
- an input entry i sees entries from mega_local_start(i) = i-w+1 rounded down to a block
  boundary up to i, plus the summaries of every block before that start (so each earlier entry is
  seen once, in full or through its block's summary); a summary sees its own block and itself (so
  a summary is never visible from its block or from earlier entries); loss/logits only for the T
  input entries;
- one predicate (`mega_mask_mod`) gives both the dense boolean mask (SDPA: CPU and reference) and
  the FlexAttention BlockMask (CUDA), each built once per layout (T, w, K).
"""
import math
import warnings
import functools
import contextlib
from dataclasses import dataclass, asdict

from torch.utils.checkpoint import checkpoint

import torch
import torch.nn as nn
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


LENS_QUERIES = ("tokens", "hidden")


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    softcap: float = 15.0
    rope_base: float = 10000.0
    # MegaContext
    megacontext: bool = False
    mc_block_size: int = 32      # K
    mc_max_level: int = 2
    gist_layers: int = 2
    gist_dim: int = 0            # 0 -> n_embd // 2 (keeps ingest < 5% of base FLOPs per token)
    lens_layers: int = 2
    lens_dim: int = 0            # 0 -> n_embd // 4
    pos_scheme: str = "entry"    # "entry" (positions = working-context entry index) or "gaussian"
    lens_query: str = "tokens"   # LensNet's queries: "tokens" (embeddings of the most recent tokens) or
                                 # "hidden" (the base model's final hidden states for them: GPT.lens_queries)
    lens_query_ctx: int = 256    # "hidden": the plain forward runs over this many most recent tokens
    lens_match: bool = False     # LensNet also reads each entry's lexical match with its query (megacontext.match)
    # MegaAttention (DESIGN section 7): local window of w entries + GistNet summaries of older blocks
    mega_attn_window: int = 0    # w in entries; 0 = off (plain causal attention over the window)
    mega_attn_impl: str = "auto" # "auto" (flex on CUDA, else sdpa), "sdpa" (dense mask), "flex"

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head dim must be even for rotary embeddings")
        if self.pos_scheme not in ("entry", "gaussian"):
            raise ValueError(f"pos_scheme must be 'entry' or 'gaussian', got {self.pos_scheme!r}")
        if self.lens_query not in LENS_QUERIES or self.lens_query_ctx < 1:
            raise ValueError(f"lens_query must be one of {LENS_QUERIES} and lens_query_ctx >= 1, "
                             f"got {self.lens_query!r}, {self.lens_query_ctx}")
        if self.mega_attn_window < 0:
            raise ValueError(f"mega_attn_window must be >= 0, got {self.mega_attn_window}")
        if self.mega_attn_window and not self.megacontext:
            raise ValueError("mega_attn_window > 0 needs megacontext=True (its summaries come from GistNet)")
        if self.mega_attn_impl not in ("auto", "sdpa", "flex"):
            raise ValueError(f"mega_attn_impl must be 'auto', 'sdpa' or 'flex', got {self.mega_attn_impl!r}")
        if self.gist_dim == 0:
            self.gist_dim = max(64, self.n_embd // 2)
        if self.lens_dim == 0:
            self.lens_dim = max(64, self.n_embd // 4)

    def to_dict(self):
        return asdict(self)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


# -----------------------------------------------------------------------------
# Rotary embeddings from explicit positions

@torch.compiler.disable  # computed once per forward, eagerly: inside a compiled graph Inductor
def rotary_cos_sin(pos, head_dim, base, sigma=None, dtype=torch.bfloat16):  # re-derives fp64 trig in every consumer kernel (measured: 25% of a d12 step)
    """pos: (B, T) positions (ints or floats); sigma: optional (B, T) spread of each entry.
    Returns cos, sin of shape (B, T, 1, head_dim/2). A span of spread sigma has its rotary
    components damped by exp(-(omega*sigma)^2/2): the expectation of e^{i omega p} under a
    Gaussian. sigma == 0 gives plain RoPE bit for bit."""
    device = pos.device
    # float64 angles so that positions ~1e6 keep their phase (fp32 would lose ~0.06 rad there)
    fdt = torch.float32 if device.type == "mps" else torch.float64
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=fdt) / head_dim))
    ang = pos.to(fdt)[..., None] * inv_freq
    cos, sin = ang.cos(), ang.sin()
    if sigma is not None:
        damp = torch.exp(-0.5 * (sigma.to(fdt)[..., None] * inv_freq) ** 2)
        cos, sin = cos * damp, sin * damp
    return cos[:, :, None, :].to(dtype), sin[:, :, None, :].to(dtype)


def rotary_tables(cos, sin):
    """Half-width (cos, sin) from rotary_cos_sin -> the full-width tables apply_rotary takes:
    cos|cos and sin|-sin along the head dim. Built once per forward, not once per layer."""
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)


def apply_rotary(x, cos, sin):
    """x (..., D) with halves x1, x2 -> [x1 cos + x2 sin, x2 cos - x1 sin], written as
    x * cos + roll(x, D/2) * sin with rotary_tables: the same products and sums (bit-identical),
    in 4 kernels per tensor instead of 8 when it runs eagerly (a decode step: 20 layers x q, k)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# -----------------------------------------------------------------------------
# Attention: one function for every caller

_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _avoid_cudnn(q, Tq, Tk, attn_mask):
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


class KVCache:
    """Preallocated per-layer K/V buffers (gpt-fast style). `pos` counts entries written.
    `truncate(j)` drops entries >= j so that an edit at working-context entry j recomputes
    from j forward only.
    Static mode (`slot` = a (1,) long device tensor, set by the caller, e.g. engine.DecodeStep):
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


# -----------------------------------------------------------------------------
# Transformer blocks (shared by GPT, GistNet and LensNet)

def weight_version(t):
    """t's in-place update count (inference tensors, made under torch.inference_mode, keep none)."""
    return 0 if t.is_inference() else t._version


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, layer_idx=0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.c_q = nn.Linear(dim, n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)
        self._qkv = None   # (key, stacked q/k/v weight) for KV-cached inference; not state

    def qkv_weight(self):
        """c_q, c_k, c_v stacked for the one-GEMM inference path, kept until one of them changes
        (an in-place update bumps its _version, a .to() swaps its data). Stacking at every call
        copied 9.8 MB per layer per decode step at d20: 22 kernels, 0.12 ms of a 1.9 ms step
        (--step-breakdown on an H200). Costs one more copy of those weights while cached. A
        compiled step takes the cached copy as is: its caller (engine.DecodeStep) refreshes it."""
        ws = (self.c_q.weight, self.c_k.weight, self.c_v.weight)
        if torch.compiler.is_compiling():
            return self._qkv[1] if self._qkv is not None else torch.cat(ws)
        key = tuple((weight_version(w), w.data_ptr(), w.dtype) for w in ws)
        if self._qkv is None or self._qkv[0] != key:
            self._qkv = (key, torch.cat(ws).detach())
        return self._qkv[1]

    def forward(self, x, cos_sin, kv_cache=None, causal=True, attn_mask=None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if kv_cache is not None:
            # inference (KV-cached forwards run without grad: decode steps, prefill, recompute):
            # one GEMM for q, k, v, then one QK norm and one rotary over the q and k heads together.
            # A d20 decode step, whose cost is its kernel count, drops from 728 to 608 ops (bench_decode
            # --count-ops). The stacked weight is cached (qkv_weight); a captured CUDA graph
            # reads that copy, so engine.DecodeStep recaptures when the weights change
            qkv = F.linear(x, self.qkv_weight()).view(B, T, H + 2 * Hkv, D)
            qk, v = norm(qkv[:, :, :H + Hkv]), qkv[:, :, H + Hkv:]
            if cos_sin is not None:
                qk = apply_rotary(qk, *cos_sin)
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            q = self.c_q(x).view(B, T, H, D)
            k = self.c_k(x).view(B, T, Hkv, D)
            v = self.c_v(x).view(B, T, Hkv, D)
            q, k = norm(q), norm(k)  # QK norm first: rotary damping must not be normalised away
            if cos_sin is not None:
                cos, sin = cos_sin
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        y = attention(q, k, v, causal=causal, attn_mask=attn_mask)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, layer_idx=0):
        super().__init__()
        self.attn = CausalSelfAttention(dim, n_head, n_kv_head, layer_idx)
        self.mlp = MLP(dim)

    def forward(self, x, cos_sin, kv_cache=None, causal=True, attn_mask=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache, causal, attn_mask)
        return x + self.mlp(norm(x))


def _heads(dim):
    return max(1, dim // 64)


# -----------------------------------------------------------------------------
# GistNet: K children -> one embedding

class GistNet(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        D, d, K = config.n_embd, config.gist_dim, config.mc_block_size
        self.K, self.rope_base = K, config.rope_base
        self.head_dim = d // _heads(d)
        self.proj_in = nn.Linear(D, d, bias=False)
        self.query = nn.Parameter(torch.zeros(d))
        self.level_emb = nn.Embedding(config.mc_max_level + 1, d)
        self.blocks = nn.ModuleList([Block(d, _heads(d), _heads(d)) for _ in range(config.gist_layers)])
        self.proj_out = nn.Linear(d, D, bias=False)

    def forward(self, children, level):
        """children: (n, K, D) embeddings of the children (token embeddings for level 1).
        level: the level of the gist being made (>= 1). Returns (n, D)."""
        n, K, _ = children.shape
        assert K == self.K, f"GistNet expects {self.K} children, got {K}"
        h = self.proj_in(norm(children))
        q = (self.query + self.level_emb.weight[level]).to(h.dtype).expand(n, 1, -1)
        x = torch.cat([h, q], dim=1)  # query slot last: position K, sees the whole block
        pos = torch.arange(K + 1, device=x.device)[None]
        cos_sin = rotary_tables(*rotary_cos_sin(pos, self.head_dim, self.rope_base, dtype=x.dtype))
        for block in self.blocks:
            x = block(x, cos_sin, causal=False)
        # mean-pool prior + learned residual (proj_out starts at zero)
        return children.mean(dim=1) + self.proj_out(norm(x[:, -1]))


# -----------------------------------------------------------------------------
# LensNet: working-context entries + recent tail -> one signed score per entry

LENS_FEATURES = 5  # per-entry features: log-age, log-width, relative position, is-tail, query match


def lens_features(starts, widths, num_tokens, match=None):
    """Per-entry LensNet features from spans. starts, widths: (B, E) tensors; num_tokens: (B, 1)
    or int; match: (B, E) query-match mass under each entry (entry_match; None = 0, i.e.
    config.lens_match off). Scale-free (logs and ratios) so they stay in range at any history
    length."""
    starts, widths = starts.float(), widths.float()
    n = torch.as_tensor(num_tokens, dtype=torch.float32, device=starts.device)
    age = (n - (starts + widths)).clamp(min=0)
    m = torch.zeros_like(starts) if match is None else torch.log1p(match.float())
    return torch.stack([torch.log1p(age) / 8.0, torch.log(widths) / 8.0,
                        starts / n.clamp(min=1), torch.zeros_like(starts), m], dim=-1)


class LensNet(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        D, d = config.n_embd, config.lens_dim
        self.proj_in = nn.Linear(D, d, bias=False)
        self.level_emb = nn.Embedding(config.mc_max_level + 2, d)  # last row marks tail tokens
        self.feat = nn.Linear(LENS_FEATURES, d, bias=False)
        self.blocks = nn.ModuleList([Block(d, _heads(d), _heads(d)) for _ in range(config.lens_layers)])
        self.head = nn.Linear(d, 1, bias=False)
        self.tail_level = config.mc_max_level + 1
        if config.lens_match:
            # the query-match feature is also a direct prior on the score: score = learned +
            # match_gain * log1p(match), so that the learned part corrects the feature rather than
            # having to rediscover it. Measured on one H200 (README, #4): with or without the prior
            # LensNet ranked a held-out passkey needle low (0.03 at 64x W) while the feature alone
            # found it (0.95); the gain, logged as lens_match_gain, rose from 1.0 to 1.12
            self.match_gain = nn.Parameter(torch.ones(()))

    def forward(self, entry_emb, entry_level, entry_feat, tail_emb, valid):
        """entry_emb (B, E, D), entry_level (B, E) long, entry_feat (B, E, LENS_FEATURES),
        tail_emb (B, t, D), valid (B, E) bool (False = padding). Returns scores (B, E) float32,
        exactly 0 at padding. Padding never influences valid entries (it is masked as a key)."""
        B, E, _ = entry_emb.shape
        t = tail_emb.size(1)
        lvl = entry_level.clamp(min=0)
        x_e = self.proj_in(norm(entry_emb)) + self.level_emb(lvl) + self.feat(entry_feat.to(entry_emb.dtype))
        tail_feat = torch.zeros(B, t, LENS_FEATURES, device=tail_emb.device, dtype=tail_emb.dtype)
        tail_feat[..., 3] = 1.0
        x_t = self.proj_in(norm(tail_emb)) + self.level_emb.weight[self.tail_level] + self.feat(tail_feat)
        x = torch.cat([x_e, x_t.to(x_e.dtype)], dim=1)
        keys = torch.cat([valid, torch.ones(B, t, dtype=torch.bool, device=valid.device)], dim=1)
        mask = keys[:, None, None, :]  # (B, 1, 1, E+t): every query sees every valid key
        for block in self.blocks:
            x = block(x, None, causal=False, attn_mask=mask)
        scores = self.head(norm(x[:, :E])).squeeze(-1).float()
        if hasattr(self, "match_gain"):
            scores = scores + self.match_gain.float() * entry_feat[..., 4].float()
        return torch.where(valid, scores, torch.zeros_like(scores))


# -----------------------------------------------------------------------------
# The GPT

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config.n_embd, config.n_head, config.n_kv_head, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head_dim = config.n_embd // config.n_head
        # rows per chunk of the training loss (0 = one piece): a training knob, not architecture,
        # so it stays out of the config (and out of checkpoints). See logits_and_loss.
        self.loss_chunk = 0
        if config.megacontext:
            self.gistnet = GistNet(config)
            self.lensnet = LensNet(config)
            # level embedding for working-context entries; row 0 (tokens) is never used, so
            # an all-LOD0 window is exactly the plain model
            self.lod_emb = nn.Embedding(config.mc_max_level + 1, config.n_embd)

    @torch.no_grad()
    def init_weights(self):
        """nanochat-style init: N(0,1) embeddings, uniform(+-sqrt(3/d)) matrices, zero output
        projections (every residual branch starts as identity), small lm_head."""
        def init_block(block, dim):
            s = math.sqrt(3.0 / dim)
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

        nn.init.normal_(self.transformer.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for b in self.transformer.h:
            init_block(b, self.config.n_embd)
        if self.config.megacontext:
            g, l = self.gistnet, self.lensnet
            for b in g.blocks:
                init_block(b, self.config.gist_dim)
            for b in l.blocks:
                init_block(b, self.config.lens_dim)
            nn.init.normal_(g.proj_in.weight, std=self.config.n_embd ** -0.5)
            nn.init.zeros_(g.proj_out.weight)
            nn.init.normal_(g.query, std=0.02)
            nn.init.normal_(g.level_emb.weight, std=0.02)
            nn.init.normal_(l.proj_in.weight, std=self.config.n_embd ** -0.5)
            nn.init.normal_(l.level_emb.weight, std=0.02)
            nn.init.normal_(l.feat.weight, std=0.02)
            nn.init.zeros_(l.head.weight)
            if hasattr(l, "match_gain"):
                nn.init.ones_(l.match_gain)
            nn.init.zeros_(self.lod_emb.weight)

    # -- bookkeeping ----------------------------------------------------------

    def num_params(self, part=None):
        mods = {"gpt": [self.transformer, self.lm_head]}
        if self.config.megacontext:
            mods.update(gistnet=[self.gistnet], lensnet=[self.lensnet], lod=[self.lod_emb])
        sel = mods if part is None else {part: mods[part]}
        return sum(p.numel() for ms in sel.values() for m in ms for p in m.parameters())

    def estimate_flops(self, seq_len=None):
        """FLOPs per token of the base model for fwd+bwd (6N + attention), nanochat's estimate."""
        c = self.config
        T = seq_len or c.sequence_len
        n = sum(p.numel() for p in self.transformer.h.parameters()) + self.lm_head.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * self.head_dim * T

    def drop_inference_caches(self):
        """Free the stacked q/k/v copies that KV-cached inference made (CausalSelfAttention.qkv_weight):
        a training loop that samples between steps should not carry a stale copy of those weights."""
        for m in self.modules():
            if isinstance(m, CausalSelfAttention):
                m._qkv = None

    def param_groups(self):
        """(matrix params for Muon, {name: params} for AdamW). Every parameter lands in exactly
        one group: GistNet/LensNet included (the earlier implementation forgot them)."""
        muon, embed, head, other = [], [], [], []
        emb_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for name, p in self.named_parameters():
            if name == "transformer.wte.weight":
                embed.append(p)
            elif name == "lm_head.weight":
                head.append(p)
            elif p.ndim == 2 and id(p) not in emb_ids and min(p.shape) >= 16:
                muon.append(p)  # hidden matrices of every transformer (base, GistNet, LensNet)
            else:
                other.append(p)  # MC embeddings, query slot, tiny feature/score heads
        return muon, {"embed": embed, "lm_head": head, "other": other}

    # -- MegaContext glue: the one place that says how tree nodes become model inputs --------

    def embed(self, idx):
        return self.transformer.wte(idx)

    def lens_context(self, t):
        """How many of the most recent tokens lens_queries(recent, t) reads."""
        return t if self.config.lens_query == "tokens" else self.config.lens_query_ctx

    def lens_queries(self, recent, t):
        """LensNet's queries for the t most recent tokens, from recent (B, L >= t) ids: their
        embeddings (lens_query "tokens"), or ("hidden") the base model's final hidden states for
        them after a plain forward over all of `recent`, i.e. the question as the reader
        understands it in context rather than its raw words. No gradient reaches the base model.
        Training (MCStep), mc_eval and MemorySession all take their queries from here."""
        if self.config.lens_query == "tokens":
            return self.embed(recent[:, -t:]).detach()
        with torch.no_grad():
            return self(recent, return_hidden=True)[:, -t:].detach()

    def gist(self, child_level, children):
        """The tree's gist_fn: child_level 0 -> children are (n, K) token ids; else (n, K, D)
        gists of that level. Returns (n, D) gists of level child_level + 1."""
        if child_level == 0:
            children = self.embed(children)
        return self.gistnet(children, child_level + 1)

    def entry_embeddings(self, levels, token_ids, gists):
        """Working-context entries -> input embeddings. levels (B, E) long (-1 = padding);
        token_ids (B, E) long, used where level == 0; gists (B, E, D), used where level >= 1
        (the level embedding is added there). LOD0 entries are exactly the plain token
        embeddings, so an all-LOD0 window is the plain model."""
        tok = self.embed(token_ids.clamp(min=0))
        x = torch.where((levels > 0)[..., None], gists.to(tok.dtype), tok)
        return self.add_level_embedding(x, levels)

    def add_level_embedding(self, x, levels):
        """x (B, E, D) raw entry vectors (token embedding or gist); adds the level embedding to
        gist entries (level >= 1). Training (gathered tables) and inference (tree reads) both
        go through here, so they feed the model identically."""
        lvl = levels.clamp(min=0)
        return torch.where((levels > 0)[..., None], x + self.lod_emb(lvl).to(x.dtype), x)

    # -- MegaAttention -----------------------------------------------------------

    def mega_window(self, mega=None, kv_cache=None, attn_mask=None):
        """The MegaAttention window w for one forward, 0 = plain attention. mega=None follows
        config.mega_attn_window, but a forward with a KV cache or an explicit attn_mask then runs
        plain attention (decode has no MegaAttention path yet); an explicit mega=w > 0 there is an
        error. mega=0/False forces plain attention."""
        if mega is None:
            w = self.config.mega_attn_window
            return 0 if (kv_cache is not None or attn_mask is not None) else w
        w = int(mega)
        if w < 0:
            raise ValueError(f"mega window must be >= 0, got {w}")
        if w and (kv_cache is not None or attn_mask is not None):
            raise ValueError("MegaAttention does not combine with a KV cache or an explicit attn_mask")
        if w and not hasattr(self, "gistnet"):
            raise ValueError("MegaAttention needs a model built with megacontext=True")
        return w

    def mega_inputs(self, x, pos, sigma, w, impl=None):
        """Append the MegaAttention summaries to the T entries x (B, T, D) with positions pos and
        spreads sigma (B or 1, T; sigma may be None). Returns (x, pos, sigma, mask) over T + S
        entries: the mask is a dense bool (SDPA) or a BlockMask (FlexAttention), per
        impl (default config.mega_attn_impl; "auto" = flex on CUDA, else sdpa)."""
        K = self.config.mc_block_size
        B, T, D = x.shape
        S = mega_num_summaries(T, w, K)
        if S:
            g = self.gistnet(x[:, :S * K].reshape(B * S, K, D), 1).view(B, S, D).to(x.dtype)
            g = self.add_level_embedding(g, torch.ones(B, S, dtype=torch.long, device=x.device))
            x = torch.cat([x, g], dim=1)
            Bp = max(pos.size(0), 1 if sigma is None else sigma.size(0))
            pos = pos.expand(Bp, T)
            sigma = torch.zeros(Bp, T, device=x.device) if sigma is None else sigma.expand(Bp, T)
            ps, ss = mega_summary_positions(pos, sigma, K, S)
            pos = torch.cat([pos.to(ps.dtype), ps], dim=1)
            sigma = torch.cat([sigma.to(ss.dtype), ss], dim=1)  # zeros stay exact zeros: plain RoPE
        impl = impl or self.config.mega_attn_impl
        if impl == "auto":
            impl = "flex" if (x.is_cuda and create_block_mask is not None) else "sdpa"
        return x, pos, sigma, mega_mask(T, w, K, x.device, impl)

    # -- forward ----------------------------------------------------------------

    def forward(self, idx=None, targets=None, kv_cache=None, embeds=None, pos=None, sigma=None,
                attn_mask=None, loss_reduction="mean", return_hidden=False, mega=None):
        """idx (B, T) token ids, or embeds (B, T, D) input embeddings (tokens and/or gists).
        pos (B or 1, T): explicit positions; default 0..T-1 after whatever the cache holds.
        sigma (B or 1, T): Gaussian spread per entry (None = 0 = plain RoPE).
        mega: MegaAttention window (see mega_window; None = config.mega_attn_window, 0 = off).
        targets (B, T) with -1 = ignore. Returns loss if targets given else logits (B, T, V)."""
        x = self.embed(idx) if embeds is None else embeds
        B, T, _ = x.shape
        w = self.mega_window(mega, kv_cache, attn_mask)
        if kv_cache is not None and kv_cache.slot is not None:
            # static decode (see KVCache): the one new entry sees slots [0, slot]; the mask and
            # the default position come from the device slot, so no step depends on a host int
            if T != 1 or attn_mask is not None:
                raise ValueError("a static-mode KV cache takes one entry per forward and no attn_mask")
            slot = kv_cache.slot
            # an additive fp32 bias (0 / -inf), built once here: decode_attention adds it to the
            # scores in one kernel per layer (a bool mask costs a negation and a masked_fill)
            hide = torch.arange(kv_cache.max_len, device=x.device) > slot
            attn_mask = torch.zeros(hide.shape, device=x.device).masked_fill(hide, float("-inf"))[None, None, None]
            pos = slot[None] if pos is None else pos
        if pos is None:
            t0 = kv_cache.pos if kv_cache is not None else 0
            pos = torch.arange(t0, t0 + T, device=x.device)[None]
        if w:
            x, pos, sigma, attn_mask = self.mega_inputs(x, pos, sigma, w)
        dtype = torch.bfloat16 if x.is_cuda else torch.float32
        cos_sin = rotary_tables(*rotary_cos_sin(pos, self.head_dim, self.config.rope_base, sigma, dtype=dtype))
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache, causal=True, attn_mask=attn_mask)
        x = norm(x[:, :T] if w else x)  # MegaAttention: summaries carry no loss/logits
        if return_hidden:
            return x
        return self.logits_and_loss(x, targets, loss_reduction)

    def logits_and_loss(self, x, targets=None, loss_reduction="mean"):
        if targets is not None and self.loss_chunk > 0 and loss_reduction in ("mean", "sum") and torch.is_grad_enabled():
            # fp32 logits at vocab 65536 are 17 GB for 32 x 2048 rows (and their gradient as
            # much again): score loss_chunk rows at a time and recompute each chunk's logits in
            # the backward (torch.utils.checkpoint), so that only one chunk's logits ever exist
            xf, tf = x.reshape(-1, x.size(-1)), targets.reshape(-1)
            n = self.loss_chunk
            total = sum(checkpoint(self._loss_sum, xf[i:i + n], tf[i:i + n], use_reentrant=False)
                        for i in range(0, tf.numel(), n))
            return total if loss_reduction == "sum" else total / (tf != -1).sum().clamp(min=1)
        logits = self._softcapped(self.lm_head(x).float())
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def _loss_sum(self, x, targets):
        return F.cross_entropy(self._softcapped(self.lm_head(x).float()), targets, ignore_index=-1, reduction="sum")

    def _softcapped(self, logits):
        c = self.config.softcap
        return c * torch.tanh(logits / c) if c else logits
