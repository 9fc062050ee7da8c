"""
Focus allocator and training-time sampler: legality, budget, n_diff, hysteresis, that the
greedy choice is the obvious one, and that sampled windows are valid, diverse and compress.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from megacontext.focus import FocusAllocator, pack_working_contexts, sample_working_contexts
from megacontext.working_context import WorkingContext
from megacontext.evals import oracle_scores, needle_rank
from scripts.bench_focus import noisy_lens_focus

SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def children_present(wc, level, index):
    K = wc.K
    return bool(((wc.levels == level - 1) & (wc.indices // K == index)).sum() == K)


@settings(**SETTINGS)
@given(st.sampled_from([(4, 40, 2), (4, 30, 3), (8, 64, 2), (3, 20, 2)]), st.integers(0, 10_000),
       st.integers(1, 6), st.integers(0, 3), st.floats(0, 0.5), st.booleans(), st.booleans())
def test_refocus_keeps_invariants(params, seed, n_diff, hysteresis, thr, free, carry):
    K, W, L = params
    rng = np.random.default_rng(seed)
    N = int(rng.integers(0, W * K**L // 4))
    wcs = sample_working_contexts(N, K, W, L, 3, rng)
    fa = FocusAllocator(n_diff=n_diff, hysteresis=hysteresis, threshold=thr, free_collapses=free, carry_scores=carry)
    wc = wcs[int(rng.integers(3))]
    history = []   # (step, kind, level, index) of every edit the allocator made
    for step in range(8):
        before = wc.copy()
        scores = rng.normal(size=len(wc)) * rng.choice([0.1, 1.0, 10.0])
        tel = fa.refocus(wc, scores)
        wc.validate()
        assert wc.num_tokens == N and len(wc) <= W
        assert tel["expanded"] + tel["collapsed"] <= n_diff
        assert len(wc) == len(before) + (K - 1) * (tel["expanded"] - tel["collapsed"])
        f = tel["first_changed"]
        assert np.array_equal(wc.levels[:f], before.levels[:f]) and np.array_equal(wc.indices[:f], before.indices[:f])
        if tel["expanded"] + tel["collapsed"] == 0:
            assert wc == before and f == len(before)
        # reconstruct what changed: expanded nodes vanished at level>=1, collapsed parents appeared
        old = set(zip(before.levels.tolist(), before.indices.tolist()))
        new = set(zip(wc.levels.tolist(), wc.indices.tolist()))
        expanded = {k for k in old - new if (k[0] - 1, k[1] * K) in new}
        collapsed = {k for k in new - old if (k[0] - 1, k[1] * K) in old}
        assert len(expanded) == tel["expanded"] and len(collapsed) == tel["collapsed"]
        if not free:
            assert tel["collapsed"] <= tel["expanded"], "collapses only pay for expansions"
        for lvl, idx in expanded:   # expanded things had positive score above threshold
            j = int(np.flatnonzero((before.levels == lvl) & (before.indices == idx))[0])
            assert scores[j] > thr
        for lvl, idx in expanded:   # hysteresis: not re-expanding what was just collapsed
            assert not any(k == "collapse" and (l, i) == (lvl, idx) and step - s <= hysteresis
                           for s, k, l, i in history)
        for lvl, idx in collapsed:
            assert not any(k == "expand" and (l, i) == (lvl, idx) and step - s <= hysteresis
                           for s, k, l, i in history)
        history += [(step, "expand", l, i) for l, i in expanded] + [(step, "collapse", l, i) for l, i in collapsed]


def test_expands_highest_and_collapses_lowest():
    K, W, L = 4, 40, 2
    wc = WorkingContext.recency(300, K, W, L)
    assert len(wc) > W - K + 1              # full: an expansion must be paid for
    scores = np.zeros(len(wc))
    lod1 = np.flatnonzero(wc.levels >= 1)
    hi = int(lod1[len(lod1) // 2])
    scores[hi] = 5.0
    scores[lod1[0]] = 1.0                   # a weaker expansion candidate
    groups = wc.collapse_groups()
    g = int(groups[-1]) if groups[-1] not in range(hi - K + 1, hi + 1) else int(groups[0])
    scores[g:g + K] = -3.0
    lvl, idx = int(wc.levels[hi]), int(wc.indices[hi])
    glvl, gidx = int(wc.levels[g]) + 1, int(wc.indices[g]) // K
    tel = FocusAllocator(n_diff=2).refocus(wc, scores)
    wc.validate()
    assert tel["expanded"] == 1 and tel["collapsed"] == 1
    assert children_present(wc, lvl, idx)
    assert ((wc.levels == glvl) & (wc.indices == gidx)).any()
    assert tel["first_changed"] == min(hi, g)


def test_expands_when_room_and_skips_lod0_and_tail():
    K, W, L = 4, 64, 2
    wc = WorkingContext.coarsest(300, K, W, L)
    scores = np.where(wc.levels == 0, 100.0, 0.0)   # LOD0 cannot expand, however much it wants to
    scores[0] = 1.0
    tel = FocusAllocator(n_diff=4).refocus(wc, scores)
    assert tel["expanded"] == 1 and tel["collapsed"] == 0 and wc.levels[0] == 1
    # the LOD0 tail never collapses, however little it is wanted
    wc = WorkingContext.recency(300, K, W, L)
    scores = np.zeros(len(wc))
    scores[-K:] = -100.0
    before = wc.copy()
    FocusAllocator(n_diff=4).refocus(wc, scores)
    assert np.array_equal(wc.levels[-K:], before.levels[-K:]) and (wc.levels[-K:] == 0).all()


def test_without_free_collapses_collapses_only_pay_for_expansions():
    """LensNet's scores rank expansions; a low score is not a licence to lose detail. With
    free_collapses=False an all-LOD0 window scored negative stays as it is, and a full window
    still pays for a wanted expansion with its lowest group."""
    wc = WorkingContext.recency(40, 4, 40, 2)                   # N = W: every entry LOD0
    before = wc.copy()
    scores = -np.linspace(1, 5, len(wc))
    assert FocusAllocator(free_collapses=True).refocus(wc.copy(), scores)["collapsed"] > 0
    tel = FocusAllocator(free_collapses=False).refocus(wc, scores)
    assert tel["collapsed"] == tel["expanded"] == 0 and wc == before
    K, W, L = 4, 40, 2
    wc = WorkingContext.recency(300, K, W, L)
    assert len(wc) > W - K + 1                                  # full: an expansion must be paid for
    scores = -np.ones(len(wc))
    j = int(np.flatnonzero(wc.levels >= 1)[len(np.flatnonzero(wc.levels >= 1)) // 2])
    scores[j] = 5.0
    tel = FocusAllocator(n_diff=4, free_collapses=False).refocus(wc, scores)
    wc.validate()
    assert tel["expanded"] == 1 and tel["collapsed"] == 1, tel


def test_no_edit_when_scores_flat():
    wc = WorkingContext.recency(5000, 8, 128, 2)
    before = wc.copy()
    fa = FocusAllocator(threshold=1e-3)
    for s in [np.zeros(len(wc)), np.random.default_rng(0).uniform(-1e-4, 1e-4, len(wc))]:
        tel = fa.refocus(wc, s)
        assert tel["expanded"] == tel["collapsed"] == 0 and tel["first_changed"] == len(wc)
        assert wc == before
    assert FocusAllocator().refocus(wc, np.zeros(len(wc)))["expanded"] == 0


def test_hysteresis_blocks_reversal_then_releases():
    K, W, L = 4, 60, 2
    wc = WorkingContext.coarsest(300, K, W, L)
    fa = FocusAllocator(n_diff=1, hysteresis=2)
    j = int(np.flatnonzero(wc.levels == 1)[0])
    lvl, idx = int(wc.levels[j]), int(wc.indices[j])
    s = np.zeros(len(wc))
    s[j] = 1.0
    assert fa.refocus(wc, s)["expanded"] == 1
    assert children_present(wc, lvl, idx)
    for step in range(2):   # the children now want to go back: refused for 2 more calls
        kids = np.flatnonzero((wc.levels == lvl - 1) & (wc.indices // K == idx))
        s = np.zeros(len(wc))
        s[kids] = -5.0
        tel = fa.refocus(wc, s)
        assert tel["collapsed"] == 0 and children_present(wc, lvl, idx)
    tel = fa.refocus(wc, s)
    assert tel["collapsed"] == 1 and not children_present(wc, lvl, idx)
    # ...and now the collapsed parent is not re-expanded for 2 calls
    p = int(np.flatnonzero((wc.levels == lvl) & (wc.indices == idx))[0])
    s = np.zeros(len(wc))
    s[p] = 5.0
    assert fa.refocus(wc, s)["expanded"] == 0
    assert fa.refocus(wc, s)["expanded"] == 0
    assert fa.refocus(wc, s)["expanded"] == 1


def test_refocus_at_w8192_keeps_invariants():
    """W=8192, K=32, 1M tokens of history: the allocator's decode-time setting. Its speed is a
    benchmark's job (scripts/bench_focus.py, scripts/bench_mc.py), not a unit test's; here every
    call must leave a valid window over the same tokens, within budget and n_diff."""
    N, K, W = 1_000_000, 32, 8192
    wc = WorkingContext.recency(N, K, W, 2)
    fa = FocusAllocator()
    rng = np.random.default_rng(0)
    edits = 0
    for i in range(12):
        before = len(wc)
        tel = fa.refocus(wc, rng.normal(size=len(wc)))
        wc.validate()
        assert wc.num_tokens == N and len(wc) <= W
        assert tel["expanded"] + tel["collapsed"] <= fa.n_diff
        assert len(wc) == before + (K - 1) * (tel["expanded"] - tel["collapsed"])
        edits += tel["expanded"] + tel["collapsed"]
    assert edits > 0, "random scores at W=8192 should make the allocator edit something"


@pytest.mark.parametrize("K,W,L", [(8, 64, 2), (32, 1024, 2), (4, 32, 3)])
def test_sampler(K, W, L):
    N = 32 * W
    wcs = sample_working_contexts(N, K, W, L, 8, np.random.default_rng(1))
    assert len(wcs) == 8 and wcs[0] == WorkingContext.recency(N, K, W, L)
    for wc in wcs:
        wc.validate()
        assert wc.num_tokens == N and len(wc) <= W and N / len(wc) >= 4
        assert len(wc) > W - K   # fills the budget
    layouts = {tuple(w.levels.tolist()) + tuple(w.indices.tolist()) for w in wcs}
    assert len(layouts) >= 6, "sampled windows should differ"
    counts = np.array([w.level_counts()[1:].sum() for w in wcs[1:]])
    assert counts.std() > 0
    again = sample_working_contexts(N, K, W, L, 8, np.random.default_rng(1))
    assert all(a == b for a, b in zip(wcs, again))
    other = sample_working_contexts(N, K, W, L, 8, np.random.default_rng(2))
    assert any(a != b for a, b in zip(wcs[1:], other[1:]))


def test_sampler_far_history_has_lod2_and_small_n():
    K, W = 8, 128
    N = 4 * K * W            # N >> K*W: LOD1 alone cannot cover it
    for wc in sample_working_contexts(N, K, W, 2, 6, np.random.default_rng(0)):
        assert wc.level_counts()[2] > 0
    few = sample_working_contexts(10, K, W, 2, 3, np.random.default_rng(0))   # fits at LOD0
    assert all(w.num_tokens == 10 for w in few) and (few[0].levels == 0).all()


def test_pack():
    K, W = 8, 64
    wcs = sample_working_contexts(3000, K, W, 2, 4, np.random.default_rng(0)) + [WorkingContext(K, W, 2)]
    p = pack_working_contexts(wcs, W)
    assert p["levels"].shape == (5, W) and p["lengths"].tolist() == [len(w) for w in wcs]
    for r, wc in enumerate(wcs):
        n = len(wc)
        assert np.array_equal(p["levels"][r, :n], wc.levels) and (p["levels"][r, n:] == -1).all()
        assert np.array_equal(p["indices"][r, :n], wc.indices) and (p["indices"][r, n:] == 0).all()
        assert np.array_equal(p["starts"][r, :n], wc.starts) and np.array_equal(p["widths"][r, :n], wc.widths)
    with pytest.raises(ValueError):
        pack_working_contexts(wcs, 10)


@pytest.mark.parametrize("mult", [4, 64, 256])
def test_a_perfect_scorer_reaches_any_needle_within_the_eval_rounds(mult):
    """mc_eval's focus loop (8 refocus rounds, n_diff 4, collapses only to pay) can bring a needle
    anywhere in a 4-256x W history down to LOD0, descending through LOD2, when the scores are
    right. So a miss in the eval is LensNet's (or the reader's), not the allocator's."""
    K, W, L = 32, 512, 2
    N = mult * W
    for depth in np.linspace(0.05, 0.95, 5):
        needle = int(depth * N)
        wc = WorkingContext.recency(N, K, W, L)
        fa = FocusAllocator(n_diff=4, hysteresis=2, free_collapses=False)
        for _ in range(8):
            fa.refocus(wc, oracle_scores(wc, [(needle, needle + 1)]))   # mc_eval's "oracle" policy
        wc.validate()
        j = int(np.searchsorted(wc.starts, needle, side="right") - 1)
        assert wc.levels[j] == 0, (mult, depth, wc.level_counts())


@pytest.mark.parametrize("mult", [64, 256])
def test_carried_scores_keep_a_found_needle_at_lod0(mult):
    """Without carried scores the noise on LOD0 scores lets a later round collapse the needle's
    tokens again to pay for a gist that scored above the noise (kept 13/15/9/5 of 20 at 4/16/64/256x
    W); with them the tokens keep the score that expanded their parent, and stay (20/20 each)."""
    N = mult * 512
    needles = np.random.default_rng(100).integers(0, N - 2048, size=20)
    kept = {c: sum(noisy_lens_focus(N, int(n), i, c)[-1] == 0 for i, n in enumerate(needles)) for c in (False, True)}
    assert kept[True] == 20 and kept[False] < 16, kept


def test_carried_score_is_dropped_when_its_parent_collapses():
    K, W, L = 4, 40, 2
    wc = WorkingContext.recency(200, K, W, L)
    fa = FocusAllocator(n_diff=2, hysteresis=0, free_collapses=False, carry_scores=True)
    j = int(np.flatnonzero(wc.levels == 1)[0])
    s = np.zeros(len(wc)); s[j] = 3.0
    fa.refocus(wc, s)
    assert list(fa._worth.values()) == [3.0]
    key = next(iter(fa._worth))
    # the same tokens are collapsed back once something scores above the carried 3.0
    for _ in range(30):
        s = np.full(len(wc), -1.0)
        s[wc.levels >= 1] = 5.0
        s[wc.levels == 0] = -5.0
        fa.refocus(wc, s)
        if key not in fa._worth:
            break
    assert key not in fa._worth, "a collapsed parent no longer carries its expansion score"
    fa._worth.update({(i << 6) | 1: 1.0 for i in range(10_000, 10_100)})   # parents gone without the allocator
    fa.refocus(wc, np.zeros(len(wc)))
    assert len(fa._worth) <= 2 * (len(wc) // K + 1), "stale carried scores are pruned"


def test_needle_rank_counts_gists_scored_above_the_needles_best_gist():
    wc = WorkingContext.recency(4096, 32, 256, 2)
    needle = 100
    g = np.flatnonzero(wc.levels >= 1)
    j = int(np.flatnonzero((wc.starts <= needle) & (wc.starts + wc.widths > needle))[0])
    scores = np.zeros(len(wc))
    scores[g[:5]] = 3.0                      # five other gists above it (if j is among them, fewer)
    scores[j] = 2.0
    assert needle_rank(wc, scores, [(needle, needle + 1)]) == 1 + int((g[:5] != j).sum())
    scores[j] = 9.0
    assert needle_rank(wc, scores, [(needle, needle + 1)]) == 1
    tail = int(wc.starts[-1])                # a needle already at LOD0 has no rank
    assert needle_rank(wc, scores, [(tail, tail + 1)]) is None
