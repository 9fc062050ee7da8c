"""
The query-match feature (GPTConfig.lens_match, match.query_match): each working-context entry's
share of the rare bigrams that its history shares with LensNet's query (the recent tokens). One
definition feeds training (MCStep), mc_eval (the "lens" and "match" policies) and MemorySession.
"""
import numpy as np
import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, LENS_FEATURES
from megacontext.match import query_match, entry_match, MATCH_SPREAD, MatchIndex
from nanochat.engine import MemorySession
from nanochat.checkpoint_manager import build_model
from megacontext.mctrain import MCStep, make_plan, level_offsets
from megacontext.evals import eval_example, match_cumsum, wc_match
from megacontext.working_context import WorkingContext

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
V, K, L, T, W, H = 4096, 4, 2, 256, 32, 8


def model(match=True, seed=0, vocab=V):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, megacontext=True,
                      mc_block_size=K, mc_max_level=L, gist_layers=1, lens_layers=1, lens_match=match))
    m.init_weights()
    with torch.no_grad():   # zero-init heads would make every score 0
        for p in m.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return m


def reference_mass(ids, N, t):
    """query_match's per-token mass, the slow way: for each distinct query bigram, one unit split
    over its occurrences that end before N - t, each share spread over the bigram's tokens and
    the MATCH_SPREAD tokens after it."""
    q = {(ids[j - 1], ids[j]) for j in range(max(N - t + 1, 1), N)}
    occ = {b: [p for p in range(1, N - t) if (ids[p - 1], ids[p]) == b] for b in q}
    mass = np.zeros(len(ids))
    for b, ps in occ.items():
        for p in ps:
            span = np.arange(p - 1, p + MATCH_SPREAD + 1)
            span = span[span < len(ids)]
            mass[span] += 1.0 / len(ps) / (MATCH_SPREAD + 2)
    return mass


@pytest.mark.parametrize("chunk", [1 << 16, 7])
def test_query_match_equals_the_slow_definition(chunk, monkeypatch):
    import megacontext.match
    monkeypatch.setattr(megacontext.match, "MATCH_CHUNK", chunk)   # many chunks: the same result
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, (3, 120))          # a tiny vocabulary: many repeated bigrams
    N = np.array([120, 77, 40])
    cs = query_match(torch.from_numpy(ids), torch.from_numpy(N), 8)
    assert cs.shape == (3, 121)
    for b in range(3):
        mass = np.diff(cs[b].numpy())
        np.testing.assert_allclose(mass, reference_mass(ids[b], N[b], 8), atol=1e-5)
        assert mass[N[b] - 8 + MATCH_SPREAD:].sum() == 0, "the query's own bigrams are not matched"


def planted(rng, n=600, at=137, phrase=(11, 22, 33, 44)):
    """Random tokens with a phrase at `at` and again at the very end (the query)."""
    ids = rng.integers(100, V, n)
    ids[at:at + len(phrase)] = phrase
    ids[n - len(phrase):] = phrase
    return ids


def test_a_phrase_shared_with_the_query_lights_up_the_entry_that_holds_it():
    ids = planted(np.random.default_rng(1))
    N = len(ids)
    cs = match_cumsum(torch.from_numpy(ids), N)
    wc = WorkingContext.recency(N, K, 64, L)
    m = wc_match(wc, cs).numpy()
    hit = (wc.starts < 137 + 4 + MATCH_SPREAD) & (wc.starts + wc.widths > 137)
    assert m[hit].sum() == pytest.approx(3.0)    # three distinct bigrams, one occurrence each
    assert m[~hit].sum() < 0.5, "random tokens share (almost) nothing with the query"
    # common bigrams weigh little: the same phrase three times splits each bigram's unit
    ids2 = ids.copy()
    ids2[300:304] = ids2[450:454] = (11, 22, 33, 44)
    m2 = np.diff(match_cumsum(torch.from_numpy(ids2), N).numpy()[0])
    assert m2[137:141 + MATCH_SPREAD].sum() == pytest.approx(1.0)


def test_lensnet_reads_the_feature_only_when_configured():
    emb = torch.randn(1, 5, 64)
    lv = torch.tensor([[2, 1, 1, 0, 0]])
    tail = torch.randn(1, 3, 64)
    valid = torch.ones(1, 5, dtype=torch.bool)
    from nanochat.gpt import lens_features
    s, w = torch.tensor([[0, 16, 20, 24, 25]]), torch.tensor([[16, 4, 4, 1, 1]])
    lo, hi = torch.zeros(1, 5), torch.tensor([[0.0, 3.0, 0.0, 0.0, 0.0]])
    f_lo, f_hi = lens_features(s, w, 26, lo), lens_features(s, w, 26, hi)
    assert f_lo.shape[-1] == LENS_FEATURES and torch.equal(f_lo, lens_features(s, w, 26))
    lens = model().lensnet
    assert not torch.allclose(lens(emb, lv, f_hi, tail, valid), lens(emb, lv, f_lo, tail, valid))


def test_training_eval_and_memory_session_compute_the_same_feature(tmp_path):
    """The feature LensNet learns from in MCStep is the one mc_eval and MemorySession hand it."""
    m = model()
    ids = planted(np.random.default_rng(2), n=T, at=60)
    N = T - H
    ids[N - 4:N] = (11, 22, 33, 44)               # the query: the tokens before the cut
    seen = []
    orig = m.lensnet.forward
    m.lensnet.forward = lambda emb, lv, feat, tail, valid: seen.append((lv.clone(), feat.clone())) or orig(emb, lv, feat, tail, valid)
    plan = make_plan(np.array([N]), T, K, W, H, L, 1, np.random.default_rng(0))
    step = MCStep(m, W, H, n_random=1)
    step(torch.from_numpy(ids)[None], torch.tensor([N]), {k: torch.from_numpy(v) for k, v in plan.items()}, None, None)
    (lv, feat), = seen
    n = int(plan["base_lengths"][0])
    base = WorkingContext(K, W=W, max_level=L, levels=plan["base_levels"][0, :n], indices=plan["base_indices"][0, :n])
    ref = torch.log1p(wc_match(base, match_cumsum(torch.from_numpy(ids), N)))
    torch.testing.assert_close(feat[0, :n, 4], ref.float())
    assert feat[0, :n, 4].max() > 1.0, "the planted phrase is matched in training"

    # MemorySession over the same history [0, N): the same feature for its own window
    seen.clear()
    m.eval()
    s = MemorySession(m, W=W, path=str(tmp_path / "mem"))
    s.ingest(ids[:N])
    wc = s.wc.copy()                              # refocus edits s.wc after LensNet has scored it
    s.refocus()
    (lv, feat), = seen
    assert np.array_equal(lv[0].numpy(), wc.levels)
    ref = torch.log1p(wc_match(wc, query_match(torch.from_numpy(ids[:N])[None], torch.tensor([N]), K)))
    torch.testing.assert_close(feat[0, :, 4], ref.float())
    s.close()


def test_the_match_policy_brings_a_planted_needle_to_full_detail():
    m = model(match=False).eval()                 # no learning: the policy reads the feature alone
    rng = np.random.default_rng(3)
    hits = 0
    for i in range(4):
        N = 384
        ids = rng.integers(100, V, N + 4)
        at = int(rng.integers(16, 300))
        ids[at:at + 4] = (11, 22, 33, 44)
        ids[N - 4:N] = (11, 22, 33, 44)
        r = eval_example(m, ids, N, ids[N:N + 4], 48, ["match", "recency"], rounds=8, rng=rng, targets=[(at, at + 4)])
        hits += r["match"]["needle_at_lod0"]
        assert not r["recency"]["needle_at_lod0"]
    assert hits == 4


def test_a_checkpoint_from_before_the_feature_loads_and_scores_as_before():
    m = model(match=False)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["lensnet.feat.weight"] = sd["lensnet.feat.weight"][:, :4]   # the 4-feature LensNet
    cfg = {k: v for k, v in m.config.to_dict().items() if k != "lens_match"}
    m2 = build_model({"model": sd, "model_config": cfg}, torch.device("cpu"))
    assert not m2.config.lens_match
    torch.testing.assert_close(m2.lensnet.feat.weight[:, 4], torch.zeros(m2.config.lens_dim))
    torch.testing.assert_close(m2.lensnet.feat.weight[:, :4], m.lensnet.feat.weight[:, :4])


def test_the_feature_is_a_prior_on_the_score_that_training_can_reweigh():
    """score = learned + match_gain * log1p(match): at init (zero head) the score is the prior."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=64, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=64, megacontext=True,
                      mc_block_size=K, mc_max_level=L, gist_layers=1, lens_layers=1, lens_match=True))
    m.init_weights()
    from nanochat.gpt import lens_features
    s, w = torch.tensor([[0, 16, 20, 24, 25]]), torch.tensor([[16, 4, 4, 1, 1]])
    match = torch.tensor([[0.0, 3.0, 0.5, 0.0, 1.0]])
    feat = lens_features(s, w, 26, match)
    lv = torch.tensor([[2, 1, 1, 0, 0]])
    scores = m.lensnet(torch.randn(1, 5, 64), lv, feat, torch.randn(1, 3, 64), torch.ones(1, 5, dtype=torch.bool))
    torch.testing.assert_close(scores, torch.log1p(match))
    scores.sum().backward()
    assert m.lensnet.match_gain.grad is not None and m.lensnet.match_gain.grad != 0
    _, groups = m.param_groups()
    assert any(p is m.lensnet.match_gain for p in groups["other"]), "the gain is trained (AdamW)"
    assert not hasattr(model(match=False).lensnet, "match_gain")


def test_memory_session_focus_by_match_brings_the_planted_phrase_to_full_detail(tmp_path):
    from nanochat.common import UserError
    m = model(match=False).eval()
    ids = planted(np.random.default_rng(4), n=384, at=101)
    s = MemorySession(m, W=48, path=str(tmp_path / "mem"), focus="match")
    calls = []
    m.lensnet.forward = lambda *a: calls.append(1)   # "match" never asks LensNet
    s.ingest(ids)
    for _ in range(6):
        s.refocus()
    lod0 = s.wc.starts[s.wc.levels == 0]
    assert all(p in lod0 for p in range(101, 105)), "the phrase shared with the query is at LOD0"
    assert calls == []
    s.save()
    s.close()
    s = MemorySession.open(m, str(tmp_path / "mem"), focus="match")
    assert s.focus_by == "match"
    s.close()
    with pytest.raises(UserError, match="focus"):
        MemorySession(m, W=48, focus="oracle")


def test_match_top_expands_the_needle_with_the_querys_key_and_not_the_distractor():
    """A multi-key question shares its phrase with every needle and its key with one: "match"
    expands both needles, "match_top" (half the best gist's mass) only the one with the key;
    "union" takes what LensNet or match_top wants."""
    from megacontext.focus import match_scores
    wc = WorkingContext(4, W=8, max_level=2, levels=np.array([2, 1, 1, 1, 0, 0, 0, 0]),
                        indices=np.array([0, 4, 5, 6, 28, 29, 30, 31]))
    mass = np.array([0.2, 4.0, 1.0, 0.0, 0.3, 0.0, 0.0, 0.0])
    plain, top = match_scores(wc, mass), match_scores(wc, mass, top=0.5)
    assert plain[1] > 0 and plain[2] > 0 and top[1] > 0 and top[2] < 0
    np.testing.assert_allclose(plain[4:], np.log1p(mass[4:]) - 0.1)   # LOD0 entries: the same in both
    # a LOD0 group that matches best (a needle already expanded) sets the bar for the gists
    lod0 = WorkingContext(4, W=8, max_level=2, levels=np.array([1, 1, 0, 0, 0, 0]), indices=np.array([0, 1, 8, 9, 10, 11]))
    s0 = match_scores(lod0, np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), top=0.5)
    assert s0[0] < 0 and match_scores(lod0, np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]))[0] > 0
    np.testing.assert_allclose(top[4:], plain[4:])
    m = model(match=False).eval()
    rng = np.random.default_rng(5)
    phrase, key = (11, 22, 33), (44, 55)
    N = 384
    ids = rng.integers(100, V, N + 4)
    ids[70:73] = phrase                       # the distractor: the phrase with another key
    ids[73:75] = (66, 77)
    ids[200:203] = phrase                     # the needle
    ids[203:205] = key
    ids[N - 5:N] = phrase + key
    r = eval_example(m, ids, N, ids[N:N + 4], 64, ["match", "match_top", "union"], rounds=8, rng=rng,
                     targets=[(200, 205)])
    assert r["match"]["needle_at_lod0"] and r["match_top"]["needle_at_lod0"] and "needle_at_lod0" in r["union"]
    from megacontext.evals import build_levels, focus, match_cumsum as mc
    hist = torch.from_numpy(ids[:N])
    table, offs = build_levels(m, hist)
    for p, want in (("match", True), ("match_top", False)):
        wc, _ = focus(m, table, offs, N, 64, p, 8, rng=rng, match_cs=mc(hist, N))
        distractor_at_lod0 = all(q in set(wc.starts[wc.levels == 0].tolist()) for q in range(70, 75))
        assert distractor_at_lod0 == want, p


def test_mc_eval_rejects_an_unknown_policy_before_loading_anything(monkeypatch, capsys, tmp_path):
    import sys
    from nanochat.common import main_guard
    from scripts import mc_eval
    monkeypatch.setattr(sys, "argv", ["mc_eval", "--ckpt-dir", str(tmp_path / "none"), "--policies", "lens,bogus"])
    with pytest.raises(SystemExit) as e:
        main_guard(mc_eval.main)
    assert e.value.code == 2 and "unknown policy 'bogus'" in capsys.readouterr().err


def test_match_index_gives_query_match_for_a_stream_appended_in_pieces(monkeypatch):
    """MemorySession's index (sorted runs, merged as they grow, plus an unsorted tail) gives the
    batched definition's entry masses, for any cut N and any split of the appends."""
    monkeypatch.setattr(MatchIndex, "RUN", 64)       # many runs and merges in 5000 tokens
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, 5000)                   # a tiny vocabulary: many repeated bigrams
    mi, pos, seen = MatchIndex(), 0, set()
    while pos < len(ids):
        k = int(rng.integers(1, 200))
        mi.append(ids[pos:pos + k])
        pos += k
        seen.add(len(mi._runs))
    assert mi.n == len(ids) and max(seen) >= 3
    for N, t in ((5000, 8), (3001, 8), (40, 32), (1, 8)):
        starts = np.sort(rng.choice(N, min(30, N), replace=False))
        starts[0] = 0
        widths = np.diff(np.concatenate([starts, [N]]))
        ref = entry_match(query_match(torch.from_numpy(ids)[None], torch.tensor([N]), min(t, N)),
                          torch.from_numpy(starts)[None], torch.from_numpy(widths)[None])[0].numpy()
        got = mi.entry_mass(ids[max(N - t, 0):N], N, starts, widths)
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_memory_session_union_and_match_top_score_as_mc_eval(tmp_path, monkeypatch):
    """MemorySession(focus=...) scores the entries with focus.focus_scores, as mc_eval's policies
    of the same names: "union" is the entrywise max of LensNet's scores and match_top's, and
    match_top never runs LensNet."""
    from megacontext import focus as F
    m = model(match=True).eval()
    ids = planted(np.random.default_rng(6), n=384, at=150)
    for policy in ("match_top", "union"):
        s = MemorySession(m, W=48, path=str(tmp_path / policy), focus=policy)
        s.ingest(ids)
        seen, real = {}, m.lensnet.forward
        m.lensnet.forward = lambda *a, **k: seen.setdefault("lens", real(*a, **k))
        got = []
        monkeypatch.setattr(s.focus, "refocus", lambda wc, scores: got.append(scores) or
                            {"expanded": 0, "collapsed": 0, "first_changed": len(wc), "len": len(wc), "ms": 0.0})
        s.refocus()
        m.lensnet.forward = real
        mass = s._match.entry_mass(ids[-m.config.mc_block_size:], len(ids), s.wc.starts, s.wc.widths)
        top = F.match_scores(s.wc, mass, top=F.MATCH_TOP)
        if policy == "match_top":
            assert "lens" not in seen
            np.testing.assert_allclose(got[0], top)
        else:
            lens = seen["lens"][0].float().numpy()
            np.testing.assert_allclose(got[0], np.maximum(top, lens), rtol=1e-6)
            assert (lens > top).any() and (top > lens).any(), "both scorers decide some entries"
        s.close()
    with pytest.raises(ValueError, match="focus policy"):
        F.focus_scores("oracle", s.wc)
    # a model trained without the feature: union's LensNet scores are the "lens" session's, whose
    # LensNet never sees a match (only match_top reads it)
    plain = model(match=False).eval()
    got = {}
    for policy in ("lens", "union"):
        s = MemorySession(plain, W=48, path=str(tmp_path / f"plain_{policy}"), focus=policy)
        s.ingest(ids)
        real = plain.lensnet.forward
        plain.lensnet.forward = lambda *a, **k: got.setdefault(policy, real(*a, **k))
        s.refocus()
        plain.lensnet.forward = real
        s.close()
    torch.testing.assert_close(got["union"], got["lens"])
    # union, the best measured policy on both held-out tasks, is what a session gets by default
    assert F.DEFAULT_FOCUS == "union" and MemorySession(m, W=48).focus_by == "union"
