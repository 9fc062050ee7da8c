"""
Plot bench_decode results: where an MC token's time goes (the --phases breakdown, one stacked bar
per history and run) next to full attention's ms/token over the same histories.

    python -m scripts.plot_decode results/h200/bench_decode_d20_w4096_phases*.json --out decode_phases.png

Each input is one bench_decode JSON; its label is the file name's last "_" part unless given as
LABEL=path. Runs without --phases still plot their MC and full-attention ms/token.
"""
import os
import json
import argparse

from nanochat.common import main_guard, fail

ORDER = ("step", "recompute", "refocus", "sample", "append", "materialize", "window_sync", "other")


def load(spec):
    label, sep, path = spec.partition("=")
    if not sep:
        path, label = spec, os.path.splitext(os.path.basename(spec))[0].rsplit("_", 1)[-1]
    try:
        with open(path) as f:
            d = json.load(f)
        d["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path}: not a bench_decode result ({type(e).__name__}: {e})")
    return label, d


def ms(r):
    return r.get("ms_per_tok") if isinstance(r, dict) else None


def plot(runs, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("plotting needs matplotlib (pip install matplotlib)")
    histories = sorted({r["history"] for _, d in runs for r in d["results"]})
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    n, width = len(runs), 0.8 / max(1, len(runs))
    colors = plt.get_cmap("tab10")
    for i, (label, d) in enumerate(runs):
        rows = {r["history"]: r for r in d["results"]}
        for x, h in enumerate(histories):
            mc = rows.get(h, {}).get("mc")
            if not isinstance(mc, dict):
                continue
            pos = x - 0.4 + width * (i + 0.5)
            ph = (mc.get("phases") or {}).get("ms_per_tok")
            if ph:
                bottom = 0.0
                for k, name in enumerate(ORDER):
                    v = max(0.0, ph.get(name, 0.0))
                    ax.bar(pos, v, width * 0.9, bottom=bottom, color=colors(k),
                           label=name if (i, x) == (0, 0) else None)
                    bottom += v
            if ms(mc) is not None:   # the unsynchronized headline figure
                ax.plot([pos - width * 0.45, pos + width * 0.45], [ms(mc)] * 2, color="black", lw=2,
                        label="measured ms/token (no syncs)" if (i, x) == (0, 0) else None)
                ax.annotate(label, (pos, 0), xytext=(0, -22), textcoords="offset points", ha="center",
                            fontsize=7, rotation=30)
        full = [(h, ms(rows[h]["full"])) for h in histories if h in rows and ms(rows[h]["full"])]
        mcs = [(h, ms(rows[h]["mc"])) for h in histories if h in rows and ms(rows[h]["mc"])]
        if mcs:
            ax2.plot(*zip(*mcs), marker="o", color=colors(i), label=f"MC ({label})")
        if full:
            ax2.plot(*zip(*full), marker="s", ls="--", color=colors(i), label=f"full attention ({label})")
    ax.set_xticks(range(len(histories)), [f"{h // 1024}k" if h % 1024 == 0 else str(h) for h in histories])
    ax.tick_params(axis="x", pad=26)
    ax.set(title="MC ms per token, by phase (device synced per phase)", ylabel="ms / token", xlabel="history")
    ax.legend(fontsize=7, ncol=3)
    ax2.set(xscale="log", title="decode ms per token", xlabel="history (tokens)", ylabel="ms / token")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("runs", nargs="+", help="bench_decode JSON files, optionally LABEL=path")
    ap.add_argument("--out", default="decode_phases.png")
    args = ap.parse_args()
    print(plot([load(s) for s in args.runs], args.out))


if __name__ == "__main__":
    main_guard(main)
