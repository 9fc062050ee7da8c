"""Benchmarks run (CPU smoke, small arguments) and print the one JSON object they promise.
Their numbers are not checked here: speed targets belong to benchmark runs on named hardware."""
import os
import sys
import json
import subprocess

import torch

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout)  # stdout is exactly one JSON document (progress goes to stderr)


def test_bench_tree_cpu_smoke():
    out = run_json("scripts.bench_tree", "--tokens", "20000", "--dim", "64", "--small_appends", "8")
    for tag in ("durable", "nondurable"):
        r = out[tag]
        assert r["nodes"][0] == 20000 and r["nodes"][1] == 20000 // 32 and r["append_MBps"] > 0
        assert r["small_append_ms"] > 0 and r["read_back_us_median"] > 0
    assert out["read"]["tokens_MBps"] > 0 and out["read"]["random_gist_read_us"] > 0


def test_bench_mc_cpu_smoke():
    out = run_json("scripts.bench_mc", "--tokens", "20000", "--depth", "2")
    assert out["device"].startswith("CPU") and out["torch"]
    assert out["config"]["tokens"] == 20000 and out["config"]["n_embd"] == 128
    ing = out["ingest"]
    assert ing["nodes_per_level"] == [20000, 20000 // 32, 20000 // 32 ** 2]
    assert ing["gist_calls"] == 2, "one batched GistNet call per level"
    assert ing["tokens_per_s"] > 0 and ing["base_forward_tokens_per_s"] > 0
    assert 0 < ing["gist_vs_base_fwd_flops_per_token"] < 1
    foc = out["focus"]
    assert foc["config"]["W"] == 8192 and foc["config"]["N"] == 1_000_000
    assert foc["refocus_ms"]["median"] > 0 and foc["refocus_ms"]["n"] == 200
    tree = out["tree"]
    assert tree["append_MBps_durable"] > 0 and tree["read"]["tokens_MBps"] > 0
    assert tree["raw"]["durable"]["nodes"] == [20000, 625, 19]


def test_bench_focus_match_smoke():
    out = run_json("scripts.bench_focus", "--match", "--N", "50000", "--W", "1024")
    m = out["match"]
    assert m["index_refocus_ms"]["n"] == 20 and m["index_build_ms"] > 0 and m["full_pass_ms"] > 0
    assert m["max_abs_diff"] < 1e-4, "the index gives the batched definition's masses"


def test_bench_train_cpu_smoke_plain_and_megacontext():
    out = run_json("scripts.bench_train", "--depth", "1", "--aspect-ratio", "64", "--head-dim", "32", "--batch", "4",
                   "--seq", "64", "--vocab", "256", "--steps", "1", "--warmup", "1", "--device", "cpu",
                   "--megacontext", "--mc-context-len", "256", "--mc-W", "32", "--mc-H", "8", "--mc-block-size", "4")
    assert out["bench"] == "train" and out["tok_per_s"] > 0 and out["mfu"] is None
    mc = out["mc"]
    assert mc["contexts"] == 1 and mc["rows_per_step"] == 1 * (1 + 2 + 1 + 4) and mc["tok_per_s"] > 0
    assert out["mc_over_plain_tok_per_s"] == round(mc["tok_per_s"] / out["tok_per_s"], 3)
    out = run_json("scripts.bench_train", "--depth", "1", "--aspect-ratio", "64", "--head-dim", "32", "--batch", "4",
                   "--seq", "64", "--vocab", "256", "--steps", "1", "--warmup", "1", "--device", "cpu",
                   "--megacontext", "--mc-context-len", "256", "--mc-W", "32", "--mc-H", "8", "--mc-block-size", "4",
                   "--mc-collapse-probes")
    assert out["mc"]["rows_per_step"] == 1 * (1 + 2 + 1 + 4 + 1) and out["mc"]["tok_per_s"] > 0


def test_bench_train_like_train_takes_the_run_shapes():
    """--like-train benches the shapes a base_train run would use: the preset, then its overrides."""
    out = run_json("scripts.bench_train", "--like-train", "--config=mc_cpu --mc-probes 2 --mc-random-wcs 1 "
                   "--mc-lens-match true --device-batch-size 1", "--steps", "1", "--warmup", "1", "--device", "cpu")
    assert (out["depth"], out["seq"], out["vocab"], out["n_embd"], out["n_head"]) == (2, 128, 4096, 128, 2)
    assert out["batch"] == 1 * 1024 // 128, "one context's rows on the plain path"
    mc = out["mc"]
    assert (mc["contexts"], mc["context_len"], mc["W"], mc["H"]) == (1, 1024, 64, 16)
    assert mc["lens_match"] is True and mc["rows_per_step"] == 1 * (1 + 1 + 1 + 2)
    assert out["like_train"].startswith("--config=mc_cpu")


def test_bench_decode_cpu_smoke():
    out = run_json("scripts.bench_decode", "--depth", "1", "--vocab", "256", "--W", "64", "--K", "8",
                   "--histories", "64,128,1024", "--steps", "4", "--max-full", "256", "--device", "cpu", timeout=240)
    text = json.dumps(out)
    assert "128" in text and "1024" in text and "skipped" in text, "full attention is skipped past --max-full"
    full = {r["history"]: r["full"]["ms_per_tok"] for r in out["results"] if isinstance(r["full"], dict)}
    mc = {r["history"]: r["mc"]["ms_per_tok"] for r in out["results"]}
    assert set(out["vs_full"]) == {"64", "128"}, "MC against full attention where both ran"
    v = out["vs_full"]["128"]
    assert v["mc_speedup"] == pytest.approx(full[128] / mc[128], rel=1e-2)
    assert v["bound"] == pytest.approx(full[128] / full[64], rel=1e-2), "full(h) / full(W)"


def test_bench_decode_repeat_alternates_and_reports_the_median(monkeypatch, capsys):
    from scripts.bench_decode import median_run
    assert median_run([{"ms_per_tok": 3.0}, {"ms_per_tok": 1.0}, {"ms_per_tok": 2.0}]) == {"ms_per_tok": 2.0}
    assert median_run([{"ms_per_tok": 3.0}, {"ms_per_tok": 1.0}]) == {"ms_per_tok": 1.0}
    assert median_run([{"oom": "prefill"}, {"ms_per_tok": 4.0}]) == {"ms_per_tok": 4.0}
    assert median_run(["skipped", "skipped"]) == "skipped"
    # the loop itself, in process: each measurement is a child (run_child), faked here
    import scripts.bench_decode as bd
    calls = []

    def fake(argv, h, mode):
        calls.append((h, mode))
        return {"ms_per_tok": {"mc": 2.0, "full": 8.0}[mode] + len(calls) / 10}
    monkeypatch.setattr(bd, "run_child", fake)
    monkeypatch.setattr(sys, "argv", ["bench_decode", "--depth", "1", "--W", "64", "--histories", "64,128",
                                      "--max-full", "64", "--device", "cpu", "--repeat", "3", "--window-cudnn"])
    bd.main()
    out = json.loads(capsys.readouterr().out)
    assert out["window_cudnn"] is True
    # MC and full attention alternate per history; full is skipped past --max-full
    assert calls == [(64, "mc"), (64, "full")] * 3 + [(128, "mc")] * 3
    r64, r128 = out["results"]
    assert [r["mc_ms_per_tok"] for r in r64["runs"]] == [2.1, 2.3, 2.5] and r64["mc"]["ms_per_tok"] == 2.3
    assert [r["mc_speedup"] for r in r64["runs"]] == [round(8.2 / 2.1, 3), round(8.4 / 2.3, 3), round(8.6 / 2.5, 3)]
    assert r128["full"] == "skipped" and r128["mc"]["ms_per_tok"] == 2.8 and out["vs_full"]["64"]["mc_speedup"] == round(8.4 / 2.3, 3)


def test_bench_decode_step_breakdown_cpu_smoke():
    """--step-breakdown on CPU: the static variant's per-token loop (replays and kernels are CUDA-only)."""
    out = run_json("scripts.bench_decode", "--depth", "1", "--vocab", "256", "--W", "64", "--step-breakdown",
                   "--device", "cpu", timeout=240)
    assert out["bench"] == "decode_step_breakdown" and out["cached_entries"] == 63
    assert set(out["variants"]) == {"static"} and out["variants"]["static"]["loop_ms"] > 0


def test_bench_decode_with_the_query_match_feature_and_focus():
    for flags in (["--lens-match"], ["--focus", "match"]):
        out = run_json("scripts.bench_decode", "--depth", "1", "--vocab", "256", "--W", "64", "--K", "8",
                       "--histories", "1024", "--steps", "40", "--max-full", "0", "--device", "cpu", *flags, timeout=240)
        mc = out["results"][0]["mc"]
        assert mc["refocus_calls"] >= 1 and mc["ms_per_tok"] > 0, flags
        assert mc["prefill_ms"] > 0 and mc["prefill_warm_ms"] > 0, "cold and warm whole-window recompute"
        assert 0 <= mc["refocus_prep_ms_mean"] <= mc["refocus_lens_ms_mean"] <= mc["refocus_ms_mean"] + 1e-3
        assert mc["refocus_alloc_ms_mean"] > 0
        assert out["config"]["lens_match"] == (flags == ["--lens-match"]) and out["focus"] == flags[-1].replace("--lens-match", "lens")


def test_bench_decode_phases_and_pipeline_switch(tmp_path):
    """--phases times a second run phase by phase: the phases (and "other") add up to its total,
    and every phase the loop runs is there; --no-pipeline reads every token before its step.
    scripts/plot_decode draws both runs, and refuses a JSON that is not a bench_decode result."""
    args = ("--depth", "1", "--vocab", "256", "--W", "64", "--K", "8", "--histories", "1024", "--steps", "40",
            "--max-full", "0", "--device", "cpu", "--phases")
    on = run_json("scripts.bench_decode", *args, "--syncs", timeout=240)
    off = run_json("scripts.bench_decode", *args, "--no-pipeline", "--window-cudnn", timeout=240)
    assert on["pipeline"] is True and off["pipeline"] is False
    # --window-cudnn reaches the measuring child's MemorySession (a no-op on CPU)
    assert on["results"][0]["mc"]["window_cudnn"] is False and off["results"][0]["mc"]["window_cudnn"] is True
    mc_on, mc_off = on["results"][0]["mc"], off["results"][0]["mc"]
    assert mc_on["pipelined_per_tok"] > 0.5 and mc_off["pipelined_per_tok"] == 0
    for mc in (mc_on, mc_off):
        ph = mc["phases"]["ms_per_tok"]
        assert {"step", "recompute", "refocus", "sample", "append", "other", "total"} <= set(ph)
        assert sum(v for k, v in ph.items() if k != "total") == pytest.approx(ph["total"], abs=1e-2)
        assert mc["phases"]["calls"]["sample"] == 40 and mc["phases"]["calls"]["refocus"] >= 40 // 8
        host = mc["phases"]["host_ms_per_tok"]   # the unsynchronized pass: the same phases, host time
        assert {"step", "sample", "append", "other", "total"} <= set(host) and host["total"] > 0
        assert sum(v for k, v in host.items() if k != "total") == pytest.approx(host["total"], abs=1e-2)
        assert 0 <= mc["host_wait_ms_per_tok"] < mc["ms_per_tok"] and mc["gist_graph_exact"] is True
        assert mc["sampler"] == {"graphs": 0, "disabled": None}   # graphs are CUDA's
        assert len(mc["tree_remaps"]) == 4 and min(mc["tree_remaps"]) >= 0   # per tree level (max_level 3)
        assert mc["emb_exact"] is True and mc["fresh_rows_per_refocus"] >= mc["fresh_gists_per_refocus"] >= 0
    # pipelined or not, a generated token's step embeds it on the device (DecodeStep emb_out):
    # materialize runs only for the entries an edit changed
    for mc in (mc_on, mc_off):
        calls = mc["phases"]["calls"]
        assert calls["step"] >= 30 > calls["materialize"]
        # materialize's parts are phases of their own: rows an edit moved, and rows from the tree
        assert calls.get("emb_move", 0) + calls.get("tree_read", 0) >= 1
        assert calls.get("tree_read", 0) == calls.get("emb_fresh", 0)
    # --syncs: a third pass with synchronizing calls recorded; on CPU there are none. No CUDA
    # allocator counters off CUDA
    assert mc_on["syncs"] == {"per_tok": 0.0, "sites": {}} and "syncs" not in mc_off and "alloc" not in mc_on
    runs = []
    for name, res in (("on", on), ("off", off)):
        runs.append(f"{name}={tmp_path / name}.json")
        (tmp_path / f"{name}.json").write_text(json.dumps(res))
    out = tmp_path / "phases.png"
    r = subprocess.run([sys.executable, "-m", "scripts.plot_decode", *runs, "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text('{"loss": 1}')
    r = subprocess.run([sys.executable, "-m", "scripts.plot_decode", str(tmp_path / "bad.json"), "--out",
                        str(tmp_path / "x.png")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode != 0 and "not a bench_decode result" in r.stderr and not (tmp_path / "x.png").exists()


def test_bench_decode_profile_names_the_top_ops():
    out = run_json("scripts.bench_decode", "--depth", "1", "--vocab", "256", "--W", "64", "--K", "8",
                   "--histories", "256", "--steps", "2", "--max-full", "0", "--device", "cpu", "--profile", timeout=240)
    prof = out["results"][0]["mc"]["profile"]
    for rows in (prof["by_device"], prof["by_cpu"]):
        assert rows and any(r["op"].startswith("aten::") for r in rows) and all(r["calls"] > 0 for r in rows)
    phases = {p["phase"]: p for p in prof["phases"]}
    # the engine's named phases: every generated token runs logits + append, the timed loop is one range
    assert phases["bench.generate"]["calls"] == 1 and phases["mc.append"]["calls"] >= 2
    assert phases["mc.logits"]["calls"] >= 2 and "mc.step" in phases and phases["mc.refocus"]["calls"] >= 1
    # and what each phase's host time is made of: aten ops under the phase they ran in
    ops = prof["phase_ops"]
    assert {"mc.refocus", "mc.append"} <= set(ops) and any(r["op"].startswith("aten::") for r in ops["mc.refocus"])
    assert all(r["calls"] > 0 and r["self_cpu_ms"] >= 0 for rows in ops.values() for r in rows)


def test_bench_decode_gpu_idle_charges_each_gap_to_the_innermost_phase():
    from types import SimpleNamespace as NS
    from scripts.bench_decode import gpu_idle
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    ev = lambda name, dev, s, e: NS(name=name, device_type=dev, time_range=NS(start=s, end=e))  # noqa: E731
    events = [ev("bench.generate", cpu, 0, 100), ev("mc.logits", cpu, 2, 45), ev("mc.step", cpu, 5, 40),
              ev("mc.append", cpu, 45, 70),
              ev("k1", cuda, 10, 20), ev("k2", cuda, 15, 30), ev("k3", cuda, 50, 60),
              ev("k_outside", cuda, 150, 160), ev("mc.step", cpu, 120, 130)]   # outside the timed loop
    r = gpu_idle(events)
    # busy: [10, 30] + [50, 60]; gaps [0, 10] (no phase yet: loop), [30, 50] (in mc.step, which
    # is inside mc.logits), [60, 100] (in mc.append)
    assert r["busy_ms"] == 0.03 and r["idle_ms"] == 0.07 and r["gaps"] == 3 and r["wall_ms"] == 0.1
    assert r["idle_ms_by_phase"] == {"mc.append": 0.04, "mc.step": 0.02, "loop": 0.01}
    assert gpu_idle(events[1:]) is None   # no timed loop in the profile


def test_bench_decode_counts_the_ops_of_one_step():
    one = run_json("scripts.bench_decode", "--depth", "1", "--vocab", "256", "--count-ops", "--device", "cpu", timeout=240)
    two = run_json("scripts.bench_decode", "--depth", "2", "--vocab", "256", "--count-ops", "--device", "cpu", timeout=240)
    assert one["bench"] == "decode_step_ops" and 10 < one["ops_per_step"] < 200
    per_layer = two["ops_per_step"] - one["ops_per_step"]       # what one more layer adds
    assert 10 < per_layer <= 40, per_layer                       # 35 at the commit that cut it from 44


def test_bench_megaattn_cpu_smoke():
    out = run_json("scripts.bench_megaattn", "--device", "cpu", "--steps", "1", "--warmup", "1", timeout=240)
    assert out["bench"] == "megaattn" and out["results"]
    assert all(r["tok_per_s"] > 0 for r in out["results"] if "tok_per_s" in r)


def test_bench_train_megacontext_under_torchrun():
    """2 gloo ranks: the plain path's DDP must not hold GistNet/LensNet (they get no gradient from a
    plain step, and DDP stops at the next step: an H200 run found this)."""
    out = run_json("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scripts.bench_train",
                   "--depth", "1", "--aspect-ratio", "64", "--head-dim", "32", "--batch", "4",
                   "--seq", "64", "--vocab", "256", "--steps", "2", "--warmup", "1", "--device", "cpu",
                   "--megacontext", "--mc-context-len", "256", "--mc-W", "32", "--mc-H", "8", "--mc-block-size", "4",
                   timeout=240)
    assert out["world_size"] == 2 and abs(out["tok_per_s"] - 2 * out["tok_per_s_per_gpu"]) <= 2
    assert out["mc"]["tok_per_s"] > 0 and out["mc_over_plain_tok_per_s"] > 0


def test_bench_materialize_cpu_smoke():
    out = run_json("scripts.bench_materialize", "--depth", "1", "--vocab", "256", "--W", "64", "--K", "8",
                   "--histories", "512", "--reps", "2", "--device", "cpu", timeout=240)
    rows = out["histories"]["512"]
    assert len(rows) == 2 and all(r["entries"] <= 64 and r["runs"] >= 1 and r["materialize_ms"] > 0 for r in rows)


def test_bench_materialize_sorts_kernels_by_kind():
    from scripts.bench_materialize import kernel_kind
    assert kernel_kind("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT") == "gemm"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert kernel_kind("triton_per_fused__fused_rms_norm_0") == "inductor"
    assert kernel_kind("Memcpy HtoD (Pageable -> Device)") == "other"


def test_bench_decode_kernels_refuses_without_a_gpu():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "scripts.bench_decode_kernels"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "CUDA" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bench_decode_sync_sites_charge_each_sync_to_the_repo_line_that_made_it():
    """--syncs: a synchronizing-op warning (what torch.cuda.set_sync_debug_mode("warn") raises)
    is counted at the innermost repo frame; other warnings still reach their usual handler."""
    import warnings
    from scripts.bench_decode import SyncSites

    def sync_here():
        warnings.warn("called a synchronizing CUDA operation", UserWarning)
    seen = []
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *a, **k: seen.append(str(message))
        with SyncSites(torch.device("cpu"), roots=("tests",)) as ss:
            for _ in range(3):
                sync_here()
            line = sync_here.__code__.co_firstlineno + 1
            warnings.warn("unrelated", UserWarning)
    assert seen == ["unrelated"]
    out = ss.per_token(steps=2)
    assert out == {"per_tok": 1.5, "sites": {f"tests/test_benchmarks.py:{line} (sync_here)": 3}}
    with SyncSites(torch.device("cpu"), roots=("megacontext",)) as ss:   # no repo frame: "other"
        sync_here()
    assert ss.sites == {"other": 1}
