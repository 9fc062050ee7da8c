"""
The working context (WC): the mixed-LOD window the model actually sees.

- Two parallel int64 arrays in timeline order, `levels` and `indices`: entry j is the tree node
  (levels[j], indices[j]) covering tokens [indices[j]*K**levels[j], (indices[j]+1)*K**levels[j]).
  Block alignment holds by construction; `validate()` checks everything else: exact contiguous
  coverage of [0, N), len <= W, levels in [0, max_level], the newest `tail` tokens at LOD0.
- N is not stored: it is the end of the last entry.
- All edits go through one all-or-nothing rebuild, `apply(expand, collapse)`: slicing around a
  few edits (the allocator), np.repeat over the old arrays for many (sampler, bulk append), so a
  batch costs one O(W) copy. Every edit returns the position of the first entry it changed;
  entries before it are untouched, so a KV cache keeps them.
- `append` collapses oldest-first across levels (the oldest legal K-sibling group, whatever its
  level). Streaming from `recency(N)` this lands exactly on `recency(N+1)` (hypothesis-tested,
  not proven), and a bulk append(n) equals n single appends, so decode and training-time
  default windows agree. Lowest-level-first would instead drain all LOD0 detail into one huge
  LOD1 band.
- `recency()`: LOD0 as far back as the budget allows, then LOD1 as far back as possible, then
  LOD2...; region boundaries come from a binary search each (cost is strictly monotone).
- Positions: "gaussian" puts a span at its centre with sigma = sqrt((w^2-1)/12), the std of a
  uniform over w integer positions, w = K**level; LOD0 gets sigma exactly 0 (plain RoPE).
  "entry" counts positions in entries (bounded by W); the level goes in an embedding elsewhere.
"""

import numpy as np


def _coarse_count(e, lo, K, L):
    """Fewest entries of levels lo..L covering [0, e); e must be a multiple of K**lo."""
    count = 0
    for l in range(L, lo - 1, -1):
        c = e // K**l
        count += c
        e -= c * K**l
    return count


def _pinned_end(N, K, L, tail):
    """Largest block-aligned point that LOD>=1 entries may reach: they must end <= N - tail."""
    return 0 if L == 0 else (max(N - tail, 0) // K) * K


def _layout(N, K, L, bounds):
    """Arrays for a layout whose levels fall toward the present: bounds[l] is where the level-l
    region starts; it ends at N (l = 0) or at bounds[l-1]; level L covers [0, bounds[L-1])."""
    ends = [N] + list(bounds)                       # ends[l] = end of the level-l region
    levels, indices = [], []
    for l in range(L, -1, -1):
        a = 0 if l == L else ends[l + 1]
        b = ends[l]
        idx = np.arange(a // K**l, b // K**l, dtype=np.int64)
        levels.append(np.full(len(idx), l, dtype=np.int64))
        indices.append(idx)
    return np.concatenate(levels), np.concatenate(indices)


class WorkingContext:

    def __init__(self, K=32, W=1024, max_level=2, tail=None, levels=None, indices=None):
        self.K, self.W, self.max_level = int(K), int(W), int(max_level)
        self.tail = self.K if tail is None else int(tail)
        self._pow = self.K ** np.arange(self.max_level + 1, dtype=np.int64)
        self.levels = np.zeros(0, np.int64) if levels is None else np.asarray(levels, dtype=np.int64).copy()
        self.indices = np.zeros(0, np.int64) if indices is None else np.asarray(indices, dtype=np.int64).copy()
        self.validate()

    # ---- basic views --------------------------------------------------------------------------

    def __len__(self):
        return len(self.levels)

    @property
    def num_tokens(self):
        if len(self.levels) == 0:
            return 0
        return int((self.indices[-1] + 1) * self._pow[self.levels[-1]])

    @property
    def widths(self):
        return self._pow[self.levels]

    @property
    def starts(self):
        return self.indices * self._pow[self.levels]

    def level_counts(self):
        return np.bincount(self.levels, minlength=self.max_level + 1)

    def positions(self, scheme="entry"):
        """(pos, sigma) float64 per entry. See the module docstring for the two schemes."""
        if scheme == "entry":
            return np.arange(len(self), dtype=np.float64), np.zeros(len(self), np.float64)
        if scheme == "gaussian":
            w = self.widths.astype(np.float64)
            pos = self.starts.astype(np.float64) + (w - 1.0) / 2.0
            return pos, np.sqrt((w * w - 1.0) / 12.0)
        raise ValueError(f"unknown position scheme {scheme!r} (expected 'entry' or 'gaussian')")

    # ---- invariants ---------------------------------------------------------------------------

    def validate(self):
        K, W, L = self.K, self.W, self.max_level
        if K < 2 or L < 0 or W < 1 or self.tail < 0:
            raise ValueError(f"bad parameters K={K} W={W} max_level={L} tail={self.tail}")
        lv, ix = self.levels, self.indices
        if lv.ndim != 1 or ix.ndim != 1 or lv.shape != ix.shape:
            raise ValueError(f"levels {lv.shape} and indices {ix.shape} must be equal-length 1-D arrays")
        if len(lv) > W:
            raise ValueError(f"working context has {len(lv)} entries > budget W={W}")
        if len(lv) == 0:
            return
        if lv.min() < 0 or lv.max() > L:
            raise ValueError(f"levels must lie in [0, {L}], got [{lv.min()}, {lv.max()}]")
        if ix.min() < 0:
            raise ValueError("negative node index")
        starts, widths = self.starts, self.widths
        ends = starts + widths
        if starts[0] != 0:
            raise ValueError(f"coverage must start at token 0, starts at {starts[0]}")
        bad = np.flatnonzero(starts[1:] != ends[:-1])
        if len(bad):
            j = int(bad[0])
            raise ValueError(f"not contiguous: entry {j} ends at {ends[j]}, entry {j+1} starts at {starts[j+1]}")
        N = int(ends[-1])
        if ends.max() > N:   # cannot happen once contiguous; kept as the literal "node exists" rule
            raise ValueError("entry covers tokens beyond N (node does not exist yet)")
        pinned = (lv > 0) & (ends > N - self.tail)
        if pinned.any():
            j = int(np.flatnonzero(pinned)[0])
            raise ValueError(f"entry {j} (LOD{lv[j]}) reaches into the LOD0 tail: ends at {ends[j]} > N - tail = {N - self.tail}")

    # ---- legality -----------------------------------------------------------------------------

    def can_expand(self):
        return (self.levels >= 1) & (len(self) + self.K - 1 <= self.W)

    def _group_ok(self, p):
        """Vectorized: do positions p start a legal collapse group?"""
        K, n = self.K, len(self)
        p = np.asarray(p, dtype=np.int64)
        ok = (p >= 0) & (p + K <= n)
        q = np.where(ok, p, 0)
        last = np.where(ok, p + K - 1, 0)
        lv, ix = self.levels[q], self.indices[q]
        ok &= (lv < self.max_level) & (ix % K == 0)
        # first and last sibling in place implies all K in between (they must fill the span)
        ok &= (self.levels[last] == lv) & (self.indices[last] == ix + K - 1)
        parent_end = (ix // K + 1) * self._pow[np.minimum(lv + 1, self.max_level)]
        ok &= parent_end <= self.num_tokens - self.tail
        return ok

    def _group_ok_at(self, p):
        """Scalar twin of _group_ok for one position."""
        K, n = self.K, len(self)
        if p < 0 or p + K > n:
            return False
        l, i = int(self.levels[p]), int(self.indices[p])
        return (l < self.max_level and i % K == 0 and int(self.levels[p + K - 1]) == l
                and int(self.indices[p + K - 1]) == i + K - 1
                and (i // K + 1) * K ** (l + 1) <= self.num_tokens - self.tail)

    def collapse_groups(self):
        """Positions (ascending, i.e. oldest first) where a legal K-sibling collapse group starts."""
        n, K = len(self), self.K
        if n < K:
            return np.zeros(0, np.int64)
        p = np.flatnonzero((self.indices[: n - K + 1] % K == 0) & (self.levels[: n - K + 1] < self.max_level))
        return p[self._group_ok(p)]

    # ---- edits --------------------------------------------------------------------------------

    def apply(self, expand=(), collapse=()):
        """Expand the entries at positions `expand` and collapse the groups starting at positions
        `collapse`, all against the current state, in one rebuild. All-or-nothing: any illegal
        or overlapping edit, or a result over budget, raises ValueError and changes nothing.
        Returns the first changed entry position (len(self) if nothing changed)."""
        return self._apply(expand, collapse, self.W)

    def _apply(self, expand, collapse, budget):
        K, n, lv = self.K, len(self), self.levels
        e = np.asarray(expand, dtype=np.int64).reshape(-1)
        c = np.asarray(collapse, dtype=np.int64).reshape(-1)
        if len(e) == 0 and len(c) == 0:
            return n
        if len(set(e.tolist())) < len(e) or len(set(c.tolist())) < len(c):
            raise ValueError("duplicate edit positions")
        if len(e) and (e.min() < 0 or e.max() >= n):
            raise ValueError(f"expand position out of range [0, {n})")
        if len(e) and (lv[e] < 1).any():
            raise ValueError(f"cannot expand a LOD0 entry (positions {e[lv[e] < 1].tolist()})")
        if len(c):
            # per-position scalar checks beat ~15 small numpy ops for the allocator's few edits
            ok = self._group_ok(c) if len(c) > 8 else np.array([self._group_ok_at(p) for p in c.tolist()])
            if not ok.all():
                raise ValueError(f"no legal K-sibling group starts at {c[~ok].tolist()} "
                                 "(needs K aligned same-level siblings, level < max_level, outside the LOD0 tail)")
            # groups never overlap each other; an expanded entry must not sit inside one
            if len(e) and (((e[:, None] >= c[None, :]) & (e[:, None] < c[None, :] + K)).any()):
                raise ValueError("an expanded entry lies inside a collapse group")
        new_len = n + (K - 1) * (len(e) - len(c))
        if new_len > budget:
            raise ValueError(f"edit would make {new_len} entries > budget W={budget}")
        if len(e) + len(c) <= 16:   # the allocator's case: slicing around a few edits is cheapest
            edits = sorted([(p, 1) for p in e.tolist()] + [(p, K) for p in c.tolist()])
            first = edits[0][0]
            lv_parts, ix_parts, prev = [], [], 0
            for p, width in edits:
                lv_parts.append(self.levels[prev:p]); ix_parts.append(self.indices[prev:p])
                l, i = int(self.levels[p]), int(self.indices[p])
                if width == 1:   # expand: K children one level down
                    lv_parts.append(np.full(K, l - 1, np.int64)); ix_parts.append(np.arange(i * K, i * K + K, dtype=np.int64))
                else:            # collapse: the parent
                    lv_parts.append(np.array([l + 1], np.int64)); ix_parts.append(np.array([i // K], np.int64))
                prev = p + width
            lv_parts.append(self.levels[prev:]); ix_parts.append(self.indices[prev:])
            self.levels, self.indices = np.concatenate(lv_parts), np.concatenate(ix_parts)
            return first
        counts = np.ones(n, np.int64)   # many edits (sampler, bulk append): one np.repeat rebuild
        counts[e] = K
        if len(c):
            counts[(c[:, None] + np.arange(1, K)).reshape(-1)] = 0
        new_lv = np.repeat(self.levels, counts)
        new_ix = np.repeat(self.indices, counts)
        at = np.cumsum(counts) - counts                # where each old entry lands
        if len(e):
            kids = (at[e][:, None] + np.arange(K)).reshape(-1)
            new_lv[kids] -= 1
            new_ix[kids] = new_ix[kids] * K + np.tile(np.arange(K), len(e))
        if len(c):
            new_lv[at[c]] += 1
            new_ix[at[c]] //= K
        self.levels, self.indices = new_lv, new_ix
        return int(min(e.min() if len(e) else n, c.min() if len(c) else n))

    def expand(self, i):
        """Replace LOD>=1 entry i by its K children. Returns i."""
        if not (0 <= i < len(self)):
            raise ValueError(f"expand position {i} out of range [0, {len(self)})")
        return self.apply(expand=[i])

    def collapse(self, i):
        """Replace the K aligned siblings starting at entry i by their parent. Returns i."""
        if not (0 <= i < len(self)):
            raise ValueError(f"collapse position {i} out of range [0, {len(self)})")
        return self.apply(collapse=[i])

    def check_append(self, n=1):
        """Raises ValueError if append(n) would (it changes nothing then); returns int(n)."""
        n = int(n)
        if n < 0:
            raise ValueError("cannot append a negative number of tokens")
        if n == 0:
            return 0
        K, L = self.K, self.max_level
        N_final = self.num_tokens + n
        pinned = _pinned_end(N_final, K, L, self.tail)
        need = _coarse_count(pinned, 1, K, L) + (N_final - pinned) if L > 0 else N_final
        if need > self.W:
            raise ValueError(f"{N_final} tokens cannot fit in W={self.W} even fully collapsed "
                             f"({need} entries at max_level={L}); raise W or max_level")
        return n

    def append(self, n=1):
        """Add n LOD0 tokens; collapse oldest-first until len <= W. Returns the first changed
        entry position. Raises ValueError (and changes nothing) if even the coarsest layout of
        N + n tokens would not fit in W."""
        n = self.check_append(n)
        first = len(self)
        if n == 0:
            return first
        K = self.K
        chunk = max(self.W // 2, 1)   # bulk appends in chunks keep the arrays O(W)
        while n > 0:
            m = min(n, chunk)
            N = self.num_tokens
            self.levels = np.concatenate([self.levels, np.zeros(m, np.int64)])
            self.indices = np.concatenate([self.indices, np.arange(N, N + m, dtype=np.int64)])
            n -= m
            while len(self) > self.W:
                g = self.collapse_groups()
                if len(g) == 0:
                    break   # mid-bulk only: a later chunk completes the blocks that can collapse
                g = self._oldest_first(g, -(-(len(self) - self.W) // (K - 1)))
                first = min(first, g[0])
                self._apply((), g, len(self))   # shrinks: the over-budget start is fine
        assert len(self) <= self.W
        return first

    def _oldest_first(self, groups, need):
        """The first `need` of the legal groups (ascending), cut short right after one whose
        parent completes a new legal group: that group is older than the rest, and collapsing
        one at a time oldest-first would take it next, so the caller rescans. This makes a bulk
        append(n) equal to n single appends (when each of those fits)."""
        K, L, lv, ix, n = self.K, self.max_level, self.levels, self.indices, len(self)
        limit = self.num_tokens - self.tail
        made, out = {}, []   # made: original position of a taken group's last entry -> its parent
        for p in groups[:need].tolist():
            out.append(p)
            l, P = int(lv[p]) + 1, int(ix[p]) // K
            made[p + K - 1] = (l, P)
            P0 = P - P % K
            if l >= L or (P0 // K + 1) * K ** (l + 1) > limit:
                continue                            # P's siblings can never collapse (yet)
            q = p + K + (P0 + K - 1 - P) - 1        # later siblings: entries right after the group
            if q >= p + K and (q >= n or lv[q] != l or ix[q] != P0 + K - 1):
                continue
            q, s = p - 1, P - 1                     # earlier siblings: entries, or parents made above
            while s >= P0:
                if made.get(q) == (l, s):
                    q -= K
                elif q >= 0 and lv[q] == l and ix[q] == s:
                    q -= 1
                else:
                    break
                s -= 1
            if s < P0:
                break
        return out

    # ---- construction, persistence ------------------------------------------------------------

    @classmethod
    def recency(cls, N, K=32, W=1024, max_level=2, tail=None):
        """Detail decays with distance: LOD0 as far back as the budget allows, then LOD1 as far
        back as it allows, and so on; the oldest region is max_level. Uses the budget to within
        K-1 entries unless everything fits at LOD0."""
        tail = K if tail is None else int(tail)
        L = max_level
        if L == 0 or N <= W:
            if N > W:
                raise ValueError(f"{N} tokens do not fit in W={W} at max_level=0")
            return cls(K, W, L, tail, np.zeros(N, np.int64), np.arange(N, dtype=np.int64))
        bounds, b_prev, fixed, top = [], N, 0, _pinned_end(N, K, L, tail)
        for l in range(L):
            step = K ** (l + 1)
            top = (min(top, b_prev) // step) * step
            def cost(e):   # entries if levels < l are fixed, level l spans [e, b_prev), coarsest below e
                return fixed + (b_prev - e) // K**l + _coarse_count(e, l + 1, K, L)
            if cost(top) > W:
                raise ValueError(f"{N} tokens cannot fit in W={W} at max_level={L} (K={K}, tail={tail})")
            lo, hi = 0, top // step      # cost(m*step) strictly decreases in m: smallest feasible m
            while lo < hi:
                mid = (lo + hi) // 2
                if cost(mid * step) <= W:
                    hi = mid
                else:
                    lo = mid + 1
            e = lo * step
            fixed += (b_prev - e) // K**l
            bounds.append(e)
            b_prev = e
        return cls(K, W, L, tail, *_layout(N, K, L, bounds))

    @classmethod
    def coarsest(cls, N, K=32, W=1024, max_level=2, tail=None):
        """Fewest entries covering [0, N) with the LOD0 tail; ValueError if that exceeds W."""
        tail = K if tail is None else int(tail)
        L = max_level
        bounds, b = [], _pinned_end(N, K, L, tail)
        for l in range(L):
            b = (b // K ** (l + 1)) * K ** (l + 1)
            bounds.append(b)
        levels, indices = _layout(N, K, L, bounds)
        if len(levels) > W:
            raise ValueError(f"{N} tokens need {len(levels)} entries even fully collapsed > W={W}")
        return cls(K, W, L, tail, levels, indices)

    def copy(self):
        """A copy of this (valid) window, not validated again: MemorySession copies it per token."""
        out = object.__new__(type(self))   # copy.copy, without its generic protocol (~10x slower)
        out.__dict__.update(self.__dict__)  # scalars and _pow are never mutated in place: shared
        out.levels, out.indices = self.levels.copy(), self.indices.copy()
        return out

    def to_dict(self):
        """JSON-able; entries stored as level runs [level, first_index, count] (consecutive
        entries of one level always have consecutive indices), so a W=8192 window is a few
        dozen numbers."""
        lv = self.levels
        cut = np.flatnonzero(np.diff(lv)) + 1
        firsts = np.concatenate([[0], cut]).astype(np.int64) if len(lv) else np.zeros(0, np.int64)
        counts = np.diff(np.concatenate([firsts, [len(lv)]]))
        runs = [[int(lv[f]), int(self.indices[f]), int(c)] for f, c in zip(firsts, counts)]
        return {"K": self.K, "W": self.W, "max_level": self.max_level, "tail": self.tail, "runs": runs}

    @classmethod
    def from_dict(cls, d):
        runs = d["runs"]
        levels = np.concatenate([np.full(c, l, np.int64) for l, _, c in runs]) if runs else None
        indices = np.concatenate([np.arange(i, i + c, dtype=np.int64) for _, i, c in runs]) if runs else None
        return cls(d["K"], d["W"], d["max_level"], d["tail"], levels, indices)

    def __eq__(self, other):
        if not isinstance(other, WorkingContext):
            return NotImplemented
        return ((self.K, self.W, self.max_level, self.tail) == (other.K, other.W, other.max_level, other.tail)
                and np.array_equal(self.levels, other.levels) and np.array_equal(self.indices, other.indices))

    def __repr__(self):
        return (f"WorkingContext(N={self.num_tokens}, len={len(self)}/{self.W}, K={self.K}, "
                f"per_level={self.level_counts().tolist()})")
