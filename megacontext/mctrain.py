"""
End-to-end MegaContext training step (DESIGN §8), batched: no per-entry Python, no host syncs.

For a batch of B long contexts (B, T) and a cut point N_b per sample (the answer start for a
synthetic task row, else T - H):

1. Tree with gradients: token embeddings -> GistNet -> LOD1 -> GistNet -> LOD2 ... ONE GistNet
   call per level for the whole batch. Levels are concatenated into one table per sample, so a
   working-context entry (level, index) is a row of that table: `offset[level] + index`.
2. Working contexts, sampled on the CPU (numpy, in `make_plan`): pure recency + diverse random
   mixtures of budget W, and a probe base of budget W - (K-1). On the GPU, LensNet scores the
   base; its top entry, an oracle entry (the one holding the needle, for task rows) and random
   entries are expanded (pure index arithmetic, `expand_rows`) to make counterfactual rows.
3. One packed forward over every row: [entries ... | horizon tokens N .. N+H-2], right-padded so
   causal attention never sees padding (no mask needed: the fast causal kernel runs). Loss = the
   next-H-token NLL (targets are the true tokens N .. N+H-1 that follow the window).
4. LensNet learns from the counterfactual rows: for each sample, the regularised argmin over
   {no edit, expand p_1, ..., expand p_m} of horizon NLL + lambda * edits is the target class
   of a softmax over [0, s_p1, ..., s_pm] (score 0 = no edit): a positive score means "expanding
   this beats leaving it".
5. Plus the ordinary full-detail LM loss over the same tokens (keeps the base model strong).

`MCStep` is an nn.Module so that DistributedDataParallel can wrap the whole step and sync
GistNet/LensNet gradients with the rest.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megacontext.working_context import WorkingContext
from megacontext.focus import sample_working_contexts, pack_working_contexts, focus_on
from nanochat.gpt import lens_features
from megacontext.match import query_match, entry_match


def level_offsets(T, K, max_level):
    """Row offset of each level inside a sample's node table [LOD0 | LOD1 | LOD2 ...]."""
    offs, o = [], 0
    for l in range(max_level + 1):
        offs.append(o)
        o += T // K**l
    return offs, o


def build_table(model, ids):
    """(B, T) ids -> flattened node table (B*T_tab, D): tokens, then the gists of every level, one
    GistNet call per level for the whole batch. Rows of sample b start at b*T_tab; within a
    sample, level l starts at level_offsets(T, K, L)[0][l]. Training and the evals share it."""
    K, L = model.config.mc_block_size, model.config.mc_max_level
    B, T = ids.shape
    levels = [model.embed(ids)]
    for l in range(1, L + 1):
        prev = levels[-1]
        n = prev.size(1) // K
        if n == 0:      # a history too short for this level (evals on short inputs)
            levels.append(prev[:, :0])
            continue
        levels.append(model.gistnet(prev[:, :n * K].reshape(B * n, K, -1), l).view(B, n, -1))
    table = torch.cat([x.to(levels[0].dtype) for x in levels], dim=1)
    return table.reshape(B * table.size(1), -1), table.size(1)


def make_plan(N, T, K, W, H, max_level, n_random, rng, needle_pos=None, tail=None, n_probe=4, collapse=False):
    """CPU side of one step. N: (B,) cut points. Returns numpy arrays:
    rows_*: (B*(1+n_random), W) sampled windows (recency first per sample); base_*: (B, Wb)
    probe bases, Wb = W - max_level*(K-1); oracle: (B,) entry index in the base covering the
    needle (-1 if none); oracle_path: (B, max_level-1) the further expansions that take an oracle
    gist of level l >= 2 down to the needle's tokens (row positions after the previous expansion,
    -1 where none). A probe expands one entry, so the oracle of a LOD2 gist alone would only reveal
    LOD1 gists, which cannot carry a 5-digit answer: LensNet would learn that expanding it is
    useless, and never descend from LOD2. With the path, the oracle row holds the needle at LOD0,
    and the bases leave room for up to max_level expansions.
    collapse: also one collapse probe per sample (DESIGN §6: counterfactuals expand *and*
    collapse): collapse_at (B,) the base position of a K-token LOD0 group (-1 if the base has
    none) and collapse_* (B, W) the base with that group collapsed into its LOD1 gist. For a
    quarter of the task rows the base holds the needle at LOD0 and the group is the needle's, so
    that LensNet also learns which detail must stay."""
    B, Wb = len(N), W - max_level * (K - 1)
    rows, bases, oracle = [], [], np.full(B, -1, np.int64)
    cols, col_at = [], np.full(B, -1, np.int64)
    path = np.full((B, max(max_level - 1, 0)), -1, np.int64)
    for b in range(B):
        has_needle = needle_pos is not None and needle_pos[b] >= 0
        wcs = sample_working_contexts(int(N[b]), K, W, max_level, 1 + n_random, rng, tail)
        if has_needle and n_random >= 1:
            # a task row: its last random window holds the needle at LOD0, so the model learns to
            # read an answer from a focused window (what LensNet + the allocator will hand it)
            focus_on(wcs[-1], int(needle_pos[b]), 0)
        rows += wcs
        if rng.random() < 0.5:
            base = WorkingContext.recency(int(N[b]), K, Wb, max_level, tail)
        else:
            base = sample_working_contexts(int(N[b]), K, Wb, max_level, 2, rng, tail)[1]
        keep_needle = collapse and has_needle and rng.random() < 0.25
        if keep_needle:
            try:   # on a copy: a base too full to hold the needle at LOD0 stays as it was
                base = focus_on(base.copy(), int(needle_pos[b]), 0)
            except ValueError:
                keep_needle = False
        if not keep_needle and has_needle and rng.random() < 0.5:
            # half the task bases hold the needle in a LOD1 gist: expanding that gist (the oracle
            # probe) reveals it, which teaches LensNet to find needles one level up
            focus_on(base, int(needle_pos[b]), 1)
        bases.append(base)
        if collapse:
            g = base.collapse_groups()
            g = g[base.levels[g] == 0]
            if keep_needle:
                g = g[(base.starts[g] <= needle_pos[b]) & (base.starts[g] + K > needle_pos[b])]
            col = base.copy()
            if len(g):
                col_at[b] = int(g[rng.integers(len(g))])
                col.apply(collapse=[col_at[b]])
            cols.append(col)
        if has_needle:
            j = np.searchsorted(base.starts, needle_pos[b], side="right") - 1
            if base.levels[j] >= 1:
                oracle[b] = j
                pos, lvl, idx = j, int(base.levels[j]), int(base.indices[j])
                for k in range(lvl - 1):        # descend: the child holding the needle, one level down
                    child = int(needle_pos[b]) // K ** (lvl - 1 - k)
                    pos, idx = pos + child - idx * K, child
                    path[b, k] = pos
    r = pack_working_contexts(rows, W)
    bw = pack_working_contexts(bases, Wb)
    extra = {}
    if collapse:
        cw = pack_working_contexts(cols, W)
        extra = {"collapse_at": col_at, "collapse_levels": cw["levels"], "collapse_indices": cw["indices"],
                 "collapse_lengths": cw["lengths"]}
    return {**extra, "row_levels": r["levels"], "row_indices": r["indices"], "row_lengths": r["lengths"],
            "base_levels": bw["levels"], "base_indices": bw["indices"], "base_lengths": bw["lengths"],
            "oracle": oracle, "oracle_path": path,
            # uniform noise for picking random probes (Gumbel-max), drawn here so that the device
            # step needs no generator (a graph break under torch.compile) and a resume replays it
            "probe_noise": rng.random((B, Wb, max(n_probe - 1, 0)), dtype=np.float32)}


def expand_rows(levels, indices, lengths, e, K):
    """Expand entry e[r] of each row r (must be LOD>=1) into its K children, on-device.
    levels/indices (R, L) with padding level -1; returns (R, L+K-1) arrays and new lengths."""
    R, L = levels.shape
    p = torch.arange(L + K - 1, device=levels.device)[None]
    e = e[:, None]
    inside = (p >= e) & (p < e + K)
    src = torch.where(p < e, p, torch.where(inside, e, p - (K - 1))).clamp(max=L - 1)
    lv, ix = levels.gather(1, src), indices.gather(1, src)
    lv = torch.where(inside, lv - 1, lv)
    ix = torch.where(inside, ix * K + (p - e), ix)
    new_len = lengths + K - 1
    pad = p >= new_len[:, None]
    return lv.masked_fill(pad, -1), ix.masked_fill(pad, 0), new_len


def rows_to_inputs(levels, indices, lengths, sample, N, ids, H, K, offs, T_tab, scheme, weights=None):
    """Index arithmetic for the packed forward. Each row: [entries (len) | tokens N..N+H-2 | pad].
    Returns src (R, S) rows of the flattened node table, lvl (R, S) (-1 pad), pos/sigma (R, S),
    targets (R, S) (-1 ignore), tw (R, S) target weights. S = L + H - 1."""
    R, L = levels.shape
    S = L + H - 1
    dev = levels.device
    p = torch.arange(S, device=dev)[None]
    ln = lengths[:, None]
    n = N[sample][:, None]
    is_ent = p < ln
    hor_tok = n + (p - ln)                                   # token index of a horizon input
    # a row cut near the end of its context (a task answer shorter than H) has fewer horizon
    # inputs: past the last token they are padding, not rows of the next level's table
    is_hor = (p >= ln) & (p < ln + H - 1) & (hor_tok < ids.size(1))
    pc = p.clamp(max=L - 1).expand(R, -1)
    lv_e, ix_e = levels.gather(1, pc), indices.gather(1, pc)
    lv_e = lv_e.clamp(min=0)
    off = torch.tensor(offs, device=dev)[lv_e]
    base = sample[:, None] * T_tab
    src = base + torch.where(is_ent, off + ix_e, torch.where(is_hor, hor_tok, 0))
    lvl = torch.where(is_ent, lv_e, torch.where(is_hor, 0, -1))
    # targets: position ln-1+j predicts token N+j, j in [0, H)
    j = p - (ln - 1)
    tgt_tok = n + j
    T = ids.size(1)
    has_tgt = (j >= 0) & (j < H) & (tgt_tok < T)
    tgt_idx = tgt_tok.clamp(max=T - 1)
    targets = torch.where(has_tgt, ids[sample[:, None].expand(R, S), tgt_idx], -1)
    tw = torch.where(has_tgt, weights[sample[:, None].expand(R, S), tgt_idx] if weights is not None else 1.0, 0.0)
    if scheme == "entry":
        pos, sigma = p.expand(R, -1).float(), None
    else:
        width = torch.tensor([K**l for l in range(len(offs))], device=dev)[lv_e].float()
        start = ix_e.float() * width
        centre = start + (width - 1) / 2
        pos = torch.where(is_ent, centre, hor_tok.float())
        sigma = torch.where(is_ent, torch.sqrt((width * width - 1) / 12), 0.0)
    return src, lvl, pos, sigma, targets, tw


def row_nll(logits_loss, targets, tw):
    """Per-row weighted mean NLL from per-position losses (R, S)."""
    w = tw * (targets >= 0)
    return (logits_loss * w).sum(1) / w.sum(1).clamp(min=1e-6)


COMPILE_MODES = ("pieces", "step")


def compile_mc(step, mode="pieces"):
    """torch.compile for MC training (CUDA). "pieces": the model's, GistNet's and LensNet's
    forwards, one graph each, with the step's glue (plan index arithmetic, gathers, the probe
    expansions) eager in between. "step": the whole MCStep forward as one compiled function, so
    the glue fuses too (its trace breaks only at the rotary tables: tested). Both patch instance
    forwards, so state_dict keys stay plain."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"mc compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "step":
        step.forward = torch.compile(step.forward, dynamic=False)
    else:
        for m in (step.model, step.model.gistnet, step.model.lensnet):
            m.forward = torch.compile(m.forward, dynamic=False)
    return step


class MCStep(nn.Module):
    """The whole MegaContext training step as one module (so DDP can wrap it)."""

    def __init__(self, model, W, H, n_random=2, n_probe=4, lam=0.01, mc_weight=1.0, lens_weight=1.0,
                 plain_weight=1.0, lens_tail=32):
        super().__init__()
        self.model = model
        c = model.config
        self.K, self.L, self.scheme = c.mc_block_size, c.mc_max_level, c.pos_scheme
        self.W, self.H, self.n_random, self.n_probe = W, H, n_random, n_probe
        self.lam, self.mc_weight, self.lens_weight, self.plain_weight = lam, mc_weight, lens_weight, plain_weight
        self.lens_tail = lens_tail

    def build_table(self, ids):
        return build_table(self.model, ids)

    def forward(self, ids, N, plan, weights=None, plain_ids=None):
        m, K, H = self.model, self.K, self.H
        B, T = ids.shape
        dev = ids.device
        offs, _ = level_offsets(T, K, self.L)
        table, T_tab = self.build_table(ids)
        metrics = {}

        # 1) full-detail LM loss over the same tokens, in model-length chunks
        seq = m.config.sequence_len
        x = ids[:, : (T // seq) * seq].reshape(-1, seq) if plain_ids is None else plain_ids
        plain = m(x[:, :-1], x[:, 1:])
        metrics["loss_plain"] = plain.detach()

        # 2) LensNet on the probe bases, then counterfactual probe rows (all on device)
        bl, bi, blen = plan["base_levels"], plan["base_indices"], plan["base_lengths"]
        Wb = bl.size(1)
        valid = bl >= 0
        lv0 = bl.clamp(min=0)
        bsrc = torch.arange(B, device=dev)[:, None] * T_tab + torch.tensor(offs, device=dev)[lv0] + bi
        base_emb = m.add_level_embedding(table[bsrc], bl).detach()
        starts = bi * (K ** lv0)
        match = entry_match(query_match(ids, N, self.lens_tail), starts, K ** lv0) if m.config.lens_match else None
        feats = lens_features(starts, (K ** lv0), N[:, None], match)
        ctx = m.lens_context(self.lens_tail)   # the tokens before N that LensNet's queries read
        recent = ids.gather(1, (N[:, None] - ctx + torch.arange(ctx, device=dev)[None]).clamp(min=0))
        tail_emb = m.lens_queries(recent, self.lens_tail)
        scores = m.lensnet(base_emb, bl, feats, tail_emb, valid)               # (B, Wb)
        legal = bl >= 1
        pick_top = scores.detach().masked_fill(~legal, float("-inf")).argmax(1)
        # random legal entries (Gumbel-max over a uniform distribution on legal entries)
        gum = plan["probe_noise"][:, :Wb]                                     # drawn by make_plan
        assert gum.size(-1) == self.n_probe - 1, "make_plan's n_probe must match MCStep's"
        rand_pick = gum.masked_fill(~legal[..., None], -1.0).argmax(1)        # (B, n_probe-1)
        oracle = plan["oracle"]
        if self.n_probe > 1:   # n_probe = 1: LensNet's own pick only, no random or oracle probe
            rand_pick[:, 0] = torch.where(oracle >= 0, oracle, rand_pick[:, 0])
        probes = torch.cat([pick_top[:, None], rand_pick], 1)                   # (B, P)
        P = probes.size(1)
        pl, pi, plen = expand_rows(bl.repeat_interleave(P, 0), bi.repeat_interleave(P, 0),
                                   blen.repeat_interleave(P, 0), probes.reshape(-1), K)
        # the oracle probe descends to the needle's tokens (make_plan's oracle_path); the other
        # rows are padded alike, so every probe row is Wb + max_level*(K-1) = W entries wide
        for k in range(plan["oracle_path"].size(1)):
            e = torch.full((B, P), -1, dtype=torch.long, device=dev)
            if self.n_probe > 1:
                e[:, 1] = torch.where(oracle >= 0, plan["oracle_path"][:, k], -1)
            e = e.reshape(-1)
            lv2, ix2, len2 = expand_rows(pl, pi, plen, e.clamp(min=0), K)
            deep = e >= 0
            pl = torch.where(deep[:, None], lv2, F.pad(pl, (0, K - 1), value=-1))
            pi = torch.where(deep[:, None], ix2, F.pad(pi, (0, K - 1), value=0))
            plen = torch.where(deep, len2, plen)

        # 3) one packed forward over sampled rows + base + probes
        Wr = self.W
        def pad_to(lv, ix, width):
            if lv.size(1) < width:
                padn = width - lv.size(1)
                lv = F.pad(lv, (0, padn), value=-1)
                ix = F.pad(ix, (0, padn), value=0)
            return lv, ix
        rl, ri = plan["row_levels"], plan["row_indices"]
        bl2, bi2 = pad_to(bl, bi, Wr)
        col = "collapse_at" in plan     # collapse probes (make_plan(collapse=True)): B more rows
        levels = torch.cat([rl, bl2, pl] + ([plan["collapse_levels"]] if col else []), 0)
        indices = torch.cat([ri, bi2, pi] + ([plan["collapse_indices"]] if col else []), 0)
        lengths = torch.cat([plan["row_lengths"], blen, plen] + ([plan["collapse_lengths"]] if col else []), 0)
        nr = rl.size(0) // B
        sample = torch.cat([torch.arange(B, device=dev).repeat_interleave(nr), torch.arange(B, device=dev),
                            torch.arange(B, device=dev).repeat_interleave(P)] + ([torch.arange(B, device=dev)] if col else []))
        src, lvl, pos, sigma, targets, tw = rows_to_inputs(levels, indices, lengths, sample, N, ids, H, K, offs,
                                                           T_tab, self.scheme, weights)
        x = m.add_level_embedding(table[src], lvl)
        loss_pos = m(embeds=x, targets=targets, pos=pos, sigma=sigma, loss_reduction="none").view(src.shape)
        nll = row_nll(loss_pos, targets, tw)                                    # (R,)
        # a sample whose probe base holds no gist (a short context) has no legal probe: its
        # probe rows are not real windows and stay out of both losses
        has_legal = legal.any(1)                                                # (B,)
        row_ok = torch.cat([torch.ones(B * nr + B, device=dev), has_legal.float().repeat_interleave(P)]
                           + ([(plan["collapse_at"] >= 0).float()] if col else []))
        # rows count by their largest target weight: row_nll normalises weights within a row, so
        # without this a task row (its horizon is the answer alone) would ignore mc_answer_weight
        row_ok = row_ok * tw.amax(1).clamp(min=1e-6)
        mc_loss = (nll * row_ok).sum() / row_ok.sum()
        metrics["loss_mc"] = mc_loss.detach()
        metrics["loss_recency"] = nll[: B * nr].view(B, nr)[:, 0].mean().detach()

        # 4) LensNet target: regularised argmin over {no edit, probes}
        with torch.no_grad():
            l_base = nll[B * nr: B * nr + B]
            l_probe = nll[B * nr + B: B * nr + B + B * P].view(B, P)
            cost = torch.cat([l_base[:, None], l_probe + self.lam], 1)
            target = cost.argmin(1)
            dnll = l_probe - l_base[:, None]                                    # < 0: expanding helps
            plev = bl.gather(1, probes)                                         # level of expanded entry
            for l in range(1, self.L + 1):
                sel = (plev == l).float()
                metrics[f"dnll_expand_lod{l}"] = (dnll * sel).sum() / sel.sum().clamp(min=1)
            metrics["swap_rate"] = (target > 0).float().mean()
            metrics["lens_top1_gain"] = -dnll[:, 0].mean()
        lens_logits = torch.cat([torch.zeros(B, 1, device=dev), scores.gather(1, probes)], 1)
        lens_ce = F.cross_entropy(lens_logits, target, reduction="none")
        lens_loss = (lens_ce * has_legal).sum() / has_legal.sum().clamp(min=1)
        if col:
            lens_loss = lens_loss + self.collapse_loss(scores, nll[B * nr: B * nr + B], nll[-B:], plan["collapse_at"], metrics)
        metrics["loss_lens"] = lens_loss.detach()
        if hasattr(m.lensnet, "match_gain"):
            metrics["lens_match_gain"] = m.lensnet.match_gain.detach().float()

        total = self.plain_weight * plain + self.mc_weight * mc_loss + self.lens_weight * lens_loss
        return total, metrics

    def collapse_loss(self, scores, l_base, l_col, at, metrics):
        """Collapse counterfactuals: the mean LensNet score of a LOD0 group says whether its detail
        must stay (> 0) or may go to pay for an expansion (< 0), as the allocator reads it.
        Target: keep when collapsing the group into its gist raises the horizon NLL by more than
        lam. Binary cross-entropy on the group's mean score; samples without a group are out."""
        K = self.K
        ok = at >= 0
        grp = at.clamp(min=0)[:, None] + torch.arange(K, device=at.device)[None]   # (B, K) base positions
        g = scores.gather(1, grp.clamp(max=scores.size(1) - 1)).mean(1)
        with torch.no_grad():
            d = l_col - l_base                                                 # > 0: the detail mattered
            keep = (d > self.lam).float()
            n = ok.float().sum().clamp(min=1)
            metrics["dnll_collapse_lod0"] = (d * ok).sum() / n
            metrics["collapse_keep_rate"] = (keep * ok).sum() / n
        bce = F.binary_cross_entropy_with_logits(g, keep, reduction="none")
        return (bce * ok).sum() / ok.float().sum().clamp(min=1)
