"""The CPU path of speedrun.sh runs end to end: tokenizer -> base training -> val bpb -> MegaContext
training -> memory evals -> chat, on the bundled corpus, with shortened trainings."""
import os
import json
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_speedrun_cpu_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    env.update(NANOCHAT_BASE_DIR=str(tmp_path), CUDA_VISIBLE_DEVICES="", CPU_ITERS="6",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    r = subprocess.run(["bash", "speedrun.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no GPU found" in r.stdout and "speedrun done" in r.stdout
    for run in ("cpu", "cpu_mc"):
        summary = json.loads((tmp_path / "runs" / run / "summary.json").read_text())
        assert summary["steps"] == 6
    res = json.loads((tmp_path / "runs" / "cpu_mc" / "mc_eval" / "mc_eval.json").read_text())
    assert set(res["accuracy"]) == {"passkey", "multikey"} and "lod1" in res["dnll"]
    assert all({"lens", "oracle", "recency", "random", "window"} <= set(acc) for acc in res["accuracy"]["passkey"].values())
    # the focus diagnostic, per MC policy (its meaning is tested in test_mctrain.py): shares in [0, 1]
    lod0 = res["needle_at_lod0"]["passkey"]
    assert set(lod0) == set(res["accuracy"]["passkey"]), lod0
    assert all(set(v) == {"lens", "match", "match_top", "union", "oracle", "recency", "random"} and all(0 <= x <= 1 for x in v.values())
               for v in lod0.values()), lod0
    assert (tmp_path / "speedrun.log").exists()
    # the training curves of both runs, from history.json and from the saved stdout log
    r = subprocess.run([sys.executable, "-m", "scripts.plot_train", "--run", "cpu_mc"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "cpu_mc" / "train_curves.png").stat().st_size > 10_000
    from scripts.plot_train import parse_log
    hist = parse_log((tmp_path / "speedrun.log").read_text())
    assert any("loss_mc" in h for h in hist) and any("val_bpb" in h for h in hist)


def test_plot_train_parses_logs_and_rejects_bad_histories(tmp_path):
    from scripts.plot_train import parse_log
    log = ("step 00000 | val bpb 3.7420\n"
           "step 00005/40 | loss 16.5583 | gnorm 5.533 | lrm 1.00 | dt 314ms | tok/s 6,524 | mfu nan% | eta 0.2m\n"
           "    loss_plain 7.8358 | loss_mc 7.7540 | swap_rate 0.0000\n")
    assert parse_log(log) == [{"step": 0, "val_bpb": 3.742},
                              {"step": 5, "loss": 16.5583, "loss_plain": 7.8358, "loss_mc": 7.754, "swap_rate": 0.0}]
    bad = tmp_path / "history.json"
    for text in ("{not json", "[1, 2]", "[]"):
        bad.write_text(text)
        r = subprocess.run([sys.executable, "-m", "scripts.plot_train", "--history", str(bad)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_mc_run_trains_under_torchrun_with_nproc(tmp_path):
    """NPROC=2 bash scripts/mc_run.sh: MC training on 2 gloo ranks with the config's contexts
    split between them (same global batch), then mc_eval; a bad NPROC stops before any work."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    env.update(NANOCHAT_BASE_DIR=str(tmp_path / "base"), CUDA_VISIBLE_DEVICES="", CONFIG="mc_cpu", NPROC="2",
               RESULTS_DIR=str(tmp_path / "out"), PY=sys.executable, OMP_NUM_THREADS="1",
               TRAIN_ARGS="--mc-collapse-probes true --mc-task-open-nouns true --mc-task-open-vocab true --log-every 1")
    r = subprocess.run(["bash", "scripts/mc_run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] > 0
    assert "1 x 1024 x 2 ranks" in r.stdout     # mc_cpu's 2 contexts per step, one per rank
    assert "dnll_collapse_lod0" in r.stdout     # TRAIN_ARGS reach base_train: collapse probes on
    from nanochat.checkpoint_manager import load_checkpoint
    run_dir = next((tmp_path / "base" / "runs").iterdir())
    tc = load_checkpoint(str(run_dir))["train_config"]
    assert tc["mc_task_open_nouns"] is True and tc["mc_task_open_vocab"] is True
    assert (tmp_path / "out" / "mc_eval.json").exists()
    bench = json.loads((tmp_path / "out" / "bench_train_mc.json").read_text())   # BENCH=1: the run's shapes
    assert bench["world_size"] == 2 and "--mc-collapse-probes true" in bench["like_train"] and bench["vocab"] == 4096
    assert bench["mc"]["rows_per_step"] == 1 * (1 + 2 + 1 + 4 + 1) and bench["mc_over_plain_tok_per_s"] > 0
    for bad in ("3", "two", "0"):
        r = subprocess.run(["bash", "scripts/mc_run.sh"], cwd=REPO, env={**env, "NPROC": bad},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "NPROC" in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
