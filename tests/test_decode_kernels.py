"""
decode="fused": the Triton decode step (nanochat/decode_kernels.py), run on CPU by Triton's
interpreter (TRITON_INTERPRET=1, set in conftest.py). On fp32 weights it must give the static
step's logits and write the same K/V (atol 1e-4: only summation order differs), with grouped
query heads, through a re-decode at an earlier slot, and across several attention splits; a
MemorySession decoding with it generates the static session's tokens through refocus and
recompute, for both position schemes; Engine batches fall back to the static step; and without
a GPU or the interpreter, decode="fused" is refused in one line.
"""
import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from nanochat.gpt import GPT, GPTConfig                      # noqa: E402
from nanochat.engine import Engine, MemorySession, DecodeStep, check_decode  # noqa: E402
from nanochat.decode_kernels import FusedDecode, fused_unavailable, pdl_supported  # noqa: E402
from test_engine import make_model, check, ATOL, K, W, V  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_model(n_head, n_kv_head, n_embd, seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(sequence_len=128, vocab_size=V, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd))
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            if not p.any():
                p.normal_(std=0.2)
    return m.eval()


@pytest.mark.parametrize("heads", [(1, 1, 64), (4, 2, 64)])   # (n_head, n_kv_head, n_embd): MHA and GQA
def test_fused_step_equals_static(heads):
    model = plain_model(*heads)
    eng = Engine(model)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, V, (1, 24)))
    got, caches = {}, {}
    for fused in (False, True):
        cache = eng.new_cache(1, 48)
        step = DecodeStep(model, cache, fused=fused)
        with torch.no_grad():
            eng.prefill(ids[:, :20], cache)
            out = [step(ids[:, i:i + 1], i) for i in (20, 21, 22)]
            out.append(step(ids[:, 5:6], 21))       # a re-decode at an earlier slot drops what was after it
        got[fused], caches[fused] = out, (cache.k[:, :, :22].clone(), cache.v[:, :, :22].clone(), cache.pos)
    if fused:
        fd = step._fd
        assert fd.ns >= 2 and fd.chunk < 20, "the test must cover several attention splits and their combine"
    for a, b in zip(got[False], got[True]):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    assert caches[True][2] == caches[False][2] == 22
    torch.testing.assert_close(caches[True][0], caches[False][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(caches[True][1], caches[False][1], atol=ATOL, rtol=0)
    # and the static step itself is the model's forward over the same tokens
    with torch.no_grad():
        ref = model(torch.cat([ids[:, :21], ids[:, 5:6]], 1))[:, -1]
    torch.testing.assert_close(got[True][-1], ref, atol=ATOL, rtol=0)


def test_fused_logits_buffer_is_not_aliased():
    """Each step's logits are the caller's: the next step must not overwrite them."""
    model = plain_model(1, 1, 64)
    eng = Engine(model)
    cache = eng.new_cache(1, 16)
    step = DecodeStep(model, cache, fused=True)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, V, (1, 8)))
    with torch.no_grad():
        eng.prefill(ids[:, :6], cache)
        a = step(ids[:, 6:7], 6)
        a0 = a.clone()
        step(ids[:, 7:8], 7)
    assert torch.equal(a, a0)


@pytest.mark.parametrize("scheme", ["entry", "gaussian"])
def test_fused_memory_session_equals_static(scheme):
    """MC: embeddings in, explicit (and for gaussian, spread) positions, refocus edits and the
    compiled whole-window recompute between fused steps: the static session's tokens and logits."""
    mc = make_model(scheme=scheme)
    toks = {}
    for mode in ("static", "fused"):
        s = MemorySession(mc, W=W, decode=mode)
        s.ingest(np.random.default_rng(0).integers(0, V, 100))
        s.refocus()
        toks[mode] = [t for t, _ in s.generate(2 * K + 1, temperature=0.0)]
        toks[mode + "_logits"] = s.logits()
        assert (s._window is not None) == (mode == "fused")
        assert s.counters["refocus_calls"] >= 3
        check(s)   # the cache the fused steps wrote is exact: cached logits == a from-scratch forward
        assert isinstance(s._step._fd, FusedDecode) == (mode == "fused")
    assert toks["static"] == toks["fused"]
    torch.testing.assert_close(toks["fused_logits"], toks["static_logits"], atol=ATOL, rtol=0)


def test_fused_engine_batch_decodes_static(monkeypatch):
    """FusedDecode decodes one sequence; Engine's batched sampling takes the static step instead."""
    model = plain_model(1, 1, 64)
    prompt = np.random.default_rng(0).integers(0, V, 12).tolist()
    calls, run = [], FusedDecode.__call__
    monkeypatch.setattr(FusedDecode, "__call__", lambda self, *a: calls.append(1) or run(self, *a))
    out = {}
    for mode in ("static", "fused"):
        eng = Engine(model, decode=mode)
        out[mode] = [eng.generate_batch(prompt, num_samples=2, max_tokens=3, temperature=1.0, top_k=8, seed=1)]
        assert not calls                     # two samples: the static step
        out[mode].append(eng.generate_batch(prompt, max_tokens=3, temperature=0.0))
        assert bool(calls) == (mode == "fused")
    assert out["static"] == out["fused"]
    cache = Engine(model).new_cache(2, 8)
    with pytest.raises(ValueError, match="batch 1"):
        FusedDecode(model, cache)


def test_fused_refuses_a_model_it_cannot_run():
    """A head dim that is not a power of two (the kernels load whole heads): refused when the
    session or engine is made, not at its first decode step."""
    m = GPT(GPTConfig(sequence_len=64, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=96))
    with pytest.raises(ValueError, match="power-of-two head dim, this model's is 48"):
        Engine(m, decode="fused")
    assert Engine(m, decode="static").decode == "static"


def test_load_tuning_takes_a_sweep_file_and_refuses_a_bad_one(tmp_path, monkeypatch):
    """NANOCHAT_DECODE_TUNING=<bench_decode_kernels JSON>: its configs replace the tables' entries;
    a malformed file changes nothing and names itself."""
    import json
    from nanochat import decode_kernels as dk
    monkeypatch.setattr(dk, "GEMV_TUNED", dict(dk.GEMV_TUNED))
    monkeypatch.setattr(dk, "ATTN_TUNED", dict(dk.ATTN_TUNED))
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"gemv_tuned": {"96,64": [4, 64, 4, 2]},
                                "attn_tuned": {"4096": {"block_t": 32, "programs_per_sm": 2, "warps": 4}}}))
    dk.load_tuning(str(good))
    assert dk.GEMV_TUNED[(96, 64)] == (4, 64, 4, 2) and dk.gemv_config(96, 64, sms=132) == (4, 64, 4, 2)
    assert dk.gemv_config(96, 64, sms=1) != (4, 64, 4, 2)        # the interpreter keeps its own
    assert dk.attn_config(4096, 8, 132)[2:] == (32, 4)
    before = (dict(dk.GEMV_TUNED), dict(dk.ATTN_TUNED))
    for bad in ("{not json", json.dumps({"gemv_tuned": {"96,64": [3, 64, 4, 2]}}),
                json.dumps({"gemv_tuned": {"96,64": [4, 64, 4, 2]}, "attn_tuned": {"4096": {"block_t": 32}}}),
                json.dumps({"gemv_tuned": {"96": [4, 64, 4, 2]}})):
        p = tmp_path / "bad.json"
        p.write_text(bad)
        with pytest.raises(ValueError, match="not a bench_decode_kernels tuning file"):
            dk.load_tuning(str(p))
        assert (dk.GEMV_TUNED, dk.ATTN_TUNED) == before
    with pytest.raises(ValueError, match="missing.json"):
        dk.load_tuning(str(tmp_path / "missing.json"))


def test_fused_refused_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = fused_unavailable("cpu")
    assert why and "CUDA" in why and "\n" not in why
    with pytest.raises(ValueError, match="fused"):
        check_decode("fused", torch.device("cpu"))
    with pytest.raises(ValueError, match="fused"):
        MemorySession(make_model(), W=W, decode="fused")
    assert check_decode("static", torch.device("cpu")) == "static"
    monkeypatch.setenv("NANOCHAT_FUSED_PDL", "1")
    assert not pdl_supported("cpu")        # programmatic dependent launch is a CUDA (sm90+) launch option
    with pytest.raises(ValueError, match="pick one"):
        DecodeStep(make_model(mc=False), Engine(make_model(mc=False)).new_cache(1, 8), compile=True, fused=True)


COMPILE_CHECK = r'''
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from nanochat import decode_kernels as dk

def comp(fn, sig, const, **opts):
    sig = dict(sig, **{k: "constexpr" for k in const})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32), options=opts)

pdl = dict(launch_pdl=True)
gs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_ptr": "*bf16", "N": "i32", "K": "i32",
      "eps": "fp32", "cap": "fp32"}
n = 0
D = 1280   # the tuned shapes are d20's: q/k/v, attention out, MLP in, MLP out, lm_head, with their epilogues
roles = {(3 * D, D): "norm", (D, D): "res", (4 * D, D): "act", (D, 4 * D): "res", (32768, D): "cap"}
for (N, K), (bn, bk, warps, stages) in dk.GEMV_TUNED.items():
    role = roles[(N, K)]
    ep = dict(NORM=role in ("norm", "act", "cap"), ACT=role == "act", RES=role == "res", CAP=role == "cap")
    comp(dk._gemv_kernel, gs, dict(ep, EVEN=True, PDL=True, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps,
         num_stages=stages, **pdl)
    if bn * triton.next_power_of_2(K) <= 8192:
        comp(dk._gemv1_kernel, gs, dict(ep, PDL=True, BLOCK_N=bn, KP=triton.next_power_of_2(K)), num_warps=warps, **pdl)
    n += 1
asig = {"qkv_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16",
        "slot_ptr": "*i64", "acc_ptr": "*fp32", "ml_ptr": "*fp32", "H": "i32", "HKV": "i32", "CHUNK": "i32",
        "NS": "i32", "eps": "fp32", "scale": "fp32"}
for t in dk.ATTN_TUNED.values():
    for p in (True, False):
        for hd in (64, 128):
            comp(dk._attn_split_kernel, asig, dict(D=hd, BLOCK_T=t["block_t"], PDL=p), num_warps=t["warps"], **(pdl if p else {}))
comp(dk._attn_combine_kernel, {"acc_ptr": "*fp32", "ml_ptr": "*fp32", "y_ptr": "*bf16", "NS": "i32"},
     dict(D=128, BLOCK_S=16, PDL=True), **pdl)
comp(dk._rms_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "eps": "fp32"}, dict(BLOCK=2048, PDL=True), **pdl)
print("compiled", n)
'''


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """The interpreter runs the kernels' Python, not Triton's compiler, which is stricter (it refused
    an int32/int64 loop-carried offset that the interpreter ran): every kernel, at the launch configs
    the fused step uses on a GPU (GEMV_TUNED, ATTN_TUNED, PDL on and off), must compile for sm90,
    here on CPU (Triton ships ptxas)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled 5" in r.stdout
