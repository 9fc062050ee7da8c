"""
Focus: deciding which spans of the working context are at which LOD.

- `FocusAllocator.refocus` turns LensNet's signed per-entry scores (> 0 wants more detail,
  < 0 less) into at most `n_diff` edits. Greedy, on a plan made against the current state:
  the most wanted edit goes first (the best expansion if its score beats the worst group's
  -score, else that group's collapse). An expansion that does not fit is paid for by collapsing
  the lowest-scoring group, but only if that group scores below the expansion (a trade that
  loses detail where it is wanted less). With free_collapses (the default), a group scoring
  below -threshold is also collapsed with nothing to pay for; the MC paths turn that off, since
  LensNet's scores only rank expansions. All chosen edits are disjoint, so they go through one
  `WorkingContext.apply` rebuild: the candidate selection is numpy (argpartition over W
  entries), only the <= n_diff chosen edits touch Python.
- Carried scores (carry_scores, on in the MC paths): LensNet is trained on expansions of gists
  (LOD >= 1) only, so its scores for LOD0 tokens carry no signal, and a needle just brought to
  LOD0 would be collapsed again, after the hysteresis, to pay for any gist that scores above the
  noise. So a LOD0 group keeps, as its collapse score, the score its parent had when this
  allocator expanded it (at least; while it stays expanded). With a LensNet that scores the
  needle's gists +4 and everything else as noise, mc_eval's 8 rounds left the needle at LOD0
  13/15/9/5 times in 20 at 4/16/64/256x W without this, 20/20 with it (python -m
  scripts.bench_focus --needle-sim; tests/test_focus.py).
- Hysteresis: the allocator remembers the parent node (level, index) of each edit and when it
  made it; for `hysteresis` refocus steps it will not collapse what it expanded, nor expand
  what it collapsed. This stops flip-flopping when scores hover near the threshold.
- `sample_working_contexts`: training-time windows. The first is always `recency()` (the
  default policy at inference); the others start from `coarsest()` and expand random entries in
  a few batched rounds (uniform, clustered around random points, biased to recent or old
  history; favouring coarse or fine entries) until no further expansion fits. All are validated, all really compress.
- `pack_working_contexts`: pads a list of windows into (n, W) arrays for batched gathers.
"""
import time

import numpy as np

from megacontext.working_context import WorkingContext

_LEVEL_BITS = 6   # node key = index << 6 | level: one int per span


def _keys(levels, indices):
    return (np.asarray(indices, np.int64) << _LEVEL_BITS) | np.asarray(levels, np.int64)


class FocusAllocator:

    def __init__(self, n_diff=4, hysteresis=2, threshold=0.0, free_collapses=True, carry_scores=False):
        """free_collapses: also collapse a group only because its mean score is below -threshold,
        with no expansion to pay for. Off for LensNet: it learns from expansion counterfactuals
        only (a score says whether expanding beats no edit), so a low score does not say that
        losing detail is harmless; there, collapses only pay for expansions.
        carry_scores: a LOD0 group's collapse score is at least the score that expanded its
        parent (module docstring); on for LensNet, whose LOD0 scores are untrained."""
        self.n_diff, self.hysteresis, self.threshold = int(n_diff), int(hysteresis), float(threshold)
        self.free_collapses, self.carry_scores = bool(free_collapses), bool(carry_scores)
        self._worth = {}       # parent key -> score that expanded it, while it stays expanded (carry_scores)
        self.calls = 0
        self._expanded = {}    # parent key -> step it was expanded at (do not collapse it back)
        self._collapsed = {}   # parent key -> step it was collapsed into (do not expand it back)

    def _recent(self, table, step):
        for k in [k for k, s in table.items() if step - s > self.hysteresis]:
            del table[k]
        return set(table)

    def refocus(self, wc, scores, step=None):
        """Edit `wc` in place toward the scores. `step` is the hysteresis clock (default: the
        number of refocus calls so far); an edit made at step s is not reversed while
        step - s <= hysteresis. Returns telemetry."""
        t0 = time.perf_counter()
        step = self.calls if step is None else int(step)
        self.calls += 1
        K, thr, n = wc.K, self.threshold, len(wc)
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (n,):
            raise ValueError(f"scores must have shape ({n},), got {scores.shape}")
        lv, ix = wc.levels, wc.indices
        blocked_expand = self._recent(self._collapsed, step)
        blocked_collapse = self._recent(self._expanded, step)

        # expansion candidates: LOD>=1, score > threshold, not just collapsed; best first.
        # A collapse group can shadow at most K candidates, so n_diff*(K+1) of them are enough.
        # Blocked ones are filtered after the partition (cheaper), so keep that many extra.
        cand = np.flatnonzero((lv >= 1) & (scores > thr))
        m = min(len(cand), self.n_diff * (K + 1) + len(blocked_expand))
        if m < len(cand):
            cand = cand[np.argpartition(-scores[cand], m - 1)[:m]]
        if len(blocked_expand) and len(cand):
            cand = cand[[k not in blocked_expand for k in _keys(lv[cand], ix[cand]).tolist()]]
        cand = cand[np.argsort(-scores[cand], kind="stable")]

        # collapse candidates: legal groups scored by their mean, not just expanded; worst first
        groups = wc.collapse_groups()
        cs = np.concatenate([[0.0], np.cumsum(scores)])
        gscore = (cs[groups + K] - cs[groups]) / K
        if len(self._worth) > 2 * (n // K + 1):
            # stale keys: parents collapsed outside the allocator (WorkingContext.append in a long chat)
            live = set(_keys(1, np.unique(ix[lv == 0] // K)).tolist())
            self._worth = {k: v for k, v in self._worth.items() if k in live}
        if self._worth and len(groups):
            low = lv[groups] == 0
            carried = np.array([self._worth.get(k, -np.inf) for k in _keys(1, ix[groups[low]] // K).tolist()])
            gscore[low] = np.maximum(gscore[low], carried)
        m = min(len(groups), 2 * self.n_diff + 1 + len(blocked_collapse))   # a planned expand shadows <= 1 group
        if m < len(groups):
            sel = np.argpartition(gscore, m - 1)[:m]
            groups, gscore = groups[sel], gscore[sel]
        if len(blocked_collapse) and len(groups):
            keep = [k not in blocked_collapse for k in _keys(lv[groups] + 1, ix[groups] // K).tolist()]
            groups, gscore = groups[keep], gscore[keep]
        order = np.argsort(gscore, kind="stable")
        groups, gscore = groups[order].tolist(), gscore[order].tolist()
        cand, cscore = cand.tolist(), scores[cand].tolist()

        expands, collapses = [], []
        free = wc.W - n

        def free_group(j, *also):   # first group from j that is unused and holds no planned expand
            while j < len(groups):
                g = groups[j]
                if g not in collapses and not any(g <= e < g + K for e in (*expands, *also)):
                    return j
                j += 1
            return j

        ei = gi = 0
        while len(expands) + len(collapses) < self.n_diff:
            while ei < len(cand) and any(g <= cand[ei] < g + K for g in collapses):
                ei += 1
            gi = free_group(gi)
            se = cscore[ei] if ei < len(cand) else None
            sg = gscore[gi] if gi < len(groups) else None
            want_collapse = self.free_collapses and sg is not None and sg < -thr
            if se is not None and (not want_collapse or se >= -sg):
                if free >= K - 1:
                    expands.append(cand[ei]); ei += 1; free -= K - 1
                    continue
                pj = free_group(gi, cand[ei])           # the cheapest group that can pay
                if pj < len(groups) and gscore[pj] < se and len(expands) + len(collapses) + 2 <= self.n_diff:
                    collapses.append(groups[pj]); expands.append(cand[ei]); ei += 1
                else:
                    ei = len(cand)   # unaffordable; weaker expansions are too. Collapses may remain.
            elif want_collapse:
                collapses.append(groups[gi]); free += K - 1
            else:
                break

        exp_keys = _keys(lv[expands], ix[expands]).tolist() if expands else []
        col_keys = _keys(lv[collapses] + 1, ix[collapses] // K).tolist() if collapses else []
        exp_scores = scores[expands].tolist() if expands else []
        first = wc.apply(expand=expands, collapse=collapses)
        for k, sc in zip(exp_keys, exp_scores):
            self._expanded[k] = step
            if self.carry_scores and k & ((1 << _LEVEL_BITS) - 1) == 1:   # a LOD1 parent of LOD0 tokens
                self._worth[k] = sc
        for k in col_keys:
            self._collapsed[k] = step
            self._worth.pop(k, None)
        return {"expanded": len(expands), "collapsed": len(collapses), "first_changed": first,
                "len": len(wc), "step": step, "ms": (time.perf_counter() - t0) * 1e3}


# MemorySession(focus=...): who scores the entries at refocus. "lens": LensNet; "match": the query
# match alone; "match_top": only the best-matched spans (MATCH_TOP); "union": max(lens, match_top)
# per entry (README, Results: the one policy good at both held-out passkey and multi-key)
FOCUS_POLICIES = ("lens", "match", "match_top", "union")
MATCH_FOCUS = ("match", "match_top", "union")   # the ones that read the query match
FOCUS_HELP = ("who scores the memory at refocus: lens (LensNet), match (the query's rare bigrams found in "
              "memory), match_top (only the best-matched spans) or union (max of lens and match_top; the default)")
# what chat uses unless told otherwise: on one H200 run (README, Results) union was the best or
# near it in every held-out cell (passkey 0.95 / multi-key 0.78 at 64x W; lens: 0.03 / 0.38)
DEFAULT_FOCUS = "union"
MATCH_TOP = 0.5   # match_top: a gist expands only with >= this share of the best span's match mass


def reads_match(policy, lens_match):
    """Does a refocus by this policy need the query-match mass? The match policies do, and "lens"
    does when LensNet was trained to read it (GPTConfig.lens_match)."""
    return policy in MATCH_FOCUS or (policy == "lens" and lens_match)


def focus_scores(policy, wc, mass=None, lens=None):
    """The refocus scores of a FOCUS_POLICIES policy (mc_eval and MemorySession share it). mass:
    (E,) query-match mass (the MATCH_FOCUS policies); lens: a callable -> (E,) LensNet scores,
    called only by the policies that read LensNet ("lens", "union")."""
    if policy not in FOCUS_POLICIES:
        raise ValueError(f"focus policy must be one of {FOCUS_POLICIES}, got {policy!r}")
    if policy == "lens":
        return lens()
    scores = match_scores(wc, mass, top=0.0 if policy == "match" else MATCH_TOP)
    return np.maximum(scores, lens()) if policy == "union" else scores


def match_scores(wc, mass, top=0.0):
    """The "match" focus policy: the query-match feature alone (match.query_match), no learning.
    wc: the WorkingContext; mass (E,) numpy: each entry's query-match mass. A gist scores its
    log-mass above the median gist's, so only outliers expand; with top > 0, also above
    log1p(top x the best-matched span's mass), the span being a gist or a K-group of LOD0 tokens
    (a needle already expanded), so that only the best-matched spans expand: a multi-key question
    shares its phrase with every needle, but its key with one. A LOD0 entry scores its log-mass
    - 0.1: unmatched ones slightly low (they pay for expansions, as in the evals' oracle), matched
    ones (a needle brought to LOD0) above 0, so that they stay."""
    mass = np.asarray(mass, np.float64)
    m = np.log1p(mass)
    gist = wc.levels >= 1
    ref = np.median(m[gist]) if gist.any() else 0.0
    if top > 0 and len(wc):
        best = mass[gist].max() if gist.any() else 0.0
        g = wc.indices[~gist] // wc.K
        if len(g):
            best = max(best, np.bincount(g - g.min(), weights=mass[~gist]).max())
        ref = max(ref, float(np.log1p(top * best)))
    return np.where(gist, m - ref, m - 0.1)


def lens_allocator(n_diff=4, hysteresis=2):
    """The allocator the MC paths (MemorySession, mc_eval) drive with LensNet's scores: collapses
    only pay for expansions, and found detail keeps the score that expanded it."""
    return FocusAllocator(n_diff, hysteresis, free_collapses=False, carry_scores=True)


def sample_working_contexts(N, K, W, max_level, n, rng, tail=None):
    """n valid windows over [0, N): recency() first, then diverse random LOD mixtures that fill
    the budget. Deterministic for a given np.random.Generator state."""
    out = [WorkingContext.recency(N, K, W, max_level, tail)]
    modes = ["uniform", "clustered", "recent", "old"]
    for s in range(1, n):
        wc = WorkingContext.coarsest(N, K, W, max_level, tail)
        mode = modes[(s - 1) % len(modes)] if rng.random() < 0.75 else modes[int(rng.integers(len(modes)))]
        centres = rng.uniform(0, N, size=int(rng.integers(1, 4)))
        scale = N * rng.uniform(0.005, 0.2)
        power = rng.uniform(1.0, 4.0)
        depth = rng.uniform(-2.0, 2.0)   # > 0 favours opening coarse entries (breadth), < 0 depth
        while True:
            room = (W - len(wc)) // (K - 1)
            cand = np.flatnonzero(wc.levels >= 1)
            if room == 0 or len(cand) == 0:
                break
            mid = (wc.starts[cand] + wc.widths[cand] / 2) / max(N, 1)
            if mode == "uniform":
                w = np.ones(len(cand))
            elif mode == "clustered":
                w = np.exp(-np.abs(mid[:, None] * N - centres[None, :]) / scale).sum(1) + 1e-6
            elif mode == "recent":
                w = mid**power + 1e-6
            else:
                w = (1 - mid) ** power + 1e-6
            w = w * wc.levels[cand].astype(np.float64) ** depth
            # a random share of the remaining room per round: later rounds can refine children
            k = min(len(cand), max(1, int(room * rng.uniform(0.3, 1.0))))
            pick = rng.choice(cand, size=k, replace=False, p=w / w.sum())
            wc.apply(expand=pick)
        wc.validate()
        out.append(wc)
    return out


def focus_on(wc, pos, level=0):
    """Expand the entries covering token `pos` until it sits at `level` or finer, collapsing the
    legal groups farthest from it when the budget is short. In place; returns wc. Training uses
    it to show the model (and LensNet's probes) windows that hold a task's needle in detail."""
    K = wc.K
    while True:
        j = int(np.searchsorted(wc.starts, pos, side="right") - 1)
        if wc.levels[j] <= level:
            return wc
        while len(wc) + K - 1 > wc.W:
            g = wc.collapse_groups()
            end = wc.starts[g + K - 1] + wc.widths[g + K - 1]
            g = g[(end <= pos) | (wc.starts[g] > pos)]
            if len(g) == 0:
                raise ValueError(f"cannot make room to focus on token {pos}")
            dist = np.minimum(np.abs(wc.starts[g] - pos), np.abs(wc.starts[g + K - 1] - pos))
            wc.apply(collapse=[int(g[np.argmax(dist)])])
            j = int(np.searchsorted(wc.starts, pos, side="right") - 1)
        wc.apply(expand=[j])


def pack_working_contexts(wcs, W):
    """(n, W) arrays for batched gathers: levels (pad -1), indices/starts/widths (pad 0), lengths."""
    lengths = np.array([len(w) for w in wcs], dtype=np.int64)
    if len(wcs) and lengths.max() > W:
        raise ValueError(f"a working context has {lengths.max()} entries > W={W}")
    mask = np.arange(W)[None, :] < lengths[:, None]
    out = {"levels": np.full((len(wcs), W), -1, np.int64), "lengths": lengths}
    for name in ("indices", "starts", "widths"):
        out[name] = np.zeros((len(wcs), W), np.int64)
    if len(wcs):
        out["levels"][mask] = np.concatenate([w.levels for w in wcs])
        out["indices"][mask] = np.concatenate([w.indices for w in wcs])
        out["starts"][mask] = np.concatenate([w.starts for w in wcs])
        out["widths"][mask] = np.concatenate([w.widths for w in wcs])
    return out
