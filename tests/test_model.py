"""The model (nanochat/gpt.py) and generation (nanochat/engine.py) on tiny CPU models, in fp32.

init_weights() zero-initialises every output projection, which makes each residual branch the
identity: a KV-cache or attention bug would then be invisible. `perturb` gives those projections
random values first wherever a test compares two computation paths."""
import math

import pytest
import torch

import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig, apply_rotary, rotary_tables, GistNet, LensNet, rotary_cos_sin, lens_features, LENS_FEATURES
from nanochat.attention import KVCache, attention, decode_attention, _avoid_cudnn
from nanochat.engine import Engine

V = 128  # vocab of the tiny models


def perturb(module, std=0.05, seed=0):
    """Give every zero-initialised projection (c_proj, GistNet proj_out, LensNet head) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("c_proj.weight", "proj_out.weight", "head.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_gpt(seed=0, perturbed=True, **kw):
    torch.manual_seed(seed)
    cfg = dict(sequence_len=64, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    model.init_weights()
    if perturbed:
        perturb(model, seed=seed)
        with torch.no_grad():  # larger logits than the 0.001 init, so argmax/samples are not near-ties
            model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


def tokens(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def new_cache(model, B, T):
    c = model.config
    return KVCache(B, c.n_kv_head, T, c.n_embd // c.n_head, c.n_layer, "cpu", torch.float32)

# ----------------------------------------------------------------------------- forward / backward


def test_forward_backward_shapes_and_finite_grads():
    model = tiny_gpt().train()
    x, y = tokens(3, 32), tokens(3, 32, seed=2)
    assert model(x).shape == (3, 32, V)
    loss = model(x, y)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"
    per_token = model(x, y, loss_reduction="none")
    assert per_token.shape == (3 * 32,) and torch.allclose(per_token.mean(), loss)


def test_init_loss_is_uniform_and_ignore_index():
    model = tiny_gpt(perturbed=False)
    x, y = tokens(2, 32), tokens(2, 32, seed=2)
    assert abs(model(x, y).item() - math.log(V)) < 0.05, "the small lm_head init gives ~uniform predictions"
    model = tiny_gpt()
    y_masked = y.clone()
    y_masked[:, ::2] = -1
    per_token = model(x, y, loss_reduction="none").view(2, 32)
    torch.testing.assert_close(model(x, y_masked), per_token[:, 1::2].mean())


@pytest.mark.parametrize("n_kv_head", [2, 1])  # GQA and MQA
def test_gqa_equals_mha_with_shared_kv_heads(n_kv_head):
    """A GQA model equals the MHA model whose K/V heads are copies of the shared ones: query head h
    uses kv head h // (n_head / n_kv_head)."""
    gqa = tiny_gpt(n_kv_head=n_kv_head)
    mha = tiny_gpt(n_kv_head=4)
    sd = gqa.state_dict()
    g, D = 4 // n_kv_head, 64 // 4
    for k in list(sd):
        if k.endswith(("c_k.weight", "c_v.weight")):
            sd[k] = sd[k].view(n_kv_head, D, 64).repeat_interleave(g, dim=0).reshape(64, 64)
    mha.load_state_dict(sd)
    x = tokens(2, 32)
    out = gqa(x)
    assert out.shape == (2, 32, V) and torch.isfinite(out).all()
    torch.testing.assert_close(out, mha(x), atol=1e-5, rtol=1e-5)


def test_embeds_path_equals_idx_path():
    model = tiny_gpt()
    x = tokens(2, 24)
    assert torch.equal(model(embeds=model.embed(x)), model(x))


def test_explicit_pos_equals_default():
    model = tiny_gpt()
    x = tokens(2, 24)
    ref = model(x)
    assert torch.equal(model(x, pos=torch.arange(24)[None]), ref)
    assert torch.equal(model(x, pos=torch.arange(24).float()[None].expand(2, -1)), ref)
    assert not torch.allclose(model(x, pos=torch.arange(24)[None] + 5), ref), "positions must matter"


def test_logit_softcap_bounds_logits():
    model = tiny_gpt()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 50.0)
    logits = model(tokens(2, 16))
    cap = model.config.softcap
    assert logits.abs().max() <= cap and logits.abs().max() > 0.9 * cap
    uncapped = tiny_gpt(softcap=0.0)
    uncapped.load_state_dict(model.state_dict())
    assert uncapped(tokens(2, 16)).abs().max() > 2 * cap

# ----------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_rotary_sigma_zero_is_plain_rope_bit_for_bit(dtype):
    pos = torch.arange(0, 5000, 37)[None]
    plain = rotary_cos_sin(pos, 32, 10000.0, dtype=dtype)
    zero = rotary_cos_sin(pos, 32, 10000.0, sigma=torch.zeros(pos.shape), dtype=dtype)
    assert plain[0].shape == (1, pos.size(1), 1, 16)
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])
    floats = rotary_cos_sin(pos.double(), 32, 10000.0, dtype=dtype)  # float positions, same values
    assert torch.equal(plain[0], floats[0]) and torch.equal(plain[1], floats[1])


def test_rotary_damping_is_gaussian():
    head_dim, base = 32, 10000.0
    pos = torch.tensor([[0.0, 15.5, 511.5, 16383.5]])
    sigma = torch.tensor([[0.0, 32 / math.sqrt(12), 1024 / math.sqrt(12), 32768 / math.sqrt(12)]])
    cos0, sin0 = rotary_cos_sin(pos, head_dim, base, dtype=torch.float64)
    cos, sin = rotary_cos_sin(pos, head_dim, base, sigma=sigma, dtype=torch.float64)
    omega = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    damp = torch.exp(-0.5 * (omega * sigma.double()[..., None]) ** 2)[:, :, None, :]
    torch.testing.assert_close(cos, cos0 * damp, atol=1e-12, rtol=0)
    torch.testing.assert_close(sin, sin0 * damp, atol=1e-12, rtol=0)
    assert (damp[0, 1:, 0, 0] < 1e-3).all() and (damp[0, 1:3, 0, -1] > 0.5).all(), \
        "wide spans lose the fast rotary channels and keep the slow ones"

# ----------------------------------------------------------------------------- KV cache


def test_kv_cached_decode_equals_full_recompute():
    model = tiny_gpt()  # GQA: 4 query heads, 2 kv heads
    B, T, P = 2, 40, 11
    x = tokens(B, T)
    with torch.no_grad():
        full = model(x)
        cache = new_cache(model, B, T)
        torch.testing.assert_close(model(x[:, :P], kv_cache=cache), full[:, :P], atol=1e-5, rtol=0)
        assert cache.pos == P
        for t in range(P, T):  # decode one token at a time
            torch.testing.assert_close(model(x[:, t:t + 1], kv_cache=cache)[:, 0], full[:, t], atol=1e-5, rtol=0)
        assert cache.pos == T
        for j in (30, 17, 1):  # an edit at entry j: drop entries >= j, recompute from j in one chunk
            cache.truncate(j)
            torch.testing.assert_close(model(x[:, j:], kv_cache=cache), full[:, j:], atol=1e-5, rtol=0)
            assert cache.pos == T
        cache.truncate(20)  # a chunk that does not reach the end of the cache's capacity
        torch.testing.assert_close(model(x[:, 20:28], kv_cache=cache), full[:, 20:28], atol=1e-5, rtol=0)
        # the check is meaningful: a wrong cache (other tokens before j) gives other logits
        bad = new_cache(model, B, T)
        model(tokens(B, 10, seed=9), kv_cache=bad)
        assert (model(x[:, 10:], kv_cache=bad) - full[:, 10:]).abs().max() > 1e-3


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_inference_qkv_path_equals_the_training_path(n_kv_head):
    """A KV-cached forward stacks c_q/c_k/c_v into one GEMM and runs one QK norm and one rotary over
    the q and k heads; it must give what the three-projection path (no cache) gives, for MHA, GQA
    and MQA, and it must read the live weights (no stale copy after they change)."""
    model = tiny_gpt(n_kv_head=n_kv_head)
    x = tokens(2, 24)
    with torch.no_grad():
        cached = model(x, kv_cache=new_cache(model, 2, 24))
        torch.testing.assert_close(cached, model(x), atol=1e-5, rtol=0)
        w = model.transformer.h[0].attn.c_k.weight  # a new direction: QK norm undoes a rescale
        w.add_(0.2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))
        changed = model(x, kv_cache=new_cache(model, 2, 24))
        torch.testing.assert_close(changed, model(x), atol=1e-5, rtol=0)
    assert (changed - cached).abs().max() > 1e-3


@pytest.mark.parametrize("n_kv_head,batch", [(4, 1), (2, 1), (1, 3)])
def test_decode_attention_equals_sdpa(n_kv_head, batch):
    """The one-query GEMV path against SDPA, with GQA, a batch and a mask over the cache (the
    static decode's layout), reading K/V as slices of a (B, L, Hkv, D) cache."""
    g = torch.Generator().manual_seed(0)
    H, D, L, Tk = 4, 16, 40, 29
    q = torch.randn(batch, 1, H, D, generator=g)
    cache_k, cache_v = (torch.randn(batch, L, n_kv_head, D, generator=g) for _ in range(2))
    rep = lambda t: t.transpose(1, 2).repeat_interleave(H // n_kv_head, dim=1)  # noqa: E731
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), rep(cache_k[:, :Tk]), rep(cache_v[:, :Tk])).transpose(1, 2)
    torch.testing.assert_close(decode_attention(q, cache_k[:, :Tk], cache_v[:, :Tk]), ref, atol=1e-5, rtol=1e-5)
    mask = (torch.arange(L) < Tk)[None, None, None]   # the masked tail must not count, whatever it holds
    torch.testing.assert_close(decode_attention(q, cache_k, cache_v, mask), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(decode_attention(q, cache_k, cache_v), ref, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_roll_form_is_bit_identical_to_the_half_split_form(dtype):
    x = torch.randn(2, 5, 3, 16, dtype=dtype)
    cos, sin = rotary_cos_sin(torch.arange(5)[None] * 37, 16, 10000.0, dtype=dtype)
    x1, x2 = x[..., :8], x[..., 8:]
    ref = torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)
    assert torch.equal(apply_rotary(x, *rotary_tables(cos, sin)), ref)


def test_decode_attention_float_bias_equals_bool_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 1, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    keep = torch.arange(9) <= 5
    bias = torch.zeros(9).masked_fill(~keep, float("-inf"))
    a = decode_attention(q, k, v, keep[None, None, None])
    assert torch.equal(decode_attention(q, k, v, bias[None, None, None]), a)
    assert torch.equal(decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias[None, None, None]),
                       decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), keep[None, None, None]))
    assert not torch.allclose(decode_attention(q, k, v), a, atol=1e-3)


def test_cudnn_attention_only_for_training_shapes():
    """cuDNN SDPA builds a plan per new shape (28 ms of CPU for a recompute or LensNet call on an
    H100): inference and KV-cached calls must exclude it; training keeps SDPA's default choice."""
    from types import SimpleNamespace
    gpu, mask = SimpleNamespace(is_cuda=True), torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert not _avoid_cudnn(gpu, 64, 64, None)                 # training forward (grad on)
    assert _avoid_cudnn(gpu, 8, 64, None) and _avoid_cudnn(gpu, 4, 4, mask)  # chunked prefill, masks
    with torch.no_grad():
        assert _avoid_cudnn(gpu, 64, 64, None)                 # a full-window recompute, LensNet
    with torch.inference_mode():
        assert _avoid_cudnn(gpu, 64, 64, None)
    assert not _avoid_cudnn(SimpleNamespace(is_cuda=False), 8, 64, None)  # CPU has no cuDNN SDPA
    from nanochat.attention import fixed_shape
    with torch.no_grad(), fixed_shape():   # a forward whose shape never changes may (window_cudnn)
        assert not _avoid_cudnn(gpu, 64, 64, None)
        assert _avoid_cudnn(gpu, 8, 64, None) and _avoid_cudnn(gpu, 4, 4, mask)
    with torch.no_grad():
        assert _avoid_cudnn(gpu, 64, 64, None)   # and only inside


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_chunked_prefill_attention_is_lower_right_causal(n_kv_head):
    """Tq < Tk queries are the last Tq positions: each sees the keys up to its own position."""
    g = torch.Generator().manual_seed(0)
    H, D, Tq, Tk = 4, 16, 5, 12
    q = torch.randn(1, Tq, H, D, generator=g)
    k, v = (torch.randn(1, Tk, n_kv_head, D, generator=g) for _ in range(2))
    rep = lambda t: t.transpose(1, 2).repeat_interleave(H // n_kv_head, dim=1)  # noqa: E731
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), rep(k), rep(v), attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(attention(q, k, v), ref, atol=1e-5, rtol=1e-5)
    top_left = F.scaled_dot_product_attention(q.transpose(1, 2), rep(k), rep(v), is_causal=True).transpose(1, 2)
    assert not torch.allclose(attention(q, k, v), top_left, atol=1e-3)


def test_kv_cache_errors():
    model = tiny_gpt()
    cache = new_cache(model, 1, 8)
    with torch.no_grad():
        model(tokens(1, 6), kv_cache=cache)
        with pytest.raises(ValueError, match="overflow"):
            model(tokens(1, 3), kv_cache=cache)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(7)
    # with autograd on, the in-place cache writes would chain every step's graph to the cache
    # (bench_decode's full-attention loop ran out of H100 memory that way): a clear error instead
    cache = new_cache(model, 1, 8)
    with pytest.raises(RuntimeError, match="no_grad"):
        model(tokens(1, 2), kv_cache=cache)
    assert cache.pos == 0 and not cache.k.requires_grad


def test_expand_batch_then_decode_rows_independently():
    model = tiny_gpt()
    prompt, conts = tokens(1, 9), tokens(3, 5, seed=4)
    with torch.no_grad():
        cache = new_cache(model, 1, 14)
        model(prompt, kv_cache=cache)
        cache.expand_batch(3)
        for t in range(5):
            out = model(conts[:, t:t + 1], kv_cache=cache)[:, 0]
            full = model(torch.cat([prompt.expand(3, -1), conts[:, :t + 1]], dim=1))[:, -1]
            torch.testing.assert_close(out, full, atol=1e-5, rtol=0)

# ----------------------------------------------------------------------------- Engine


def test_greedy_is_deterministic_and_the_argmax_of_a_full_forward():
    model = tiny_gpt()
    engine, prompt = Engine(model), tokens(1, 7)[0].tolist()
    out = engine.generate_batch(prompt, max_tokens=12, temperature=0.0)
    assert len(out) == 1 and len(out[0]) == 12
    assert engine.generate_batch(prompt, max_tokens=12, temperature=0.0, seed=123) == out
    seq = list(prompt)
    with torch.no_grad():
        for t in out[0]:
            assert model(torch.tensor([seq]))[0, -1].argmax().item() == t
            seq.append(t)
    assert engine.generate_batch(prompt, max_tokens=12, temperature=1.0, top_k=1) == out, "top-1 sampling is greedy"
    rows = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=0.0)
    assert rows == out * 3, "batched greedy rows equal the single-row greedy"


def test_seed_reproduces_a_temperature_sample():
    engine, prompt = Engine(tiny_gpt()), tokens(1, 5)[0].tolist()
    a = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, seed=7)
    assert len(a) == 4 and all(len(r) == 10 for r in a)
    assert len({tuple(r) for r in a}) > 1, "rows are sampled independently"
    assert engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, seed=7) == a
    assert engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, seed=8) != a
    k3 = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, top_k=3, seed=7)
    assert k3 == engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, top_k=3, seed=7)


def test_stop_tokens_end_rows():
    engine = Engine(tiny_gpt(vocab_size=6))  # tiny vocab: every row soon samples the stop token
    prompt, stop, n, max_tokens = [1, 2, 3], 4, 5, 60
    steps = list(engine.generate(prompt, num_samples=n, max_tokens=max_tokens, temperature=1.0, seed=3,
                                 stop_tokens=[stop]))
    assert len(steps) < max_tokens and all(steps[-1][1]), "generation ends once every row has stopped"
    for i in range(n):
        col = [c[i] for c, _ in steps]
        done = [d[i] for _, d in steps]
        first = col.index(stop)
        assert done == [False] * first + [True] * (len(steps) - first), "a row is done from its stop token on"
    rows = engine.generate_batch(prompt, num_samples=n, max_tokens=max_tokens, temperature=1.0,
                                               seed=3, stop_tokens=[stop])
    for i, row in enumerate(rows):
        col = [c[i] for c, _ in steps]
        assert row == col[:col.index(stop)], "generate_batch keeps a row's tokens before its stop token"
    # greedy with its own first token as the stop token: one step, nothing returned
    first = engine.generate_batch(prompt, max_tokens=5, temperature=0.0)[0][0]
    assert engine.generate_batch(prompt, max_tokens=5, temperature=0.0, stop_tokens=[first]) == [[]]


def test_engine_rejects_bad_requests():
    engine = Engine(tiny_gpt())  # sequence_len 64
    with pytest.raises(ValueError, match="exceeds"):
        engine.generate_batch(list(range(60)), max_tokens=10)
    with pytest.raises(ValueError, match="exceeds"):
        engine.generate_batch(list(range(65)), max_tokens=0)
    with pytest.raises(ValueError):
        engine.generate_batch([], max_tokens=3)
    assert len(engine.generate_batch(list(range(54)), max_tokens=10, temperature=0.0)[0]) == 10  # exactly fits

# ----------------------------------------------------------------------------- GistNet / LensNet


def mc_config(**kw):
    return GPTConfig(**dict(dict(sequence_len=64, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=64,
                                 megacontext=True, mc_block_size=8, gist_layers=2, lens_layers=2), **kw))


def mc_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(mc_config())
    model.init_weights()
    perturb(model, std=0.1, seed=seed)
    return model.eval()


def test_gistnet_starts_as_mean_pooling():
    model = GPT(mc_config())
    model.init_weights()
    children = torch.randn(3, 8, 64)
    torch.testing.assert_close(model.gistnet(children, 1), children.mean(dim=1))


def test_gistnet_output_depends_on_every_child_and_the_level():
    gist = mc_model().gistnet
    K = gist.K
    children = torch.randn(2, K, 64, requires_grad=True)
    out = gist(children, 1)
    assert out.shape == (2, 64)
    # the learned part (beyond the mean-pooling prior) must see every child
    (out - children.mean(dim=1)).pow(2).sum().backward()
    per_child = children.grad.abs().sum(dim=-1)  # (n, K)
    assert (per_child > 0).all(), f"children with no influence on the gist: {(per_child == 0).nonzero().tolist()}"
    with torch.no_grad():
        assert not torch.allclose(gist(children, 1), gist(children, 2)), "the level embedding must matter"
        other = children.clone()
        other[:, 3] += 1.0
        delta = gist(other, 1) - gist(children, 1) - (other - children).mean(dim=1)
        assert delta.abs().max() > 1e-4, "changing one child changes the learned part of its gist"
        assert torch.allclose(gist(children[:1], 2), gist(children, 2)[:1], atol=1e-6), "blocks are independent"


def lens_inputs(B=2, E=6, t=4, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, E, D, generator=g)
    level = torch.randint(0, 3, (B, E), generator=g)
    widths = 8 ** level
    starts = torch.cumsum(widths, dim=1) - widths
    feat = lens_features(starts, widths, (starts + widths)[:, -1:])
    tail = torch.randn(B, t, D, generator=g)
    valid = torch.ones(B, E, dtype=torch.bool)
    valid[1, 4:] = False
    level = level.masked_fill(~valid, -1)
    assert feat.shape == (B, E, LENS_FEATURES)
    return emb, level, feat, tail, valid


def test_lensnet_scores_depend_on_the_tail_and_are_zero_at_padding():
    lens = mc_model().lensnet
    emb, level, feat, tail, valid = lens_inputs()
    tail.requires_grad_(True)
    scores = lens(emb, level, feat, tail, valid)
    assert scores.shape == (2, 6) and scores.dtype == torch.float32
    assert (scores[~valid] == 0).all() and (scores[valid] != 0).all()
    scores[0].sum().backward()
    per_tail = tail.grad[0].abs().sum(dim=-1)
    assert (per_tail > 0).all(), "every recent tail token influences the scores"
    assert (tail.grad[1] == 0).all(), "rows of the batch are independent"
    with torch.no_grad():
        other = tail.detach().clone()
        other[0] = torch.randn(4, 64)
        changed = lens(emb, level, feat, other, valid)
        assert ((changed[0] - scores[0]).abs() > 1e-5).all()
        torch.testing.assert_close(changed[1], scores[1].detach(), atol=1e-6, rtol=0)


def test_lensnet_padding_values_do_not_affect_valid_scores():
    lens = mc_model().lensnet
    emb, level, feat, tail, valid = lens_inputs()
    with torch.no_grad():
        ref = lens(emb, level, feat, tail, valid)
        emb2, level2, feat2 = emb.clone(), level.clone(), feat.clone()
        emb2[~valid] = 100 * torch.randn(int((~valid).sum()), 64)
        level2[~valid] = 2
        feat2[~valid] = 5.0
        out = lens(emb2, level2, feat2, tail, valid)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert (out[~valid] == 0).all()


def test_lensnet_is_permutation_equivariant_over_entries():
    lens = mc_model().lensnet
    emb, level, feat, tail, valid = lens_inputs()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        ref = lens(emb, level, feat, tail, valid)
        out = lens(emb[:, perm], level[:, perm], feat[:, perm], tail, valid[:, perm])
    torch.testing.assert_close(out, ref[:, perm], atol=1e-5, rtol=1e-5)


def test_chunked_loss_equals_the_whole_loss_and_its_gradients():
    """model.loss_chunk scores the training loss a chunk of rows at a time (recomputing each
    chunk's logits in the backward): same loss, same gradients, also with ignored targets."""
    x, y = tokens(3, 20), tokens(3, 20, seed=2)
    y[0, :5] = -1
    grads = []
    for chunk in (0, 7):
        model = tiny_gpt()
        model.loss_chunk = chunk
        loss = model(x, y)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1, atol=1e-6) and g0.keys() == g1.keys()
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6) for n in g0)
    model.loss_chunk = 7
    with torch.no_grad():                                         # eval: the plain path
        assert torch.allclose(model(x, y), l0, atol=1e-6)
        assert model(x).shape == (3, 20, V)
