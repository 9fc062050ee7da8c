"""Training: optimizers, configuration, checkpoints and scripts/base_train.py end to end (tiny, CPU).

The subprocess tests run the real script the way a user does (`python -m scripts.base_train`,
torchrun for 2 ranks on gloo). This file is also the 2-rank Muon/DDP worker: torchrun runs it as a
script (see `ddp_muon_worker` at the bottom)."""
import os
import sys
import json
import math
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # when torchrun runs this file as a script
    sys.path.insert(0, REPO)

from nanochat.common import UserError
from nanochat.configurator import parse_config
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizers, Muon
from nanochat.checkpoint_manager import save_checkpoint, load_checkpoint, build_model

# a 115k-parameter model, 64-token rows, 1 micro-batch per step: ~10 ms a step on a CPU core
TINY = ["--config", "cpu", "--depth", "1", "--aspect-ratio", "64", "--head-dim", "32", "--max-seq-len", "64",
        "--device-batch-size", "2", "--total-batch-size", "128", "--eval-every", "-1", "--data", "bundled",
        "--device", "cpu", "--log-every", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def clean_env(base_dir, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    e.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1", NANOCHAT_BASE_DIR=str(base_dir), **env)
    return e


def run(args, base_dir, timeout=120, **env):
    """Run a command in the repo with a clean nanochat environment; returns CompletedProcess."""
    return subprocess.run([str(a) for a in args], cwd=REPO, env=clean_env(base_dir, **env), capture_output=True,
                          text=True, timeout=timeout)


def start(args, base_dir, **env):
    return subprocess.Popen([str(a) for a in args], cwd=REPO, env=clean_env(base_dir, **env), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def script(name, *args):
    return [sys.executable, "-m", name, *args]


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def tiny_model(megacontext=False, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=1, n_embd=64,
                          megacontext=megacontext, mc_block_size=8))
    model.init_weights()
    return model

# ----------------------------------------------------------------------------- optimizers


def test_optimizer_steps_lower_the_loss_on_a_fixed_batch():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 128, (4, 32), generator=g)
    y = torch.roll(x, -1, dims=1)
    opts = build_optimizers(model)
    assert isinstance(opts[1], Muon)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(8):
        loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters that never moved: {unchanged}"


@pytest.mark.parametrize("megacontext", [False, True])
def test_every_parameter_is_in_exactly_one_optimizer_group(megacontext):
    model = tiny_model(megacontext)
    opts = build_optimizers(model)
    counts = Counter(id(p) for o in opts for g in o.param_groups for p in g["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(counts) == set(names), f"in no group: {[names[i] for i in set(names) - set(counts)]}"
    assert all(c == 1 for c in counts.values()), f"in several groups: {[names[i] for i, c in counts.items() if c > 1]}"
    assert all(p.ndim == 2 for g in opts[1].param_groups for p in g["params"]), "Muon takes matrices only"
    if megacontext:
        mc = {n for n in names.values() if n.startswith(("gistnet.", "lensnet.", "lod_emb."))}
        assert len(mc) > 10 and mc <= set(names.values())
        muon_names = {names[id(p)] for g in opts[1].param_groups for p in g["params"]}
        assert any(n.startswith("gistnet.blocks") for n in muon_names)
        assert any(n.startswith("lensnet.blocks") for n in muon_names)


def ddp_muon_worker(out_path):
    """torchrun, 2 ranks on gloo: each rank trains on its own batches; after DDP's gradient average
    Muon (and AdamW) must leave the weights bit-identical on both ranks."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from nanochat.common import compute_init, compute_cleanup
    ddp, rank, _, world, device = compute_init("cpu", seed=0)
    assert ddp and world == 2
    model = tiny_model(seed=rank)  # different init per rank: DDP must broadcast rank 0's weights
    ddp_model = DDP(model)
    opts = build_optimizers(model)
    init = torch.cat([p.detach().flatten() for p in model.parameters()])
    g = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(3):
        x = torch.randint(0, 128, (2, 32), generator=g)
        loss = ddp_model(x, torch.roll(x, -1, dims=1))
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    all_losses = [None] * world
    dist.all_gather_object(all_losses, losses)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"max_abs_diff": (gathered[0] - gathered[1]).abs().max().item(),
                       "moved": (flat - init).abs().max().item(), "losses": all_losses}, f)
    del ddp_model  # before the process group: see compute_cleanup
    compute_cleanup()


@pytest.mark.slow
def test_muon_keeps_weights_identical_across_ddp_ranks(tmp_path):
    out = tmp_path / "ddp.json"
    ok(run(TORCHRUN + [os.path.abspath(__file__), "--ddp-muon-worker", out], tmp_path, timeout=240))
    res = json.loads(out.read_text())
    assert res["max_abs_diff"] == 0.0, "weights diverged across ranks"
    assert res["moved"] > 0
    assert res["losses"][0] != res["losses"][1], "the ranks should have trained on different batches"

# ----------------------------------------------------------------------------- configurator


@dataclass
class Cfg:
    depth: int = 4
    lr: float = 0.1
    name: str = "x"
    flag: bool = False


def write(path, text):
    path.write_text(text)
    return str(path)


def test_config_file_and_cli(tmp_path):
    f = write(tmp_path / "c.toml", 'name = "top"\n[sec]\ndepth = 8\nlr = 1\n[other]\nbogus = 1\n')
    c = parse_config(Cfg, ["--config", f], section="sec")
    assert (c.depth, c.lr, c.name, c.flag) == (8, 1.0, "top", False), "top level + own section; other sections ignored"
    for argv in (["--config", f, "--depth", "3"], ["--depth=3", "--config", f]):
        assert parse_config(Cfg, argv, section="sec").depth == 3, f"the CLI overrides the file: {argv}"
    c = parse_config(Cfg, ["--flag", "--lr=-0.5", "--name", "y"], section="sec")
    assert (c.flag, c.lr, c.name) == (True, -0.5, "y")
    assert parse_config(Cfg, [], section="sec") == Cfg()


@pytest.mark.parametrize("argv, toml, match", [
    (["--config", "FILE"], "[sec]\nwidth = 3\n", "unknown key 'width'"),
    (["--widht", "3"], None, "unknown option --widht"),
    (["--depth", "three"], None, "expects an integer"),
    (["--depth", "2.5"], None, "expects an integer"),
    (["--lr", "fast"], None, "expects a number"),
    (["--flag", "maybe"], None, "expects a boolean"),
    (["--config", "FILE"], '[sec]\ndepth = "deep"\n', "expects an integer"),
    (["--config", "FILE"], "[sec]\ndepth = true\n", "expects an integer"),
    (["--config", "FILE"], "[sec\n", "not valid TOML"),
    (["--config", "/nonexistent/x.toml"], None, "config file not found"),
    (["depth", "3"], None, "unexpected argument"),
])
def test_config_errors_are_user_errors(tmp_path, argv, toml, match):
    if toml is not None:
        argv = [write(tmp_path / "c.toml", toml) if a == "FILE" else a for a in argv]
    with pytest.raises(UserError, match=match):
        parse_config(Cfg, argv, section="sec")


def test_config_float_in_toml_for_an_int_is_an_error(tmp_path):
    with pytest.raises(UserError, match="expects an integer"):
        parse_config(Cfg, ["--config", write(tmp_path / "c.toml", "[sec]\ndepth = 2.5\n")], section="sec")


def test_presets_parse():
    from scripts.base_train import TrainConfig
    for preset in ("cpu", "d12", "d20", "speedrun"):
        parse_config(TrainConfig, ["--config", preset], section="base_train")

# ----------------------------------------------------------------------------- checkpoints in-process


def test_checkpoint_round_trip_includes_gistnet_and_lensnet(tmp_path):
    model = tiny_model(megacontext=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the init values, so a round trip is visible
    opts = build_optimizers(model)
    save_checkpoint(str(tmp_path), 7, model, opts, {"epoch": 0, "group": 0, "offset": 5}, {"depth": 2}, {"x": 1})
    assert (tmp_path / "latest").read_text().strip() == "7"
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["step"] == 7 and ckpt["meta"] == {"x": 1} and ckpt["loader_states"] == [{"epoch": 0, "group": 0, "offset": 5}]
    rebuilt = build_model(ckpt, "cpu")
    sd, sd2 = model.state_dict(), rebuilt.state_dict()
    assert any(k.startswith("gistnet.") for k in sd) and any(k.startswith("lensnet.") for k in sd)
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_checkpoint_errors_are_user_errors(tmp_path, tiny_tokenizer):
    from nanochat.tokenizer import Tokenizer
    model = tiny_model()
    ckpt = {"model_config": GPTConfig(**{**model.config.to_dict(), "vocab_size": 512}).to_dict(), "model": {}}
    other = Tokenizer.train_from_iterator(iter(["hello world, hello tokens"] * 20), 300)
    assert other.get_vocab_size() != 512
    with pytest.raises(UserError, match=f"vocab size 512 but the tokenizer has {other.get_vocab_size()}"):
        build_model(ckpt, "cpu", tokenizer=other)
    with pytest.raises(UserError, match="does not match the model"):
        build_model(ckpt, "cpu", tokenizer=tiny_tokenizer)  # right vocab, but no weights
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "latest").write_text("3\n")
    (tmp_path / "model_000003.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(str(tmp_path))

# ----------------------------------------------------------------------------- base_train end to end


@pytest.fixture(scope="module")
def resumed_run(tiny_tokenizer, tmp_path_factory):
    """6 steps saving at 3 and 6 (run a); then a copy of the step-3 checkpoint resumed to 6 (run b)."""
    base = os.path.dirname(tiny_tokenizer.directory)
    root = tmp_path_factory.mktemp("resume")
    a, b = root / "a", root / "b"
    ok(run(script("scripts.base_train", *TINY, "--num-iterations", "6", "--save-every", "3", "--out-dir", a), base))
    b.mkdir()
    shutil.copy(a / "model_000003.pt", b)
    (b / "latest").write_text("3\n")
    r = ok(run(script("scripts.base_train", *TINY, "--num-iterations", "6", "--save-every", "3", "--out-dir", b,
                      "--resume"), base))
    assert "resumed from step 3" in r.stdout
    return base, a, b


def test_resume_reproduces_the_next_steps_exactly(resumed_run):
    _, a, b = resumed_run
    ref, res = load(a / "model_000006.pt"), load(b / "model_000006.pt")
    losses = lambda c: {h["step"]: h["loss"] for h in c["meta"]["history"] if "loss" in h}
    la, lb = losses(ref), losses(res)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]
    assert [la[s] for s in (4, 5, 6)] == [lb[s] for s in (4, 5, 6)], f"{la} vs {lb}"
    assert la[6] < la[1]
    assert all(torch.equal(ref["model"][k], res["model"][k]) for k in ref["model"])
    assert ref["loader_states"] == res["loader_states"]
    assert load(a / "model_000003.pt")["loader_states"] == [{"epoch": 0, "group": 0, "offset": 3 * 128}], \
        "the saved loader state is where step 4's batch starts"
    summary = json.loads((b / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 1


@pytest.mark.slow
def test_torchrun_two_ranks(tiny_tokenizer, tmp_path):
    base = os.path.dirname(tiny_tokenizer.directory)
    out = tmp_path / "ddp"
    args = TINY + ["--total-batch-size", "256", "--num-iterations", "3", "--eval-every", "3", "--eval-tokens", "256",
                   "--out-dir", out]
    r = ok(run(TORCHRUN + ["-m", "scripts.base_train"] + args, base, timeout=180))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and math.isfinite(summary["val_bpb"])
    assert r.stdout.count("resumed") == 0 and r.stdout.count("step 00003/3") == 1, "rank 0 prints, once"
    ckpt = load(out / "model_000003.pt")
    s0, s1 = ckpt["loader_states"]
    assert s0 != s1 and s0["group"] % 2 == 0 and s1["group"] % 2 == 1, "each rank reads its own documents"
    assert s0["offset"] == s1["offset"] == 3 * 128, "each rank consumed 3 of its own batches"


def test_bad_input_stops_with_one_clear_line(resumed_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from nanochat.tokenizer import Tokenizer
    base, a, _ = resumed_run
    empty, shards, other_tok = tmp_path / "empty", tmp_path / "shards", tmp_path / "tok300"
    empty.mkdir()
    shards.mkdir()
    table = pa.table({"text": [f"document {i} " * 50 for i in range(20)]})
    for i in (0, 1):
        pq.write_table(table, shards / f"shard_{i:05d}.parquet", row_group_size=5)
    data = (shards / "shard_00000.parquet").read_bytes()
    (shards / "shard_00000.parquet").write_bytes(data[:len(data) // 2])  # a torn train shard
    Tokenizer.train_from_iterator(iter(["hello world"] * 10), 300).save(str(other_tok))
    toml = tmp_path / "bad.toml"
    toml.write_text("[base_train]\ndepht = 3\n")
    train = lambda *extra: script("scripts.base_train", *TINY, "--num-iterations", "2", "--out-dir", tmp_path / "o", *extra)
    cases = {
        "unknown config key": (train("--config", toml), base, {}, "unknown key 'depht'"),
        "unknown flag": (train("--num-iteration", "3"), base, {}, "unknown option --num-iteration"),
        "bad type": (train("--depth", "two"), base, {}, "--depth expects an integer"),
        "bad mc compile mode": (train(*MC_TINY, "--mc-compile", "graph"), base, {}, "mc_compile must be one of"),
        "open vocab without open nouns": (train(*MC_TINY, "--mc-task-open-vocab", "true"), base, {},
                                          "mc_task_open_vocab picks the nouns of mc_task_open_nouns"),
        "negative loss chunk": (train("--loss-chunk", "-1"), base, {}, "loss_chunk must be >= 0"),
        "no data": (train("--data", "fineweb"), base, {"NANOCHAT_DATA_DIR": str(empty)}, "no .parquet shards"),
        "corrupt shard": (train("--data", "fineweb"), base, {"NANOCHAT_DATA_DIR": str(shards)}, "corrupt shard"),
        "no tokenizer": (train(), empty, {}, "no tokenizer at"),
        "wrong vocab": (script("scripts.base_loss", "--ckpt-dir", a, "--tokenizer-dir", other_tok, "--device", "cpu"),
                        base, {}, "vocab size 512 but the tokenizer has"),
    }
    procs = {name: start(cmd, base_dir, **env) for name, (cmd, base_dir, env, _) in cases.items()}  # in parallel
    for name, p in procs.items():
        _, stderr = p.communicate(timeout=120)
        err, match = stderr.strip(), cases[name][3]
        assert p.returncode == 2, f"{name}: exit {p.returncode}\n{stderr[-2000:]}"
        assert err.startswith("error:") and "Traceback" not in err and len(err.splitlines()) == 1, f"{name}: {err}"
        assert match in err, f"{name}: {err}"


MC_TINY = ["--megacontext", "--mc-context-len", "512", "--mc-W", "48", "--mc-H", "8", "--mc-block-size", "8",
           "--total-batch-size", "1024", "--mc-task-rate", "0.5"]


@pytest.mark.slow
def test_megacontext_resume_reproduces_the_next_steps_exactly(tiny_tokenizer, tmp_path):
    """The MC path's sampling streams (windows, tasks, probes) are saved with the loader state: a
    run resumed at step 2 repeats steps 3-4 of the uninterrupted run bit for bit."""
    base = os.path.dirname(tiny_tokenizer.directory)
    a, b = tmp_path / "a", tmp_path / "b"
    args = TINY + MC_TINY + ["--num-iterations", "4", "--save-every", "2"]
    ok(run(script("scripts.base_train", *args, "--out-dir", a), base))
    b.mkdir()
    shutil.copy(a / "model_000002.pt", b)
    (b / "latest").write_text("2\n")
    ok(run(script("scripts.base_train", *args, "--out-dir", b, "--resume"), base))
    ref, res = load(a / "model_000004.pt"), load(b / "model_000004.pt")
    losses = lambda c: {h["step"]: h["loss"] for h in c["meta"]["history"] if "loss" in h}
    assert [losses(ref)[s] for s in (3, 4)] == [losses(res)[s] for s in (3, 4)]
    assert all(torch.equal(ref["model"][k], res["model"][k]) for k in ref["model"])
    assert "mc" in ref["loader_states"][0] and "rng" in ref["loader_states"][0]["mc"]


def test_eager_restores_compiled_forwards():
    """base_train samples through eager(): a compiled (dynamic=False) forward would recompile at
    every decode step. Inside, the module's own forward runs; after, the compiled one is back."""
    from scripts.base_train import eager
    model = tiny_model(megacontext=True)
    x = torch.randint(0, 128, (1, 8))
    def compiled(*a, **k):
        raise AssertionError("the compiled forward must not run while sampling")
    model.forward = model.gistnet.forward = compiled
    with eager(model, model.gistnet):
        assert model(x).shape == (1, 8, 128)
    assert model.forward is compiled and model.gistnet.forward is compiled
    with eager(model.lensnet):                              # a module without a compiled forward
        pass
    assert "forward" not in model.lensnet.__dict__


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp-muon-worker"]:
    ddp_muon_worker(sys.argv[2])


def test_the_time_budget_clock_leaves_out_evals_and_checkpoints(monkeypatch):
    import scripts.base_train as bt
    now = [100.0]
    monkeypatch.setattr(bt.time, "time", lambda: now[0])
    clock = bt.BudgetClock()
    now[0] += 10                      # training
    clock.pause()
    now[0] += 50                      # an eval
    assert clock.elapsed() == 10
    clock.pause()                     # idempotent
    clock.resume()
    now[0] += 5
    clock.resume()
    assert clock.elapsed() == 15
