"""
MegaContext evaluations (DESIGN §11). Every function works on one long token sequence at a time
and returns plain numbers; scripts/mc_eval.py sweeps lengths, policies and seeds and plots.

Policies compared at the same budget W (entries):
- "lens":     MegaContext, recency layout refocused by LensNet + the focus allocator (R rounds)
- "recency":  MegaContext, recency layout, no refocus (gists, but no learned focus)
- "random":   MegaContext, refocused with random scores (same allocator, same number of rounds)
- "match":    MegaContext, refocused by the query-match feature alone (no learning: the bigrams
              of the recent tokens against the history, match.query_match); LensNet reads the same
              feature when config.lens_match is on
- "match_top": the same, but only gists with at least half the match mass of the best-matched
              span (a gist or a K-group of LOD0 tokens) expand
- "union":    max(lens, match_top) per entry: what either scorer wants expanded
- "oracle":   MegaContext, refocused with perfect scores: the entries that cover the answer's
              needle score high (task examples only). Its accuracy is the reader's with ideal
              focus, so lens < oracle is LensNet's miss and oracle < 1 is the reader's.
- "window":   the same model reading only the last W tokens (a plain sliding window: no memory)
- "full":     the same model with full attention over the whole history (where it fits)

Scoring is teacher-forced: the window covers [0, N) where N is where the answer starts; the answer
tokens follow as plain tokens; an example is correct when every answer token is the argmax.
"""
import numpy as np
import torch
import torch.nn.functional as F

from megacontext.working_context import WorkingContext
from megacontext.focus import lens_allocator, focus_scores, reads_match, FOCUS_POLICIES, MATCH_FOCUS
from megacontext.mctrain import build_table, level_offsets
from nanochat.gpt import lens_features
from megacontext.match import query_match, entry_match


MC_POLICIES = ("lens", "recency", "random") + MATCH_FOCUS   # + "oracle" (needs targets)
POLICIES = MC_POLICIES + ("oracle", "window", "full")


def wilson_interval(p, n, z=1.96):
    """The Wilson score interval (95% at z = 1.96) of an accuracy p measured on n examples: the
    band the plots draw. Unlike p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at
    p = 0 or 1 (at n = 40: 0/40 -> [0, 0.088], 20/40 -> [0.352, 0.648])."""
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1 examples, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {p}")
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return max(0.0, c - h), min(1.0, c + h)


@torch.no_grad()
def build_levels(model, ids):
    """ids (N,) on device -> node table (rows: tokens, LOD1 gists, LOD2 ...) and level offsets:
    the training step's table (mctrain.build_table) for one sequence."""
    table, _ = build_table(model, ids[None])
    c = model.config
    return table, level_offsets(ids.size(0), c.mc_block_size, c.mc_max_level)[0]


def entry_inputs(model, table, offs, wc):
    lv = torch.as_tensor(wc.levels, device=table.device)
    ix = torch.as_tensor(wc.indices, device=table.device)
    src = torch.as_tensor(offs, device=table.device)[lv] + ix
    return model.add_level_embedding(table[src][None], lv[None])[0]


def match_cumsum(hist, N, tail=32):
    """query_match's prefix sums (1, N + 1) for one history of token ids hist[:N] (device tensor):
    like the query, they do not change between refocus rounds."""
    return query_match(hist[None, :N], torch.tensor([N], device=hist.device), min(tail, N))


def wc_match(wc, cs):
    """(E,) query-match mass under each entry of wc, from match_cumsum's prefix sums."""
    return entry_match(cs, torch.as_tensor(wc.starts, device=cs.device)[None],
                       torch.as_tensor(wc.widths, device=cs.device)[None])[0]


@torch.no_grad()
def lens_scores(model, table, offs, wc, query, mass=None):
    """query: LensNet's (1, t, D) queries (lens_query); mass: wc_match's (E,) query-match mass,
    needed when the model reads the query-match feature (config.lens_match)."""
    N = wc.num_tokens
    lv = torch.as_tensor(wc.levels, device=table.device)[None]
    emb = entry_inputs(model, table, offs, wc)[None]
    match = mass[None] if model.config.lens_match else None
    feats = lens_features(torch.as_tensor(wc.starts, device=table.device)[None],
                          torch.as_tensor(wc.widths, device=table.device)[None], N, match)
    s = model.lensnet(emb, lv, feats, query, torch.ones_like(lv, dtype=torch.bool))
    return s[0].float().cpu().numpy()


def _covers(wc, targets):
    """(E,) bool: the entries of wc that overlap any target token span [(a, b)]."""
    hit = np.zeros(len(wc), bool)
    for a, b in targets:
        hit |= (wc.starts < b) & (wc.starts + wc.widths > a)
    return hit


def oracle_scores(wc, targets):
    """Perfect focus for needles at token spans targets [(a, b)]: the entries that overlap one
    score high (expand), other LOD0 entries slightly low (they may collapse to pay for it)."""
    return np.where(_covers(wc, targets), 5.0, -0.1 * (wc.levels == 0))


def needles_at_lod0(wc, targets):
    """True when every token of every target span [(a, b)] is a LOD0 entry of wc."""
    return not (_covers(wc, targets) & (wc.levels > 0)).any()


def needle_rank(wc, scores, targets):
    """Rank (1 = top) of the best-scored gist that holds a target needle, among all gists of wc;
    None when no gist holds one (the needles are LOD0 already)."""
    gist = wc.levels >= 1
    hit = gist & _covers(wc, targets)
    if not hit.any():
        return None
    return int((scores[gist] > scores[hit].max()).sum()) + 1


def lens_query(model, hist, N, tail=32):
    """LensNet's queries for a history of token ids hist[:N]. The history does not change
    between refocus rounds: one query serves them all."""
    t = min(tail, N)
    return model.lens_queries(torch.as_tensor(hist[max(0, N - model.lens_context(t)):N])[None], t)


def focus(model, table, offs, N, W, policy, rounds=8, n_diff=4, rng=None, targets=None, trace=None, query=None,
          match_cs=None):
    """Build the working context for a policy (MC_POLICIES or 'oracle';
    the oracle needs the target needles' token spans). trace: a dict that gets, with targets, the
    first round's needle_rank and the number of gists it ranked among (does the policy's
    scorer find the needle before the allocator acts?). query: LensNet's queries (lens_query),
    needed by "lens" and "union"; match_cs: match_cumsum, needed by the match policies (and by
    "lens" when the model reads the query-match feature)."""
    c = model.config
    wc = WorkingContext.recency(N, c.mc_block_size, W, c.mc_max_level)
    if policy == "recency":
        return wc, 0
    alloc = lens_allocator(n_diff)   # as MemorySession
    edits = 0
    for r in range(rounds):
        mass = wc_match(wc, match_cs) if reads_match(policy, c.lens_match) else None   # once per round, for both of union's scorers
        if policy in FOCUS_POLICIES:   # lens, match, match_top, union: as MemorySession scores them
            scores = focus_scores(policy, wc, None if mass is None else mass.cpu().numpy(),
                                  lambda: lens_scores(model, table, offs, wc, query=query, mass=mass))
        elif policy == "oracle":
            scores = oracle_scores(wc, targets)
        else:
            scores = rng.standard_normal(len(wc))
        if r == 0 and trace is not None and targets:
            trace.update(needle_rank=needle_rank(wc, scores, targets), gists=int((wc.levels >= 1).sum()))
        t = alloc.refocus(wc, scores)
        edits += t["expanded"] + t["collapsed"]
        if t["expanded"] + t["collapsed"] == 0:
            break
    return wc, edits


@torch.no_grad()
def score_continuation(model, prefix_emb, pos, sigma, cont_ids):
    """NLL per token and argmax-correctness of cont_ids given prefix embeddings (E, D)."""
    dev = prefix_emb.device
    cont = torch.as_tensor(cont_ids, device=dev)
    x = torch.cat([prefix_emb, model.embed(cont[:-1])], 0)[None]
    logits = model(embeds=x, pos=pos[None], sigma=None if sigma is None else sigma[None])[0]
    E = prefix_emb.size(0)
    lg = logits[E - 1: E - 1 + len(cont)].float()
    nll = F.cross_entropy(lg, cont, reduction="none")
    correct = bool((lg.argmax(-1) == cont).all())
    return nll.cpu().numpy(), correct


def _positions(scheme, wc, n_cont, device, N):
    if scheme == "entry":
        E = len(wc)
        return torch.arange(E + n_cont - 1, device=device), None
    pos, sig = wc.positions("gaussian")
    pos = np.concatenate([pos, N + np.arange(n_cont - 1)])
    sig = np.concatenate([sig, np.zeros(n_cont - 1)])
    return torch.as_tensor(pos, device=device), torch.as_tensor(sig, device=device)


@torch.no_grad()
def eval_example(model, ids, N, cont, W, policies, rounds=8, rng=None, full_max=None, targets=None):
    """ids: the history tokens [0, N) (np array); cont: tokens to score after it; targets: the
    answer's needle spans [(a, b)] (tokens), for the oracle policy (skipped without them).
    Returns {policy: {"correct": bool, "nll": mean nll, "edits": n}}."""
    dev = next(model.parameters()).device
    out = {}
    hist = torch.as_tensor(np.asarray(ids[:N]), device=dev)
    mc_pol = [p for p in policies if p in MC_POLICIES or (p == "oracle" and targets)]
    if mc_pol:
        table, offs = build_levels(model, hist)
        query = lens_query(model, hist, N) if {"lens", "union"} & set(mc_pol) else None
        mcs = match_cumsum(hist, N) if any(reads_match(p, model.config.lens_match) for p in mc_pol) else None
        for p in mc_pol:
            trace = {}
            wc, edits = focus(model, table, offs, N, W, p, rounds, rng=rng, targets=targets, trace=trace, query=query,
                              match_cs=mcs)
            emb = entry_inputs(model, table, offs, wc)
            pos, sig = _positions(model.config.pos_scheme, wc, len(cont), dev, N)
            nll, ok = score_continuation(model, emb, pos, sig, cont)
            out[p] = {"correct": ok, "nll": float(nll.mean()), "edits": edits,
                      "lod_counts": wc.level_counts().tolist()}
            if targets:   # did focus bring every answer needle to LOD0? (a miss: focus's, else the reader's)
                out[p]["needle_at_lod0"] = needles_at_lod0(wc, targets)
                out[p].update(trace)
    for p, span in (("window", W), ("full", full_max)):
        if p not in policies or (p == "full" and (full_max is None or N > full_max)):
            continue
        t = hist[max(0, N - span):]
        emb = model.embed(t)
        pos = torch.arange(len(t) + len(cont) - 1, device=dev)
        nll, ok = score_continuation(model, emb, pos, None, cont)
        out[p] = {"correct": ok, "nll": float(nll.mean()), "edits": 0}
    return out


@torch.no_grad()
def substitution_dnll(model, ids, N, H, level, n_blocks=8, rng=None):
    """ΔNLL@H of substituting single blocks by their level-`level` gist. Base window: everything in
    [0, N) at level-1 detail (LOD0 for level 1) except the pinned tail; variant: one aligned block
    of K**level tokens at `level`. Returns (mean ΔNLL over blocks, base NLL) on the next H tokens."""
    c = model.config
    K = c.mc_block_size
    dev = next(model.parameters()).device
    hist = torch.as_tensor(np.asarray(ids[:N]), device=dev)
    table, offs = build_levels(model, hist)
    cont = np.asarray(ids[N:N + H])
    lo = level - 1
    n_hi = (N - K) // K**lo                     # level-`lo` entries, then LOD0 up to N (the tail)
    start0 = n_hi * K**lo
    levels = np.concatenate([np.full(n_hi, lo), np.zeros(N - start0, np.int64)])
    indices = np.concatenate([np.arange(n_hi), np.arange(start0, N)])
    base = WorkingContext(K, W=len(levels), max_level=c.mc_max_level, levels=levels, indices=indices)
    emb = entry_inputs(model, table, offs, base)
    pos, sig = _positions(c.pos_scheme, base, len(cont), dev, N)
    nll0, _ = score_continuation(model, emb, pos, sig, cont)
    groups = list(range(n_hi // K))             # aligned groups of K level-`lo` entries
    if not groups:
        return float("nan"), float(nll0.mean())
    pick = rng.choice(groups, size=min(n_blocks, len(groups)), replace=False)
    d = []
    for g in pick:
        wc = base.copy()
        wc.apply(collapse=[g * K])
        emb = entry_inputs(model, table, offs, wc)
        pos, sig = _positions(c.pos_scheme, wc, len(cont), dev, N)
        nll1, _ = score_continuation(model, emb, pos, sig, cont)
        d.append(float(nll1.mean() - nll0.mean()))
    return float(np.mean(d)), float(nll0.mean())
