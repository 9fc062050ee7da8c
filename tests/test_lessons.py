"""LESSONS.md items about positions that other tests do not already pin down, checked on the
paths that feed the model: training (megacontext/mctrain.py rows_to_inputs) and evaluation
(megacontext/evals.py).

Already covered elsewhere: rotary with sigma = 0 is plain RoPE bit for bit and the damping is
exp(-(omega*sigma)^2/2) (tests/test_model.py); WorkingContext.positions puts spans at their centre
with sigma from K**level (tests/test_working_context.py); eval task generators are deterministic
per seed, eval seeds/phrasings/answers are disjoint from training ones (tests/test_tasks.py), and
training task rows carry train-split answers (tests/test_mctrain.py)."""
import math

import numpy as np
import pytest
import torch

from megacontext import evals
from megacontext.mctrain import rows_to_inputs, level_offsets, MCStep
from megacontext.focus import sample_working_contexts, pack_working_contexts
from megacontext.working_context import WorkingContext
from nanochat.gpt import GPT, GPTConfig, rotary_cos_sin

V = 64


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def model_for(scheme, K=4, L=2, seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(sequence_len=64, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, megacontext=True,
                      mc_block_size=K, mc_max_level=L, gist_layers=1, lens_layers=1, pos_scheme=scheme))
    m.init_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised outputs (c_proj, proj_out, lod_emb) would hide position bugs
        for p in m.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


def train_rows(wcs, N, ids, H, K, L, scheme):
    """The training path for windows over one sample: (src, lvl, pos, sigma, targets, T_tab)."""
    T = ids.size(1)
    offs, T_tab = level_offsets(T, K, L)
    Wmax = max(w.W for w in wcs)
    pk = pack_working_contexts(wcs, Wmax)
    R = len(wcs)
    out = rows_to_inputs(torch.from_numpy(pk["levels"]), torch.from_numpy(pk["indices"]),
                         torch.from_numpy(pk["lengths"]), torch.zeros(R, dtype=torch.long),
                         torch.tensor([N]), ids, H, K, offs, T_tab, scheme)
    return (*out, T_tab)


def windows(N, K, W, L, seed=0):
    wcs = sample_working_contexts(N, K, W, L, 4, np.random.default_rng(seed))
    assert all(set(w.level_counts().nonzero()[0]) >= {0, 1} for w in wcs) and any(w.level_counts()[2] for w in wcs)
    return wcs


@pytest.mark.parametrize("K", [4, 32])
def test_training_positions_lod0_is_the_token_index_gists_centred_sigma_from_k_pow_level(K):
    """Gaussian scheme, training rows: an LOD0 entry sits at its token index with sigma exactly 0
    (so its rotary is plain RoPE), a level-l entry at the centre of its K**l-token span with
    sigma = sqrt((K**(2l) - 1)/12); horizon tokens are plain. Same numbers as
    WorkingContext.positions and the evaluation path."""
    L, H = 2, 8
    W = 32 if K == 4 else 256
    N = 7 * K ** 2 + 3                                   # not block aligned
    ids = torch.randint(0, V, (1, N + H), generator=torch.Generator().manual_seed(0))
    wcs = windows(N, K, W, L)
    src, lvl, pos, sigma, targets, tw, T_tab = train_rows(wcs, N, ids, H, K, L, "gaussian")
    for r, wc in enumerate(wcs):
        n = len(wc)
        starts, widths = wc.starts, wc.widths
        lod0 = wc.levels == 0
        p, s = pos[r, :n].double().numpy(), sigma[r, :n].double().numpy()
        assert np.array_equal(p[lod0], starts[lod0].astype(np.float64)), "LOD0 entries sit at their token index"
        assert (s[lod0] == 0).all(), "LOD0 entries are undamped"
        np.testing.assert_allclose(p, starts + (widths - 1) / 2, rtol=0, atol=0)    # span centre, exact in fp32
        np.testing.assert_allclose(s, np.sqrt((widths.astype(float) ** 2 - 1) / 12), rtol=1e-6)
        for l in range(1, L + 1):
            assert np.allclose(s[wc.levels == l], math.sqrt((K ** (2 * l) - 1) / 12), rtol=1e-6)
        hor = slice(n, n + H - 1)
        assert torch.equal(pos[r, hor], torch.arange(N, N + H - 1, dtype=pos.dtype)) and (sigma[r, hor] == 0).all()
        # the other two paths that position a window agree
        wp, ws = wc.positions("gaussian")
        np.testing.assert_allclose(p, wp, rtol=0, atol=0)
        np.testing.assert_allclose(s, ws, rtol=1e-6)
        ep, es = evals._positions("gaussian", wc, H, "cpu", N)
        np.testing.assert_allclose(pos[r, :n + H - 1].double().numpy(), ep.numpy(), rtol=0, atol=0)
        np.testing.assert_allclose(sigma[r, :n + H - 1].double().numpy(), es.numpy(), rtol=1e-6)


def test_lod0_rotary_in_a_mixed_window_is_plain_rope_bit_for_bit():
    """The rotary the model applies at LOD0 entries and horizon tokens of a mixed training window
    equals plain RoPE at those token positions exactly; gist entries are damped."""
    K, L, W, H, N = 4, 2, 32, 8, 203
    ids = torch.randint(0, V, (1, N + H), generator=torch.Generator().manual_seed(0))
    wcs = windows(N, K, W, L)
    src, lvl, pos, sigma, *_ = train_rows(wcs, N, ids, H, K, L, "gaussian")
    head_dim = 32
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = rotary_cos_sin(pos, head_dim, 10000.0, sigma, dtype=dtype)
        for r, wc in enumerate(wcs):
            n = len(wc)
            plain_pos = np.concatenate([wc.starts[wc.levels == 0], np.arange(N, N + H - 1)])
            at = np.concatenate([np.flatnonzero(wc.levels == 0), np.arange(n, n + H - 1)])
            pc, ps = rotary_cos_sin(torch.from_numpy(plain_pos)[None], head_dim, 10000.0, dtype=dtype)
            assert torch.equal(cos[r, at], pc[0]) and torch.equal(sin[r, at], ps[0])
            gist = np.flatnonzero(wc.levels >= 1)
            amp = (cos[r, gist].double() ** 2 + sin[r, gist].double() ** 2).sqrt()
            assert (amp[..., 0] < 0.6).all(), "gist entries are damped (fastest channel)"


def test_damping_uses_k_pow_level_and_lod2_keeps_slow_channels():
    """d20-like heads (head_dim 128, base 10000), K=32: a LOD2 gist (1024 tokens) keeps its slow
    rotary channels (the earlier code used max_seq_len**level: sigma ~ 2048**2/sqrt(12) erased
    every channel, so LOD2 carried no position at all)."""
    K, L, H, head_dim = 32, 2, 4, 128
    N = 5 * K ** 2 + 100
    ids = torch.zeros(1, N + H, dtype=torch.long)
    wc = WorkingContext.recency(N, K, 256, L)
    assert wc.level_counts()[2] > 0
    _, _, pos, sigma, *_ = train_rows([wc], N, ids, H, K, L, "gaussian")
    lv = torch.from_numpy(wc.levels)
    cos, sin = rotary_cos_sin(pos[:, :len(wc)], head_dim, 10000.0, sigma[:, :len(wc)], dtype=torch.float64)
    amp = (cos ** 2 + sin ** 2).sqrt()[0, :, 0]                          # (entries, head_dim/2) damping factors
    omega = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    for l in range(L + 1):
        s = math.sqrt((K ** (2 * l) - 1) / 12)
        torch.testing.assert_close(amp[lv == l], torch.exp(-0.5 * (omega * s) ** 2).expand(int((lv == l).sum()), -1))
    lod2 = amp[lv == 2][0]
    assert (lod2 > 0.5).sum() >= 16 and lod2[-1] > 0.999, "LOD2 keeps a quarter of its channels"
    wrong = torch.exp(-0.5 * (omega * (2048 ** 2 / math.sqrt(12))) ** 2)
    assert (wrong < 1e-6).all(), "(the old max_seq_len**level sigma would have erased them all)"


@pytest.mark.parametrize("scheme", ["entry", "gaussian"])
def test_all_lod0_window_is_the_plain_model_exactly(scheme):
    """A training row whose window is all tokens (N <= W) is the plain model, bit for bit:
    same embeddings (no level embedding on LOD0), same positions, no damping."""
    K, L, W, H, N = 4, 2, 48, 8, 40
    model = model_for(scheme)
    ids = torch.randint(0, V, (2, 64), generator=torch.Generator().manual_seed(1))
    step = MCStep(model, W, H)
    table, T_tab = step.build_table(ids)
    offs, _ = level_offsets(64, K, L)
    wc = WorkingContext.recency(N, K, W, L)
    assert (wc.levels == 0).all()
    pk = pack_working_contexts([wc, wc], W)
    src, lvl, pos, sigma, targets, tw = rows_to_inputs(
        torch.from_numpy(pk["levels"]), torch.from_numpy(pk["indices"]), torch.from_numpy(pk["lengths"]),
        torch.tensor([0, 1]), torch.tensor([N, N]), ids, H, K, offs, T_tab, scheme)
    S = N + H - 1
    with torch.no_grad():
        x = model.add_level_embedding(table[src], lvl)
        got = model(embeds=x[:, :S], pos=pos[:, :S], sigma=None if sigma is None else sigma[:, :S])
        want = model(ids[:, :S])
        assert torch.equal(got, want)
        assert torch.equal(targets[:, N - 1:S], ids[:, N:S + 1]) and (targets[:, :N - 1] == -1).all()


@pytest.mark.parametrize("scheme", ["entry", "gaussian"])
def test_training_and_evaluation_read_a_window_identically(scheme):
    """Per-token horizon NLL of the same windows through the training path (node table,
    rows_to_inputs, one packed forward) and the evaluation path (evals.build_levels,
    entry_inputs, _positions, score_continuation): no train/eval skew in gists, positions,
    damping or targets."""
    K, L, W, H, N, T = 4, 2, 32, 8, 203, 256
    model = model_for(scheme)
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(2))
    wcs = windows(N, K, W, L, seed=3)
    step = MCStep(model, W, H)
    with torch.no_grad():
        table, T_tab = step.build_table(ids)
        src, lvl, pos, sigma, targets, tw, _ = train_rows(wcs, N, ids, H, K, L, scheme)
        x = model.add_level_embedding(table[src], lvl)
        nll = model(embeds=x, targets=targets, pos=pos, sigma=sigma, loss_reduction="none").view(src.shape)
        etable, eoffs = evals.build_levels(model, ids[0, :N])
        cont = ids[0, N:N + H].numpy()
        for r, wc in enumerate(wcs):
            n = len(wc)
            emb = evals.entry_inputs(model, etable, eoffs, wc)
            ep, es = evals._positions(scheme, wc, H, "cpu", N)
            want, _ = evals.score_continuation(model, emb, ep, es, cont)
            got = nll[r, n - 1:n - 1 + H].numpy()
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
