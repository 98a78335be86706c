"""Draws the blog's figures from result CSVs alone: one PNG beside each CSV, with
(a) probe accuracy per epoch (the untrained encoder's level dashed), (b) positive (dashed) and
negative (solid) cosine of z and z' per epoch, (c) training loss on a log scale, and (d) for
runs with LARS, the effective LARS lr of encoder layer1 and the projector's first layer.
For exp_bn_anatomy.py also <csv>_k_parts.png: final accuracy and negative cosine against the
ghost BN group size k, and a bar chart of BN's parts.

    python plot_results.py results/table1_cpu.csv [more.csv ...]
    python plot_results.py            # every results/*.csv
    python plot_results.py --table results/lars_cpu.csv   # markdown: last epoch, mean ± std over seeds
    python plot_results.py --recovery results/steps/lars_steps.csv --steps-per-epoch 78
                         # markdown: per run, how far it went (steps, lr x wd x steps) and whether it recovered
    python plot_results.py --depth results/steps/depth/collapse_depth_steps.csv
                         # markdown and figure: each lever's last-epoch loss, gaps and z_std

Uses matplotlib (plots are the one place a library clearly beats hand-written code).
"""
import csv
import sys
from collections import defaultdict
from statistics import mean, stdev
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves(rows, column):
    """{variant: (epochs, mean over seeds)} of a column, skipping empty cells."""
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get(column) not in (None, ""):
            by[r["variant"]][int(r["epoch"])].append(float(r[column]))
    return {v: (sorted(d), [sum(d[e]) / len(d[e]) for e in sorted(d)]) for v, d in by.items()}


def plot(csv_path):
    rows = read_results(csv_path)
    if not rows:
        print(f"{csv_path}: no rows, skipped")
        return None
    lars_cols = [c for c in ("lars_lr:encoder.layer1", "lars_lr:projector.0") if c in rows[0]]
    panels = 4 if lars_cols and curves(rows, lars_cols[0]) else 3
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    colors = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(r["variant"] for r in rows))}
    ax = axes[0]
    acc_curves = curves(rows, "probe_acc")
    # the untrained encoder: epoch 0 of the trained variants; epoch-0-only variants (random
    # baselines) get their own line
    start = [acc[0] for e, acc in acc_curves.values() if len(e) > 1 and e[0] == 0]
    if start and max(start) - min(start) < 0.5:   # one encoder type; else each curve's epoch 0 shows it
        ax.axhline(sum(start) / len(start), color="k", ls="--", lw=1, label="untrained encoder")
    for v, (e, acc) in acc_curves.items():
        if len(e) > 1:
            ax.plot(e, acc, "o-", ms=3, color=colors[v], label=v)
        elif v not in ("random",):
            ax.axhline(acc[0], color=colors[v], ls=":", lw=1, label=f"{v} (untrained)")
    ax.set(xlabel="epoch", ylabel="linear probe accuracy (%)", title="Linear evaluation accuracy")
    ax.legend(fontsize=7)
    ax = axes[1]
    for v, (e, c) in curves(rows, "neg_cos").items():
        ax.plot(e, c, "-", color=colors[v], label=v)
    for v, (e, c) in curves(rows, "pos_cos").items():
        ax.plot(e, c, "--", color=colors[v])
    ax.set(xlabel="epoch", ylabel="cosine(z, z')", title="Positive (dashed) / negative (solid) cosine",
           ylim=(-0.05, 1.05))
    ax = axes[2]
    for v, (e, loss) in curves(rows, "loss").items():
        ax.plot(e, loss, "-", color=colors[v], label=v)
    ax.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss")
    if panels == 4:
        ax = axes[3]
        for col, ls in zip(lars_cols, ("-", ":")):
            for v, (e, lr) in curves(rows, col).items():
                ax.plot(e, lr, ls, color=colors[v], label=f"{v} {col.split(':')[1]}")
        ax.set(xlabel="epoch", ylabel="lr x trust ratio", yscale="log",
               title="LARS lr: layer1 (solid), projector layer 1 (dotted)")
        ax.legend(fontsize=6)
    fig.suptitle(Path(csv_path).name)
    fig.tight_layout()
    out = Path(csv_path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    if rows[0].get("exp") == "bn_anatomy":
        plot_anatomy(csv_path, rows)
    return out


def final_values(rows, column):
    """{variant: [value at the last epoch of each seed]}."""
    last = {}
    for r in rows:
        key = (r["variant"], r["seed"])
        if key not in last or int(r["epoch"]) > int(last[key]["epoch"]):
            last[key] = r
    out = defaultdict(list)
    for (v, _), r in last.items():
        if r.get(column) not in (None, ""):
            out[v].append(float(r[column]))
    return out


def plot_anatomy(csv_path, rows):
    """exp_bn_anatomy.py's summary: final probe accuracy and negative cosine against the ghost
    BN group size k (every seed a dot, the mean a line), and a bar chart of BN's parts."""
    acc, neg = final_values(rows, "probe_acc"), final_values(rows, "neg_cos")
    untrained = [float(r["probe_acc"]) for r in rows if r["epoch"] == "0" and r["probe_acc"]
                 and r.get("cfg_encoder_norm", "bn") == "bn"]
    ks = sorted(int(v[len("ghost_k"):]) for v in acc if v.startswith("ghost_k"))
    xs = {f"ghost_k{k}": k for k in ks}
    if "bn" in acc and ks:
        xs["bn"] = 2 * ks[-1]   # the whole batch, drawn one step past the largest k
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, values, label in ((axes[0], acc, "final probe accuracy (%)"), (axes[1], neg, "final negative cosine")):
        names = [v for v in xs if v in values]
        for v in names:
            ax.plot([xs[v]] * len(values[v]), values[v], "o", color="C0", alpha=0.5, ms=4)
        ax.plot([xs[v] for v in names], [sum(values[v]) / len(values[v]) for v in names], "-", color="C0")
        if "no_norm" in values:
            ax.axhline(sum(values["no_norm"]) / len(values["no_norm"]), color="C3", ls=":", label="no MLP norm")
        if label.startswith("final probe") and untrained:
            ax.axhline(sum(untrained) / len(untrained), color="k", ls="--", lw=1, label="untrained BN encoder")
        ax.set_xscale("log", base=2)
        ax.set_xticks([xs[v] for v in names], [str(xs[v]) if v != "bn" else "full" for v in names])
        ax.set(xlabel="BN group size k (samples sharing statistics)", ylabel=label,
               title=f"Ghost BN in projector and predictor: {label.split(' ', 1)[1]}")
        ax.legend(fontsize=7)
    ax = axes[2]
    parts = [v for v in ("bn", "bn_no_affine", "center_only", "scale_only", "no_norm", "gn_ws", "gn_ws_ln") if v in acc]
    for i, v in enumerate(parts):
        mean = sum(acc[v]) / len(acc[v])
        ax.bar(i, mean, color=f"C{i}")
        ax.plot([i] * len(acc[v]), acc[v], "k.", ms=4)
        if v in neg:
            ax.text(i, mean + 0.5, f"neg {sum(neg[v]) / len(neg[v]):.2f}", ha="center", fontsize=7)
    if untrained:
        ax.axhline(sum(untrained) / len(untrained), color="k", ls="--", lw=1, label="untrained BN encoder")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(parts)), parts, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="final probe accuracy (%)", title="BN's parts (dots: seeds; text: negative cosine)")
    fig.suptitle(Path(csv_path).name)
    fig.tight_layout()
    out = Path(csv_path).with_name(Path(csv_path).stem + "_k_parts.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return out


NEEDED = ("variant", "seed", "epoch", "loss", "probe_acc", "pos_cos", "neg_cos")


def read_results(csv_path):
    """Rows of a results CSV; a variant run under several settings (cfg_hash) gets one curve per
    setting, labelled with the hash."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in NEEDED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} is not a results CSV (no column {', '.join(missing)})")
        rows = [r for r in reader if None not in r.values()]   # a torn line has too few cells
    hashes = defaultdict(set)
    for r in rows:
        hashes[r["variant"]].add(r.get("cfg_hash", ""))
    for r in rows:
        if len(hashes[r["variant"]]) > 1:
            r["variant"] = f"{r['variant']} [{r['cfg_hash'][:6]}]"
    return rows


def last_rows(rows):
    """{(variant, seed): the run's last row}."""
    last = {}
    for r in rows:
        key = (r["variant"], r["seed"])
        if key not in last or int(r["epoch"]) > int(last[key]["epoch"]):
            last[key] = r
    return last


def table(csv_path, columns=("probe_acc", "probe_standardized", "pos_cos", "neg_cos", "z_std")):
    """A markdown table of each variant's last epoch, mean ± std over seeds (what the README's
    result tables are pasted from)."""
    rows = read_results(csv_path)
    last = last_rows(rows)
    cols = [c for c in columns if c in rows[0]]
    out = [f"| variant | epoch | seeds | {' | '.join(cols)} |", "|---" * (len(cols) + 3) + "|"]
    for v in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for (name, _), r in last.items() if name == v]
        cells = []
        for c in cols:
            vals = [float(r[c]) for r in runs if r.get(c) not in (None, "")]
            # probes in points, cosines to 4 places (collapse is 0.9999), anything else (z_std: 5e-5
            # when collapsed) to 2 significant digits, so a small value never prints as 0.0000
            fmt = ".1f" if c.startswith("probe") else ".4f" if c.endswith("cos") else ".2g"
            cells.append("" if not vals else f"{mean(vals):{fmt}}" + (f" ± {stdev(vals):{fmt}}" if len(vals) > 1 else ""))
        epochs = sorted({r["epoch"] for r in runs})
        out.append(f"| {v} | {'/'.join(epochs)} | {len(runs)} | {' | '.join(cells)} |")
    return "\n".join(out)


RISE = 5.0   # a recovery: after collapse the probe rises this many points above the untrained encoder


def recovery(csv_path, steps_per_epoch):
    """A markdown table of how far each run was taken and whether it left collapse: steps,
    lr x wd x steps (the decay's clock: wd times the logged lr summed over the steps) and the same
    in e-folds of the decayed weights, lr x wd x steps / (1 - momentum); the epoch it collapsed
    (negative cosine >= 0.999); its lowest negative cosine after that and the first epoch back at
    <= 0.9; and both probes (blog / standardized): untrained, best after collapse, last.
    'probe recovered' = the blog probe after collapse >= RISE points above the untrained encoder,
    with the first epoch it got there; where the blog shows the cosines (D1-D3) a recovery also needs
    the negative cosine back at <= 0.9 (its own column)."""
    rows = read_results(csv_path)
    runs = defaultdict(list)
    for r in rows:
        runs[(r["variant"], r["seed"])].append(r)
    out = ["| variant | seed | steps | lr x wd x steps | e-folds | collapsed at | lowest neg. cos after | "
           "neg. cos <= 0.9 at | blog probe: untrained / best after / last | std. probe: same | "
           "probe recovered (>= untrained + 5 after collapse) |",
           "|---" * 11 + "|"]
    for (v, seed), rs in runs.items():
        rs.sort(key=lambda r: int(r["epoch"]))
        wd = rs[0].get("cfg_weight_decay") or ""
        beta = float(rs[0].get("cfg_momentum") or 0.9)
        lrs = [float(r["lr"]) for r in rs if r["lr"] not in ("", None)]
        clock = float(wd) * sum(lrs) * steps_per_epoch if wd else None
        neg = [(int(r["epoch"]), float(r["neg_cos"])) for r in rs if r["neg_cos"] not in ("", None)]
        start = next((e for e, c in neg if c >= 0.999), None)
        after = [(c, e) for e, c in neg if start is not None and e >= start]
        low = min(after) if after else None
        back = next((e for c, e in after if c <= 0.9), None)   # after is in epoch order

        def probe(col):
            pts = [(int(r["epoch"]), float(r[col])) for r in rs if r.get(col) not in ("", None)]
            untrained = pts[0][1] if pts and pts[0][0] == 0 else None
            post = [(e, a) for e, a in pts if start is not None and e >= start]
            best = max((a for _, a in post), default=None)
            return untrained, best, (pts[-1][1] if pts else None), post
        u, best, last, post = probe("probe_acc")
        su, sbest, slast, _ = probe("probe_standardized")
        rec = next((e for e, a in post if u is not None and a >= u + RISE), None)
        fmt = lambda xs: " / ".join("-" if x is None else f"{x:.1f}" for x in xs)   # noqa: E731
        cells = [v, seed, str(int(rs[-1]["epoch"]) * steps_per_epoch),
                 "-" if clock is None else f"{clock:.3f}", "-" if clock is None else f"{clock / (1 - beta):.2f}",
                 str(start) if start is not None else "never",
                 f"{low[0]:.4f} (ep {low[1]})" if low else "-", str(back) if back is not None else "no",
                 fmt((u, best, last)), fmt((su, sbest, slast)), f"yes (ep {rec})" if rec is not None else "no"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


DEPTH = ("loss", "pos_gap", "neg_gap", "z_std", "probe_acc", "probe_standardized")


def depth_figure(csv_path):
    """<csv>_depth.png: each variant's last-epoch loss and neg_gap (log scale, one dot a seed),
    beside the blog's floors (D1's loss ~1e-4, D2's ~1e-3)."""
    last = last_rows(read_results(csv_path))
    names = list(dict.fromkeys(v for v, _ in last))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(names) + 1.5), sharey=True)
    for ax, col in zip(axes, ("loss", "neg_gap")):
        for i, v in enumerate(names):
            vals = [float(r[col]) for (name, _), r in last.items() if name == v and r.get(col) not in ("", None)]
            ax.scatter([max(x, 1e-16) for x in vals], [i] * len(vals), color="C0" if v.startswith("c1") else "C1")
        if col == "loss":
            for y, label in ((1e-4, "blog D1 floor"), (1e-3, "blog D2 floor")):
                ax.axvline(y, ls="--", color="gray")
                ax.text(y, -1, label, fontsize=7, ha="center")
        ax.set_xscale("log")
        ax.set_xlabel(f"last epoch {col}" + (" (1 - neg. cos, without cancellation)" if col == "neg_gap" else ""))
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle(f"Depth of collapse: {Path(csv_path).name}")
    fig.tight_layout()
    out = Path(csv_path).with_name(Path(csv_path).stem + "_depth.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv):
    if argv[:1] == ["--recovery"]:
        if len(argv) != 4 or argv[2] != "--steps-per-epoch" or not argv[3].isdigit() or int(argv[3]) < 1:
            raise ValueError("usage: --recovery CSV --steps-per-epoch N (N >= 1; 78 for the appendix's cpu and steps presets)")
        print(recovery(argv[1], int(argv[3])))
        return
    if argv[:1] == ["--depth"]:
        if len(argv) != 2:
            raise ValueError("usage: --depth CSV (a collapse_depth CSV): its table, and <csv>_depth.png")
        print(table(argv[1], columns=DEPTH))
        print(f"figure: {depth_figure(argv[1])}")
        return
    if argv[:1] == ["--table"]:
        if len(argv) < 2:
            raise ValueError("--table needs a CSV")
        for p in argv[1:]:
            print(table(p))
        return
    paths = argv or sorted(str(p) for p in Path("results").glob("*.csv"))
    if not paths:
        raise ValueError("no CSV given and none in results/")
    for p in paths:
        if not Path(p).is_file():
            raise ValueError(f"{p} does not exist")
        plot(p)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
