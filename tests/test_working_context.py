"""
WorkingContext invariants: random edit/append sequences stay valid (validate() after every op),
illegal edits raise and change nothing, edits round-trip, positions are exact, recency() and
coarsest() are what they claim, and streaming append reproduces recency().
"""
import json

import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st, HealthCheck

from megacontext.working_context import WorkingContext

SETTINGS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (K, W, max_level, tail): small K so that LOD2/LOD3 show up at small N
PARAMS = st.sampled_from([(2, 12, 3, None), (3, 16, 2, None), (4, 20, 3, None), (4, 40, 2, 3),
                          (4, 24, 3, 0), (8, 64, 2, None), (5, 30, 1, 7), (32, 256, 2, None)])


def max_tokens(K, W, L, tail):
    """A history length N such that every N' <= N fits in W fully collapsed: the coarsest layout
    is at most N'//K**L top-level entries, K-1 per middle level, and tail + K-1 LOD0 entries."""
    tail = K if tail is None else tail
    return (W - (L - 1) * (K - 1) - tail - (K - 1)) * K**L


def snapshot(wc):
    return wc.levels.copy(), wc.indices.copy()


def check_prefix(before, wc, first):
    """Entries before `first` are unchanged (what the KV cache relies on)."""
    lv, ix = before
    assert np.array_equal(wc.levels[:first], lv[:first]) and np.array_equal(wc.indices[:first], ix[:first])


@settings(**SETTINGS)
@given(PARAMS, st.integers(0, 3), st.floats(0, 1),
       st.lists(st.tuples(st.sampled_from(["append", "expand", "collapse", "apply"]), st.floats(0, 1),
                          st.integers(1, 40), st.booleans()), min_size=1, max_size=30))
def test_random_edit_sequences_keep_invariants(params, start, frac, ops):
    K, W, L, tail = params
    N = int(frac * max_tokens(K, W, L, tail))
    wc = [WorkingContext(K, W, L, tail), WorkingContext.recency(N, K, W, L, tail),
          WorkingContext.coarsest(N, K, W, L, tail), WorkingContext.recency(min(N, W), K, W, L, tail)][start]
    wc.validate()
    for op, u, n, pick_legal in ops:
        before, copy = snapshot(wc), wc.copy()
        i = int(u * (len(wc) + 2)) - 1                     # also hits -1 and len: out of range
        groups = wc.collapse_groups()
        legal = groups if op == "collapse" else np.flatnonzero(wc.can_expand())
        if pick_legal and len(legal):
            i = int(legal[int(u * len(legal)) % len(legal)])
        legal_expand = 0 <= i < len(wc) and bool(wc.can_expand()[i])
        try:
            if op == "append":
                first = wc.append(n)
            elif op == "expand":
                first = wc.expand(i)
                assert legal_expand
            elif op == "collapse":
                first = wc.collapse(i)
                assert i in groups
            else:   # a batch: every other legal group plus one expansion
                first = wc.apply(expand=[i] if legal_expand else [], collapse=groups[::2])
        except ValueError:
            event(f"{op} refused")
            assert wc == copy, "a failed edit must leave the working context unchanged"
            if op == "expand":
                assert not legal_expand
            if op == "collapse":
                assert i not in groups
            continue
        event(f"{op} done")
        wc.validate()
        check_prefix(before, wc, first)
        if op == "append":
            assert wc.num_tokens == copy.num_tokens + n


@settings(**SETTINGS)
@given(PARAMS, st.floats(0, 1), st.integers(0, 10_000))
def test_expand_collapse_round_trip(params, frac, seed):
    K, W, L, tail = params
    N = int(frac * max_tokens(K, W, L, tail))
    wc = WorkingContext.coarsest(N, K, W, L, tail)
    rng = np.random.default_rng(seed)
    ok = np.flatnonzero(wc.can_expand())
    if len(ok):
        i = int(rng.choice(ok))
        orig = wc.copy()
        assert wc.expand(i) == i
        wc.validate()
        assert wc.collapse(i) == i
        assert wc == orig
    wc = WorkingContext.recency(N, K, W, L, tail)
    g = wc.collapse_groups()
    if len(g):
        i = int(rng.choice(g))
        orig = wc.copy()
        wc.collapse(i)
        wc.validate()
        wc.expand(i)
        assert wc == orig


@settings(**SETTINGS)
@given(PARAMS, st.floats(0, 1))
def test_recency_and_coarsest(params, frac):
    K, W, L, tail = params
    N = int(frac * max_tokens(K, W, L, tail))
    rec = WorkingContext.recency(N, K, W, L, tail)
    rec.validate()
    assert rec.num_tokens == N
    assert (np.diff(rec.levels) <= 0).all(), "detail decays with distance: levels never rise toward the past"
    if N > W:
        assert len(rec) > W - K, f"budget under-used: {len(rec)} of {W}"
    else:
        assert (rec.levels == 0).all()
    co = WorkingContext.coarsest(N, K, W, L, tail)
    co.validate()
    assert len(co.collapse_groups()) == 0 and len(co) <= len(rec)


@settings(**SETTINGS)
@given(PARAMS, st.floats(0, 1), st.integers(1, 50))
def test_streaming_append_reproduces_recency(params, frac, n):
    """Oldest-first collapse keeps a streaming window equal to the training-time default."""
    K, W, L, tail = params
    M = max_tokens(K, W, L, tail)
    N = int(frac * M)
    wc = WorkingContext.recency(N, K, W, L, tail)
    for _ in range(n):
        if wc.num_tokens + 1 > M:
            break
        wc.append(1)
        assert wc == WorkingContext.recency(wc.num_tokens, K, W, L, tail)
    bulk = WorkingContext(K, W, L, tail)
    bulk.append(wc.num_tokens)
    assert bulk == wc


def test_recency_far_history_uses_lod2():
    wc = WorkingContext.recency(1_000_000, 32, 8192, 2)
    wc.validate()
    counts = wc.level_counts()
    assert counts[2] > 900 and len(wc) > 8192 - 32
    assert wc.levels[0] == 2 and (wc.levels[-32:] == 0).all()
    assert wc.num_tokens / len(wc) > 100


def test_append_errors_leave_wc_unchanged():
    wc = WorkingContext.recency(30, 4, 12, 1)
    copy = wc.copy()
    with pytest.raises(ValueError):
        wc.append(10_000)              # cannot fit even fully collapsed at max_level 1
    assert wc == copy
    with pytest.raises(ValueError):
        wc.append(-1)
    assert wc.append(0) == len(wc)


def test_illegal_edits_raise():
    K = 4
    wc = WorkingContext.recency(200, K, 30, 2)
    copy = wc.copy()
    lod0 = int(np.flatnonzero(wc.levels == 0)[0])
    cases = [("expand", lod0), ("expand", len(wc)), ("expand", -1), ("collapse", len(wc) - K),   # tail
             ("collapse", 0)]                                                                    # LOD2 = max_level
    full = WorkingContext.recency(200, K, 30, 2)
    while full.can_expand().any():
        full.expand(int(np.flatnonzero(full.can_expand())[0]))
    for op, i in cases:
        with pytest.raises(ValueError):
            getattr(wc, op)(i)
        assert wc == copy
    with pytest.raises(ValueError):    # over budget
        full.expand(int(np.flatnonzero(full.levels >= 1)[0]))
    g = wc.collapse_groups()
    if len(g):
        with pytest.raises(ValueError):   # misaligned: one entry into a group
            wc.collapse(int(g[0]) + 1)
        with pytest.raises(ValueError):   # an expansion inside a collapsed group
            wc.apply(expand=[int(g[0])], collapse=[int(g[0])])
    assert wc == copy


@pytest.mark.parametrize("levels,indices,why", [
    ([0, 0, 0], [0, 2, 3], "gap"),
    ([1, 0, 0], [0, 3, 4], "overlap"),
    ([0, 0], [1, 2], "start"),
    ([3, 0], [0, 64], "level above max"),
    ([1, 0], [0, 4], "LOD1 inside the LOD0 tail"),
    ([0] * 41, list(range(41)), "over budget"),
    ([0, -1], [0, 1], "negative level"),
])
def test_validate_rejects(levels, indices, why):
    with pytest.raises((ValueError, AssertionError)):
        WorkingContext(4, 40, 2, None, np.array(levels), np.array(indices))


@settings(**SETTINGS)
@given(PARAMS, st.floats(0, 1))
def test_positions(params, frac):
    K, W, L, tail = params
    N = int(frac * max_tokens(K, W, L, tail))
    wc = WorkingContext.coarsest(N, K, W, L, tail)
    while wc.can_expand().any():   # a mixed window: expand the middle-most candidate
        c = np.flatnonzero(wc.can_expand())
        wc.expand(int(c[len(c) // 2]))
    pos, sigma = wc.positions("gaussian")
    assert np.array_equal(wc.widths, K ** wc.levels)          # K**level, never max_seq_len**level
    lod0 = wc.levels == 0
    assert np.array_equal(pos[lod0], wc.starts[lod0].astype(np.float64))   # plain RoPE positions
    assert (sigma[lod0] == 0.0).all()
    assert np.allclose(pos, wc.starts + (wc.widths - 1) / 2)
    assert np.allclose(sigma, np.sqrt((wc.widths.astype(float) ** 2 - 1) / 12))
    for l in range(1, L + 1):
        if (wc.levels == l).any():
            assert np.allclose(sigma[wc.levels == l], np.sqrt((K ** (2 * l) - 1) / 12))
    pos, sigma = wc.positions("entry")
    assert np.array_equal(pos, np.arange(len(wc))) and (sigma == 0).all() and (pos < W).all()
    with pytest.raises(ValueError):
        wc.positions("bogus")


def test_persistence_round_trip():
    wc = WorkingContext.recency(123_457, 32, 1024, 3, tail=40)
    wc.expand(int(np.flatnonzero(wc.levels == 3)[0])) if len(wc) + 31 <= 1024 else None
    d = json.loads(json.dumps(wc.to_dict()))
    back = WorkingContext.from_dict(d)
    assert back == wc and back is not wc
    assert WorkingContext.from_dict(WorkingContext(4, 10, 2).to_dict()) == WorkingContext(4, 10, 2)
    other = wc.copy()
    other.W += 1
    assert other != wc
