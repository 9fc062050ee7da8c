"""MegaAttention (DESIGN section 7): mask properties, SDPA path vs a naive per-query reference,
FlexAttention vs SDPA, w >= T == plain causal attention, gradients into GistNet. CPU, fp32."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanochat import gpt as G
from nanochat import attention as A
from nanochat.gpt import GPT, GPTConfig
from nanochat.attention import (attention, mega_attention_mask, mega_mask, mega_mask_mod, mega_num_summaries,
                                mega_summary_positions)
from megacontext.working_context import WorkingContext

V = 128


def perturb(module, std=0.05, seed=0):
    """init_weights() zeroes every output projection; give them values so that paths differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("c_proj.weight", "proj_out.weight", "head.weight")) or "lod_emb" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_mega(K=8, w=0, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(sequence_len=128, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
               megacontext=True, mc_block_size=K, gist_layers=1, lens_layers=1, mega_attn_window=w)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    model.init_weights()
    perturb(model, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


def tokens(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def visible_keys(i, T, w, K):
    """The spec, written out per query (independently of mega_mask_mod)."""
    S = mega_num_summaries(T, w, K)
    if i < T:
        start = max(0, i - w + 1) // K * K                  # the window's start, rounded down to a block
        keys = [j for j in range(T) if start <= j <= i]
        keys += [T + b for b in range(S) if (b + 1) * K <= start]           # blocks entirely before it
    else:
        b = i - T
        keys = list(range(b * K, (b + 1) * K)) + [i]
    return keys


LAYOUTS = [(64, 16, 8), (67, 16, 8), (100, 24, 8), (40, 7, 4), (33, 1, 4), (64, 64, 8), (64, 200, 8), (130, 50, 16)]

# ----------------------------------------------------------------------------- mask


@pytest.mark.parametrize("T,w,K", LAYOUTS)
def test_mask_matches_spec(T, w, K):
    m = mega_attention_mask(T, w, K)
    S = mega_num_summaries(T, w, K)
    assert m.shape == (T + S, T + S) and m.dtype == torch.bool
    for i in range(T + S):
        assert torch.nonzero(m[i]).flatten().tolist() == visible_keys(i, T, w, K), i


@pytest.mark.parametrize("T,w,K", LAYOUTS)
def test_mask_properties(T, w, K):
    m = mega_attention_mask(T, w, K)
    S = mega_num_summaries(T, w, K)
    ent = m[:T, :T]
    # no future leak among entries, and every query sees itself
    assert not torch.triu(ent, diagonal=1).any()
    assert m.diagonal().all()
    for b in range(S):
        end = (b + 1) * K                                   # exclusive end of block b
        col = m[:T, T + b]
        # a summary is never visible to queries at or before its block's end ...
        assert not col[:end].any()
        # ... and visible exactly once the (block-aligned) local window has passed the whole block
        for i in range(T):
            assert bool(col[i]) == (max(0, i - w + 1) // K * K >= end)
        # the summary's own row: its block and itself only (its K/V come from its block only)
        row = m[T + b]
        assert row[b * K:end].all() and row[T + b]
        assert row.sum() == K + 1
    # key count per entry query: (i+1 - start) local (w..w+K-1 once past w) + start/K summaries
    counts = ent.sum(1) + m[:T, T:].sum(1)
    for i in range(T):
        start = max(0, i - w + 1) // K * K
        assert counts[i] == (i + 1 - start) + start // K, (i, counts[i])
        assert min(i + 1, w) <= i + 1 - start <= min(i + 1, w + K - 1)
    # full coverage: every earlier entry is seen exactly once, in full or through its block's summary
    for i in range(T):
        start = max(0, i - w + 1) // K * K
        assert not ent[i, :start].any(), "entries inside far blocks are never seen in full detail"
        seen_by_summary = sum(K for b in range(S) if m[i, T + b])
        assert seen_by_summary == start and ent[i, start:i + 1].all()


def test_num_summaries_and_cost():
    assert mega_num_summaries(64, 64, 8) == 0 and mega_num_summaries(64, 100, 8) == 0
    assert mega_num_summaries(64, 16, 8) == 6
    # the design's example: W = 8192, w = 1024, K = 32: ~1,250 keys per query instead of 8,192
    T, w, K = 8192, 1024, 32
    assert w + (T - 1 - w + 1) // K == 1248


def test_summary_positions_follow_gaussian_convention():
    K, S = 4, 5
    T = S * K + 3
    pos = torch.arange(T)[None]
    ps, ss = mega_summary_positions(pos, None, K, S)
    wc = WorkingContext(K=K, W=64, max_level=2, tail=0, levels=[1] * S, indices=list(range(S)))
    wp, wsig = wc.positions("gaussian")
    np.testing.assert_allclose(ps[0].numpy(), wp, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ss[0].numpy(), wsig, rtol=0, atol=1e-12)
    # K LOD1 gists (gaussian positions) -> exactly their LOD2 parent's position and spread
    wc1 = WorkingContext(K=K, W=64, max_level=2, tail=0, levels=[1] * (K * 2), indices=list(range(K * 2)))
    p1, s1 = (torch.from_numpy(a)[None] for a in wc1.positions("gaussian"))
    ps2, ss2 = mega_summary_positions(p1, s1, K, 2)
    wc2 = WorkingContext(K=K, W=64, max_level=2, tail=0, levels=[2, 2], indices=[0, 1])
    p2, s2 = wc2.positions("gaussian")
    np.testing.assert_allclose(ps2[0].numpy(), p2, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ss2[0].numpy(), s2, rtol=0, atol=1e-9)

# ----------------------------------------------------------------------------- attention paths


def naive_attention(q, k, v, T, w, K):
    """Per-query loop with an explicit softmax over the spec's key set. q (B, L, H, D), k/v
    (B, L, Hkv, D)."""
    B, L, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    out = torch.zeros_like(q)
    for i in range(L):
        keys = torch.tensor(visible_keys(i, T, w, K))
        s = torch.einsum("bhd,bkhd->bhk", q[:, i], k[:, keys]) / math.sqrt(D)
        p = torch.exp(s - s.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
        out[:, i] = torch.einsum("bhk,bkhd->bhd", p, v[:, keys])
    return out


def qkv(T, w, K, B=2, H=4, Hkv=2, D=16, seed=0):
    L = T + mega_num_summaries(T, w, K)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, L, H, D, generator=g), torch.randn(B, L, Hkv, D, generator=g),
            torch.randn(B, L, Hkv, D, generator=g))


@pytest.mark.parametrize("T,w,K", [(67, 16, 8), (40, 7, 4), (64, 200, 8)])
def test_sdpa_path_matches_naive(T, w, K):
    q, k, v = qkv(T, w, K)
    y = attention(q, k, v, attn_mask=mega_mask(T, w, K, "cpu", "sdpa"))
    torch.testing.assert_close(y, naive_attention(q, k, v, T, w, K), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(A.create_block_mask is None, reason="no FlexAttention in this torch build")
@pytest.mark.parametrize("T,w,K", [(200, 40, 8)])  # L = 220: several 128-blocks, a ragged last one
def test_flex_path_matches_sdpa(T, w, K):
    """flex_attention runs forward-only on CPU in eager mode (unfused; "FlexAttention does not
    support backward on CPU"); on CUDA it is compiled and the backward is checked too."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(dev).requires_grad_(dev == "cuda") for t in qkv(T, w, K))
    bm = mega_mask(T, w, K, dev, "flex")
    assert isinstance(bm, A.BlockMask) and mega_mask(T, w, K, dev, "flex") is bm  # cached per layout
    y_flex = attention(q, k, v, attn_mask=bm)
    y_sdpa = attention(q, k, v, attn_mask=mega_mask(T, w, K, dev, "sdpa"))
    torch.testing.assert_close(y_flex, y_sdpa, atol=1e-5, rtol=1e-5)
    if dev == "cpu":
        return
    go = torch.randn_like(y_flex)
    g_flex = torch.autograd.grad(y_flex, (q, k, v), go)
    g_sdpa = torch.autograd.grad(y_sdpa, (q, k, v), go)
    for a, b in zip(g_flex, g_sdpa):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

# ----------------------------------------------------------------------------- model


def test_off_by_default_and_validation():
    assert GPTConfig().mega_attn_window == 0
    with pytest.raises(ValueError):
        GPTConfig(mega_attn_window=16)  # needs megacontext (GistNet)
    with pytest.raises(ValueError):
        GPTConfig(megacontext=True, mega_attn_window=16, mega_attn_impl="nope")


def test_window_covering_everything_is_plain_causal():
    model = tiny_mega(K=8, w=64)
    x = tokens(2, 64)
    ref = model(x, mega=0)
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)          # S = 0: exactly the plain model
    torch.testing.assert_close(model(x, mega=1000), ref, atol=0, rtol=0)
    # w < T: until the block-aligned window start passes entry 0 (query w+K-1), queries see
    # everything (plain causal); later ones do not
    for w in (56, 20):
        out, first = model(x, mega=w), w + 8 - 1
        torch.testing.assert_close(out[:, :first], ref[:, :first], atol=1e-5, rtol=1e-5)
        assert (out[:, first:] - ref[:, first:]).abs().amax(-1).min() > 1e-4


def test_model_sdpa_matches_naive_layers_and_flex():
    """Whole-model check: the SDPA path equals a forward that runs every layer through the naive
    reference; the flex path equals the SDPA path."""
    T, w, K = 72, 20, 8
    model = tiny_mega(K=K, w=w)
    x = tokens(2, T)
    out = model(x)
    assert out.shape == (2, T, V)
    orig = G.attention

    def naive(q, k, v, causal=True, attn_mask=None):
        return naive_attention(q, k, v, T, w, K)
    try:
        G.attention = naive
        ref = model(x)
    finally:
        G.attention = orig
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - model(x, mega=0)).abs().max() > 1e-3  # MegaAttention really changed something
    if A.create_block_mask is not None:
        model.config.mega_attn_impl = "flex"
        with torch.no_grad():  # FlexAttention has no backward on CPU (eager, unfused)
            torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)


def test_positions_broadcast_and_sigma():
    T, w, K = 48, 12, 8
    model = tiny_mega(K=K, w=w)
    x = tokens(3, T)
    pos = torch.arange(T)[None].float() * 2 + 5
    sig = torch.rand(3, T)
    a = model(x, pos=pos, sigma=sig)
    b = model(x, pos=pos.expand(3, T), sigma=sig)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.isfinite(a).all()


def test_gradients_reach_gistnet_and_only_window_has_loss():
    T, w, K = 64, 16, 8
    model = tiny_mega(K=K, w=w).train()
    x, y = tokens(2, T), tokens(2, T, seed=2)
    loss = model(x, y)
    per_tok = model(x, y, loss_reduction="none")
    assert per_tok.shape == (2 * T,)
    torch.testing.assert_close(loss, per_tok.mean())
    loss.backward()
    for name, p in model.gistnet.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"gistnet.{name} gets no gradient"
    assert model.lod_emb.weight.grad[1].abs().sum() > 0
    # a summary is only seen by entries after its block: the first w + K - 1 entries never see one,
    # so their loss has no gradient into GistNet
    model.zero_grad()
    per_tok.view(2, T)[:, : w + K - 1].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.gistnet.parameters())


def test_mega_with_cache_or_mask():
    model = tiny_mega(K=8, w=16)
    x = tokens(1, 40)
    with pytest.raises(ValueError):
        model(x, mega=16, attn_mask=torch.ones(40, 40, dtype=torch.bool).tril())
    # config-driven MegaAttention with an explicit mask: the caller's mask wins (plain attention)
    torch.testing.assert_close(model(x, attn_mask=torch.ones(40, 40, dtype=torch.bool).tril()),
                               model(x, mega=0), atol=1e-6, rtol=1e-6)
    torch.manual_seed(0)
    plain = GPT(GPTConfig(sequence_len=64, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    with pytest.raises(ValueError):
        plain(x, mega=16)  # no GistNet
