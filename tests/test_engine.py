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
from nanochat.engine import Engine, MemorySession, DECODE_MODES, compute_model_id

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


def test_phase_ranges_cost_nothing_unless_a_profiler_runs():
    """The engine's named ranges (mc.*) are record_function only under a profiler: outside one a
    record_function still costs ~12 us on CPU, several per generated token."""
    from nanochat.engine import _phase, _NO_PHASE
    assert _phase("mc.step") is _NO_PHASE
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with _phase("mc.step"):
            torch.ones(1).add_(1)
    assert "mc.step" in {e.key for e in prof.key_averages()}
