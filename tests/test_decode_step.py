"""
The decode step and its sampling (nanochat/decode_step.py): DecodeStep's slots and its emb_out
row; sample_next draws what torch.multinomial draws; the counter-based Sampler is pure, uniform
and follows softmax over the top-k; compiled steps and the compiled whole-window recompute leave
the attention GEMVs to cuBLAS and write the cache in place once; a step sees weights changed in
place and weights made under inference_mode. Split out of tests/test_engine.py.
"""
import numpy as np
import pytest
import torch

from nanochat.engine import Engine, MemorySession, DecodeStep
from test_engine import make_model, ATOL, W, V


def test_decode_step_slots():
    model = make_model(mc=False)
    eng, ids = Engine(model), torch.from_numpy(np.random.default_rng(0).integers(0, V, (1, 8)))
    cache = eng.new_cache(1, 8)
    eng.prefill(ids[:, :7], cache)
    step = DecodeStep(model, cache)
    with torch.no_grad():
        torch.testing.assert_close(step(ids[:, 7:], 7), model(ids)[:, -1], atol=ATOL, rtol=0)
        assert cache.pos == 8 and cache.slot is None   # as a dynamic forward leaves the cache
        with pytest.raises(ValueError, match="outside the KV cache"):
            step(ids[:, :1], 8)
        # an earlier slot: as truncate there, then decode (MemorySession after an edit)
        torch.testing.assert_close(step(ids[:, 3:4], 3), model(ids[:, :4])[:, -1], atol=ATOL, rtol=0)
        assert cache.pos == 4
        with pytest.raises(ValueError, match="gap"):
            step(ids[:, :1], 6)
        # the step bumps its own device slot: the next slot needs no refill, an earlier one does
        torch.testing.assert_close(step(ids[:, 4:5], 4), model(ids[:, :5])[:, -1], atol=ATOL, rtol=0)
        torch.testing.assert_close(step(ids[:, 5:6], 5), model(ids[:, :6])[:, -1], atol=ATOL, rtol=0)
        torch.testing.assert_close(step(ids[:, 2:3], 2), model(ids[:, :3])[:, -1], atol=ATOL, rtol=0)
        assert cache.pos == 3 and int(step.slot) == 3


def test_decode_step_writes_the_token_row_into_emb_out():
    """MemorySession's steps take token ids and DecodeStep writes the token's embedding into the
    window buffer (emb_out) itself: exactly entry_embeddings at LOD0; an embedding input writes nothing."""
    model = make_model()
    cache = Engine(model).new_cache(1, 16)
    emb = torch.zeros(16, model.config.n_embd)
    step = DecodeStep(model, cache, emb_out=emb)
    with torch.no_grad():
        ref = model.entry_embeddings(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[5, 9, 2]]),
                                     torch.zeros(1, 3, model.config.n_embd))[0]
        for j, t in enumerate((5, 9, 2)):
            step(torch.tensor([[t]]), j)
        assert torch.equal(emb[:3], ref) and not emb[3:].any()
        step(ref[1][None, None], 3)   # an embedding: the caller wrote its row
        assert not emb[3].any()
        with pytest.raises(ValueError, match="one token per step"):
            DecodeStep(model, Engine(model).new_cache(2, 16), emb_out=emb)(torch.tensor([[1], [2]]), 0)


def test_sample_next_draws_what_multinomial_draws():
    """sample_next's sync-free draw (_multinomial1) gives torch.multinomial's ids and leaves the
    generator where multinomial leaves it, with and without top-k."""
    from nanochat.engine import sample_next

    def reference(logits, rng, temperature, top_k):
        logits = logits / temperature
        if top_k:
            vals, idx = torch.topk(logits, top_k, dim=-1)
            return idx.gather(-1, torch.multinomial(torch.softmax(vals, dim=-1), 1, generator=rng))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng)
    for seed in range(20):
        logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(100 + seed)) * 3
        for temperature, top_k in ((1.0, None), (0.7, 50), (1.3, 1)):
            a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            got = sample_next(logits, a, temperature, top_k)
            assert torch.equal(got, reference(logits, b, temperature, top_k)), (seed, temperature, top_k)
            assert torch.equal(a.get_state(), b.get_state())
    assert torch.equal(sample_next(logits, None, 0.0), logits.argmax(-1, keepdim=True))


def test_counter_sampler_is_pure_uniform_and_respects_top_k():
    """decode_step.Sampler: uniforms from a hash of (seed, draw, index). The same state gives the
    same uniforms, another draw or seed others; they are uniform (moments, bins, neighbours
    uncorrelated); inverse-CDF draws follow softmax(logits / T) over the top-k tokens (chi-square),
    never leave the top-k, and temperature 0 is argmax. Each call advances the draw counter by one."""
    from nanochat.decode_step import counter_uniform, sample_counter, Sampler, _mul32
    x = torch.tensor([0, 1, 0xFFFFFFFF, 0x12345678], dtype=torch.int64)
    for c in (0x7FEB352D, 0x846CA68B):   # the overflow-free 32-bit multiply
        assert _mul32(x, c).tolist() == [(int(v) * c) % 2**32 for v in x]
    st = torch.tensor([42, 7])
    u = counter_uniform(st, (4, 5000))
    assert torch.equal(u, counter_uniform(st.clone(), (4, 5000))) and u.dtype == torch.float64
    # a CPU draw computes the same values with Python ints
    assert torch.equal(counter_uniform(st, (1, 64)), u.flatten()[:64].view(1, 64))
    assert not torch.equal(u, counter_uniform(torch.tensor([42, 8]), (4, 5000)))
    assert not torch.equal(u, counter_uniform(torch.tensor([43, 7]), (4, 5000)))
    f = u.flatten()
    assert 0 < f.min() and f.max() < 1
    assert abs(f.mean() - 0.5) < 0.01 and abs(f.var() - 1 / 12) < 0.003
    counts = torch.histc(f, bins=20, min=0, max=1)
    assert ((counts - len(f) / 20).abs() < 5 * (len(f) / 20) ** 0.5).all()
    assert abs(torch.corrcoef(torch.stack([f[:-1], f[1:]]))[0, 1]) < 0.03
    firsts = torch.stack([counter_uniform(torch.tensor([0, d]), (1,))[0] for d in range(2000)])
    assert abs(firsts.mean() - 0.5) < 0.03   # consecutive draws at one index are uniform too
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    for temperature, top_k in ((1.0, None), (0.7, 3)):
        s = Sampler(5, "cpu")
        draws = torch.cat([s(logits, temperature, top_k) for _ in range(6000)]).flatten()
        assert s.draws == 6000 and s.state.tolist() == [5, 6000]
        p = torch.softmax(logits[0] / temperature, -1)
        if top_k:
            p[top_k:] = 0
            p = p / p.sum()
            assert draws.max() < top_k
        obs = torch.bincount(draws, minlength=6).float()
        exp = p * len(draws)
        live = exp > 0
        chi2 = ((obs[live] - exp[live]) ** 2 / exp[live]).sum()
        assert chi2 < 25, (temperature, top_k, obs.tolist(), exp.tolist())   # df <= 5: p < 1e-3
    assert sample_counter(logits, st, 0.0).item() == 0
    s1, s2, s3 = Sampler(9, "cpu"), Sampler(9, "cpu"), Sampler(10, "cpu")
    seq = [int(s1(logits)) for _ in range(50)]
    assert seq == [int(s2(logits)) for _ in range(50)] != [int(s3(logits)) for _ in range(50)]
    shared = {}   # a session's Samplers share their calls: a new seed reuses them, and draws its own stream
    a, b = Sampler(9, "cpu", fns=shared), Sampler(9, "cpu", fns=shared)
    assert [int(a(logits)) for _ in range(50)] == seq and len(shared) == 1
    assert [int(b(logits)) for _ in range(50)] == seq and len(shared) == 1
    for bad in ((-0.5, None), (float("nan"), None), (float("inf"), None), (1.0, -3)):
        with pytest.raises(ValueError, match="temperature"):
            s1(logits, *bad)
    assert s1.draws == 50   # a refused call draws nothing


def test_compiled_decode_step_leaves_the_attention_gemvs_to_cublas():
    """decode="compiled": Inductor would fold decode_attention's single-query bmms into its own
    reduction loops (one program per head walking all keys, the pattern that made SDPA's kernel
    slow here), so they are an opaque op (nanochat::decode_bmm), two per layer, inside one graph.
    A graph break per layer instead made dynamo recompile the layers' frames up to its cache limit
    and run the rest eagerly (H200, --step-breakdown): the trace breaks only at rotary_cos_sin."""
    import torch._dynamo as dynamo
    from nanochat.engine import DecodeStep
    model = make_model(mc=False)
    engine = Engine(model, decode="compiled")
    cache = engine.new_cache(1, 32)
    engine.prefill(torch.randint(0, V, (1, 8)), cache)
    step = DecodeStep(model, cache)
    cache.slot = torch.tensor([cache.pos])
    dynamo.reset()
    with torch.no_grad():
        ex = dynamo.explain(step._forward)(torch.tensor([[1]]), None, None)
    cache.slot = None
    reasons = [str(b.reason) for b in ex.break_reasons]
    assert all("rotary_cos_sin" in r for r in reasons) and len(reasons) <= 1, reasons
    bmms = sum(str(n.target) == "nanochat.decode_bmm.default" for g in ex.graphs for n in g.graph.nodes)
    assert bmms == 2 * model.config.n_layer, bmms
    cats = sum("cat" in str(n.target) for g in ex.graphs for n in g.graph.nodes)
    assert cats == 2, f"{cats} cats: rotary_tables' two, and no per-layer stack of the q/k/v weights"
    dynamo.reset()


def test_compiled_decode_step_writes_one_cache_entry_not_the_whole_cache():
    """Inductor functionalized the static step's index_copy_ into a view of the cache as a copy of
    the whole layer's cache, in every layer (H200, d20, 4k entries: a 4.6 ms step against 1.8 ms
    eager). The write is its own op (nanochat::cache_write), so the generated code has no loop
    over a layer's cache (a distinctive length makes the bound findable)."""
    import re
    import torch._dynamo as dynamo
    from torch._inductor.utils import run_and_get_code
    from nanochat.engine import DecodeStep
    model = make_model(mc=False)
    engine = Engine(model)
    cache = engine.new_cache(1, 97)
    engine.prefill(torch.randint(0, V, (1, 8)), cache)
    step = DecodeStep(model, cache, compile=True)
    step(torch.tensor([[1]]), cache.pos)           # refreshes the q/k/v stack, as every call does
    dynamo.reset()
    cache.slot = torch.tensor([cache.pos])
    with torch.no_grad():
        _, codes = run_and_get_code(torch.compile(step._forward, dynamic=False), torch.tensor([[1]]), None, None)
    cache.slot = None
    code = "\n".join(codes)
    layer = cache.k[0].numel()
    assert "nanochat.cache_write" in code
    assert not re.search(rf"\b{layer}L\b|numel = {layer}\b", code), "a loop over a whole layer's cache"
    dynamo.reset()


def test_compiled_window_recompute_writes_the_cache_in_place_once():
    """The whole-window recompute (a compiled multi-entry forward) writes each layer's K/V with
    nanochat::cache_write_at: a slice assignment there was functionalized into per-layer buffers
    copied into the cache at the graph's end (H200, d20, W=4096: ~0.3 ms copy kernels among the
    recompute's Inductor time). The compiled cache and logits equal the eager forward's."""
    import torch._dynamo as dynamo
    from torch._inductor.utils import run_and_get_code
    model = make_model()
    s = MemorySession(model, W=W)
    s.ingest(np.random.default_rng(3).integers(0, V, 90))
    s.refocus()
    E = len(s)
    s.logits()   # eager: the reference cache and logits
    ref_k, ref_v, ref = s.cache.k[:, :, :E].clone(), s.cache.v[:, :, :E].clone(), s.logits().clone()
    s.cache.k.zero_()
    s.cache.v.zero_()
    dynamo.reset()
    pos, last = torch.arange(W)[None], torch.tensor([E - 1])
    s.cache.truncate(0)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(s._window_fn, dynamic=False), s.emb[None], pos, None, last)
    code = "\n".join(codes)
    assert code.count("nanochat.cache_write_at.default(") == 2 * model.config.n_layer
    assert "setitem" not in code, "a functionalized slice assignment into the cache"
    torch.testing.assert_close(s.cache.k[:, :, :E], ref_k, atol=ATOL, rtol=0)
    torch.testing.assert_close(s.cache.v[:, :, :E], ref_v, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.reshape(-1), ref, atol=ATOL, rtol=0)
    s.close()
    dynamo.reset()


def test_decode_with_a_model_made_under_inference_mode():
    """Weights made under torch.inference_mode keep no version counter: the q/k/v stack and
    DecodeStep's change check must still work (chat_web serves inside inference_mode)."""
    with torch.inference_mode():
        model = make_model(mc=False)
        out = Engine(model).generate_batch([1, 2, 3], max_tokens=4, temperature=0.0)
    assert model.transformer.h[0].attn.c_q.weight.is_inference()
    assert out == Engine(make_model(mc=False)).generate_batch([1, 2, 3], max_tokens=4, temperature=0.0)


@pytest.mark.parametrize("decode", ["static", "compiled"])
def test_decode_sees_weights_changed_in_place(decode):
    """The one-GEMM inference path reads a cached stack of c_q/c_k/c_v (qkv_weight). An in-place
    update (an optimizer step, load_state_dict) must reach the next prefill and the next decode
    step, also a compiled one, which reads the cache as it is (DecodeStep refreshes it)."""
    from nanochat.engine import DecodeStep
    model = make_model(mc=False)
    eng, ids = Engine(model), torch.from_numpy(np.random.default_rng(0).integers(0, V, (1, 8)))
    cache = eng.new_cache(1, 8)
    step = DecodeStep(model, cache, compile=decode == "compiled")
    with torch.no_grad():
        eng.prefill(ids[:, :6], cache)
        torch.testing.assert_close(step(ids[:, 6:7], 6), model(ids[:, :7])[:, -1], atol=ATOL, rtol=0)
        for blk in model.transformer.h:
            blk.attn.c_k.weight.mul_(1.5)
            blk.attn.c_v.weight.add_(0.05)
        want = model(ids)[:, -1]      # no KV cache: reads the parameters themselves
        cache.truncate(0)
        for i in range(8):            # only decode steps: no eager KV-cached forward refreshes the stack first
            got = step(ids[:, i:i + 1], i)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_to_device_takes_arrays_lists_and_tensors():
    """common.to_device, the decode loop's host->device copy: a numpy array, a list of arrays
    (concatenated in order) and a CPU tensor arrive with their values and dtypes."""
    from nanochat.common import to_device
    a, b = np.arange(3, dtype=np.int64), np.arange(10, 12, dtype=np.int64)
    assert to_device(a, "cpu").tolist() == [0, 1, 2]
    assert to_device([a, b], "cpu").tolist() == [0, 1, 2, 10, 11]
    g = np.ones((2, 4), np.float16)
    out = to_device([g, 2 * g], "cpu")
    assert out.dtype == torch.float16 and out.shape == (4, 4) and out[2:].eq(2).all()
    t = torch.tensor([[1.5]])
    assert torch.equal(to_device(t, torch.device("cpu")), t)
