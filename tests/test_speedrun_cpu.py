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
    assert (tmp_path / "speedrun.log").exists()
