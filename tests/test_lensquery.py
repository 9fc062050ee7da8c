"""
LensNet's queries (GPTConfig.lens_query): "tokens" (the embeddings of the most recent tokens, the
default) or "hidden" (the base model's final hidden states for them, after a plain forward over
the last lens_query_ctx tokens). One function (GPT.lens_queries) feeds training (MCStep), mc_eval
and MemorySession, and the hidden queries never pass a gradient to the base model.
"""
import numpy as np
import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.engine import MemorySession
from megacontext.mctrain import MCStep, make_plan
from megacontext.evals import eval_example

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
V, K, L, T, W, H = 64, 4, 2, 256, 32, 8


def model(query="hidden", ctx=48, seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(sequence_len=64, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, megacontext=True,
                      mc_block_size=K, mc_max_level=L, gist_layers=1, lens_layers=1, lens_query=query, lens_query_ctx=ctx))
    m.init_weights()
    with torch.no_grad():   # zero-init projections would make the hidden states trivial
        for p in m.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return m


def test_queries_are_token_embeddings_or_hidden_states():
    recent = torch.randint(0, V, (2, 40))
    tok, hid = model("tokens"), model("hidden")
    torch.testing.assert_close(tok.lens_queries(recent, 8), tok.embed(recent[:, -8:]))
    q = hid.lens_queries(recent, 8)
    with torch.no_grad():
        ref = hid(recent, return_hidden=True)[:, -8:]
    torch.testing.assert_close(q, ref)
    assert not q.requires_grad
    # in context: the same last 8 tokens after another prefix give other queries
    other = torch.cat([torch.randint(0, V, (2, 32)), recent[:, -8:]], 1)
    assert not torch.allclose(hid.lens_queries(other, 8), q)
    with pytest.raises(ValueError, match="lens_query"):
        GPTConfig(lens_query="gists")


def test_mc_step_with_hidden_queries_trains_lensnet_only():
    m = model()
    step = MCStep(m, W, H, plain_weight=0.0, mc_weight=0.0, lens_weight=1.0)
    ids = torch.randint(0, V, (2, T))
    N = np.array([T - H, 200])
    plan = {k: torch.from_numpy(v) for k, v in make_plan(N, T, K, W, H, L, 2, np.random.default_rng(0)).items()}
    seen = []
    orig = m.lens_queries
    m.lens_queries = lambda recent, t: seen.append((recent.clone(), t)) or orig(recent, t)
    loss, metrics = step(ids, torch.from_numpy(N), plan, None, None)
    loss.backward()
    (recent, t), = seen
    assert t == 32 and recent.shape == (2, 48)
    assert torch.equal(recent[0], ids[0, T - H - 48:T - H]) and torch.equal(recent[1], ids[1, 200 - 48:200])
    lens = [p for n, p in m.named_parameters() if n.startswith("lensnet.")]
    base = [p for n, p in m.named_parameters() if n.startswith("transformer.h.")]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lens)
    assert all(p.grad is None or not p.grad.any() for p in base), "the queries pass no gradient to the base model"


def test_memory_session_and_eval_take_hidden_queries_from_the_recent_tokens(tmp_path):
    m = model().eval()
    calls = []
    orig = m.lens_queries
    m.lens_queries = lambda recent, t: calls.append((recent.shape[1], t)) or orig(recent, t)
    s = MemorySession(m, W=W, path=str(tmp_path / "mem"))
    ids = np.random.default_rng(0).integers(0, V, 300)
    s.ingest(ids)
    s.refocus()
    assert calls == [(48, K)], calls          # lens_query_ctx tokens in, the last K out
    s.close()
    calls.clear()
    r = eval_example(m, ids, 250, ids[250:254], W, ["lens", "recency"], rounds=3, rng=np.random.default_rng(0))
    assert set(r) == {"lens", "recency"} and calls == [(48, 32)], calls   # one query for all rounds
