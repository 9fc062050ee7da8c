"""MegaContext end-to-end training (megacontext/mctrain.py, the --megacontext path of
scripts/base_train.py): one test per LESSONS.md item about training, on tiny CPU models.

- the horizon loss scores the tokens that *follow* each working context (not a copy task);
- MC training leaves the plain LM loss (nearly) where plain training puts it;
- GistNet/LensNet get gradients, are optimized, clipped, synced across DDP ranks, checkpointed;
- training windows are aligned, cover [0, N), use LOD2 and really compress;
- the step is batched: one GistNet call per level, no host syncs in its forward.

This file is also a torchrun worker: `ddp_base_train_worker` runs scripts/base_train.py's main()
on 2 gloo ranks with a few functions wrapped to record what the real script does."""
import os
import sys
import json
import math
import subprocess

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # when torchrun runs this file as a script
    sys.path.insert(0, REPO)

import megacontext.mctrain as mctrain
from megacontext.mctrain import MCStep, make_plan, expand_rows, level_offsets
from megacontext.working_context import WorkingContext
from megacontext import tasks
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizers
from nanochat.checkpoint_manager import save_checkpoint, load_checkpoint, build_model

V, K, L = 64, 4, 2                  # tiny vocab, block size, levels
T, W, H, SEQ = 256, 32, 8, 64       # context, window budget, horizon, plain row length
MC_PREFIXES = ("gistnet.", "lensnet.", "lod_emb.")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def perturb(model, std=0.1, seed=0):
    """Random values for the zero-initialised projections (every residual branch, GistNet's
    proj_out, LensNet's head, lod_emb), so that gradients flow everywhere from the first step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "proj_out.weight", "head.weight")) or name.startswith("lod_emb."):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def mc_model(seed=0, perturbed=False, **kw):
    torch.manual_seed(seed)
    cfg = dict(sequence_len=SEQ, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, megacontext=True,
               mc_block_size=K, mc_max_level=L, gist_layers=1, lens_layers=1)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    model.init_weights()
    if perturbed:
        perturb(model, seed=seed)
    return model


def markov_chain(seed=123, fanout=3):
    """A learnable stream: each token has `fanout` possible successors (entropy ~0.95 nats)."""
    r = np.random.default_rng(seed)
    P = np.zeros((V, V))
    for a in range(V):
        P[a, r.choice(V, fanout, replace=False)] = r.dirichlet(np.full(fanout, 2.0))
    return P.cumsum(1)


CDF = markov_chain()


def stream(rng, B, n):
    out = np.zeros((B, n), np.int64)
    out[:, 0] = rng.integers(V, size=B)
    for t in range(1, n):
        out[:, t] = np.minimum((rng.random(B)[:, None] > CDF[out[:, t - 1]]).sum(1), V - 1)
    return out


def plan_tensors(N, rng, n_random=2, needle=None, t=T, w=W, h=H, k=K, lv=L, collapse=False):
    p = make_plan(np.asarray(N), t, k, w, h, lv, n_random, rng, needle, collapse=collapse)
    return {name: torch.from_numpy(v) for name, v in p.items()}


def mc_inputs(ids, N, seed=0, needle=None, collapse=False):
    """What MCBatcher hands MCStep: ids, N, plan, weights, plain_ids."""
    N = np.asarray(N, np.int64)
    plan = plan_tensors(N, np.random.default_rng(seed), needle=needle, collapse=collapse)
    return torch.as_tensor(ids), torch.from_numpy(N), plan, None, None


def step_once(step, opts, inputs):
    loss, metrics = step(*inputs)
    loss.backward()
    for o in opts:
        o.step()
    step.zero_grad(set_to_none=True)
    return loss.detach(), metrics


def mc_named(model):
    return {n: p for n, p in model.named_parameters() if n.startswith(MC_PREFIXES)}

# ----------------------------------------------------------------------------- the objective


def test_every_horizon_target_is_the_token_that_follows_the_window(monkeypatch):
    """Decode every packed row MCStep builds (sampled windows, probe base, counterfactual
    probes) from the node-table indices alone: the inputs must tile [0, N) with aligned spans,
    then the horizon tokens N, N+1, ...; wherever a position has a target, the target is the
    raw-stream token right after everything the position (and the ones before it) cover."""
    model = mc_model(perturbed=True).eval()
    step = MCStep(model, W, H)
    B = 3
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    # a text row (N = T - H), a task row cut mid-block, a task row whose answer is 3 tokens
    N = [T - H, 150, T - 3]
    seen = {}

    def spy(*args, **kw):
        out = rows_to_inputs(*args, **kw)
        seen["args"], seen["out"] = args, out
        return out
    rows_to_inputs = mctrain.rows_to_inputs
    monkeypatch.setattr(mctrain, "rows_to_inputs", spy)
    embeds = {}
    forward = model.forward

    def fwd(*a, **kw):
        if kw.get("embeds") is not None:
            embeds["x"] = kw["embeds"]
        return forward(*a, **kw)
    monkeypatch.setattr(model, "forward", fwd)
    with torch.no_grad():
        step(*mc_inputs(ids, N, needle=np.array([-1, 17, 40])))

    levels, indices, lengths, sample = seen["args"][:4]
    src, lvl, pos, sigma, targets, tw = seen["out"]
    offs, T_tab = level_offsets(T, K, L)
    R, S = src.shape
    assert R == B * (1 + step.n_random) + B + B * step.n_probe, "sampled rows + probe bases + probes"
    ids_np, src_np, lvl_np, tgt_np = ids.numpy(), src.numpy(), lvl.numpy(), targets.numpy()
    n_targets = 0
    for r in range(R):
        b = int(sample[r])
        cover, row_targets, first_target_cover = 0, [], None
        for p in range(S):
            if lvl_np[r, p] < 0:                       # right padding: after everything, no target
                assert tgt_np[r, p] == -1 and (lvl_np[r, p:] < 0).all()
                break
            row = src_np[r, p] - b * T_tab
            assert 0 <= row < T_tab, "every input comes from its own sample's node table"
            level = max(l for l in range(L + 1) if offs[l] <= row)
            assert level == lvl_np[r, p], f"row {r} pos {p}: table row {row} is LOD{level}, labelled LOD{lvl_np[r, p]}"
            width = K ** level
            start = (row - offs[level]) * width          # node (level, i) covers [i*K^l, (i+1)*K^l)
            assert start == cover, f"row {r} pos {p}: a span starts at {start}, the previous ended at {cover}"
            cover = start + width
            if tgt_np[r, p] >= 0:
                if first_target_cover is None:
                    first_target_cover = cover
                assert tgt_np[r, p] == ids_np[b, cover], f"row {r} pos {p}: target is not token {cover}"
                row_targets.append(cover)
            else:
                assert cover < N[b] or cover >= min(N[b] + H, T), "a position with a horizon token to predict has a target"
        assert first_target_cover == N[b], f"row {r}: the window covers [0, {first_target_cover}), not [0, {N[b]})"
        assert row_targets == list(range(N[b], min(N[b] + H, T))), f"row {r}: targets {row_targets}"
        assert int(lengths[r]) <= W
        n_targets += len(row_targets)
    assert n_targets == sum(min(H, T - n) for n in N) * R // B
    assert (tw.numpy()[tgt_np >= 0] == 1).all() and (tw.numpy()[tgt_np < 0] == 0).all()

    # and the vectors fed at those positions are those nodes: token embeddings for LOD0, the
    # gist of exactly the aligned children (+ level embedding) above
    x = embeds["x"]
    with torch.no_grad():
        def node(b, level, i):
            if level == 0:
                return model.embed(ids[b, i])
            kids = torch.stack([node(b, level - 1, i * K + j) for j in range(K)])
            return model.gistnet(kids[None], level)[0]
        checked = set()
        for r in range(R):
            b = int(sample[r])
            for p in range(S):
                if lvl_np[r, p] < 0:
                    break
                row = src_np[r, p] - b * T_tab
                level = int(lvl_np[r, p])
                key = (b, level, row - offs[level])
                want = node(*key)
                if level > 0:
                    want = want + model.lod_emb.weight[level]
                torch.testing.assert_close(x[r, p], want, atol=1e-5, rtol=1e-5)
                checked.add(key)
    assert {k[1] for k in checked} == {0, 1, 2}


def test_mc_batcher_task_rows_cut_at_the_answer(tiny_tokenizer):
    """MCBatcher: a task row's cut point N is its answer start (so the horizon scores the answer),
    the answer is up-weighted, answers come from the train split, oracle probes are expandable
    entries, and the draws are a deterministic function of (seed, rank). (That the oracle is the
    entry holding the needle: test_training_windows_... below.)"""
    from scripts.base_train import MCBatcher, TrainConfig
    cfg = TrainConfig(mc_context_len=1024, mc_W=64, mc_H=16, mc_block_size=8, mc_max_level=2, mc_task_rate=1.0)
    x = torch.randint(0, tiny_tokenizer.get_vocab_size(), (4, 1024), generator=torch.Generator().manual_seed(0))
    ids, N, plan, weights, _ = MCBatcher(tiny_tokenizer, cfg, rank=0, device=torch.device("cpu"))(x)
    again = MCBatcher(tiny_tokenizer, cfg, rank=0, device=torch.device("cpu"))(x)
    other = MCBatcher(tiny_tokenizer, cfg, rank=1, device=torch.device("cpu"))(x)
    assert torch.equal(ids, again[0]) and torch.equal(N, again[1])
    assert all(torch.equal(plan[k], again[2][k]) for k in plan)
    assert not torch.equal(ids, other[0]), "ranks draw different tasks"
    Kc = cfg.mc_block_size
    for b in range(4):
        n = int(N[b])
        assert 0 < n < 1024 and not torch.equal(ids[b], x[b]), "every row is a task at rate 1"
        answer = tiny_tokenizer.decode(ids[b, n:].tolist()).strip()
        values = [v.removeprefix("value-") for v in answer.split(", ")]
        assert all(tasks.is_train_value(v) for v in values), f"{answer!r} is not a train-split answer"
        assert (weights[b, :n] == 1).all() and (weights[b, n:] == cfg.mc_answer_weight).all()
        bl, bi, n_base = plan["base_levels"][b], plan["base_indices"][b], int(plan["base_lengths"][b])
        assert int((bi[n_base - 1] + 1) * Kc ** bl[n_base - 1]) == n, "the probe base covers [0, N)"
        o = int(plan["oracle"][b])
        assert o == -1 or bl[o] >= 1, "the oracle probe is an expandable entry"
    assert (plan["oracle"] >= 0).any(), "some needle lies in a gist entry of the base"


# ----------------------------------------------------------------------------- plain loss


@pytest.fixture(scope="module")
def plain_vs_mc():
    """Held-out plain NLL on the Markov stream after 50 steps: plain loss only, vs MCStep at a
    low MC weight and at the default weight (same init, same batches, same optimizers)."""
    steps = 50
    held = torch.from_numpy(stream(np.random.default_rng(999), 32, SEQ + 1))
    out = {}
    from scripts.base_train import TrainConfig
    default = TrainConfig().mc_weight               # what base_train passes to MCStep
    for name, weight in (("plain", 0.0), ("mc_0.1", 0.1), ("mc_default", default)):
        model = mc_model(seed=0)
        opts = build_optimizers(model)
        step = MCStep(model, W, H, mc_weight=weight)
        rng, plan_rng = np.random.default_rng(0), np.random.default_rng(1)
        with torch.no_grad():
            init = model(held[:, :-1], held[:, 1:]).item()
        for _ in range(steps):
            ids = torch.from_numpy(stream(rng, 2, T))
            if name == "plain":
                x = ids.reshape(-1, SEQ)
                loss = model(x[:, :-1], x[:, 1:])
                loss.backward()
                for o in opts:
                    o.step()
                model.zero_grad(set_to_none=True)
            else:
                N = np.full(2, T - H)
                step_once(step, opts, (ids, torch.from_numpy(N), plan_tensors(N, plan_rng), None, None))
        with torch.no_grad():
            out[name] = {"init": init, "final": model(held[:, :-1], held[:, 1:]).item()}
    out["default_mc_weight"] = default
    return out


def test_mc_training_keeps_learning_plain_loss(plain_vs_mc):
    """The seed's failure: its MC objective drove the real NLL above uniform. Here plain NLL
    falls under MC training from log(V) toward the stream's entropy (~0.95 nats), and at a low
    MC weight it ends within 0.06 nats of plain-only training."""
    r = plain_vs_mc
    for name in ("plain", "mc_0.1", "mc_default"):
        assert abs(r[name]["init"] - math.log(V)) < 0.05
        assert r[name]["final"] < 1.6, f"{name}: plain NLL {r[name]['final']:.3f} after 50 steps"
    assert r["mc_0.1"]["final"] <= r["plain"]["final"] + 0.06, r


def test_mc_training_at_default_weight_does_not_hurt_plain_loss(plain_vs_mc):
    """LESSONS: MC training at base_train's default weight does not hurt plain loss (at 1.0 it
    trailed plain-only training by ~0.2 nats after 50-200 steps: the horizon loss's H tokens per row
    each weigh ~60x a plain token, and the normalized optimizer steps split between the terms)."""
    r = plain_vs_mc
    assert r["mc_default"]["final"] <= r["plain"]["final"] + 0.06, r

# ----------------------------------------------------------------------------- GistNet / LensNet


def test_gistnet_and_lensnet_move_after_one_step_and_round_trip_checkpoints(tmp_path):
    """One optimizer step moves every GistNet/LensNet/lod_emb tensor of a model whose residual
    branches are live. From the zero init every residual branch is off (c_proj, proj_out, head
    = 0), so gradients reach one more layer per step: gists first matter at step 2 and GistNet's
    innermost matrices move at step 4."""
    model = mc_model(seed=0, perturbed=True)
    step, opts = MCStep(model, W, H), build_optimizers(model)
    in_opt = {id(p) for o in opts for g in o.param_groups for p in g["params"]}
    mc = mc_named(model)
    assert len(mc) > 10 and all(id(p) in in_opt for p in mc.values()), "GistNet/LensNet are optimized"
    init = {n: p.detach().clone() for n, p in mc.items()}
    ids = torch.from_numpy(stream(np.random.default_rng(0), 2, T))
    step_once(step, opts, mc_inputs(ids, [T - H, T - 20], seed=0))
    still = sorted(n for n, p in mc.items() if torch.equal(p, init[n]))
    assert not still, f"did not move in one step: {still}"

    model = mc_model(seed=0)                       # the real init
    step, opts = MCStep(model, W, H), build_optimizers(model)
    mc = mc_named(model)
    init = {n: p.detach().clone() for n, p in mc.items()}
    for s in range(4):
        step_once(step, opts, mc_inputs(ids, [T - H, T - 20], seed=s))
        if s == 0:
            assert not torch.equal(model.lensnet.head.weight, init["lensnet.head.weight"])
    still = sorted(n for n, p in mc.items() if torch.equal(p, init[n]))
    assert not still, f"never trained after 4 steps from init: {still}"

    save_checkpoint(str(tmp_path), 3, model, opts, None, {"megacontext": True})
    rebuilt = build_model(load_checkpoint(str(tmp_path)), "cpu")
    sd, sd2 = model.state_dict(), rebuilt.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    inputs = mc_inputs(ids, [T - H, T - 20], seed=7)
    with torch.no_grad():
        a, ma = MCStep(model, W, H)(*inputs)
        inputs = mc_inputs(ids, [T - H, T - 20], seed=7)
        b, mb = MCStep(rebuilt, W, H)(*inputs)
    assert torch.equal(a, b) and all(torch.equal(ma[k], mb[k]) for k in ma), "the rebuilt model trains identically"


def test_gradients_reach_gistnet_from_the_mc_loss_and_lensnet_from_its_loss():
    model = mc_model(perturbed=True)
    ids = torch.from_numpy(stream(np.random.default_rng(0), 2, T))
    gist = {n: p for n, p in model.named_parameters() if n.startswith("gistnet.")}
    lens = {n: p for n, p in model.named_parameters() if n.startswith("lensnet.")}
    nonzero = lambda ps: sorted(n for n, p in ps.items() if p.grad is not None and p.grad.abs().sum() > 0)  # noqa: E731

    MCStep(model, W, H, plain_weight=0.0, mc_weight=1.0, lens_weight=0.0)(*mc_inputs(ids, [T - H, 200]))[0].backward()
    assert nonzero(gist) == sorted(gist), f"no gradient from the MC loss: {sorted(set(gist) - set(nonzero(gist)))}"
    assert model.lod_emb.weight.grad[1:].abs().sum(1).gt(0).all(), "each gist level's embedding is trained"
    model.zero_grad(set_to_none=True)

    MCStep(model, W, H, plain_weight=0.0, mc_weight=0.0, lens_weight=1.0)(*mc_inputs(ids, [T - H, 200]))[0].backward()
    assert nonzero(lens) == sorted(lens), f"no gradient from the LensNet loss: {sorted(set(lens) - set(nonzero(lens)))}"
    model.zero_grad(set_to_none=True)

    MCStep(model, W, H, plain_weight=1.0, mc_weight=0.0, lens_weight=0.0)(*mc_inputs(ids, [T - H, 200]))[0].backward()
    assert not nonzero(gist) and not nonzero(lens), "the plain loss alone does not touch the MC modules"


def test_mc_loss_goes_down():
    model = mc_model(seed=1)
    step, opts = MCStep(model, W, H), build_optimizers(model)
    rng, plan_rng = np.random.default_rng(0), np.random.default_rng(1)
    hist = []
    for _ in range(15):
        ids = torch.from_numpy(stream(rng, 2, T))
        N = np.array([T - H, T - H])
        loss, m = step_once(step, opts, (ids, torch.from_numpy(N), plan_tensors(N, plan_rng), None, None))
        hist.append({k: float(v) for k, v in m.items()} | {"total": float(loss)})
    assert all(math.isfinite(h["total"]) for h in hist)
    first, last = hist[0], {k: np.mean([h[k] for h in hist[-3:]]) for k in hist[0]}
    assert abs(first["loss_mc"] - math.log(V)) < 0.1
    assert last["loss_mc"] < first["loss_mc"] - 1.0 and last["loss_plain"] < first["loss_plain"] - 1.0, (first, last)
    assert last["total"] < first["total"] - 2.0

def test_node_table_of_a_history_too_short_for_the_top_level():
    """The evals build tables for short histories too: a level with no full block is empty."""
    from megacontext.evals import build_levels
    model = mc_model(seed=0)
    ids = torch.from_numpy(stream(np.random.default_rng(0), 1, K + 3))[0]
    table, offs = build_levels(model, ids)
    assert table.shape[0] == K + 3 + 1 and offs == [0, K + 3, K + 4]


def test_eval_policies_never_trade_detail_away_for_nothing():
    """An H100 eval had lens/random NLL well above recency at N = W (every entry LOD0, nothing to
    expand): the allocator collapsed groups on untrained scores. Now a window with nothing to
    expand keeps its detail under every policy, and with gists to expand, collapses only pay."""
    from megacontext.evals import build_levels, focus, lens_query
    model = mc_model(seed=0, perturbed=True)
    with torch.no_grad():
        model.lensnet.head.weight.normal_(0, 1.0)                  # decisive, untrained scores
    ids = torch.from_numpy(stream(np.random.default_rng(0), 1, T))[0]
    table, offs = build_levels(model, ids[:W])
    for policy in ("lens", "random"):
        wc, edits = focus(model, table, offs, W, W, policy, rng=np.random.default_rng(0), query=lens_query(model, ids, W))
        assert edits == 0 and (wc.levels == 0).all(), policy
    table, offs = build_levels(model, ids[:T - H])
    for policy in ("lens", "random"):
        wc, _ = focus(model, table, offs, T - H, W, policy, rng=np.random.default_rng(0), query=lens_query(model, ids, T - H))
        wc.validate()
        assert wc.level_counts()[0] >= WorkingContext.recency(T - H, K, W, L).level_counts()[0] - K * 8, policy


def test_oracle_policy_brings_the_answer_needle_to_full_detail():
    """mc_eval's "oracle" (perfect scores from the example's needle span) is the reader's ceiling:
    its window must hold the needle at LOD0, where recency has it compressed, and it is skipped
    when an example has no needle (loss-vs-distance text)."""
    from megacontext.evals import build_levels, focus, eval_example
    model = mc_model(seed=0, perturbed=True)
    N = T - H
    ids = stream(np.random.default_rng(0), 1, T)[0]
    table, offs = build_levels(model, torch.from_numpy(ids[:N]))
    span = (N // 4 + 1, N // 4 + 6)

    def detail(wc):
        over = (wc.starts < span[1]) & (wc.starts + wc.widths > span[0])
        return wc.levels[over]

    assert (detail(focus(model, table, offs, N, W, "recency")[0]) > 0).all()
    wc, edits = focus(model, table, offs, N, W, "oracle", targets=[span])
    wc.validate()
    assert edits > 0 and (detail(wc) == 0).all() and len(wc) <= W
    ex = tasks.make_example("passkey", tasks.task_rng("eval", 0), T, tasks.make_text_filler(ids), lambda s: [ord(c) % V for c in s],
                            split="eval", fmt=tasks.EVAL_FMTS[0])
    (a, b), = ex["target_spans"]
    assert a == ex["target_pos"][0] and b > a and b <= ex["answer_start"]
    r = eval_example(model, ids, N, ids[N:N + 4], W, ["oracle", "recency"], rng=np.random.default_rng(0))
    assert set(r) == {"recency"}
    r = eval_example(model, ids, N, ids[N:N + 4], W, ["oracle", "recency"], rng=np.random.default_rng(0), targets=[span])
    assert set(r) == {"oracle", "recency"}
    assert r["oracle"]["needle_at_lod0"] and not r["recency"]["needle_at_lod0"]   # mc_eval's focus diagnostics
    assert r["oracle"]["needle_rank"] == 1 and r["oracle"]["gists"] > 1 and "needle_rank" not in r["recency"]


def test_answer_weight_scales_whole_task_rows_in_the_horizon_loss():
    """row_nll normalises weights inside a row, and a task row's horizon is its answer alone, so
    mc_answer_weight must act across rows: a sample weighted 4 counts 4x in loss_mc."""
    model = mc_model(seed=0, perturbed=True)
    step = MCStep(model, W, H)
    ids = torch.from_numpy(stream(np.random.default_rng(0), 2, T))
    N = [T - H, T - H]

    def loss_mc(w0, w1):
        ids_, N_, plan, _, _ = mc_inputs(ids, N)
        w = torch.ones(2, T)
        w[0], w[1] = w0, w1
        with torch.no_grad():
            return step(ids_, N_, plan, w, None)[1]["loss_mc"].item()

    a, b = loss_mc(1.0, 0.0), loss_mc(0.0, 1.0)       # each sample's rows alone
    assert abs(loss_mc(1.0, 1.0) - (a + b) / 2) < 1e-4
    assert abs(loss_mc(4.0, 1.0) - (4 * a + b) / 5) < 1e-4
    assert abs(a - b) > 1e-3                          # the check above can tell the weights apart


# ----------------------------------------------------------------------------- training windows


def presets():
    from nanochat.configurator import parse_config
    from scripts.base_train import TrainConfig
    out = [("defaults", TrainConfig())]
    out += [(p, parse_config(TrainConfig, ["--config", p], section="base_train")) for p in ("mc_cpu", "mc_h100")]
    return out


@pytest.mark.parametrize("name,cfg", presets(), ids=lambda v: v if isinstance(v, str) else "")
def test_training_windows_are_aligned_cover_use_lod2_and_compress(name, cfg):
    Kc, Lc, Tc, Wc, Hc = cfg.mc_block_size, cfg.mc_max_level, cfg.mc_context_len, cfg.mc_W, cfg.mc_H
    N = np.array([Tc - Hc, Tc - 5, Tc // 2 + 3, Tc - Hc])     # text rows, task rows (any cut point)
    needle = np.array([-1, Tc // 7, 11, -1])
    p = make_plan(N, Tc, Kc, Wc, Hc, Lc, cfg.mc_random_wcs, np.random.default_rng(0), needle)
    nr = 1 + cfg.mc_random_wcs
    rows = []
    for r in range(len(N) * nr):
        n = p["row_lengths"][r]
        wc = WorkingContext(Kc, Wc, Lc, None, p["row_levels"][r, :n], p["row_indices"][r, :n])  # validates
        b = r // nr
        assert wc.num_tokens == N[b], "covers [0, N) exactly"
        if r % nr == 0:
            assert wc == WorkingContext.recency(int(N[b]), Kc, Wc, Lc), "the first window is pure recency"
        assert len(wc) > Wc - Kc, "fills the budget"
        assert N[b] / len(wc) >= 4, f"compresses only {N[b] / len(wc):.1f}x"
        rows.append(wc)
        try:
            WorkingContext.coarsest(int(N[b]), Kc, Wc, 1)
        except ValueError:              # LOD1 cannot cover it: LOD2 is mandatory
            assert wc.level_counts()[2] > 0
    assert all(w.level_counts()[2] > 0 for w in rows[::nr]), "recency windows reach LOD2 at these lengths"
    assert np.mean([w.level_counts()[2] > 0 for w in rows]) >= 0.75
    for b in range(len(N)):
        layouts = {tuple(w.levels.tolist()) for w in rows[b * nr:(b + 1) * nr]}
        assert len(layouts) == nr, "the sampled windows differ"
    ratios = [N[i // nr] / len(w) for i, w in enumerate(rows)]
    assert max(ratios) <= Kc ** Lc

    # probe bases (budget W - L(K-1): room for an oracle's descent) and every single expansion of
    # them (the counterfactual rows)
    Wb = Wc - Lc * (Kc - 1)
    bl, bi, blen = (torch.from_numpy(p[k]) for k in ("base_levels", "base_indices", "base_lengths"))
    for b in range(len(N)):
        base = WorkingContext(Kc, Wb, Lc, None, p["base_levels"][b, :blen[b]], p["base_indices"][b, :blen[b]])
        assert base.num_tokens == N[b]
        legal = np.flatnonzero(base.levels >= 1)
        e = torch.from_numpy(legal)
        lv, ix, ln = expand_rows(bl[b:b + 1].expand(len(legal), -1), bi[b:b + 1].expand(len(legal), -1),
                                 blen[b:b + 1].expand(len(legal)), e, Kc)
        assert lv.shape[1] == Wb + Kc - 1
        for j, pos in enumerate(legal.tolist()):
            got = WorkingContext(Kc, Wc, Lc, None, lv[j, :ln[j]].numpy(), ix[j, :ln[j]].numpy())
            want = base.copy()
            want.W = Wc
            want.apply(expand=[pos])
            assert got == want and (lv[j, ln[j]:] == -1).all()
        o = p["oracle"][b]
        if needle[b] >= 0:
            holder = int(np.searchsorted(base.starts, needle[b], side="right") - 1)
            assert o == (holder if base.levels[holder] >= 1 else -1)
            if o >= 0:   # the oracle row: expand o, then follow oracle_path down to the needle's tokens
                row = base.copy()
                row.W = Wc
                row.apply(expand=[o])
                for e in p["oracle_path"][b]:
                    if e >= 0:
                        row.apply(expand=[int(e)])
                at = int(np.searchsorted(row.starts, needle[b], side="right") - 1)
                assert row.levels[at] == 0 and len(row) <= Wc, "the oracle row holds the needle at LOD0"
                assert (p["oracle_path"][b] >= 0).sum() == base.levels[holder] - 1
        else:
            assert o == -1 and (p["oracle_path"][b] == -1).all()


def test_the_oracle_probe_of_a_lod2_gist_descends_to_the_needle(monkeypatch):
    """A needle inside a LOD2 gist: the oracle probe row the model scores holds it at LOD0 (so
    its ΔNLL can say "expand this LOD2 entry"), not merely at LOD1."""
    model = mc_model(perturbed=True).eval()
    step = MCStep(model, W, H)
    seen = {}
    rows_to_inputs = mctrain.rows_to_inputs

    def spy_rows(*a, **kw):
        seen["args"] = a
        return rows_to_inputs(*a, **kw)
    monkeypatch.setattr(mctrain, "rows_to_inputs", spy_rows)
    ids = torch.from_numpy(stream(np.random.default_rng(0), 2, T))
    needle = np.array([5, -1])
    for seed in range(100):                                 # a plan whose base holds the needle at LOD2
        inputs = mc_inputs(ids, [T - H, T - H], seed=seed, needle=needle)
        plan = inputs[2]
        o = int(plan["oracle"][0])
        if o >= 0 and int(plan["base_levels"][0, o]) == 2:
            break
    else:
        pytest.fail("no plan put the needle in a LOD2 gist")
    with torch.no_grad():
        step(*inputs)
    levels, indices, lengths = seen["args"][:3]
    r = 2 * (1 + step.n_random) + 2 + 0 * step.n_probe + 1  # sample 0's second probe row: the oracle
    row = WorkingContext(K, W, L, None, levels[r, :lengths[r]].numpy(), indices[r, :lengths[r]].numpy())
    at = int(np.searchsorted(row.starts, needle[0], side="right") - 1)
    assert row.levels[at] == 0 and row.num_tokens == T - H
    others = [q for q in range(2 * (1 + step.n_random) + 2, levels.size(0)) if q != r]
    assert all(int(lengths[q]) <= W - (L - 1) * (K - 1) for q in others), "only the oracle row descends"


def test_lensnet_choice_is_among_the_trained_rows(monkeypatch):
    """The current policy's choice: make_plan has no LensNet (it runs on the CPU ahead of the
    step), so the policy enters on the device: the first probe row of each sample is its probe
    base with LensNet's top-scored legal entry expanded. (A full refocused window, R rounds of the
    allocator, is not among the rows; see the report.)"""
    model = mc_model(perturbed=True).eval()
    with torch.no_grad():
        model.lensnet.head.weight.normal_(0, 1.0)     # decisive scores
    step = MCStep(model, W, H)
    seen, scores = {}, {}
    rows_to_inputs, lens_fwd = mctrain.rows_to_inputs, model.lensnet.forward

    def spy_rows(*a, **kw):
        seen["args"] = a
        return rows_to_inputs(*a, **kw)

    def spy_lens(*a):
        scores["s"] = lens_fwd(*a)
        return scores["s"]
    monkeypatch.setattr(mctrain, "rows_to_inputs", spy_rows)
    monkeypatch.setattr(model.lensnet, "forward", spy_lens)
    B = 2
    ids = torch.from_numpy(stream(np.random.default_rng(0), B, T))
    inputs = mc_inputs(ids, [T - H, 180], seed=3)
    plan = inputs[2]
    with torch.no_grad():
        step(*inputs)
    levels, indices, lengths = seen["args"][:3]
    s = scores["s"]
    first_probe = B * (1 + step.n_random) + B
    for b in range(B):
        bl, bi, n = plan["base_levels"][b], plan["base_indices"][b], int(plan["base_lengths"][b])
        top = int(s[b].masked_fill(bl < 1, float("-inf")).argmax())
        want = WorkingContext(K, W, L, None, bl[:n].numpy(), bi[:n].numpy())
        want.apply(expand=[top])
        r = first_probe + b * step.n_probe
        got = WorkingContext(K, W, L, None, levels[r, :lengths[r]].numpy(), indices[r, :lengths[r]].numpy())
        assert got == want

# ----------------------------------------------------------------------------- batched, no host syncs


@pytest.mark.parametrize("collapse,query,match", [(False, "tokens", False), (True, "tokens", False), (False, "hidden", False), (False, "tokens", True)])
def test_mc_step_has_no_host_sync_and_one_gistnet_call_per_level(monkeypatch, collapse, query, match):
    model = mc_model(perturbed=True, lens_query=query, lens_match=match)
    step = MCStep(model, W, H)
    B = 3
    ids = torch.from_numpy(stream(np.random.default_rng(0), B, T))
    inputs = mc_inputs(ids, [T - H, 200, T - 3], seed=0, needle=np.array([-1, 30, 5]), collapse=collapse)
    calls = []
    model.gistnet.register_forward_hook(lambda mod, args, out: calls.append((args[0].shape[0], args[1])))

    def sync(*a, **kw):
        raise AssertionError("host sync inside the MC step's forward")
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    loss, metrics = step(*inputs)
    monkeypatch.undo()
    assert calls == [(B * T // K ** l, l) for l in range(1, L + 1)], "one batched GistNet call per level"
    loss.backward()                                    # and the graph is whole
    assert math.isfinite(loss.item()) and all(math.isfinite(v.item()) for v in metrics.values())
    assert ("dnll_collapse_lod0" in metrics) == collapse


def test_collapse_loss_pushes_a_needed_group_up_and_a_spare_one_down():
    step = MCStep(mc_model(), W, H)
    scores = torch.zeros(3, 12, requires_grad=True)
    at = torch.tensor([2, 6, -1])                      # sample 2 has no collapse probe
    l_base = torch.tensor([1.0, 1.0, 1.0])
    l_col = torch.tensor([1.5, 1.0, 9.0])              # collapsing hurt sample 0 only
    metrics = {}
    step.collapse_loss(scores, l_base, l_col, at, metrics).backward()
    g = scores.grad
    assert (g[0, 2:2 + K] < 0).all() and (g[1, 6:6 + K] > 0).all(), "keep: up; spare: down"
    assert g[0, :2].eq(0).all() and g[0, 2 + K:].eq(0).all() and g[2].eq(0).all(), "only the probed groups"
    assert float(metrics["collapse_keep_rate"]) == 0.5 and abs(float(metrics["dnll_collapse_lod0"]) - 0.25) < 1e-6

# ----------------------------------------------------------------------------- torchrun, 2 ranks


def ddp_base_train_worker(out_dir, argv):
    """torchrun, 2 gloo ranks: scripts/base_train.py main() with --megacontext. Wraps
    build_optimizers (init weights, optimizer membership), clip_grad_norm_ (which parameters
    are clipped, their gradients before/after), MCStep.forward (per-rank losses) and
    save_checkpoint (all ranks' final weights)."""
    import torch.distributed as dist
    import scripts.base_train as bt
    rec = {"clip": [], "losses": []}
    orig_build, orig_save, orig_clip = bt.build_optimizers, bt.save_checkpoint, torch.nn.utils.clip_grad_norm_

    def build(model, *a, **kw):
        opts = orig_build(model, *a, **kw)
        rec["model"] = model
        rec["init"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        rec["opt"] = {id(p) for o in opts for g in o.param_groups for p in g["params"]}
        return opts

    def clip(params, max_norm, *a, **kw):
        params = list(params)
        names = {id(p): n for n, p in rec["model"].named_parameters()}
        mc = [p for p in params if names.get(id(p), "").startswith(MC_PREFIXES)]
        gnorm = lambda: torch.stack([p.grad.norm() for p in mc if p.grad is not None]).norm().item()  # noqa: E731
        before = gnorm()
        total = orig_clip(params, max_norm, *a, **kw)
        rec["clip"].append({"names": sorted(names.get(id(p), "?") for p in params), "max_norm": max_norm,
                            "total": float(total), "mc_before": before, "mc_after": gnorm(),
                            "mc_no_grad": sorted(names[id(p)] for p in mc if p.grad is None or not p.grad.abs().sum())})
        return total

    class RecMCStep(bt.MCStep):
        def forward(self, *a, **kw):
            loss, metrics = super().forward(*a, **kw)
            rec["losses"].append(loss.detach().clone())
            return loss, metrics

    def save(run_dir, step, model, *a, **kw):
        names = sorted(n for n, _ in model.named_parameters())
        sd = dict(model.named_parameters())
        flat = torch.cat([sd[n].detach().flatten() for n in names])
        gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        losses = [None] * dist.get_world_size()
        dist.all_gather_object(losses, [float(x) for x in rec["losses"]])
        if dist.get_rank() == 0:
            diff, off = {}, 0
            for n in names:
                k = sd[n].numel()
                diff[n] = (gathered[0][off:off + k] - gathered[1][off:off + k]).abs().max().item()
                off += k
            mc = [n for n in names if n.startswith(MC_PREFIXES)]
            torch.save({n: sd[n].detach().clone() for n in names}, os.path.join(out_dir, "final_rank0.pt"))
            with open(os.path.join(out_dir, "worker.json"), "w") as f:
                json.dump({"world": dist.get_world_size(), "step": step, "mc": mc, "max_abs_diff": diff,
                           "not_in_optimizer": [n for n in names if id(sd[n]) not in rec["opt"]],
                           "unchanged_mc": [n for n in mc if torch.equal(sd[n], rec["init"][n])],
                           "clip": rec["clip"], "losses": losses}, f)
        return orig_save(run_dir, step, model, *a, **kw)

    bt.build_optimizers, bt.save_checkpoint, bt.MCStep = build, save, RecMCStep
    torch.nn.utils.clip_grad_norm_ = clip
    sys.argv = ["scripts.base_train"] + argv
    bt.main()


@pytest.mark.slow
def test_base_train_megacontext_under_torchrun(tiny_tokenizer, tmp_path):
    out = tmp_path / "mc_ddp"
    out.mkdir()
    base = os.path.dirname(tiny_tokenizer.directory)
    args = ["--config", "mc_cpu", "--device", "cpu", "--num-iterations", "2", "--eval-every", "-1",
            "--device-batch-size", "1", "--total-batch-size", "2048", "--grad-clip", "0.001",
            "--log-every", "1", "--out-dir", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1", NANOCHAT_BASE_DIR=base)
    r = subprocess.run(TORCHRUN + [os.path.abspath(__file__), "--ddp-base-train-worker", str(out), *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    res = json.loads((out / "worker.json").read_text())
    assert res["world"] == 2 and res["step"] == 2 and "loss_mc" in r.stdout
    assert len(res["mc"]) > 10
    assert not res["not_in_optimizer"], res["not_in_optimizer"]
    assert not [n for n, d in res["max_abs_diff"].items() if d != 0], "weights differ across ranks after DDP steps"
    early = {"gistnet.proj_out.weight", "lensnet.head.weight", "lod_emb.weight"}  # the rest need more steps from init
    assert not early & set(res["unchanged_mc"]), f"did not train in 2 steps: {res['unchanged_mc']}"
    l0, l1 = res["losses"]
    assert len(l0) == len(l1) == 2 and l0 != l1, "the ranks trained on different batches"
    assert len(res["clip"]) == 2
    for c in res["clip"]:
        assert set(res["mc"]) <= set(c["names"]), "GistNet/LensNet gradients are clipped with the rest"
        assert c["total"] > c["max_norm"] == 0.001
        assert c["mc_after"] == pytest.approx(c["mc_before"] * c["max_norm"] / c["total"], rel=1e-3)
    assert not early & set(res["clip"][1]["mc_no_grad"]), f"no gradient at step 2: {res['clip'][1]['mc_no_grad']}"
    final = torch.load(out / "final_rank0.pt")
    ckpt = load_checkpoint(str(out))
    assert ckpt["step"] == 2 and all(torch.equal(ckpt["model"][n], final[n]) for n in final)
    assert any(n.startswith("gistnet.") for n in ckpt["model"]) and any(n.startswith("lensnet.") for n in ckpt["model"])


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp-base-train-worker"]:
    ddp_base_train_worker(sys.argv[2], sys.argv[3:])


def test_a_short_context_has_no_probes_and_no_lens_loss():
    """A sample whose probe base is all LOD0 (N <= Wb = W - L(K-1)) has no legal probe: its (garbage)
    probe rows stay out of the horizon loss and it adds nothing to LensNet's loss."""
    model = mc_model(seed=0, perturbed=True)
    step = MCStep(model, W, H)
    ids = torch.from_numpy(stream(np.random.default_rng(0), 2, T))
    short = W - L * (K - 1)                                 # fits the probe base at LOD0
    loss, m = step(*mc_inputs(ids, [short, short]))
    assert torch.isfinite(loss) and m["loss_lens"].item() == 0.0
    loss_mixed, m2 = step(*mc_inputs(ids, [short, T - H]))
    assert torch.isfinite(loss_mixed) and m2["loss_lens"].item() > 0


def test_compile_mc_wraps_the_pieces_or_the_whole_step():
    from megacontext.mctrain import compile_mc
    step = compile_mc(MCStep(mc_model(), W, H), "pieces")
    assert all("forward" in vars(m) for m in (step.model, step.model.gistnet, step.model.lensnet))
    assert "forward" not in vars(step)
    step = compile_mc(MCStep(mc_model(), W, H), "step")
    assert "forward" in vars(step) and "forward" not in vars(step.model)
    assert set(step.state_dict()) == set(MCStep(mc_model(), W, H).state_dict()), "plain state_dict keys"
    with pytest.raises(ValueError, match="compile mode"):
        compile_mc(MCStep(mc_model(), W, H), "graph")


@pytest.mark.parametrize("lens_match", [False, True])
def test_mc_step_traces_without_graph_breaks_beyond_rotary(lens_match):
    """Compile-friendliness: TorchDynamo traces the whole MC step; the only breaks are the calls
    to rotary_cos_sin, which is kept out of compiled graphs on purpose (fp64 tables, once per
    forward). A host sync, a data-dependent Python branch or a generator argument would show here.
    With lens_match the step also computes each entry's query match (mc_h100 trains with it)."""
    import torch._dynamo as dynamo
    model = mc_model(seed=0, perturbed=True, lens_match=lens_match)
    step = MCStep(model, W, H)
    ids = torch.from_numpy(stream(np.random.default_rng(0), 2, T))
    dynamo.reset()
    ex = dynamo.explain(step)(*mc_inputs(ids, [T - H, T - 20]))
    reasons = [str(b.reason) for b in ex.break_reasons]
    assert reasons and all("rotary_cos_sin" in r for r in reasons), reasons
    dynamo.reset()
