"""
Decode engine: the MemorySession KV cache is exact (cached logits == a from-scratch forward over
the same working context, fp32, atol 1e-4) through appends, collapses, refocus edits and direct
WC edits, for both position schemes; the cache is really reused (an append recomputes 1 entry,
an edit at j recomputes len - j); memory compresses from the first token past W; persistence
round-trips; a plain model works through the same API; generate() refocuses every K tokens;
static-shape decode (DecodeStep, the CUDA-graph path, run eagerly here) gives the dynamic path's
logits (fp32, atol 1e-4), for Engine (also batched) and MemorySession across refocus edits; bf16
weights run; chat_cli runs end to end on a tiny checkpoint.
"""
import os
import sys
import subprocess

import numpy as np
import pytest
import torch

from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.engine import Engine, MemorySession, DecodeStep, DECODE_MODES, compute_model_id

ATOL = 1e-4  # fp32 on CPU: cached vs from-scratch logits differ only by summation order
K, W, V = 4, 32, 96


def make_model(mc=True, scheme="entry", seed=0, vocab=V, seq=64):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=2, n_head=1, n_kv_head=1, n_embd=64,
                    megacontext=mc, mc_block_size=K, mc_max_level=3, gist_layers=1, lens_layers=1, pos_scheme=scheme)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # zero-init output projections, lod_emb and LensNet head would hide bugs
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.2)
        if mc:
            model.lensnet.head.weight.normal_(std=2.0)
    return model.eval()


@torch.no_grad()
def reference_logits(s):
    """From scratch: the working context -> entry_embeddings -> one forward."""
    m, wc = s.model, s.wc
    lv = wc.levels
    emb = s.reference_embeddings()[None]   # emb's dtype is the model's
    if m.config.pos_scheme == "gaussian":
        pos, sigma = (torch.from_numpy(a)[None] for a in wc.positions("gaussian"))
    else:
        pos, sigma = torch.arange(len(lv))[None], None
    return m(embeds=emb, pos=pos, sigma=sigma)[0, -1]


def check(s):
    s.wc.validate()
    assert len(s.wc) <= s.W
    torch.testing.assert_close(s.logits(), reference_logits(s), atol=ATOL, rtol=0)


@pytest.mark.parametrize("scheme", ["entry", "gaussian"])
def test_cache_exact_through_appends_and_edits(scheme):
    rng = np.random.default_rng(1)
    s = MemorySession(make_model(scheme=scheme), W=W)
    s.ingest(rng.integers(0, V, 20))
    check(s)
    assert s.last_recomputed == 20
    s.ingest([5])
    check(s)
    assert s.last_recomputed == 1                            # a plain append reuses the cache
    before = s.logits().clone()
    s.ingest(rng.integers(0, V, 300))                         # a prompt far longer than W
    check(s)
    assert (s.logits() - before).abs().max() > 1e-2          # the test can see a wrong context
    edits = 0
    for _ in range(3):                                       # refocus edits, then appends
        tel = s.refocus()
        edits += tel["expanded"] + tel["collapsed"]
        check(s)
        assert s.last_recomputed == len(s.wc) - tel["first_changed"] or tel["first_changed"] == len(s.wc)
        for _ in range(2):
            s.ingest(rng.integers(0, V, 1))
            check(s)
    assert edits > 0
    # direct WC edits: collapse the newest legal group, then expand the newest gist that fits
    g = int(s.wc.collapse_groups()[-1])
    j = s.wc.apply(collapse=[g])
    check(s)
    assert j == g and s.last_recomputed == len(s.wc) - j
    e = int(np.flatnonzero(s.wc.levels >= 1)[-1])
    assert s.wc.expand(e) == e
    check(s)
    assert s.last_recomputed == len(s.wc) - e
    check(s)
    assert s.last_recomputed == 0                            # nothing changed: nothing recomputed


def test_one_token_materialize_is_the_entry_embedding():
    """A generated token's slot is filled by the one-entry fast path (a row of wte, no host->device
    copies); it must hold exactly what entry_embeddings gives, and the slot after a refocus too."""
    s = MemorySession(make_model(), W=W)
    s.ingest(np.arange(300) % V)
    s.refocus()
    s.logits()
    for t in (7, 3):
        s.ingest([t])
        s.logits()
        assert s.last_recomputed == 1
        E = len(s.wc)
        ref = s.model.entry_embeddings(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[t]]),
                                       torch.zeros(1, 1, s.config.n_embd))[0, 0]
        assert torch.equal(s.emb[E - 1], ref.to(s.emb.dtype))
        assert (s._lv[E - 1], s._ix[E - 1]) == (0, s.wc.indices[E - 1])
    check(s)


def test_materialize_moves_the_rows_an_edit_shifted():
    """After an edit, the entries behind it are the same nodes at other slots: their rows move
    within emb (no tree read) and must be exactly what entry_embeddings gives for the window,
    through collapses (the window shrinks), expansions (it grows) and generated tokens."""
    s = MemorySession(make_model(), W=W)
    s.ingest(np.arange(400) % V)
    s.logits()
    reused, shifted = s.counters.get("emb_reused", 0), 0
    for t in range(24):
        if t % 3 == 0:
            tel = s.refocus()
            shifted += tel["expanded"] + tel["collapsed"] > 0
        s.ingest([t % V])
        s.logits()
        E = len(s.wc)
        assert torch.equal(s.emb[:E], s.reference_embeddings()), t
        assert (s._lv[:E] == s.wc.levels).all() and (s._ix[:E] == s.wc.indices).all()
    assert shifted and s.counters["emb_reused"] - reused > W // 2   # rows really moved, not re-read
    check(s)
    for _ in s.generate(12, temperature=0.0):   # the pipelined steps' rows, then a refocus's move
        pass
    check(s)   # (the last generated token gets its row here)
    assert torch.equal(s.emb[:len(s.wc)], s.reference_embeddings())


def test_a_failed_step_leaves_no_stale_row():
    """The one-entry step writes the token's row into emb itself: if it raises, the slot must not
    count as known, so the retry (or a later edit's row move) cannot use a row never written."""
    s = MemorySession(make_model(), W=W)
    s.ingest(np.arange(20) % V)
    s.logits()
    s.ingest([5])
    s.logits()                      # a one-entry step: the DecodeStep exists now
    s.ingest([7])
    step = s._step

    def boom(*a, **kw):
        raise RuntimeError("device lost")
    s._step = boom
    with pytest.raises(RuntimeError, match="device lost"):
        s.logits()
    assert s._lv[len(s.wc) - 1] == -1   # the slot the failed step was to write is no known node
    s._step = step
    check(s)
    assert s.last_recomputed == 1 and torch.equal(s.emb[:len(s.wc)], s.reference_embeddings())
    s.ingest(np.arange(40) % V)     # a full window: collapses move the rows behind them
    s.refocus()
    check(s)
    assert torch.equal(s.emb[:len(s.wc)], s.reference_embeddings())


@pytest.mark.parametrize("lens_match", [False, True])
def test_refocus_scores_the_window_padded_to_W(lens_match):
    """refocus runs LensNet over all W slots, the padding masked (one shape: one CUDA graph on
    CUDA): the scores of the real entries are the unpadded call's."""
    from nanochat.gpt import lens_features
    from nanochat.decode_step import GraphedFn
    model = make_model()
    model.config.lens_match = lens_match
    if lens_match:
        model.lensnet.match_gain = torch.nn.Parameter(torch.ones(()))
    s = MemorySession(model, W=W, focus="lens")
    s.ingest(np.arange(300) % V)
    s.logits()
    s.ingest([3, 9])
    s.wc.apply(collapse=[int(s.wc.collapse_groups()[-1])])   # a window short of W: padding to see
    s.logits()
    seen = {}

    def spy_on(sess):
        real = sess._lens_scores

        def spy(rows, extra, match):
            out = real(rows, extra, match)
            seen.update(rows=rows.clone(), match=None if match is None else match.clone(), out=out.clone())
            return out
        sess._lens_scores = spy
    spy_on(s)
    lv, E, N = s.wc.levels.copy(), len(s.wc), s.wc.num_tokens
    starts, widths = s.wc.starts.copy(), s.wc.widths.copy()
    s.refocus()
    assert isinstance(s._lens_fn, GraphedFn) and not s._lens_fn.graphs and E < W   # padded: W - E slots
    assert seen["rows"].shape == (3, W)   # a multiple of lens_bucket, at most W
    recent = torch.from_numpy(s.tree.tokens(N - K, N).astype(np.int64))[None]
    match = seen["match"][:E][None] if lens_match else None
    with torch.no_grad():
        feat = lens_features(torch.from_numpy(starts)[None], torch.from_numpy(widths)[None], N, match)
        ref = model.lensnet(s.emb[:E][None], torch.from_numpy(lv)[None], feat, model.lens_queries(recent, K),
                            torch.ones(1, E, dtype=torch.bool))[0]
    torch.testing.assert_close(seen["out"][:E], ref, atol=1e-5, rtol=1e-5)
    assert not seen["out"][E:].any()
    # a wide window pads only to the next multiple of lens_bucket (a short memory stays cheap)
    s2 = MemorySession(model, W=1000, focus="lens")
    s2.ingest(np.arange(300) % V)
    spy_on(s2)
    s2.refocus()
    assert len(s2.wc) == 300 and seen["rows"].shape == (3, 512)


def test_one_block_gists_go_through_graphed_fn():
    """While decoding, the block a token completes gets its gist through a GraphedFn per level
    (a CUDA graph on CUDA, the eager call elsewhere): the tree holds exactly the eager gists."""
    from nanochat.decode_step import GraphedFn
    model = make_model()
    s = MemorySession(model, W=W)
    s.ingest(np.arange(3 * K * K + 1) % V)   # bulk: n > 1 per call, eager
    assert not s._gist_graphs
    for t in range(2 * K * K):
        s.ingest([t % V])                    # one token at a time: one-block gists
    assert {0, 1} <= {lvl for lvl, _ in s._gist_graphs} and all(isinstance(g, GraphedFn) for g in s._gist_graphs.values())
    assert all(not g.graphs for g in s._gist_graphs.values())   # CPU: no graphs, the eager call
    ids = torch.from_numpy(s.tree.tokens(0, s.tree.num_tokens).astype(np.int64))
    with torch.no_grad():
        n1 = s.tree.num_nodes(1)
        bf = lambda g: g.to(torch.bfloat16).float()   # noqa: E731 (the tree stores bf16 gists)
        torch.testing.assert_close(s.tree.gists(1, 0, n1), bf(model.gist(0, ids[:n1 * K].view(n1, K))), atol=0, rtol=0)
        n2 = s.tree.num_nodes(2)
        torch.testing.assert_close(s.tree.gists(2, 0, n2), bf(model.gist(1, s.tree.gists(1, 0, n2 * K).view(n2, K, -1))),
                                   atol=0, rtol=0)


def test_compresses_from_first_token_past_W():
    s = MemorySession(make_model(), W=W)
    s.ingest(np.arange(W) % V)
    assert len(s.wc) == W and s.wc.level_counts()[0] == W
    s.logits()
    tel = s.ingest([1])                                       # token W + 1: must compress now
    assert len(s.wc) <= W and s.wc.level_counts()[1:].sum() > 0
    assert s.logits() is not None and s.last_recomputed == len(s.wc) - tel["first_changed"]
    rng = np.random.default_rng(0)
    for n in (1, 3, 40, 1, 200, 7):
        s.ingest(rng.integers(0, V, n))
        s.wc.validate()
        assert len(s.wc) <= W
    assert s.num_tokens > 8 * W
    check(s)
    st = s.stats()
    assert st["tokens"] == s.num_tokens and st["entries"] <= W and st["compression"] > 8


def test_memory_full_and_bad_ids_are_user_errors():
    s = MemorySession(make_model(), W=12)
    s.ingest(np.zeros(40, np.int64))
    wc = s.wc.copy()
    with pytest.raises(UserError, match="memory full"):
        s.ingest(np.zeros(10_000, np.int64))
    assert s.wc == wc and s.tree.num_tokens == 40             # nothing changed
    with pytest.raises(UserError, match="token ids"):
        s.ingest([V])


def test_generate_refocuses_every_K_tokens():
    s = MemorySession(make_model(), W=W)
    s.ingest(np.random.default_rng(0).integers(0, V, 10))        # the window is not full: no forced collapse
    assert s.stats()["decode_tok_per_s"] is None                # nothing generated yet
    out = list(s.generate(3 * K, temperature=0.0))
    assert s.stats()["decode_tok_per_s"] > 0 and s.last_decode[0] == 3 * K
    assert len(out) == 3 * K and s.num_tokens == 10 + 3 * K
    assert [i for i, (_, tel) in enumerate(out) if tel is not None] == [K - 1, 2 * K - 1, 3 * K - 1]
    assert all({"expanded", "collapsed", "first_changed", "ms"} <= set(tel) for _, tel in out if tel)
    assert s.tree.tokens(10, 10 + 3 * K).tolist() == [t for t, _ in out]
    first = out[0][0]
    s2 = MemorySession(make_model(), W=W)
    s2.ingest(np.random.default_rng(0).integers(0, V, 10))
    assert [t for t, _ in s2.generate(10, temperature=0.0, stop_tokens=(first,))] == [first]
    check(s)


def test_a_full_window_refocuses_when_an_append_collapses_so_one_recompute_serves_both():
    """In a full window every K-1 appends must collapse an older block, which cuts the cache as a
    refocus does. Refocusing at that moment makes both edits cost one recompute, not two."""
    s = MemorySession(make_model(), W=W)
    s.ingest(np.random.default_rng(0).integers(0, V, 100))
    s.logits()                                                  # the initial prefill
    refocus_at, big_recomputes = [], 0
    for i, (_, tel) in enumerate(s.generate(6 * K, temperature=0.0)):
        big_recomputes += s.last_recomputed > 1                 # the logits() that sampled this token
        if tel is not None:
            refocus_at.append(i)
    assert np.diff([-1] + refocus_at).max() <= K, "at least every K tokens"
    assert len(refocus_at) >= 6, refocus_at
    assert big_recomputes <= len(refocus_at), (big_recomputes, refocus_at)
    check(s)


def test_persistence_roundtrip(tmp_path):
    model = make_model()
    path = str(tmp_path / "mem")
    s = MemorySession(model, W=W, path=path)
    s.ingest(np.random.default_rng(0).integers(0, V, 400))
    s.refocus()
    wc, logits = s.wc.copy(), s.logits().clone()
    with pytest.raises(UserError, match="already open"):
        MemorySession.open(model, path)
    s.save()
    s.close()
    with pytest.raises(UserError, match="already holds a memory"):
        MemorySession(model, W=W, path=path)
    s = MemorySession.open(model, path)
    assert s.wc == wc and s.num_tokens == 400
    torch.testing.assert_close(s.logits(), logits, atol=ATOL, rtol=0)
    assert s.last_recomputed == len(wc)
    s.ingest([1, 2, 3])
    check(s)
    s.close()
    with pytest.raises(UserError, match="not by this one"):
        MemorySession.open(make_model(seed=1), path)
    with pytest.raises(UserError, match="no memory"):
        MemorySession.open(model, str(tmp_path / "nothing"))


def test_model_id_is_stable_and_short():
    a, b = compute_model_id(make_model()), compute_model_id(make_model())
    assert a == b and len(a.encode()) <= 32
    assert compute_model_id(make_model(seed=1)) != a
    assert compute_model_id(make_model(scheme="gaussian")) != a


def test_plain_model_same_api(tmp_path):
    model = make_model(mc=False, seq=32)
    path = str(tmp_path / "plain")
    s = MemorySession(model, path=path)
    ids = np.random.default_rng(0).integers(0, V, 20)
    s.ingest(ids)
    with torch.no_grad():
        torch.testing.assert_close(s.logits(), model(torch.from_numpy(ids)[None])[0, -1], atol=ATOL, rtol=0)
    s.ingest([3])
    s.logits()
    assert s.last_recomputed == 1
    s.ingest(np.random.default_rng(1).integers(0, V, 30))    # past sequence_len: the window slides
    assert len(s) <= 32 and s.num_tokens == 51
    toks = list(s.tokens)[s.w0:]
    with torch.no_grad():
        torch.testing.assert_close(s.logits(), model(torch.tensor([toks]))[0, -1], atol=ATOL, rtol=0)
    gen = list(s.generate(12, temperature=0.0))
    assert len(gen) == 12 and all(tel is None for _, tel in gen) and s.num_tokens == 63
    assert s.refocus()["expanded"] == 0 and s.focus_map()[0]["level"] == 0
    logits = s.logits().clone()
    s.close()
    s = MemorySession.open(model, path)
    assert s.num_tokens == 63
    torch.testing.assert_close(s.logits(), logits, atol=ATOL, rtol=0)
    s.close()


def test_focus_map_covers_the_timeline():
    s = MemorySession(make_model(), W=W)
    s.ingest(np.random.default_rng(0).integers(0, V, 300))
    s.refocus()
    fm = s.focus_map()
    assert fm[0]["start"] == 0 and fm[-1]["end"] == 300 and fm[-1]["level"] == 0
    assert all(a["end"] == b["start"] and a["level"] != b["level"] for a, b in zip(fm, fm[1:]))
    assert sum(r["entries"] for r in fm) == len(s.wc)


def test_plain_engine_prefill_matches_forward():
    model = make_model(mc=False)
    ids = torch.randint(0, V, (1, 30))
    eng = Engine(model)
    eng.prefill_chunk = 7   # chunked prefill must equal one forward
    with torch.no_grad():
        ref = model(ids)[0, -1]
    torch.testing.assert_close(eng.prefill(ids, eng.new_cache(1, 30))[0], ref, atol=ATOL, rtol=0)
    out = eng.generate_batch(ids[0].tolist(), max_tokens=5, temperature=0.0)[0]
    seq = ids[0].tolist()
    for _ in range(5):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[30:]


def record_steps(engine):
    """Keep every decode step's logits: wraps engine.decoder, which generate() steps through."""
    logs, make = [], engine.decoder

    def decoder(cache):
        step = make(cache)
        return lambda nxt: logs.append(step(nxt)) or logs[-1]
    engine.decoder = decoder
    return logs


def test_static_decode_equals_dynamic_engine():
    model = make_model(mc=False)
    prompt = np.random.default_rng(0).integers(0, V, 20).tolist()
    out, logs = {}, {}
    for mode in ("static", "dynamic"):
        eng = Engine(model, decode=mode)
        logs[mode] = record_steps(eng)
        out[mode] = eng.generate_batch(prompt, max_tokens=12, temperature=0.0)
    assert out["static"] == out["dynamic"] and len(logs["static"]) == len(logs["dynamic"]) == 12
    for a, b in zip(logs["static"], logs["dynamic"]):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # num_samples > 1: expand_batch replaces the cache's buffers before the static step is made
    kw = dict(num_samples=3, max_tokens=10, temperature=1.0, seed=5)
    rows = Engine(model, decode="static").generate_batch(prompt, **kw)
    assert rows == Engine(model, decode="dynamic").generate_batch(prompt, **kw)
    assert len({tuple(r) for r in rows}) > 1, "rows are sampled independently"
    with pytest.raises(ValueError, match="decode"):
        Engine(model, decode="bogus")
    with pytest.raises(ValueError, match="decode"):
        MemorySession(make_model(), W=W, decode="bogus")


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


@pytest.mark.parametrize("scheme", ["entry", "gaussian"])
def test_static_decode_equals_dynamic_memory_session(scheme):
    def run(decode):
        s = MemorySession(make_model(scheme=scheme), W=W, decode=decode)
        s.pipeline = False   # every step through logits(), so that each one is recorded (pipelined: below)
        s.ingest(np.random.default_rng(0).integers(0, V, 100))   # a full window: appends collapse too
        s.refocus()
        logs, recomputed, logits = [], [], s.logits

        def recorded():
            out = logits()
            logs.append(out.clone())
            recomputed.append(s.last_recomputed)
            return out
        s.logits = recorded
        toks = [t for t, _ in s.generate(3 * K + 1, temperature=0.0)]
        return s, toks, logs, recomputed

    s, toks, logs, recomputed = run("static")
    _, toks_d, logs_d, recomputed_d = run("dynamic")
    assert toks == toks_d and recomputed == recomputed_d
    assert recomputed.count(1) >= K and max(recomputed) > 1   # static steps and recomputes after edits
    for a, b in zip(logs, logs_d):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert s._step is not None
    check(s)


@pytest.mark.parametrize("mc,scheme", [(True, "entry"), (True, "gaussian"), (False, "entry")])
def test_pipelined_decode_equals_unpipelined(mc, scheme):
    """generate() queues a tail-append step before the host reads its token (_queue_step): same
    tokens, same refocus points, same cache accounting and the same final logits as the loop
    that reads each token first, through refocus edits, forced collapses (MC) and re-anchors
    (plain); and the cache stays exact."""
    def run(pipeline):
        s = MemorySession(make_model(mc=mc, scheme=scheme, seq=64 if mc else 32), W=W)
        s.pipeline = pipeline
        s.ingest(np.random.default_rng(0).integers(0, V, 100 if mc else 20))
        out = list(s.generate(6 * K + 1, temperature=1.0, top_k=20, seed=3))
        return s, [t for t, _ in out], [i for i, (_, tel) in enumerate(out) if tel is not None], s.logits().clone()

    s, toks, refocus_at, logits = run(True)
    s0, toks0, refocus_at0, logits0 = run(False)
    assert toks == toks0 and refocus_at == refocus_at0
    torch.testing.assert_close(logits, logits0, atol=0, rtol=0)
    keys = ("forwards", "recomputed", "reused", "generated")
    assert {k: s.counters[k] for k in keys} == {k: s0.counters[k] for k in keys}
    assert s.counters["pipelined"] >= K and "pipelined" not in s0.counters
    assert (len(refocus_at) >= 4) if mc else (s.w0 > 0)   # edits (MC) and a re-anchor (plain) were crossed
    if mc:
        check(s)
    else:
        with torch.no_grad():
            ref = s.model(torch.tensor([list(s.tokens)[s.w0:]]))[0, -1]
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


def test_pipelined_decode_survives_a_failed_append(monkeypatch):
    """If the host append fails after the step was queued, the queued slot is not recorded: the
    next logits() drops it and the cache stays exact."""
    s = MemorySession(make_model(), W=W)
    s.ingest(np.random.default_rng(0).integers(0, V, 10))
    list(s.generate(2, temperature=0.0))                    # the DecodeStep exists now
    real, calls = s._append, []

    def flaky(ids, progress=None):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")
        return real(ids, progress)
    monkeypatch.setattr(s, "_append", flaky)
    with pytest.raises(OSError):
        list(s.generate(3, temperature=0.0))
    assert s.cache.pos == s._known + 1 == len(s) + 1          # the queued entry sits past the known prefix
    check(s)
    list(s.generate(3, temperature=0.0))
    check(s)


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


def test_compiled_decode_equals_static():
    """decode="compiled" (torch.compile before the capture) gives the static step's tokens and
    logits, for the plain Engine (twice: a second generate reuses the compiled code) and for a
    MemorySession across refocus and recompute."""
    assert set(DECODE_MODES) == {"static", "compiled", "fused", "dynamic"}
    model = make_model(mc=False)
    prompt = np.random.default_rng(0).integers(0, V, 20).tolist()
    out, logs = {}, {}
    for mode in ("static", "compiled", "compiled"):
        eng = Engine(model, decode=mode)
        logs[mode] = record_steps(eng)
        out[mode] = eng.generate_batch(prompt, max_tokens=8, temperature=0.0)
    assert out["static"] == out["compiled"]
    for a, b in zip(logs["static"], logs["compiled"]):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    toks = {}
    mc = make_model()
    for mode in ("static", "compiled"):
        s = MemorySession(mc, W=W, decode=mode)
        s.ingest(np.random.default_rng(0).integers(0, V, 100))
        s.refocus()
        toks[mode] = [t for t, _ in s.generate(3 * K + 2, temperature=0.0)]
        toks[mode + "_logits"] = s.logits()
        # compiled: the refocus recomputes ran as one whole-window forward (_forward_window)
        assert (s._window is not None) == (mode == "compiled")
        check(s)
    assert toks["static"] == toks["compiled"]
    torch.testing.assert_close(toks["static_logits"], toks["compiled_logits"], atol=ATOL, rtol=0)


def test_bf16_weights_run_on_cpu():
    """bench_decode --dtype bf16 converts the whole model: ingest (gists of gists, from the tree's
    fp32 copies), refocus and both decode modes must run with bf16 parameters and cache."""
    model = make_model().to(torch.bfloat16)
    for mode in ("static", "dynamic"):
        s = MemorySession(model, W=W, decode=mode)
        tel = s.ingest(np.random.default_rng(0).integers(0, V, 300))
        assert tel["new_nodes"][2] > 0
        s.refocus()
        assert len([t for t, _ in s.generate(2 * K, temperature=0.0)]) == 2 * K
        assert s.cache.k.dtype == torch.bfloat16 and torch.isfinite(s.logits()).all()
    plain = make_model(mc=False).to(torch.bfloat16)
    assert len(Engine(plain).generate_batch([1, 2, 3], num_samples=2, max_tokens=5)[1]) == 5


def test_chat_cli_one_shot(tiny_tokenizer, tmp_path, monkeypatch, capsys):
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.common import main_guard
    from scripts import chat_cli
    model = make_model(vocab=tiny_tokenizer.get_vocab_size(), seq=64)
    run = str(tmp_path / "run")
    save_checkpoint(run, 0, model)
    doc = tmp_path / "doc.txt"
    doc.write_text("The passkey is 7312. " * 40)
    base = os.path.dirname(tiny_tokenizer.directory)
    args = ["--ckpt-dir", run, "--prompt", "What is the passkey?", "--max-tokens", "8", "--device", "cpu",
            "--W", "48", "--memory", str(tmp_path / "mem")]
    # a real `python -m` run: load a document, answer, persist the memory
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "scripts.chat_cli"] + args + ["--load-file", str(doc)], cwd=root,
                       env=dict(os.environ, NANOCHAT_BASE_DIR=base), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ingesting" in r.stderr and "[memory]" in r.stderr and r.stdout.strip()
    # in-process (faster): the memory reopens and grows; a bad checkpoint dir is a clean error
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    # the reopened memory, refocused by match, decoded dynamically
    monkeypatch.setattr(sys, "argv", ["chat_cli"] + args + ["--focus", "match", "--decode", "dynamic"])
    seen = []
    orig = MemorySession.refocus
    monkeypatch.setattr(MemorySession, "refocus", lambda self: seen.append((self.focus_by, self.decode)) or orig(self))
    main_guard(chat_cli.main)
    err = capsys.readouterr().err
    assert "reopened" in err and seen and set(seen) == {("match", "dynamic")}
    s = MemorySession.open(model, str(tmp_path / "mem"))
    assert s.num_tokens > 200 and len(s) <= 48
    s.close()
    monkeypatch.setattr(sys, "argv", ["chat_cli", "--ckpt-dir", str(tmp_path / "nope"), "--prompt", "x"])
    with pytest.raises(SystemExit) as e:
        main_guard(chat_cli.main)
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: no checkpoint")


def test_chat_cli_bfloat16_weights(tiny_tokenizer, tmp_path, monkeypatch, capsys):
    """--dtype bfloat16 (auto's choice on CUDA) loads the checkpoint's weights as bf16 and answers;
    a memory made under it does not open under float32 (its model id names the dtype)."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.common import main_guard, inference_dtype
    from scripts import chat_cli
    assert inference_dtype("auto", "cuda") == torch.bfloat16 and inference_dtype("auto", "cpu") == torch.float32
    model = make_model(vocab=tiny_tokenizer.get_vocab_size(), seq=64)
    run = str(tmp_path / "run")
    save_checkpoint(run, 0, model)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", os.path.dirname(tiny_tokenizer.directory))
    args = ["chat_cli", "--ckpt-dir", run, "--prompt", "Hi", "--max-tokens", "4", "--device", "cpu",
            "--W", "48", "--memory", str(tmp_path / "mem")]
    monkeypatch.setattr(sys, "argv", args + ["--dtype", "bfloat16"])
    main_guard(chat_cli.main)
    assert capsys.readouterr().out.strip()
    s = MemorySession.open(model.to(torch.bfloat16), str(tmp_path / "mem"))
    assert s.cache.k.dtype == torch.bfloat16 and s.num_tokens > 0
    s.close()
    monkeypatch.setattr(sys, "argv", args + ["--dtype", "float32"])
    with pytest.raises(SystemExit) as e:
        main_guard(chat_cli.main)
    assert e.value.code == 2 and "model" in capsys.readouterr().err


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


def test_inference_caches_are_dropped_on_request():
    """base_train samples between steps: the q/k/v stacks that sampling made are freed after."""
    model = make_model(mc=False)
    prompt = [1, 2, 3]
    first = Engine(model).generate_batch(prompt, max_tokens=4, temperature=0.0)
    attn = [b.attn for b in model.transformer.h]
    assert all(a._qkv is not None for a in attn)
    model.drop_inference_caches()
    assert all(a._qkv is None for a in attn)
    assert Engine(model).generate_batch(prompt, max_tokens=4, temperature=0.0) == first


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


def test_phase_ranges_cost_nothing_unless_a_profiler_runs():
    """The engine's named ranges (mc.*) are record_function only under a profiler: outside one a
    record_function still costs ~12 us on CPU, several per generated token."""
    from nanochat.engine import _phase, _NO_PHASE
    assert _phase("mc.step") is _NO_PHASE
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with _phase("mc.step"):
            torch.ones(1).add_(1)
    assert "mc.step" in {e.key for e in prof.key_averages()}
