"""
The query-match signal (DESIGN section 6, "cheap features"): how much of the query's rare
vocabulary (the bigrams of the last t tokens) lives under each span of the history.

- `query_match` / `entry_match`: batched torch, for training (MCStep) and mc_eval, where the whole
  history is a tensor. Each distinct query bigram spreads one unit over its occurrences, so a rare
  shared phrase weighs and a common one vanishes, whatever the phrasing.
- `MatchIndex`: the same numbers for a growing token stream (MemorySession), from an index of
  bigram occurrences, so that a refocus costs O(occurrences of the query's bigrams + W log N)
  instead of a pass over the whole history.

LensNet reads the result as its fifth feature (GPTConfig.lens_match); focus.match_scores turns it
into the "match" focus policy.
"""
import numpy as np
import torch
import torch.nn.functional as F


MATCH_SPREAD = 8   # query_match: a matched bigram also marks this many tokens after it
MATCH_CHUNK = 1 << 16   # query_match: history bigrams compared per chunk


def bigram_hash(ids):
    """One int64 per adjacent pair (ids[..., i], ids[..., i+1]) of a torch tensor or numpy array
    of token ids (< 2**20): the key that query_match and MatchIndex must agree on."""
    return (ids[..., :-1] << 20) | ids[..., 1:]


def query_match(ids, N, t):
    """Lexical match of the history with LensNet's query (config.lens_match): the bigrams of
    the t tokens before N[b] (the query LensNet reads) against every bigram that ends before
    N[b] - t. ids (B, T) long, N (B,) long. Returns the prefix sums (B, T + 1) float of a
    per-token mass: each distinct query bigram q spreads one unit over its count(q) occurrences
    in the history, each share spread evenly over the bigram's two tokens and the MATCH_SPREAD
    tokens after it. So a rare shared phrase ("the access code") weighs and a common one
    ("= self") vanishes, whatever the phrasing: the signal LensNet could not learn from 32:1
    gists of phrasings it never saw (README, #4). Batched tensor ops only; the history is
    compared in chunks of MATCH_CHUNK bigrams, so a 1M-token history needs no 1M x t buffer."""
    B, T = ids.shape
    if T < 2 or t < 2:   # no bigram in the history or in the query
        return torch.zeros(B, T + 1, device=ids.device)
    ids = ids.long()
    h = bigram_hash(ids)                                      # (B, T-1): the bigram ending at p = j+1
    end = N.long()[:, None] - t + torch.arange(1, t, device=ids.device)[None]   # query bigram ends
    hq = h.gather(1, (end - 1).clamp(0, max(T - 2, 0)))      # (B, t-1)
    first = ~((hq[:, :, None] == hq[:, None, :]) & torch.ones(t - 1, t - 1, dtype=torch.bool,
                                                               device=ids.device).tril(-1)).any(-1)
    qv = first & (end >= 1) & (end < T)                       # distinct, real query bigrams
    hist = torch.arange(1, T, device=ids.device)[None] < (N.long()[:, None] - t)

    def eq(a):   # (B, c, t-1): which query bigram each history bigram a .. a+c-1 equals
        return (h[:, a:a + MATCH_CHUNK, None] == hq[:, None, :]) & hist[:, a:a + MATCH_CHUNK, None] & qv[:, None, :]
    chunks = range(0, T - 1, MATCH_CHUNK)
    w = 1.0 / sum(eq(a).sum(1) for a in chunks).clamp(min=1).float()    # (B, t-1): 1 / count(q)
    mass = torch.cat([torch.bmm(eq(a).float(), w[:, :, None])[..., 0] for a in chunks], 1)
    mass = F.pad(mass, (1, 0))                                # (B, T): at the bigram's end
    # each occurrence's unit is spread over the bigram and the MATCH_SPREAD tokens after it:
    # where a phrase of the query recurs, what followed it (a passkey after "the access code
    # is") is what the query asks for, and it may sit in the next block
    S = MATCH_SPREAD
    mass = F.conv1d(F.pad(mass, (S, 1))[:, None], torch.ones(1, 1, S + 2, device=ids.device))[:, 0] / (S + 2)
    return F.pad(mass.cumsum(1), (1, 0))                      # (B, T+1): cs[i] = mass of tokens < i


def entry_match(cs, starts, widths):
    """Query-match mass under each entry from query_match's prefix sums: (B, E) float."""
    starts = starts.long().clamp(0, cs.size(1) - 1)
    return cs.gather(1, (starts + widths.long()).clamp(max=cs.size(1) - 1)) - cs.gather(1, starts)


class MatchIndex:
    """The bigram occurrences of a growing token stream (MemorySession's history), so that a
    refocus gets entry_match(query_match(...)) for its window without a pass over the history.

    Bigrams go into an unsorted tail; every RUN of them becomes a run sorted by (hash, position),
    and runs merge when the newer is as long as the older (at most ~log2(N / RUN) runs). A
    refocus binary-searches each run for the query's <= t-1 bigrams, and turns the occurrences
    into the entries' masses with prefix sums over the sorted occurrence starts: O(occurrences +
    (W + runs x t) log N). Host memory: 16 bytes per token. Built from the tree's tokens, so a
    reopened memory rebuilds it at its first refocus."""
    RUN = 4096

    def __init__(self):
        self.n, self._last = 0, None
        self._runs = []                               # [(hashes, positions)], each sorted
        self._tail_h = self._tail_p = np.zeros(0, np.int64)

    def append(self, ids):
        ids = np.asarray(ids, np.int64).ravel()
        if len(ids) == 0:
            return
        full = ids if self._last is None else np.concatenate([[self._last], ids])
        p0 = self.n - (0 if self._last is None else 1) + 1    # end position of full's first bigram
        self._tail_h = np.concatenate([self._tail_h, bigram_hash(full)])
        self._tail_p = np.concatenate([self._tail_p, np.arange(p0, p0 + len(full) - 1, dtype=np.int64)])
        self.n += len(ids)
        self._last = int(ids[-1])
        if len(self._tail_h) >= self.RUN:
            self._runs.append(self._sorted(self._tail_h, self._tail_p))
            self._tail_h = self._tail_p = np.zeros(0, np.int64)
            while len(self._runs) > 1 and len(self._runs[-1][0]) >= len(self._runs[-2][0]):
                (h1, p1), (h2, p2) = self._runs.pop(), self._runs.pop()
                self._runs.append(self._sorted(np.concatenate([h2, h1]), np.concatenate([p2, p1])))

    @staticmethod
    def _sorted(h, p):
        order = np.lexsort((p, h))
        return h[order], p[order]

    def entry_mass(self, query_ids, N, starts, widths):
        """query_ids: the t tokens [N - t, N) (N <= self.n); starts, widths (E,): the entries.
        Returns (E,) float64: entry_match(query_match(history, N, t)) for these entries."""
        q = np.asarray(query_ids, np.int64)
        t = len(q)
        starts, ends = np.asarray(starts, np.int64), np.asarray(starts, np.int64) + np.asarray(widths, np.int64)
        if N < 2 or t < 2:
            return np.zeros(len(starts))
        hq = np.unique(bigram_hash(q))
        limit = N - t                                 # occurrences end before the query starts
        occ, cnt = [], np.zeros(len(hq), np.int64)
        for h, p in self._runs:
            lo, hi = np.searchsorted(h, hq, "left"), np.searchsorted(h, hq, "right")
            for j in np.flatnonzero(hi > lo):
                ps = p[lo[j]:hi[j]]
                ps = ps[:np.searchsorted(ps, limit)]  # positions are sorted within one hash
                occ.append((np.full(len(ps), j), ps))
                cnt[j] += len(ps)
        hit = np.isin(self._tail_h, hq) & (self._tail_p < limit)   # the unsorted tail (< RUN bigrams)
        j = np.searchsorted(hq, self._tail_h[hit])
        occ.append((j, self._tail_p[hit]))
        cnt += np.bincount(j, minlength=len(hq))
        j = np.concatenate([o[0] for o in occ])
        a = np.concatenate([o[1] for o in occ]) - 1   # first token the occurrence's share reaches
        w = 1.0 / cnt[j]
        order = np.argsort(a, kind="stable")
        a, w = a[order], w[order]
        L = MATCH_SPREAD + 2
        cw, cwa = np.concatenate([[0.0], np.cumsum(w)]), np.concatenate([[0.0], np.cumsum(w * a)])

        def cs(x):   # mass of tokens < x: sum of w/L * clip(x - a, 0, L)
            full, part = np.searchsorted(a, x - L, "right"), np.searchsorted(a, x, "left")
            return cw[full] + (x * (cw[part] - cw[full]) - (cwa[part] - cwa[full])) / L
        return cs(ends) - cs(starts)
