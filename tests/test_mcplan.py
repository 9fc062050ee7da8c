"""The training plan's focused windows: focus_on puts a needle at the asked level within budget,
and make_plan gives every task row one window that holds its needle at LOD0."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from megacontext.focus import focus_on, sample_working_contexts
from megacontext.mctrain import make_plan


@settings(max_examples=60, deadline=None)
@given(N=st.integers(300, 3000), frac=st.floats(0, 0.98), level=st.integers(0, 1), seed=st.integers(0, 2**16))
def test_focus_on_reaches_the_level_within_budget(N, frac, level, seed):
    rng = np.random.default_rng(seed)
    K, W, L = 8, 96, 2
    pos = int(frac * (N - 1))
    for wc in sample_working_contexts(N, K, W, L, 3, rng):
        focused = focus_on(wc.copy(), pos, level)
        focused.validate()
        j = np.searchsorted(focused.starts, pos, side="right") - 1
        assert focused.levels[j] <= level and len(focused) <= W
        assert focused.num_tokens == wc.num_tokens


def test_focus_on_raises_when_no_room():
    from megacontext.working_context import WorkingContext
    wc = WorkingContext.coarsest(64 * 64, K=8, W=80, max_level=2)   # 78 entries: no room, nothing to collapse
    with pytest.raises(ValueError):
        focus_on(wc, 5, 0)


def test_task_rows_get_a_window_with_the_needle_at_lod0():
    rng = np.random.default_rng(0)
    K, W, H, L, T = 8, 96, 8, 2, 4096
    N = np.array([T - H, 3000, 3500, T - H])
    needle = np.array([-1, 100, 1700, -1])
    plan = make_plan(N, T, K, W, H, L, 2, rng, needle)
    lv, ix, ln = plan["row_levels"], plan["row_indices"], plan["row_lengths"]
    for b in (1, 2):
        r = b * 3 + 2                                   # the last of the sample's 3 windows
        levels, indices = lv[r, :ln[r]], ix[r, :ln[r]]
        assert any(l == 0 and i == needle[b] for l, i in zip(levels, indices)), "needle token at LOD0"
        assert levels.max() >= 1, "still a compressed window"
    for b in (0, 3):                                    # text rows keep their random windows
        assert lv[b * 3 + 2, :ln[b * 3 + 2]].max() >= 1


def test_collapse_probes_are_the_base_with_one_lod0_group_collapsed():
    """make_plan(collapse=True): each sample's collapse row is its probe base with one aligned
    K-token LOD0 group replaced by its LOD1 gist; some task rows collapse the needle's own group
    (the detail LensNet must learn to keep). Off (the default) draws nothing extra."""
    from megacontext.working_context import WorkingContext
    K, W, H, L, T = 8, 160, 8, 2, 4096
    Wb = W - L * (K - 1)
    N = np.array([T - H, 3000, 3500, T - H, 2500, 3900])
    needle = np.array([-1, 100, 1700, -1, 900, 2000])
    on_needle = probed = 0
    for seed in range(12):
        plan = make_plan(N, T, K, W, H, L, 2, np.random.default_rng(seed), needle, collapse=True)
        assert plan["collapse_levels"].shape == (len(N), W)
        for b, j in enumerate(plan["collapse_at"]):
            bl, bi = plan["base_levels"][b], plan["base_indices"][b]
            n = plan["base_lengths"][b]
            base = WorkingContext(K, W=Wb, max_level=L, levels=bl[:n], indices=bi[:n])
            cn = plan["collapse_lengths"][b]
            if j < 0:                                   # no legal LOD0 group: the row is the base, and is left out
                assert cn == n and (plan["collapse_levels"][b, :n] == bl[:n]).all()
                continue
            probed += 1
            assert (bl[j:j + K] == 0).all() and bi[j] % K == 0 and (np.diff(bi[j:j + K]) == 1).all()
            base.apply(collapse=[j])
            assert cn == n - (K - 1) and (plan["collapse_levels"][b, cn:] == -1).all()
            np.testing.assert_array_equal(plan["collapse_levels"][b, :cn], base.levels)
            np.testing.assert_array_equal(plan["collapse_indices"][b, :cn], base.indices)
            on_needle += needle[b] >= 0 and bi[j] <= needle[b] < bi[j] + K
    assert probed >= 0.8 * 12 * len(N) and on_needle >= 3, (probed, on_needle)   # some test the needle's own detail
    a = make_plan(N, T, K, W, H, L, 2, np.random.default_rng(0), needle)
    b = make_plan(N, T, K, W, H, L, 2, np.random.default_rng(0), needle, collapse=False)
    assert "collapse_at" not in a and all(np.array_equal(a[k], b[k]) for k in a)
