"""
A fused decode step in Triton (decode="fused"): one token through the GPT over its KV cache in six
kernels per layer, where the compiled step runs ~17 (bench_decode --step-breakdown).

Per layer, for the one new entry x (the residual stream, in the weights' dtype):
  1. gemv: qkv = rms_norm(x) @ Wqkv^T          (the norm folded in: its sum of squares comes
                                               from the GEMV's own loads of x)
  2. attn_split: QK norm + rotary of the new q, k; k, v written to the cache slot; flash-decoding
     over the cached keys, split into NS chunks per head (the whole GPU reads the cache)
  3. attn_combine: the NS partial softmaxes per head -> y
  4. gemv: x += y @ Wproj^T                    (the residual add is the epilogue)
  5. gemv: u = relu(rms_norm(x) @ Wfc^T)^2
  6. gemv: x += u @ Wfc2^T
then rms_norm + lm_head + softcap as one more GEMV. Every kernel has a fixed grid for a given cache,
so DecodeStep captures the step as one CUDA graph; the slot is read on the device.

Numerics follow GPT.forward's rounding points (each op's output rounded to the activation dtype,
fp32 inside a kernel), except that norm(x) is not rounded before its GEMV; attention accumulates
in fp32 where the eager path rounds its scores to bf16,
so fused logits match the static step to bf16 rounding, and exactly (to fp32 rounding) on fp32
weights (tests/test_decode_kernels.py, on CPU through TRITON_INTERPRET=1).

Needs triton (CUDA builds of torch ship it). On CPU it runs only under TRITON_INTERPRET=1 (tests).
"""
import os
import json
import math

import torch

from nanochat.gpt import rotary_cos_sin, rotary_tables

try:
    import triton
    import triton.language as tl
except Exception:  # no triton: decode="fused" says so (fused_unavailable)
    triton = tl = None


def fused_unavailable(device=None, model=None):
    """None if decode="fused" can run on `device` for `model` (either may be None: not checked),
    else why not (one line)."""
    if triton is None:
        return "decode='fused' needs triton (pip install triton; CUDA builds of torch ship it)"
    if device is not None and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "decode='fused' runs on CUDA (on CPU only under TRITON_INTERPRET=1, for tests)"
    if model is not None:
        c = model.config
        head_dim = c.n_embd // c.n_head
        if head_dim & (head_dim - 1):
            return f"decode='fused' needs a power-of-two head dim, this model's is {head_dim}"
    return None


if triton is not None:

    @triton.jit
    def _rms_kernel(x_ptr, out_ptr, N, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """out = rms_norm(x) over one row of N (N <= BLOCK)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        r = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + r, mask=r < N, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        tl.store(out_ptr + r, x * rstd, mask=r < N)

    @triton.jit
    def _gemv_epilogue(y, act_ty, out_ptr, res_ptr, rn, nmask, cap,
                       ACT: tl.constexpr, RES: tl.constexpr, CAP: tl.constexpr):
        """The GEMV's row sums y (fp32) -> out: rounded to the activation dtype (the linear's output),
        then relu^2 (ACT), + res (RES) or cap * tanh(. / cap) in fp32 (CAP)."""
        y = y.to(act_ty).to(tl.float32)
        if ACT:
            y = tl.maximum(y, 0.0).to(act_ty).to(tl.float32)
            y = y * y
        if RES:
            y = y + tl.load(res_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        if CAP:
            z = y / cap
            t = tl.exp(-2.0 * tl.abs(z))
            th = (1.0 - t) / (1.0 + t)
            y = cap * tl.where(z < 0, -th, th)
        tl.store(out_ptr + rn, y, mask=nmask)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, res_ptr, N, K, eps, cap,
                     NORM: tl.constexpr, ACT: tl.constexpr, RES: tl.constexpr, CAP: tl.constexpr,
                     EVEN: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[n] = f(x' @ W[n]) for BLOCK_N rows of W (N, K), x' = rms_norm(x) if NORM else x.
        f: round to the activation dtype, then relu^2 (ACT), + res[n] (RES) or, for logits,
        cap * tanh(. / cap) in fp32 (CAP). The norm is one pass with the dot products: its sum of
        squares comes from the same loads of x, and 1/rms scales the row sums (x' is not rounded
        before the dot, as GPT.forward's norm output is: a difference of bf16 rounding).
        EVEN: N % BLOCK_N == 0 and K % BLOCK_K == 0 (no masks)."""
        act_ty = x_ptr.dtype.element_ty
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            if EVEN:
                xv = tl.load(x_ptr + rk).to(tl.float32)
                w = tl.load(w_ptr + rn[:, None] * K + rk[None, :]).to(tl.float32)
            else:
                kmask = rk < K
                xv = tl.load(x_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None] & kmask[None, :],
                            other=0.0).to(tl.float32)
            acc += w * xv[None, :]
            if NORM:
                ss += xv * xv
        y = tl.sum(acc, 1)
        if NORM:
            y = y / tl.sqrt(tl.sum(ss, 0) / K + eps)
        _gemv_epilogue(y, act_ty, out_ptr, res_ptr, rn, nmask, cap, ACT, RES, CAP)

    @triton.jit
    def _gemv1_kernel(x_ptr, w_ptr, out_ptr, res_ptr, N, K, eps, cap,
                      NORM: tl.constexpr, ACT: tl.constexpr, RES: tl.constexpr, CAP: tl.constexpr,
                      PDL: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr):
        """_gemv_kernel for a row block that fits in one load (BLOCK_N x KP, KP = K rounded up to a
        power of two), issued first: with programmatic dependent launch (PDL) this program reads its
        weights while the kernel before it still runs, and waits (gdc_wait) only to read x."""
        act_ty = x_ptr.dtype.element_ty
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rk = tl.arange(0, KP)
        kmask = rk < K
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        xv = tl.load(x_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * xv[None, :], 1)
        if NORM:
            y = y / tl.sqrt(tl.sum(xv * xv, 0) / K + eps)
        _gemv_epilogue(y, act_ty, out_ptr, res_ptr, rn, nmask, cap, ACT, RES, CAP)

    @triton.jit
    def _norm_rotary(ptr, d, dr, cos, sin, eps, act_ty, D: tl.constexpr):
        """One head at ptr (D values): rms_norm, then rotary with full-width tables, each rounded to
        the activation dtype as the eager path rounds them. dr: the torch.roll(x, D/2) indices."""
        x = tl.load(ptr + d).to(tl.float32)
        xr = tl.load(ptr + dr).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        x = (x * r).to(act_ty).to(tl.float32)
        xr = (xr * r).to(act_ty).to(tl.float32)
        return (x * cos + xr * sin).to(act_ty).to(tl.float32)

    @triton.jit
    def _softmax_tile(m, l, acc, q, kt, vt, valid, scale):
        """Online softmax: the running (max m, sum l, acc) after the tile of keys kt and values vt
        (BLOCK_T, D), whose invalid rows score -inf."""
        sc = tl.where(valid, tl.sum(kt.to(tl.float32) * q[None, :], 1) * scale, -float("inf"))
        m_new = tl.maximum(m, tl.max(sc, 0))
        p = tl.exp(sc - m_new)
        alpha = tl.exp(m - m_new)
        return m_new, l * alpha + tl.sum(p, 0), acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), 0)

    @triton.jit
    def _attn_split_kernel(qkv_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, slot_ptr, acc_ptr, ml_ptr,
                           H, HKV, CHUNK, NS, eps, scale,
                           D: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr):
        """Program (s, h): query head h over cache slots [s*CHUNK, (s+1)*CHUNK) that are < slot,
        plus (s == 0) the new entry itself, which this kernel also writes at `slot` (the program of
        the kv head's first query head does). Writes the chunk's unnormalised acc (D) and (m, l)."""
        s = tl.program_id(0)
        h = tl.program_id(1)
        act_ty = qkv_ptr.dtype.element_ty
        G = H // HKV
        g = h // G
        slot = tl.load(slot_ptr)                              # set before the step: no wait needed
        d = tl.arange(0, D)
        row = HKV * D                                        # cache layout (L, HKV, D) for B = 1
        start = s * CHUNK
        end = tl.minimum(start + CHUNK, slot)                 # cached keys of this chunk below the slot
        # the chunk's first tile: slots written by earlier steps, so (PDL) read before the wait
        t = start + tl.arange(0, BLOCK_T)
        tm = t < end
        off = t[:, None] * row + g * D + d[None, :]
        kt0 = tl.load(kc_ptr + off, mask=tm[:, None], other=0.0)
        vt0 = tl.load(vc_ptr + off, mask=tm[:, None], other=0.0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        dr = (d + D // 2) % D                                 # torch.roll(x, D/2) reads x[(i + D/2) % D]
        cos = tl.load(cos_ptr + d).to(tl.float32)             # full-width tables (gpt.rotary_tables)
        sin = tl.load(sin_ptr + d).to(tl.float32)
        # the new q and k: QK norm (rounded), rotary (rounded), as CausalSelfAttention's KV-cached path
        q = _norm_rotary(qkv_ptr + h * D, d, dr, cos, sin, eps, act_ty, D)
        k = _norm_rotary(qkv_ptr + (H + g) * D, d, dr, cos, sin, eps, act_ty, D)
        v = tl.load(qkv_ptr + (H + HKV + g) * D + d).to(tl.float32)
        if (s == 0) & (h % G == 0):
            tl.store(kc_ptr + slot * row + g * D + d, k)
            tl.store(vc_ptr + slot * row + g * D + d, v)
        # online softmax over the chunk: the prefetched tile, then the rest
        m = tl.full([], -1.0e30, tl.float32)
        l = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([D], dtype=tl.float32)
        m, l, acc = _softmax_tile(m, l, acc, q, kt0, vt0, tm, scale)
        for t0 in range(start + BLOCK_T, end, BLOCK_T):   # (loop-local names: no loop-carried int types)
            ti = t0 + tl.arange(0, BLOCK_T)
            ti_m = ti < end
            ti_off = ti[:, None] * row + g * D + d[None, :]
            kt = tl.load(kc_ptr + ti_off, mask=ti_m[:, None], other=0.0)
            vt = tl.load(vc_ptr + ti_off, mask=ti_m[:, None], other=0.0)
            m, l, acc = _softmax_tile(m, l, acc, q, kt, vt, ti_m, scale)
        if s == 0:
            sn = tl.sum(k * q, 0) * scale
            m_new = tl.maximum(m, sn)
            alpha = tl.exp(m - m_new)
            pn = tl.exp(sn - m_new)
            acc = acc * alpha + pn * v
            l = l * alpha + pn
            m = m_new
        base = h * NS + s
        tl.store(acc_ptr + base * D + d, acc)
        tl.store(ml_ptr + base * 2, m)
        tl.store(ml_ptr + base * 2 + 1, l)

    @triton.jit
    def _attn_combine_kernel(acc_ptr, ml_ptr, y_ptr, NS, D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        """Program h: y[h] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over head h's NS chunks."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        h = tl.program_id(0)
        d = tl.arange(0, D)
        M = tl.full([], -1.0e30, tl.float32)
        for s0 in range(0, NS, BLOCK_S):
            r = s0 + tl.arange(0, BLOCK_S)
            M = tl.maximum(M, tl.max(tl.load(ml_ptr + (h * NS + r) * 2, mask=r < NS, other=-1.0e30), 0))
        num = tl.zeros([D], dtype=tl.float32)
        den = tl.full([], 0.0, tl.float32)
        for s0 in range(0, NS, BLOCK_S):
            r = s0 + tl.arange(0, BLOCK_S)
            rm = r < NS
            w = tl.exp(tl.load(ml_ptr + (h * NS + r) * 2, mask=rm, other=-1.0e30) - M)
            w = tl.where(rm, w, 0.0)
            den += tl.sum(w * tl.load(ml_ptr + (h * NS + r) * 2 + 1, mask=rm, other=0.0), 0)
            a = tl.load(acc_ptr + (h * NS + r)[:, None] * D + d[None, :], mask=rm[:, None], other=0.0)
            num += tl.sum(w[:, None] * a, 0)
        tl.store(y_ptr + h * D + d, num / den)


def _pow2_at_most(n):
    return 1 << (max(1, int(n)).bit_length() - 1)


def gemv_config(N, K, sms):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an (N, K) GEMV on a GPU of `sms` SMs: enough
    programs to spread the weight over every SM (a GEMV is bound by how much of the bandwidth its
    grid can use), BLOCK_N x BLOCK_K = 4096 loads per step. scripts/bench_decode_kernels.py sweeps
    the alternatives on a GPU (`GEMV_TUNED` holds what it found)."""
    tuned = GEMV_TUNED.get((N, K)) if sms > 1 else None
    if tuned:
        return tuned
    block_n = max(1, min(32, _pow2_at_most(max(1, N // (2 * sms)))))
    block_k = min(triton.next_power_of_2(K), max(64, 4096 // block_n))
    return block_n, block_k, 4, 3


# (N, K) -> (BLOCK_N, BLOCK_K, num_warps, num_stages): the d20 shapes' best on one H200 (132 SMs, as
# an H100 SXM), results/h200/decode_kernels_d20.json. GPUs only: the interpreter keeps the heuristic
GEMV_TUNED = {(3840, 1280): (4, 512, 4, 2), (1280, 1280): (2, 1024, 4, 2), (5120, 1280): (4, 256, 4, 2),
              (1280, 5120): (1, 1024, 4, 2), (32768, 1280): (32, 256, 4, 2)}


def gemv(x, w, out, eps=0.0, norm=False, act=False, res=None, cap=0.0, config=None, pdl=False):
    """out = f(x' @ w^T) (see _gemv_kernel) for x (K,), w (N, K) contiguous, out (N,). pdl: launch
    with programmatic dependent launch (see pdl_supported); a row block that fits one load then
    runs as _gemv1_kernel, which reads its weights before it waits for the kernel before it."""
    N, K = w.shape
    bn, bk, warps, stages = config or gemv_config(N, K, _sms(w.device))
    args = (x, w, out, res if res is not None else out, N, K, eps, cap if cap else 1.0)
    kw = dict(NORM=norm, ACT=act, RES=res is not None, CAP=bool(cap), num_warps=warps, **_pdl_launch(pdl))
    kp = triton.next_power_of_2(K)
    if pdl and bn * kp <= 8192:
        _gemv1_kernel[(triton.cdiv(N, bn),)](*args, BLOCK_N=bn, KP=kp, **kw)
    else:
        _gemv_kernel[(triton.cdiv(N, bn),)](*args, EVEN=(N % bn == 0 and K % bk == 0), BLOCK_N=bn, BLOCK_K=bk,
                                            num_stages=stages, **kw)


def pdl_supported(device):
    """Programmatic dependent launch: each kernel of the step starts while the one before it
    finishes, and reads what does not depend on it (weights, cached K/V) before it waits.
    Hopper (sm90) and later, with a Triton that has `launch_pdl`. Opt-in (NANOCHAT_FUSED_PDL=1):
    on one H200 the d20 step replayed in 0.795 ms with it and 0.769 ms without
    (results/h200/decode_step_breakdown_d20_w4096_fused.json)."""
    if os.environ.get("NANOCHAT_FUSED_PDL", "0") != "1" or torch.device(device).type != "cuda":
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        return "launch_pdl" in CUDAOptions.__dataclass_fields__
    except Exception:
        return False


def _sms(device):
    if device.type != "cuda":
        return 1    # the interpreter (tests) runs programs one by one: few of them
    return torch.cuda.get_device_properties(device).multi_processor_count


def attn_config(L, H, sms, block_t=None, programs_per_sm=None, warps=None):
    """(CHUNK, NS, BLOCK_T, num_warps): NS chunks of CHUNK cache slots per head, ~programs_per_sm
    programs per SM in all (CPU, the interpreter: 3 chunks, so that tests cover the combine).
    Unset arguments come from ATTN_TUNED at the measured cache length nearest L, else 64 / 4 / 4."""
    if ATTN_TUNED:
        near = min(ATTN_TUNED, key=lambda n: abs(math.log(n / L)))
        t = ATTN_TUNED[near]
        block_t, programs_per_sm, warps = (a if a is not None else t[k] for a, k in
                                           ((block_t, "block_t"), (programs_per_sm, "programs_per_sm"), (warps, "warps")))
    block_t, programs_per_sm, warps = block_t or 64, programs_per_sm or 4, warps or 4
    if sms == 1:
        block_t, ns = 8, 3
    else:
        ns = max(1, min(128, triton.cdiv(programs_per_sm * sms, H)))
    chunk = triton.cdiv(triton.cdiv(L, ns), block_t) * block_t
    return chunk, triton.cdiv(L, chunk), block_t, warps


def _pdl_launch(pdl):
    """The kernels' PDL constexpr and, when on, Triton's launch option for it."""
    return dict(PDL=pdl, **({"launch_pdl": True} if pdl else {}))


def attend(qkv, kc, vc, cos, sin, slot, part_acc, part_ml, y, H, HKV, config, eps, pdl=False):
    """One layer's decode attention: qkv ((H + 2 HKV) * D) the new entry's projections; kc, vc its
    (1, L, HKV, D) cache (the new k, v are written at `slot`); config = attn_config(L, H, sms);
    part_acc / part_ml the splits' scratch (H * NS * D, H * NS * 2 fp32); y (H * D) the output."""
    chunk, ns, block_t, warps = config
    D = kc.size(-1)
    _attn_split_kernel[(ns, H)](qkv, kc, vc, cos, sin, slot, part_acc, part_ml, H, HKV, chunk, ns, eps, D ** -0.5,
                                D=D, BLOCK_T=block_t, num_warps=warps, **_pdl_launch(pdl))
    _attn_combine_kernel[(H,)](part_acc, part_ml, y, ns, D=D, BLOCK_S=min(16, triton.next_power_of_2(ns)),
                               **_pdl_launch(pdl))


# cache length -> {block_t, programs_per_sm, warps}: the same run's best at 4k and 128k slots
ATTN_TUNED = {4096: dict(block_t=128, programs_per_sm=8, warps=4), 131072: dict(block_t=128, programs_per_sm=4, warps=8)}


def load_tuning(path):
    """Take the launch configs a `python -m scripts.bench_decode_kernels` run found (its JSON).
    A file that is not one is refused whole (ValueError naming it): nothing is half-loaded."""
    def pow2(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0 and not v & (v - 1)
    try:
        with open(path) as f:
            t = json.load(f)
        gemv = {}
        for k, c in t.get("gemv_tuned", {}).items():
            n, kk = (int(v) for v in k.split(","))
            c = tuple(c)
            if len(c) != 4 or not all(pow2(v) for v in c[:3]) or not (isinstance(c[3], int) and c[3] >= 1) or n < 1 or kk < 1:
                raise ValueError(f"gemv_tuned[{k!r}] = {list(c)}: want [BLOCK_N, BLOCK_K, num_warps, num_stages]")
            gemv[(n, kk)] = c
        attn = {}
        for k, v in t.get("attn_tuned", {}).items():
            v = {f: v[f] for f in ("block_t", "programs_per_sm", "warps")}
            if not all(isinstance(x, int) and x > 0 for x in v.values()) or not pow2(v["block_t"]) or int(k) < 1:
                raise ValueError(f"attn_tuned[{k!r}] = {v}: want positive ints, block_t a power of two")
            attn[int(k)] = v
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: not a bench_decode_kernels tuning file ({type(e).__name__}: {e})") from None
    GEMV_TUNED.update(gemv)
    ATTN_TUNED.update(attn)


if triton is not None and os.environ.get("NANOCHAT_DECODE_TUNING"):
    load_tuning(os.environ["NANOCHAT_DECODE_TUNING"])


class FusedDecode:
    """The fused step for one (model, cache): buffers and launch shapes fixed at construction, so
    DecodeStep can capture it as a CUDA graph. __call__(x, pos, sigma, slot): x (1, 1) ids or
    (1, 1, D) embeddings, slot (1,) long device tensor, pos/sigma (1, 1) or None (pos = slot).
    Writes the entry's K/V at `slot` in every layer and returns (1, V) float32 logits."""

    def __init__(self, model, cache, pdl=None):
        """pdl: programmatic dependent launch (None: where pdl_supported says it runs)."""
        why = fused_unavailable(cache.k.device, model)
        if why:
            raise ValueError(why)
        if cache.k.size(1) != 1:
            raise ValueError(f"decode='fused' decodes one sequence (batch 1), the cache has {cache.k.size(1)}")
        cfg = model.config
        self.model, self.cache = model, cache
        blocks = list(model.transformer.h)
        a0 = blocks[0].attn
        self.H, self.HKV, self.Dh = a0.n_head, a0.n_kv_head, a0.head_dim
        self.D, self.V = cfg.n_embd, cfg.vocab_size
        w = model.lm_head.weight
        self.dtype, dev = w.dtype, w.device
        self.eps = torch.finfo(self.dtype).eps   # F.rms_norm's default eps (GPT's norm)
        self.cap = float(cfg.softcap or 0.0)
        self.sms = _sms(dev)
        self.pdl = pdl_supported(dev) if pdl is None else bool(pdl)
        self.chunk, self.ns, self.block_t, self.attn_warps = attn_config(cache.max_len, self.H, self.sms)
        e = lambda *s, dt=self.dtype: torch.empty(*s, device=dev, dtype=dt)  # noqa: E731
        self.x = e(self.D)
        self.qkv = e((self.H + 2 * self.HKV) * self.Dh)
        self.y, self.u = e(self.D), e(4 * self.D)
        self.part_acc = e(self.H * self.ns * self.Dh, dt=torch.float32)
        self.part_ml = e(self.H * self.ns * 2, dt=torch.float32)
        self.logits = e(1, self.V, dt=torch.float32)
        self.blocks = blocks

    def _gemv(self, x, w, out, norm=False, act=False, res=None, cap=0.0):
        gemv(x, w, out, self.eps, norm=norm, act=act, res=res, cap=cap, config=gemv_config(*w.shape, self.sms),
             pdl=self.pdl)

    @torch.no_grad()
    def __call__(self, x, pos, sigma, slot):
        model, c = self.model, self.cache
        emb = model.embed(x) if not x.is_floating_point() else x
        pos = slot[None] if pos is None else pos
        cos, sin = rotary_tables(*rotary_cos_sin(pos, self.Dh, model.config.rope_base, sigma, dtype=self.dtype))
        cos, sin = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()
        D = self.D
        _rms_kernel[(1,)](emb.reshape(-1).to(self.dtype).contiguous(), self.x, D, self.eps,
                          BLOCK=triton.next_power_of_2(D), **_pdl_launch(self.pdl))
        for i, blk in enumerate(self.blocks):
            a = blk.attn
            self._gemv(self.x, a.qkv_weight(), self.qkv, norm=True)
            attend(self.qkv, c.k[i], c.v[i], cos, sin, slot, self.part_acc, self.part_ml, self.y, self.H, self.HKV,
                   (self.chunk, self.ns, self.block_t, self.attn_warps), self.eps, self.pdl)
            self._gemv(self.y, a.c_proj.weight, self.x, res=self.x)
            self._gemv(self.x, blk.mlp.c_fc.weight, self.u, norm=True, act=True)
            self._gemv(self.u, blk.mlp.c_proj.weight, self.x, res=self.x)
        self._gemv(self.x, model.lm_head.weight, self.logits, norm=True, cap=self.cap)
        return self.logits
