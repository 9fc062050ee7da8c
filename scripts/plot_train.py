"""
Plot a run's training curves from <run>/history.json (written by scripts/base_train.py): train
loss and val bpb, and for a MegaContext run every MC loss term, ΔNLL per level and swap rate.

    python -m scripts.plot_train --run mc          # -> <base_dir>/runs/mc/train_curves.png
    python -m scripts.plot_train --history path/to/history.json --out curves.png
    python -m scripts.plot_train --log base_train.log --out curves.png   # from a saved stdout log
"""
import os
import re
import json
import argparse

from nanochat.common import get_base_dir, main_guard, fail

MC_LOSSES = ("loss_plain", "loss_mc", "loss_recency", "loss_lens")


def parse_log(text):
    """base_train's stdout -> history records: 'step N/M | loss X ...' lines, the indented MC line
    that follows them, and 'step N | val bpb X' lines."""
    history, last = [], None
    for line in text.splitlines():
        if m := re.match(r"step (\d+)/\d+ \| loss ([\d.]+)", line):
            last = {"step": int(m[1]), "loss": float(m[2])}
            history.append(last)
        elif m := re.match(r"step (\d+) \| val bpb ([\d.]+)", line):
            history.append({"step": int(m[1]), "val_bpb": float(m[2])})
        elif line.startswith("    ") and last is not None and "|" in line:
            for part in line.split("|"):
                k, _, v = part.strip().rpartition(" ")
                try:
                    last[k] = float(v)
                except ValueError:
                    pass
    return history


def plot(history, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("plotting needs matplotlib (pip install matplotlib)")
    train = [h for h in history if "loss" in h]
    val = [h for h in history if "val_bpb" in h]
    mc = [k for k in MC_LOSSES if train and k in train[-1]]
    extra = sorted(k for k in (train[-1] if train else {}) if k.startswith("dnll_") or k in ("swap_rate", "lens_top1_gain"))
    panels = 2 + bool(mc) + bool(extra)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    ax = axes[0]
    ax.plot([h["step"] for h in train], [h["loss"] for h in train])
    ax.set(title="train loss (total)", xlabel="step")
    ax = axes[1]
    ax.plot([h["step"] for h in val], [h["val_bpb"] for h in val], marker="o")
    ax.set(title="val bits per byte", xlabel="step")
    i = 2
    if mc:
        for k in mc:
            axes[i].plot([h["step"] for h in train], [h[k] for h in train], label=k)
        axes[i].set(title="MegaContext loss terms (nats)", xlabel="step")
        axes[i].legend(fontsize=8)
        i += 1
    if extra:
        for k in extra:
            axes[i].plot([h["step"] for h in train], [h[k] for h in train], label=k)
        axes[i].axhline(0, color="grey", lw=0.5)
        axes[i].set(title="focus signals", xlabel="step")
        axes[i].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main():
    ap = argparse.ArgumentParser(description="plot a run's training curves")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run name: <base_dir>/runs/<run>/history.json")
    src.add_argument("--history", help="a history.json")
    src.add_argument("--log", help="a saved base_train stdout log")
    ap.add_argument("--out", default="", help="PNG path (default: train_curves.png beside the history)")
    args = ap.parse_args()
    path = args.log or args.history or os.path.join(get_base_dir(), "runs", args.run, "history.json")
    if not os.path.exists(path):
        fail(f"no history at {path} (train first)")
    try:
        with open(path) as f:
            history = parse_log(f.read()) if args.log else json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"{path} is not valid JSON: {e}")
    if not history or not isinstance(history, list) or not all(isinstance(h, dict) and "step" in h for h in history):
        fail(f"{path} is not a training history (a list of {{'step': ...}} records)")
    out = args.out or os.path.join(os.path.dirname(path), "train_curves.png")
    print(json.dumps({"plot": plot(history, out), "records": len(history)}))


if __name__ == "__main__":
    main_guard(main)
