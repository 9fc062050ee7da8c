"""
Evaluate a MegaContext checkpoint: does focus remember? Prints one JSON object, writes it to
<out>/mc_eval.json and saves PNG plots there.

  python -m scripts.mc_eval --run mc --mults 4,16,64,256 --n 20

- Passkey / multi-key NIAH accuracy by history length (mults x W) and needle depth, for the
  policies in megacontext/evals.py (lens, match, match_top, union, oracle, recency, random, window, full). Eval examples come
  from held-out seeds, phrasings and answer values (megacontext/tasks.py); the same examples in
  a training phrasing are scored too ("accuracy_train_phrasing").
- ΔNLL@H of substituting one LOD1 block (vs LOD0) and one LOD2 block (vs LOD1) on held-out text.
- Loss vs distance: next-H-token NLL on held-out text as the history grows, per policy.
"""
import os
import json
import time
from dataclasses import dataclass

import numpy as np

from nanochat.common import compute_init, print0, get_base_dir, main_guard, fail, atomic_write_json, autocast_ctx
from nanochat.configurator import parse_config
from nanochat.checkpoint_manager import load_checkpoint, build_model
from nanochat.tokenizer import get_tokenizer
from nanochat.dataset import documents_iter_batched
from megacontext import tasks
from megacontext.evals import eval_example, substitution_dnll, wilson_interval, POLICIES


@dataclass
class EvalConfig:
    run: str = "mc"
    ckpt_dir: str = ""
    out: str = ""
    data: str = "bundled"            # held-out text for filler / ΔNLL / loss-vs-distance
    W: int = 0                       # 0: the budget the checkpoint was trained with
    mults: str = "4,16,64,256"       # history lengths as multiples of W
    tasks: str = "passkey,multikey"
    n: int = 20                      # examples per (task, length)
    policies: str = ",".join(POLICIES)
    rounds: int = 8                  # refocus rounds for lens/random
    full_max: int = 0                # longest history for full attention (0: the model's sequence_len)
    dnll_n: int = 8
    train_phrasing: bool = True      # also score the training phrasings (eval seeds and values)
    replot: bool = False             # only redraw the plots from <out>/mc_eval.json (no model needed)
    H: int = 64
    device: str = ""
    seed: int = 0


def held_out_tokens(tokenizer, source, max_tokens=400_000):
    toks = []
    for batch in documents_iter_batched(source, "val"):
        for doc in batch:
            toks.extend(tokenizer.encode(doc, prepend=tokenizer.get_bos_token_id()))
        if len(toks) >= max_tokens:
            break
    return np.asarray(toks[:max_tokens], dtype=np.int64)


def plot(results, out_dir, W):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    train_fmt = results.get("accuracy_train_phrasing") or {}
    colors = {p: f"C{i}" for i, p in enumerate(("lens", "recency", "random", "window", "full", "oracle", "match", "match_top", "union"))}
    n = results["config"].get("n")   # examples per point: the width of its 95% interval
    for task, by_len in results["accuracy"].items():
        # held-out phrasing (the claim) and, when scored, a training phrasing with eval seeds
        # beside it: "not learned" and "not transferred" look different
        panels = [("held-out phrasing", by_len)] + ([("training phrasing", train_fmt[task])] if task in train_fmt else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (name, acc) in zip(axes[0], panels):
            lens = sorted(int(k) for k in acc)
            for pol in sorted({q for v in acc.values() for q in v}):
                xs = [L for L in lens if pol in acc[str(L)]]
                ys = [acc[str(L)][pol] for L in xs]
                ax.plot(xs, ys, marker="o", label=pol, color=colors.get(pol))
                if n:   # the 95% Wilson interval of each point's n examples: a band, or a bar for one point
                    lo, hi = zip(*(wilson_interval(y, n) for y in ys))
                    if len(xs) > 1:
                        ax.fill_between(xs, lo, hi, color=colors.get(pol), alpha=0.12, linewidth=0)
                    else:
                        ax.errorbar(xs, ys, yerr=[[ys[0] - lo[0]], [hi[0] - ys[0]]], color=colors.get(pol), capsize=3)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"history length (tokens); W = {W} entries")
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{task}, {name}" + (f" ({n} examples per point, 95% bands)" if n else ""))
            ax.legend(fontsize=8)
        p = os.path.join(out_dir, f"acc_{task}.png")
        fig.tight_layout()
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    lvd = results.get("loss_vs_distance")
    if lvd:
        fig, ax = plt.subplots(figsize=(6, 4))
        for pol, pts in lvd.items():
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=pol)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("history length (tokens)")
        ax.set_ylabel(f"NLL of the next {results['config']['H']} tokens (nats)")
        ax.legend()
        p = os.path.join(out_dir, "loss_vs_distance.png")
        fig.tight_layout()
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def main():
    cfg = parse_config(EvalConfig, section="mc_eval")
    _, rank, _, _, device = compute_init(cfg.device or None, cfg.seed)
    run_dir = cfg.ckpt_dir or os.path.join(get_base_dir(), "runs", cfg.run)
    if cfg.replot:
        path = os.path.join(cfg.out or os.path.join(run_dir, "mc_eval"), "mc_eval.json")
        if not os.path.exists(path):
            fail(f"--replot: no results at {path}")
        with open(path) as f:
            res = json.load(f)
        print0(json.dumps({"plots": plot(res, os.path.dirname(path), res["config"]["W"])}))
        return
    # arguments first: a typo must not cost a checkpoint load
    policies = cfg.policies.split(",")
    for p in policies:
        if p not in POLICIES:
            fail(f"unknown policy {p!r} (choose from {', '.join(POLICIES)})")
    task_names = cfg.tasks.split(",")
    for t in task_names:
        if t not in tasks.TASKS:
            fail(f"unknown task {t!r} (choose from {', '.join(tasks.TASKS)})")
    mults = [int(m) for m in cfg.mults.split(",")]
    if not 1 <= cfg.n <= 1_000_000:
        fail(f"--n must be in [1, 1000000], got {cfg.n}")
    ckpt = load_checkpoint(run_dir, device=device)
    tokenizer = get_tokenizer()
    model = build_model(ckpt, device, tokenizer)
    model.eval()
    if not model.config.megacontext:
        fail(f"checkpoint in {run_dir} is not a MegaContext model (train with --megacontext)")
    tc = ckpt.get("train_config") or {}
    W = cfg.W or tc.get("mc_W", 512)
    full_max = cfg.full_max or model.config.sequence_len
    out_dir = cfg.out or os.path.join(run_dir, "mc_eval")
    os.makedirs(out_dir, exist_ok=True)
    autocast = autocast_ctx(device.type)
    val = held_out_tokens(tokenizer, cfg.data)
    filler = tasks.make_text_filler(val)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()

    partial = {}
    at_lod0 = {}   # "[label]task" -> L -> policy -> share of examples whose answer needles ended at LOD0
    first = {}     # "[label]task" -> L -> policy -> round-1 rank of the needle's gist among all gists: top1 share, median

    def task_accuracy(fmt, label):
        """Accuracy by (task, history length, policy) and by needle depth, for one phrasing."""
        acc, by_depth = {}, {}
        for task in task_names:
            acc[task], by_depth[task], at_lod0[label + task], first[label + task] = {}, {}, {}, {}
            for m in mults:
                L = m * W
                hits, lod0, ranks = {p: [] for p in policies}, {}, {}
                depth_hits = {}
                for i in range(cfg.n):
                    cell = mults.index(m) * len(task_names) + task_names.index(task)   # one seed range per (task, L)
                    erng = tasks.task_rng("eval", cell * 1_000_000 + i)
                    depth = (i + 0.5) / cfg.n
                    kw = {"depth": depth} if task == "passkey" else {}
                    ex = tasks.make_example(task, erng, L, filler, tokenizer.encode, fmt=fmt, split="eval", **kw)
                    N = ex["answer_start"]
                    cont = ex["ids"][N:]
                    with autocast:
                        r = eval_example(model, ex["ids"], N, cont, W, policies, cfg.rounds, rng, full_max,
                                         targets=ex["target_spans"])
                    for p, v in r.items():
                        hits[p].append(v["correct"])
                        if "needle_at_lod0" in v:
                            lod0.setdefault(p, []).append(v["needle_at_lod0"])
                        if v.get("needle_rank") is not None:
                            ranks.setdefault(p, []).append(v["needle_rank"])
                        depth_hits.setdefault(p, {}).setdefault(round(depth, 2), []).append(v["correct"])
                acc[task][str(L)] = {p: float(np.mean(h)) for p, h in hits.items() if h}
                by_depth[task][str(L)] = {p: {d: float(np.mean(v)) for d, v in dd.items()} for p, dd in depth_hits.items()}
                at_lod0[label + task][str(L)] = {p: float(np.mean(v)) for p, v in lod0.items()}
                first[label + task][str(L)] = {p: {"top1": float(np.mean(np.array(v) == 1)), "median_rank": float(np.median(v))}
                                               for p, v in ranks.items()}
                print0(f"{label}{task} @ {L} tokens ({m}x W): "
                       + ", ".join(f"{p} {a:.2f}" for p, a in acc[task][str(L)].items()) + f"  [{time.time() - t0:.0f}s]"
                       + "\n    needle at LOD0 after focus: " + ", ".join(f"{p} {a:.2f}" for p, a in at_lod0[label + task][str(L)].items())
                       + "\n    needle's gist ranked first in round 1: "
                       + ", ".join(f"{p} {r['top1']:.2f} (median rank {r['median_rank']:g})" for p, r in first[label + task][str(L)].items()))
                partial["accuracy_train_phrasing" if label else "accuracy"] = acc
                atomic_write_json(os.path.join(out_dir, "mc_eval.partial.json"), partial)
        return acc, by_depth

    # the headline: held-out phrasing; then the training phrasings (still eval seeds and values),
    # which tells "never learned the task" apart from "did not transfer to a new phrasing"
    acc, by_depth = task_accuracy(tasks.EVAL_FMTS[0], "")
    acc_train_fmt = task_accuracy(tasks.TRAIN_FMTS[0], "[train phrasing] ")[0] if cfg.train_phrasing else {}

    # ΔNLL@H of substitution, on held-out text
    dnll = {}
    for level in range(1, model.config.mc_max_level + 1):
        need = model.config.mc_block_size ** level * 2 + 2 * model.config.mc_block_size
        N = min(max(need, 2 * W), len(val) - cfg.H - 1)
        vals = []
        for j in range(cfg.dnll_n):
            s = int(rng.integers(0, len(val) - N - cfg.H))
            with autocast:
                d, _ = substitution_dnll(model, val[s:s + N + cfg.H], N, cfg.H, level, n_blocks=4, rng=rng)
            vals.append(d)
        dnll[f"lod{level}"] = float(np.nanmean(vals))
    print0(f"ΔNLL@{cfg.H} (nats/token) of substituting one block: {dnll}  [{time.time() - t0:.0f}s]")

    # loss vs distance on held-out text
    lvd = {p: [] for p in policies}
    for m in [1, 2, 4, 8, 16, 32]:
        N = m * W
        if N + cfg.H >= len(val):
            break
        per = {p: [] for p in policies}
        for j in range(4):
            s = int(rng.integers(0, len(val) - N - cfg.H))
            seg = val[s:s + N + cfg.H]
            with autocast:
                r = eval_example(model, seg, N, seg[N:N + cfg.H], W, policies, cfg.rounds, rng, full_max)
            for p, v in r.items():
                per[p].append(v["nll"])
        for p, v in per.items():
            if v:
                lvd[p].append((N, float(np.mean(v))))
    lvd = {p: v for p, v in lvd.items() if v}

    results = {"config": {**cfg.__dict__, "W": W, "full_max": full_max, "run_dir": run_dir,
                          "pos_scheme": model.config.pos_scheme, "device": str(device)},
               "accuracy": acc, "accuracy_by_depth": by_depth, "accuracy_train_phrasing": acc_train_fmt, "needle_at_lod0": at_lod0, "needle_rank_round1": first, "dnll": dnll, "loss_vs_distance": lvd,
               "eval_seconds": round(time.time() - t0, 1)}
    results["plots"] = plot(results, out_dir, W)
    atomic_write_json(os.path.join(out_dir, "mc_eval.json"), results)
    print0(json.dumps(results))


if __name__ == "__main__":
    main_guard(main)
