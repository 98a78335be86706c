"""Draws the blog's figures from result CSVs alone, into --out (default runs/plots/: plotting
never writes into results/ unless --out points there). For each CSV, <out>/<csv stem>.png:
(a) probe accuracy per epoch (the untrained encoder's level dashed), (b) positive and (c) negative
cosine of z and z' per epoch, (d) training loss on a log scale, and (e) for runs with LARS, the
effective LARS lr of encoder layer1 and the projector's first layer. Each variant is its mean over
seeds with a band from the lowest to the highest seed, in its own colour, line style and marker
(no_norm and layer_norm both sit at cosine 1.0: the styles keep them apart); one legend below
the panels; the title names the finding. Also:
  a table1 CSV      <stem>_vs_blog.png: each variant's last epoch (seeds as dots, mean ± std)
                    beside the blog's Table 1 (SPEC.md section 1.1, cosines 1.2) as red crosses
  a bn_anatomy CSV  <stem>_k_parts.png: final accuracy and negative cosine against the ghost BN
                    group size k, and a bar chart of BN's parts

    python plot_results.py results/table1_cpu.csv [more.csv ...] [--out DIR]
    python plot_results.py            # every results/*.csv, into runs/plots/
    python plot_results.py --table results/lars_cpu.csv   # markdown: last epoch, mean ± std over seeds
    python plot_results.py --recovery results/steps/recovery/recovery_steps.csv [--steps-per-epoch 78]
            # markdown: per run, how far it went (steps, lr x wd x steps) and whether it recovered;
            # for exp_recovery.py CSVs also <out>/recovery_<c1|d1|d2>.png and recovery_fraction.csv;
            # with the conv-weight columns also <out>/<name>_<c1|d1|d2>_mechanism.png; then the
            # noise between runs of the same seed and settings and every recovery finding's verdict
            # by the rule (FINDINGS_JUDGED, read from these CSVs and the committed ones), printed
            # and in <out>/noise.csv and <out>/verdicts.csv
    python plot_results.py --noise [CSV ...]   # the noise pairs and delta alone, into <out>/noise.csv
    python plot_results.py --depth results/steps/depth/collapse_depth_steps.csv
            # markdown and figure: each lever's last-epoch loss, gaps and z_std
    python plot_results.py --escape-law results/steps/law/escape_law_steps.csv
            # exp_escape_law.py: each run's turn and rise of the collapsed loss and the log-log fit
            # against lr x wd; <out>/<stem>_escape.csv and <stem>_escape.png

Uses matplotlib (plots are the one place a library clearly beats hand-written code).
"""
import argparse
import dataclasses
import math
import os
import sys
from collections import defaultdict
from statistics import mean, stdev
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

import common  # noqa: E402
import harness  # noqa: E402
import reuse  # noqa: E402
import presets  # noqa: E402
from harness import UsageError  # noqa: E402   bad input: one 'error:' line and exit code 2

ROOT = Path(__file__).resolve().parent

# the finding each experiment reproduces (the figure's title); other exps are titled by name
FINDINGS = {"table1": "Table 1: norms in the MLPs", "lars": "Appendix C1/D3: LARS",
            "encoder_gn": "Appendix C2/D2: GroupNorm encoder", "weight_decay": "Appendix D1: weight decay",
            "recovery": "Appendix C1/D1/D2 at the blog's epoch 100"}
# one style per variant, so that curves lying on top of each other (no_norm and layer_norm at
# cosine 1.0) stay told apart by their dashes and markers, not by colour alone
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 2)), (0, (8, 2, 2, 2))]
MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "<", ">"]


def styles(names):
    """{variant: matplotlib style kwargs}: colour, line style and marker, each cycling on its own."""
    return {v: dict(color=f"C{i % 10}", ls=LINESTYLES[i % len(LINESTYLES)], marker=MARKERS[i % len(MARKERS)], index=i)
            for i, v in enumerate(names)}


def seed_curves(rows, column):
    """{variant: (epochs, mean, lowest, highest) over seeds} of a column, skipping empty cells;
    each epoch's statistics are over the seeds that logged it."""
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get(column) not in (None, ""):
            by[r["variant"]][int(r["epoch"])].append(float(r[column]))
    out = {}
    for v, d in by.items():
        es = sorted(d)
        out[v] = (es, [mean(d[e]) for e in es], [min(d[e]) for e in es], [max(d[e]) for e in es])
    return out


def draw_band(ax, curve, style, lw=1.5, alpha=0.18, **kw):
    """The mean over seeds as a line, and the lowest-to-highest seed as a band around it."""
    es, m, lo, hi = curve
    style = dict(style)
    step = max(2, len(es) // 12)   # markers at staggered epochs, so that curves on top of each other show each
    ax.plot(es, m, lw=lw, ms=3.5, markevery=(style.pop("index", 0) % step, step), **style, **kw)
    if any(a != b for a, b in zip(lo, hi)):
        ax.fill_between(es, lo, hi, color=style["color"], alpha=alpha, lw=0)


def legend_below(fig, handles, note=""):
    """One legend for the whole figure, below the panels, where it hides no data."""
    ncol = min(len(handles), 5)
    rows = (len(handles) + ncol - 1) // max(ncol, 1)
    height = fig.get_size_inches()[1]
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if note:   # just above the legend's rows (about 0.24 inch each)
        fig.text(0.5, (0.1 + 0.24 * rows) / height, note, ha="center", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, (0.1 + 0.24 * rows + 0.25 * bool(note)) / height, 1, 0.95))


def save(fig, path, dpi=110):
    """Writes the PNG through a temporary file, so a failure midway leaves the old one whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def title_of(rows, csv_path):
    exp = rows[0].get("exp", "")
    seeds = len({r["seed"] for r in rows})
    return f"{FINDINGS.get(exp, exp or Path(csv_path).stem)}   ({Path(csv_path).name}, {seeds} seed{'s' * (seeds > 1)})"


def plot(csv_path, out_dir, name=None):
    """<out_dir>/<name or the CSV's stem>.png, the curves of every variant; for table1 and
    bn_anatomy CSVs their extra figure. Returns the main figure's path."""
    rows = read_results(csv_path)
    if not rows:
        print(f"{csv_path}: no rows, skipped")
        return None
    stem = name or Path(csv_path).stem
    lars_cols = [c for c in ("lars_lr:encoder.layer1", "lars_lr:projector.0") if c in rows[0]]
    panels = 5 if lars_cols and seed_curves(rows, lars_cols[0]) else 4
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 4.6))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    style = styles(names)
    handles = {}
    ax = axes[0]
    acc = seed_curves(rows, "probe_acc")
    # the untrained encoder: epoch 0 of the trained variants; epoch-0-only variants (random
    # baselines) get their own line
    start = [c[1][0] for c in acc.values() if len(c[0]) > 1 and c[0][0] == 0]
    if start and max(start) - min(start) < 0.5:   # one encoder type; else each curve's epoch 0 shows it
        ax.axhline(mean(start), color="k", ls="--", lw=1)
        handles["untrained"] = Line2D([], [], color="k", ls="--", lw=1, label="untrained encoder (epoch 0)")
    for v, c in acc.items():
        if len(c[0]) > 1:
            draw_band(ax, c, style[v])
        else:   # never trained (random): its level across the panel, the seeds' spread as a band
            ax.axhline(c[1][0], color=style[v]["color"], ls=style[v]["ls"], lw=1.2)
            if c[2][0] != c[3][0]:
                ax.axhspan(c[2][0], c[3][0], color=style[v]["color"], alpha=0.12, lw=0)
    ax.set(xlabel="epoch", ylabel="linear probe accuracy (%)", title="Linear evaluation accuracy")
    for ax, col, what in ((axes[1], "pos_cos", "Positive"), (axes[2], "neg_cos", "Negative")):
        for v, c in seed_curves(rows, col).items():
            draw_band(ax, c, style[v])
        ax.set(xlabel="epoch", ylabel=f"cosine(z, z'), {what.lower()} pairs", ylim=(-0.05, 1.05),
               title=f"{what} cosine (1 = collapse)" if what == "Negative" else f"{what} cosine")
    ax = axes[3]
    for v, c in seed_curves(rows, "loss").items():
        draw_band(ax, c, style[v])
    ax.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss")
    if panels == 5:
        ax = axes[4]
        for col, alpha in zip(lars_cols, (1.0, 0.45)):
            for v, c in seed_curves(rows, col).items():
                draw_band(ax, c, style[v], alpha=0.1 * alpha, lw=1.5 * alpha)
        ax.set(xlabel="epoch", ylabel="lr x trust ratio", yscale="log",
               title="LARS lr: layer1 (bold), projector layer 1 (thin)")
    for v in names:
        handles[v] = Line2D([], [], lw=1.5, ms=4, label=v, **{k: x for k, x in style[v].items() if k != "index"})
    seeds = len({r["seed"] for r in rows})
    legend_below(fig, list(handles.values()),
                 f"lines: mean over {seeds} seeds; bands: lowest to highest seed" if seeds > 1 else "one seed")
    fig.suptitle(title_of(rows, csv_path))
    out = save(fig, Path(out_dir) / f"{stem}.png")
    if rows[0].get("exp") == "bn_anatomy":
        plot_anatomy(csv_path, rows, out_dir, stem)
    if rows[0].get("exp") == "table1":
        plot_table1(csv_path, rows, out_dir, stem)
    return out


# The blog's Table 1 (SPEC.md section 1.1: probe accuracy after 10 epochs, STL-10, ResNet-18)
# and its cosine bars (section 1.2, [fig:cosine_similarity_10e]); random has no cosines.
BLOG_TABLE1 = {"contrastive": (44.1, 0.90, 0.53), "byol": (57.7, 0.88, 0.27), "proj_bn_only": (55.3, 0.87, 0.265),
               "pred_bn_only": (48.0, 0.95, 0.73), "no_norm": (28.3, 1.00, 1.00), "layer_norm": (29.4, 1.00, 1.00),
               "random": (28.8, None, None)}


def plot_table1(csv_path, rows, out_dir, stem):
    """<stem>_vs_blog.png: per Table 1 row, our last epoch (each seed a dot, mean ± std a bar)
    beside the blog's number (a red cross), for the probe and both cosines. The blog's numbers are
    STL-10 at 96 px after 10 epochs; ours are whatever preset the CSV holds (its title says)."""
    names = [v for v in dict.fromkeys(r["variant"] for r in rows)]
    names = [v for v in BLOG_TABLE1 if v in names] + [v for v in names if v not in BLOG_TABLE1]
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.45 * len(names) + 2.4), sharey=True)
    for ax, (i, col, label) in zip(axes, ((0, "probe_acc", "linear probe accuracy (%)"),
                                          (1, "pos_cos", "positive cosine"), (2, "neg_cos", "negative cosine"))):
        finals = final_values(rows, col)
        for y, v in enumerate(names):
            vals = finals.get(v, [])
            if vals:
                ax.plot(vals, [y + 0.12] * len(vals), ".", color="C0", alpha=0.5, ms=6)
                ax.errorbar(mean(vals), y + 0.12, xerr=stdev(vals) if len(vals) > 1 else None, fmt="o",
                            color="C0", capsize=3, ms=6)
                ax.text(mean(vals), y + 0.42, f"{mean(vals):.3g}", ha="center", fontsize=7, color="C0")
            blog = BLOG_TABLE1.get(v, (None,) * 3)[i]
            if blog is not None:
                ax.plot(blog, y - 0.12, "X", color="C3", ms=8)
                ax.text(blog, y - 0.3, f"{blog:g}", ha="center", fontsize=7, color="C3")
        ax.set(xlabel=label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    seeds = len({r["seed"] for r in rows})
    epochs = sorted({int(r["epoch"]) for r in last_rows(rows).values()})
    handles = [Line2D([], [], color="C0", marker="o", ls="", label=f"ours: mean ± std over {seeds} seed(s), "
                      f"last epoch {max(epochs)} (small dots: each seed)"),
               Line2D([], [], color="C3", marker="X", ls="", ms=8, label="blog: Table 1 and its cosine "
                      "figure (STL-10, 96 px, 10 epochs)")]
    legend_below(fig, handles)
    fig.suptitle(f"{FINDINGS['table1']}: ours against the blog's   ({Path(csv_path).name})")
    return save(fig, Path(out_dir) / f"{stem}_vs_blog.png")


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


def plot_anatomy(csv_path, rows, out_dir, stem):
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
    fig.suptitle(f"BN's anatomy: which part of BatchNorm prevents collapse   ({Path(csv_path).name})")
    fig.tight_layout()
    return save(fig, Path(out_dir) / f"{stem}_k_parts.png")


NEEDED = ("variant", "seed", "epoch", "loss", "probe_acc", "pos_cos", "neg_cos")


def read_csv(path, needed=NEEDED, what="a results CSV"):
    """The rows of a CSV through harness.read_rows, under the header the file has (a torn last
    line is cut off there, with the harness's warning); rows with too few cells are left out.
    UsageError where a column of `needed` is missing."""
    path = Path(path)
    with open(path, newline="") as f:
        header = f.readline().rstrip("\r\n").split(",")
    missing = [c for c in needed if c not in header]
    if missing:
        raise UsageError(f"{path} is not {what} (no column {', '.join(missing)})")
    return [r for r in harness.read_rows(path, header) if None not in r.values()]


def read_results(csv_path):
    """Rows of a results CSV; a variant run under several settings (cfg_hash) gets one curve per
    setting, labelled with the hash."""
    rows = read_csv(csv_path)
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
        lrs = [float(r["lr"]) for r in rs if r.get("lr") not in ("", None)]
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


def depth_figure(csv_path, out_dir):
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
    return save(fig, Path(out_dir) / f"{Path(csv_path).stem}_depth.png")


# ============================================================ exp_recovery.py: C1, D1, D2

BLOG_STEPS = presets.BLOG_STEPS   # the blog's schedule: 320 epochs x 410 steps (105k STL-10 images, batch 256)
BLOG_EPOCHS = 320
# The blog's readings (SPEC.md section 3, Appendix C and D), as (blog epoch, value).
# C1's recovered fraction from [fig:accuracy_resnet_batch_norm]'s table, (SGD no-BN-MLP - its epoch 0)
# / (SGD with-BN-MLP - the same epoch 0), the untrained level being the no-BN run's epoch 0, 28.0 (as
# ours: each run's own epoch 0): 0.42 at 20, 0.70 at 30, 0.79 at 100, 0.83 at 319.
BLOG_C1_PROBES = {0: (28.0, 39.4), 10: (30.1, 54.6), 15: (32.5, 58.5), 20: (42.1, 61.5), 30: (54.5, 66.1),
                  50: (63.6, 72.0), 100: (66.9, 77.3), 200: (70.5, 81.0), 319: (72.1, 81.4)}
BLOG_C1_FRACTION = [(e, (a - 28.0) / (b - 28.0)) for e, (a, b) in BLOG_C1_PROBES.items() if e > 0]
# D1 [fig:weight_decay_distance]: negative cosine ~1.0 from epoch 2 to 100, 0.07 at ~140, a
# rebound to 0.62 at ~165, 0.56 at the end
BLOG_D1_NEG_COS = [(2, 1.0), (100, 1.0), (140, 0.07), (165, 0.62), (320, 0.56)]
# D2 [fig:weight_std_distance]: ~1.0 for epochs 0-18, 0.1 at ~20, then peaks and troughs, settling at 0.22
BLOG_D2_NEG_COS = [(0, 1.0), (18, 1.0), (20, 0.1), (32, 0.39), (55, 0.78), (73, 0.87), (93, 0.44), (115, 0.96),
                   (135, 0.96), (160, 0.43), (180, 0.0), (200, 0.22), (320, 0.22)]
# D1's and D2's final probes, 56 and 51 (the text), as fractions of the GN + BN-MLP control's 75.1
# (epoch 319) over the GN runs' untrained 33.8 ([fig:accuracy_resnet_group_norm], epoch 0)
BLOG_GN_UNTRAINED, BLOG_GN_HEALTHY = 33.8, 75.1
BLOG_D_FRACTION = {f: [(320, (p - BLOG_GN_UNTRAINED) / (BLOG_GN_HEALTHY - BLOG_GN_UNTRAINED))]
                   for f, p in (("d1", 56.0), ("d2", 51.0))}   # 0.54, 0.42
BLOG_MARKS = {("c1", "fraction"): BLOG_C1_FRACTION, ("d1", "neg_cos"): BLOG_D1_NEG_COS,
              ("d2", "neg_cos"): BLOG_D2_NEG_COS, ("d1", "fraction"): BLOG_D_FRACTION["d1"],
              ("d2", "fraction"): BLOG_D_FRACTION["d2"]}
MARK_NAMES = {"fraction": "recovered fraction", "neg_cos": "negative cosine"}
FAMILIES = ("c1", "d1", "d2")
FAMILY_NAMES = {"c1": "C1, BN encoder without BN in the MLPs (SGD)",
                "d1": "D1, GroupNorm encoder without any BN (SGD + weight decay)",
                "d2": "D2, GroupNorm + weight standardization without any BN (SGD)"}
FRACTION_COLUMNS = ["variant", "seed", "epoch", "step", "blog_schedule_fraction", "probe_acc", "untrained_probe",
                    "healthy_probe", "healthy_seed", "recovered_fraction"]


def read_runs(paths):
    """{(variant, seed): {epoch: row}} from one or more CSVs (an experiment split over several
    --out folders). The same run in two CSVs must be the same settings; its rows are read once."""
    runs, hashes = defaultdict(dict), {}
    for path in paths:
        for r in read_csv(path):
            key = (r["variant"], int(r["seed"]))
            h = hashes.setdefault(key, r.get("cfg_hash", ""))
            if h != r.get("cfg_hash", ""):
                raise UsageError(f"{r['variant']} seed {r['seed']} is in these CSVs under two settings (cfg_hash "
                                 f"{h} and {r.get('cfg_hash')}); pass CSVs with one setting per run")
            runs[key][int(r["epoch"])] = r
    return runs


def num(r, col):
    return float(r[col]) if r is not None and r.get(col) not in (None, "") else None


def recovered_fractions(runs, steps_per_epoch):
    """Rows of FRACTION_COLUMNS: for every run of c1, d1, d2 and their *_all_decay controls, at each
    epoch where it and its healthy reference have a probe, (probe - untrained) / (healthy - untrained)
    with untrained = the run's own epoch-0 probe, healthy = the X_healthy run of the same seed, or
    of seed 0 where that seed has none (healthy_seed says which). Empty where healthy <= untrained."""
    out = []
    for (v, seed), by_epoch in sorted(runs.items()):
        family = v.split("_")[0]
        if family not in FAMILIES or v == f"{family}_healthy":
            continue
        ref_seed = seed if (f"{family}_healthy", seed) in runs else 0
        healthy = runs.get((f"{family}_healthy", ref_seed))
        untrained = num(by_epoch.get(0), "probe_acc")
        if healthy is None or untrained is None:
            continue
        for e in sorted(by_epoch):
            probe, ref = num(by_epoch[e], "probe_acc"), num(healthy.get(e), "probe_acc")
            if e == 0 or probe is None or ref is None:
                continue
            frac = (probe - untrained) / (ref - untrained) if ref > untrained else None
            out.append(dict(variant=v, seed=seed, epoch=e, step=e * steps_per_epoch,
                            blog_schedule_fraction=e * steps_per_epoch / BLOG_STEPS, probe_acc=probe,
                            untrained_probe=untrained, healthy_probe=ref, healthy_seed=ref_seed,
                            recovered_fraction=frac))
    return out


def recovery_figures(paths, out_dir, steps_per_epoch, runs=None):
    """<out>/recovery_<family>.png for each of c1, d1, d2 in the CSVs, and <out>/recovery_fraction.csv.
    Panels: probe, negative cosine, recovered fraction, against the fraction of the blog's 131,200
    steps; each seed a thin line, the mean over seeds a thick one, the healthy reference in black,
    the blog's readings (SPEC.md section 3) as red crosses. runs: read_runs(paths), where the
    caller has read them already. Returns the paths written."""
    runs = runs if runs is not None else read_runs(paths)
    fractions = recovered_fractions(runs, steps_per_epoch)
    written = []
    for family in FAMILIES:
        names = [n for n in (family, f"{family}_all_decay") if any(v == n for v, _ in runs)]
        if not names:
            continue
        # one x range for all three panels, the blog's whole schedule: where our runs stop (the blog's
        # epoch 100 = 0.31) and where the blog's readings go on
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharex=True)
        axes[0].set_xlim(0, 1.02)
        x = lambda e: e * steps_per_epoch / BLOG_STEPS   # noqa: E731
        handles = []
        colors = {family: "C0", f"{family}_all_decay": "C1", f"{family}_healthy": "k"}
        for ax, col in zip(axes[:2], ("probe_acc", "neg_cos")):
            for v in [*names, f"{family}_healthy"]:
                seeds = sorted(s for n, s in runs if n == v)
                per_epoch = defaultdict(list)
                for s in seeds:
                    pts = [(e, num(r, col)) for e, r in sorted(runs[(v, s)].items()) if num(r, col) is not None]
                    ax.plot([x(e) for e, _ in pts], [y for _, y in pts], color=colors[v], lw=0.6, alpha=0.5)
                    for e, y in pts:
                        per_epoch[e].append(y)
                es = sorted(per_epoch)
                ax.plot([x(e) for e in es], [mean(per_epoch[e]) for e in es], color=colors[v], lw=2,
                        ls="--" if v.endswith("_healthy") else "-")
        fr = defaultdict(lambda: defaultdict(list))
        for r in fractions:
            if r["variant"] in names and r["recovered_fraction"] is not None:
                fr[r["variant"]][r["epoch"]].append(r["recovered_fraction"])
        for v in names:
            for s in sorted(s for n, s in runs if n == v):
                pts = [(r["epoch"], r["recovered_fraction"]) for r in fractions
                       if r["variant"] == v and r["seed"] == s and r["recovered_fraction"] is not None]
                axes[2].plot([x(e) for e, _ in pts], [f for _, f in pts], color=colors[v], lw=0.6, alpha=0.5)
            es = sorted(fr[v])
            axes[2].plot([x(e) for e in es], [mean(fr[v][e]) for e in es], color=colors[v], lw=2)
        axes[2].axhline(1.0, color="k", ls="--", lw=1.5)   # the healthy run, by definition
        axes[2].axhline(0.0, color="0.5", ls=":", lw=1)    # the untrained encoder
        for (fam, what), marks in BLOG_MARKS.items():
            if fam == family:
                ax = axes[2] if what == "fraction" else axes[1]
                ax.plot([e / BLOG_EPOCHS for e, _ in marks], [y for _, y in marks], "X", color="C3", ms=8, ls=":",
                        lw=0.8)
        seeds = {v: sorted(s for n, s in runs if n == v) for v in [*names, f"{family}_healthy"]}
        borrowed = sorted({r["seed"] for r in fractions if r["variant"] in names and r["healthy_seed"] != r["seed"]})
        ref_note = ("same seed" if not borrowed else
                    f"seed 0's for seed{'s' * (len(borrowed) > 1)} {', '.join(map(str, borrowed))} (no own healthy run)")
        for v in names:
            handles.append(Line2D([], [], color=colors[v], lw=2, label=f"{v}: mean of seeds {seeds[v]} (thin: each)"))
        if seeds[f"{family}_healthy"]:
            handles.append(Line2D([], [], color="k", lw=2, ls="--", label=f"{family}_healthy: reference, seeds "
                                  f"{seeds[f'{family}_healthy']}; fraction uses {ref_note}"))
        marks = [what for (fam, what) in BLOG_MARKS if fam == family]
        if marks:
            handles.append(Line2D([], [], color="C3", marker="X", ls=":", lw=0.8, ms=8,
                                  label=f"blog's {' and '.join(MARK_NAMES[m] for m in marks)} "
                                        f"(SPEC.md section 3; x = blog epoch / 320)"))
        axes[0].set(ylabel="linear probe accuracy (%)", title="Linear evaluation accuracy")
        axes[1].set(ylabel="negative cosine (1 = collapse)", title="Negative cosine", ylim=(-0.05, 1.05))
        axes[2].set(ylabel="(probe - untrained) / (healthy - untrained)", title="Recovered fraction")
        for ax in axes:
            ax.set_xlabel(f"fraction of the blog's schedule (step / {BLOG_STEPS:,}; {steps_per_epoch} steps an epoch)")
        legend_below(fig, handles)
        fig.suptitle(f"{FINDINGS['recovery']}: {FAMILY_NAMES[family]}")
        written.append(save(fig, Path(out_dir) / f"recovery_{family}.png"))
    if fractions:
        written.append(write_csv(Path(out_dir) / "recovery_fraction.csv", FRACTION_COLUMNS, fractions))
    return written


def write_csv(path, columns, rows):
    """rows (dicts) under columns, floats to 6 significant digits, through harness.rewrite_rows
    (atomic: a failure midway leaves the old file whole)."""
    harness.rewrite_rows(Path(path), list(columns), [
        {k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    print(f"wrote {path}")
    return Path(path)


# ================================================ verdicts: one rule, against the measured noise
# The rule (issue 37), fixed before the runs it judges. Window: the evaluations at epochs > 0.8 x
# the run's last epoch. delta: the noise, the largest |difference| of the judged quantity between
# two runs of the same seed and settings at the same epoch (noise_pairs). Per seed:
#   C (the blog shows accuracy): the recovered fraction (probe - untrained) / (healthy - untrained)
#     met: window mean >= 0.5 + delta and >= 80% of the window's evaluations >= 0.5;
#     not met: window mean <= 0.5 - delta; else within noise
#   D (the blog shows cosines): met: >= 80% of the window's epochs have neg. cos <= 0.9 and the
#     window-mean probe gain over the untrained encoder >= 5 + delta; not met: window-mean neg.
#     cos > 0.9 or window-mean gain <= 5 - delta; else within noise
COLLAPSE, HELD_COS, FRACTION_MIN = 0.999, 0.9, 0.5
WINDOW, SHARE = 0.2, 0.8
RECOVERY = "recovery"   # a verdict's source: the CSVs given to --recovery (exp_recovery.py's runs)
RECOVERY_CSV = "results/steps/recovery/recovery_steps.csv"   # --noise's default


def finding(name, kind, source, variant, healthy=None, blog="met", collapse=True):
    return dict(finding=name, kind=kind, source=source, variant=variant, healthy=healthy, blog=blog, collapse=collapse)


C1_130 = "results/steps/c1/lars_steps.csv"
C2_GN32, C2_GN4 = "results/steps/c2/encoder_gn_steps.csv", "results/steps/c2_shallow/encoder_gn_steps.csv"
C2_41K = "results/steps/c2_41k/encoder_gn_steps.csv"
D1_BLOG, D1_130 = "results/steps/d1/weight_decay_steps.csv", "results/steps/d1_shallow/weight_decay_steps.csv"
D2_130 = "results/steps/d2_shallow/encoder_gn_steps.csv"
D3_60, D3_130 = "results/steps/d3_shallow/lars_steps.csv", "results/steps/d3_shallow/long/lars_steps.csv"
# Every recovery verdict of results/README.md: source (a CSV under the repo, or RECOVERY), the
# variant, its healthy reference (source, variant: the same settings with BN in both MLPs; None
# where no run is that), blog: what the blog's run shows ("met": it recovers, "not met": it stays
# collapsed), collapse: whether a seed must collapse first (negative cosine >= 0.999) to be judged.
FINDINGS_JUDGED = [
    finding("C1, 41k steps", "C", RECOVERY, "c1", (RECOVERY, "c1_healthy")),
    finding("C1, 130 epochs", "C", C1_130, "bn_sgd_no_mlp_bn_conv_wd", (RECOVERY, "c1_healthy")),
    # c1_healthy decays the conv weights only: not the reference of a run that decays everything
    finding("C1 control: decay on every parameter, 130 epochs", "C", RECOVERY, "c1_all_decay"),
    finding("C2: GN 32 groups, LARS lr 0.2 (blog: recovers), 60 epochs", "C", C2_GN32, "lars_lr0.2"),
    finding("C2: GN 32 groups, LARS lr 0.1 (blog: stays collapsed), 60 epochs", "C", C2_GN32, "lars_lr0.1",
            blog="not met"),
    finding("C2: GN 4 groups, LARS lr 0.05 (blog's 0.2), 60 epochs", "C", C2_GN4, "lars_lr0.05"),
    finding("C2: GN 4 groups, LARS lr 0.025 (blog's 0.1), 60 epochs", "C", C2_GN4, "lars_lr0.025", blog="not met"),
    finding("C2: GN 4 groups, LARS lr 0.05 (blog's 0.2: recovers), 41k steps", "C", C2_41K, "lars_lr0.05",
            (C2_41K, "lars_lr0.05_healthy")),
    # lr 0.2 and 0.05 never collapsed in 60 epochs (2 seeds each): whether it learns, collapse or not
    finding("C2: GN 4 groups, LARS lr 0.05 (blog's 0.2: learns), 41k steps", "C", C2_41K, "lars_lr0.05",
            (C2_41K, "lars_lr0.05_healthy"), collapse=False),
    finding("C2: GN 4 groups, LARS lr 0.025 (blog's 0.1: stays collapsed), 41k steps", "C", C2_41K, "lars_lr0.025",
            (C2_41K, "lars_lr0.025_healthy"), blog="not met"),
    # its seed 1 never collapsed: whether lr 0.025 learns at all (the blog's lr 0.1 stays at chance)
    finding("C2: GN 4 groups, LARS lr 0.025 (blog's 0.1: does not learn), 41k steps", "C", C2_41K, "lars_lr0.025",
            (C2_41K, "lars_lr0.025_healthy"), blog="not met", collapse=False),
    finding("D1, 41k steps (conv decay, 160x the blog's wd)", "D", RECOVERY, "d1"),
    finding("D1, 130 epochs (conv decay, 160x the blog's wd)", "D", D1_130, "wd_lr0.05_conv_x10"),
    finding("D1, the blog's wd 1e-5, 640 epochs", "D", D1_BLOG, "wd_1e-05"),
    finding("D1 control: decay on every parameter, 130 epochs", "D", RECOVERY, "d1_all_decay"),
    finding("D2, 41k steps", "D", RECOVERY, "d2"),
    finding("D2, 130 epochs", "D", D2_130, "ws_sgd_lr0.2_conv"),
    finding("D2 control: decay on every parameter, 130 epochs", "D", D2_130, "ws_sgd_lr0.2"),
    finding("D3: LARS on layers 1-2, 60 epochs", "D", D3_60, "gn4_lars_layer12"),
    finding("D3: LARS on layers 1-2, 130 epochs", "D", D3_130, "gn4_lars_layer12"),
    finding("D3: LARS on the MLPs only (blog: re-collapses), 60 epochs", "D", D3_60, "gn4_lars_mlp", blog="not met"),
    finding("D3: full LARS lr 0.125 (blog's 0.5: learns), 60 epochs", "D", D3_60, "gn4_lars_lr0.125", collapse=False),
    finding("D3: full LARS lr 0.025 (blog's 0.1: does not), 60 epochs", "D", C2_GN4, "lars_lr0.025", blog="not met",
            collapse=False),
]


def in_window(points, last_epoch):
    """The (epoch, value) points at epochs > (1 - WINDOW) x last_epoch: the run's last 20%."""
    return [(e, v) for e, v in points if e > (1 - WINDOW) * last_epoch]


def passing(values, ok):
    """The share of values for which ok(value) holds."""
    return sum(map(ok, values)) / len(values)


def judge_c(window, delta):
    """C-type, one seed: window = [(epoch, recovered fraction)]. Returns mean, min, max, share
    (of evaluations >= 0.5) and status: met / not met / within noise."""
    vals = [v for _, v in window]
    m, share = mean(vals), passing(vals, lambda v: v >= FRACTION_MIN)
    status = ("met" if m >= FRACTION_MIN + delta and share >= SHARE - 1e-9 else
              "not met" if m <= FRACTION_MIN - delta else "within noise")
    return dict(mean=m, min=min(vals), max=max(vals), share=share, status=status)


def judge_d(gains, negs, delta):
    """D-type, one seed: gains = [(epoch, probe - untrained)] at the window's evaluations, negs =
    [(epoch, negative cosine)] at the window's epochs. Returns the gain's mean, min, max, share (of
    epochs at neg. cos <= 0.9), the neg. cos mean and status: met / not met / within noise."""
    g, c = [v for _, v in gains], [v for _, v in negs]
    m, share, neg = mean(g), passing(c, lambda v: v <= HELD_COS), mean(c)
    status = ("met" if share >= SHARE - 1e-9 and m >= RISE + delta else
              "not met" if neg > HELD_COS or m <= RISE - delta else "within noise")
    return dict(mean=m, min=min(g), max=max(g), share=share, neg_cos_mean=neg, status=status)


def finding_verdict(statuses, blog="met", never=0):
    """'reproduces, k of n seeds' / 'partly, k of n' / 'does not reproduce, 0 of n', k the seeds
    whose status is the blog's, with ', m within noise' where m > 0; seeds not judged (any other
    status) are counted after it; where none is judged, the reason. never: how many seeds never
    collapsed (said where > 0)."""
    judged = [s for s in statuses if s in ("met", "not met", "within noise")]
    other = list(dict.fromkeys(s for s in statuses if s not in judged))
    if judged:
        k, n, m = judged.count(blog), len(judged), judged.count("within noise")
        text = (f"reproduces, {k} of {n} seeds" if k == n else f"partly, {k} of {n}" if k else
                f"does not reproduce, 0 of {n}")
        text += (f", {m} within noise" if m else "") + "".join(f"; {statuses.count(s)} {s}" for s in other)
    else:
        text = "; ".join(other) or "no runs"
    return text + (f"; never collapsed in {never} of {len(statuses)} seeds" if never else "")


# ------------------------------------------------------------------ the noise between runs

def rel(path):
    """A path relative to the repo where it is inside it (as noise.csv and verdicts.csv name CSVs)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def load_sources(recovery_paths):
    """{label: {(variant, seed): {epoch: row}}}: the --recovery CSVs together under RECOVERY (their
    label: RECOVERY -> 'a.csv+b.csv' in sources[RECOVERY]['label']) and every CSV FINDINGS_JUDGED
    names that exists."""
    sources = {}
    if recovery_paths:
        sources[RECOVERY] = dict(label="+".join(rel(p) for p in recovery_paths), runs=read_runs(recovery_paths))
    for f in FINDINGS_JUDGED:
        if f["source"] != RECOVERY and f["source"] not in sources and (ROOT / f["source"]).is_file():
            sources[f["source"]] = dict(label=f["source"], runs=read_runs([ROOT / f["source"]]))
    return sources


def _value(v):
    s = str(v).strip()
    try:
        return float(s)
    except ValueError:
        return s.lower()


# every Config field's default; a removed field at the value every run without its cfg_ cell had
DEFAULTS = {**reuse.RETIRED_FIELDS, "loss_form": "cos",
            **{f.name: f.default for f in dataclasses.fields(common.Config) if f.default is not dataclasses.MISSING}}
# hooks that only log (exp_recovery.py's TrackedBYOL and recovery_metrics: a run with them repeats
# one without digit for digit, results/README.md D2) and each hook's default, as the CSV names them
SAME_HOOK = {"cfg_model_fn": {"", "byol", "trackedbyol"}, "cfg_groups_fn": {"", "param_groups"}}
IGNORED = {"cfg_hash", "cfg_metrics_fn"}


def settings(label, by_epoch):
    """A run's settings as its cfg_* cells give them, each field it lacks at its preset's value (the
    preset: the CSV name's _<preset> part, e.g. lars_steps.csv -> steps), so that CSVs written by
    different scripts compare. None where the CSV names no appendix preset."""
    preset = next((p for p in presets.APPENDIX_PRESETS for part in label.split("+")
                   if p in Path(part).stem.split("_")), None)
    if preset is None:
        return None
    row = by_epoch[min(by_epoch)]
    out = {f"cfg_{k}": _value(v) for k, v in {**DEFAULTS, **presets.APPENDIX_PRESETS[preset]}.items() if k != "epochs"}
    out.update({c: _value(v) for c, v in row.items() if c.startswith("cfg_") and c not in IGNORED})
    for c, same in SAME_HOOK.items():
        if out.get(c, "") in same:
            out[c] = ""
    out["preset"] = preset
    return out


def _same_schedule(a, b):
    """The logged lr and tau are equal at every epoch both runs logged them (and there is one)."""
    shared = [e for e in a if e in b and num(a[e], "lr") is not None and num(b[e], "lr") is not None]
    return bool(shared) and all(math.isclose(num(a[e], c), num(b[e], c), rel_tol=1e-9)
                                for e in shared for c in ("lr", "tau") if num(a[e], c) is not None)


def _probes(by_epoch):
    return {e: num(r, "probe_acc") for e, r in by_epoch.items() if num(r, "probe_acc") is not None}


NOISE_COLUMNS = ["kind", "quantity", "csv_a", "variant_a", "last_epoch_a", "csv_b", "variant_b", "last_epoch_b",
                 "seed", "healthy", "shared_evaluations", "max_abs_diff", "at_epoch", "note"]


def noise_pairs(sources):
    """Rows of NOISE_COLUMNS, one per pair of runs and quantity: two runs (a run copied into two
    CSVs, the same variant, seed and cfg_hash, counts once) of the same seed and the same settings
    (settings(): every cfg_* field, hooks that only log aside; and the same logged lr and tau at
    every shared epoch), compared at
    every epoch > 0 where both have a probe: the probe gain over each run's own untrained encoder
    (epoch 0), and, where one of them has a <variant>_healthy of the same seed in its CSV, the
    recovered fraction of both against that healthy run."""
    runs, seen = [], set()
    for src in sources.values():
        for key, by in src["runs"].items():
            copy = (*key, by[min(by)].get("cfg_hash") or id(by))   # a run copied into two CSVs counts once
            if copy not in seen:
                seen.add(copy)
                runs.append((key, src, by, settings(src["label"], by)))
    out = []
    for i, ((va, seed), sa, a, cfg_a) in enumerate(runs):
        for (vb, sb_seed), sb, b, cfg_b in runs[i + 1:]:
            if sb_seed != seed or cfg_a is None or cfg_a != cfg_b or not _same_schedule(a, b):
                continue
            pa, pb = _probes(a), _probes(b)
            if 0 not in pa or 0 not in pb:
                continue
            shared = sorted(e for e in pa if e in pb and e > 0)
            if not shared:
                continue
            base = dict(kind="pair", csv_a=sa["label"], variant_a=va, last_epoch_a=max(a), csv_b=sb["label"],
                        variant_b=vb, last_epoch_b=max(b), seed=seed)
            diffs = [(abs((pa[e] - pa[0]) - (pb[e] - pb[0])), e) for e in shared]
            d, at = max(diffs, key=lambda t: (t[0], -t[1]))
            out.append(dict(base, quantity="probe_gain", healthy="", shared_evaluations=len(shared),
                            max_abs_diff=round(d, 6), at_epoch=at, note=""))
            for src, v in ((sa, va), (sb, vb)):
                healthy = src["runs"].get((f"{v}_healthy", seed))
                if healthy is not None:
                    h = _probes(healthy)
                    es = [e for e in shared if e in h and h[e] > max(pa[0], pb[0])]
                    fr = [(abs((pa[e] - pa[0]) / (h[e] - pa[0]) - (pb[e] - pb[0]) / (h[e] - pb[0])), e) for e in es]
                    if fr:
                        d, at = max(fr, key=lambda t: (t[0], -t[1]))
                        out.append(dict(base, quantity="recovered_fraction", healthy=f"{src['label']}:{v}_healthy",
                                        shared_evaluations=len(fr), max_abs_diff=round(d, 6), at_epoch=at,
                                        note="both against the same healthy run: its own noise is not in it"))
                    break
    return out


def healthy_gain(sources):
    """The mean over every *_healthy run of its probe gain at its last evaluation: the scale between
    a fraction and points (a fallback, noise_delta)."""
    gains = []
    for src in sources.values():
        for (v, _), by in src["runs"].items():
            p = _probes(by)
            if v.endswith("_healthy") and 0 in p and len(p) > 1:
                gains.append(p[max(p)] - p[0])
    return mean(gains) if gains else None


def noise_delta(pairs, sources):
    """({quantity: delta}, [delta rows of NOISE_COLUMNS]): each quantity's largest max_abs_diff over
    its pairs. A quantity without a pair takes the other's delta scaled by the mean healthy gain
    (fraction = points / that gain), and says so; None where neither has one."""
    best = {q: max((r for r in pairs if r["quantity"] == q), key=lambda r: r["max_abs_diff"], default=None)
            for q in ("recovered_fraction", "probe_gain")}
    delta = {q: (r["max_abs_diff"] if r else None) for q, r in best.items()}
    notes = {q: (f"largest of {sum(p['quantity'] == q for p in pairs)} pairs: {r['csv_a']}:{r['variant_a']} vs "
                 f"{r['csv_b']}:{r['variant_b']}, seed {r['seed']}, epoch {r['at_epoch']}" if r else "")
             for q, r in best.items()}
    scale = healthy_gain(sources)
    for q, other, f in (("recovered_fraction", "probe_gain", lambda d: d / scale),
                        ("probe_gain", "recovered_fraction", lambda d: d * scale)):
        if delta[q] is None and delta[other] is not None and best[other] and scale:
            delta[q] = round(f(delta[other]), 6)
            notes[q] = (f"no pair of runs of the same seed and settings: the {other.replace('_', ' ')} delta "
                        f"{best[other]['max_abs_diff']:.4g} scaled by the mean healthy gain {scale:.2f} points")
    rows = [dict(kind="delta", quantity=q, max_abs_diff=d, note=notes[q] or "no pair: not measured")
            for q, d in delta.items()]
    return {q: d for q, d in delta.items()}, rows


# ------------------------------------------------------------------------ the verdicts

VERDICT_COLUMNS = ["finding", "kind", "variant", "seed", "csv", "healthy", "last_epoch", "collapsed_at", "quantity",
                   "window_epochs", "n_evaluations", "window_mean", "window_min", "window_max", "share_passing",
                   "neg_cos_window_mean", "delta", "status", "finding_verdict", "evaluations", "neg_cos_evaluations"]
QUANTITY = {"C": "recovered_fraction", "D": "probe_gain"}


def _points(by_epoch, col):
    return [(e, num(by_epoch[e], col)) for e in sorted(by_epoch) if num(by_epoch[e], col) is not None]


def judge_seed(spec, source, healthy_runs, seed, by_epoch, delta):
    """One seed of one finding: a row of VERDICT_COLUMNS (without finding_verdict)."""
    last = max(by_epoch)
    negs = _points(by_epoch, "neg_cos")
    collapsed = next((e for e, c in negs if c >= COLLAPSE), None)
    probes = dict(_points(by_epoch, "probe_acc"))
    row = dict(finding=spec["finding"], kind=spec["kind"], variant=spec["variant"], seed=seed, csv=source["label"],
               healthy="", last_epoch=last, collapsed_at="never" if collapsed is None else collapsed,
               quantity=QUANTITY[spec["kind"]], delta=delta)
    healthy = None
    if spec["healthy"]:
        healthy = healthy_runs.get((spec["healthy"][1], seed)) if healthy_runs is not None else None
        row["healthy"] = f"{spec['healthy'][1]} seed {seed}" if healthy else ""
    if spec["kind"] == "C" and healthy is None:
        return dict(row, status="no healthy reference: not judged")
    if spec["collapse"] and collapsed is None:
        return dict(row, status="never collapsed: not judged")
    if 0 not in probes:
        return dict(row, status="no untrained probe (epoch 0): not judged")
    if delta is None:
        return dict(row, status="no noise measurement: not judged")
    if spec["kind"] == "C":
        h = dict(_points(healthy, "probe_acc"))
        points = [(e, (p - probes[0]) / (h[e] - probes[0])) for e, p in probes.items()
                  if e > 0 and e in h and h[e] > probes[0]]
        window, neg_window = in_window(points, last), in_window(negs, last)
        if not window:
            return dict(row, status="no evaluation in the last 20%: not judged")
        j = judge_c(window, delta)
    else:
        window = in_window([(e, p - probes[0]) for e, p in probes.items() if e > 0], last)
        neg_window = in_window(negs, last)
        if not window or not neg_window:
            return dict(row, status="no evaluation in the last 20%: not judged")
        j = judge_d(window, neg_window, delta)
    first = min(e for e, _ in window + neg_window)
    return dict(row, window_epochs=f"{first}-{last}", n_evaluations=len(window), window_mean=j["mean"],
                window_min=j["min"], window_max=j["max"], share_passing=j["share"],
                neg_cos_window_mean=mean(c for _, c in neg_window) if neg_window else None, status=j["status"],
                evaluations=" ".join(f"{e}:{v:.4g}" for e, v in window),
                neg_cos_evaluations=" ".join(f"{e}:{c:.4f}" for e, c in neg_window))


def verdicts(sources, delta):
    """Rows of VERDICT_COLUMNS: every seed of every finding of FINDINGS_JUDGED whose CSV is among
    sources (the RECOVERY ones only where --recovery gave CSVs), each finding's verdict in every row
    of it. delta: {quantity: delta} (noise_delta)."""
    rows = []
    for spec in FINDINGS_JUDGED:
        source = sources.get(spec["source"])
        if source is None:
            continue
        healthy_src = sources.get(spec["healthy"][0]) if spec["healthy"] else None
        mine = sorted((seed, by) for (v, seed), by in source["runs"].items() if v == spec["variant"])
        judged = [judge_seed(spec, source, healthy_src["runs"] if healthy_src else None, seed, by,
                             delta.get(QUANTITY[spec["kind"]])) for seed, by in mine]
        text = finding_verdict([r["status"] for r in judged], spec["blog"],
                               sum(r["collapsed_at"] == "never" for r in judged))
        rows += [dict(r, finding_verdict=text) for r in judged]
    return rows


def verdict_report(rows, delta_rows):
    """Markdown: the noise, the per-seed table, each finding's verdict, and every window evaluation."""
    out = ["Noise (largest |difference| between two runs of the same seed and settings at the same epoch):"]
    out += [f"- {r['quantity']}: delta = {r['max_abs_diff']} ({r['note']})" for r in delta_rows]
    out += ["", "| finding | variant | seed | collapsed at | window (epochs) | evaluations | "
            "quantity: mean (min-max) | share passing | neg. cos, window mean | verdict |", "|---" * 10 + "|"]
    fmt = lambda v, f: "" if v in (None, "") else f"{v:{f}}"   # noqa: E731
    for r in rows:
        q = "fraction" if r["kind"] == "C" else "gain"
        stats = (f"{q} {fmt(r.get('window_mean'), '.3f')} ({fmt(r.get('window_min'), '.3f')}-"
                 f"{fmt(r.get('window_max'), '.3f')})" if r.get("window_mean") is not None else "")
        out.append(f"| {r['finding']} | {r['variant']} | {r['seed']} | {r['collapsed_at']} | "
                   f"{r.get('window_epochs', '')} | {r.get('n_evaluations', '')} | {stats} | "
                   f"{fmt(r.get('share_passing'), '.0%')} | "
                   f"{fmt(r.get('neg_cos_window_mean'), '.4f')} | {r['status']} |")
    out += ["", "Verdicts (the blog's outcome in k of n seeds):"]
    out += [f"- {f}: {v}" for f, v in dict.fromkeys((r["finding"], r["finding_verdict"]) for r in rows)]
    out += ["", "Window evaluations (epoch:value):"]
    for r in rows:
        if r.get("evaluations"):
            out.append(f"- {r['finding']}, {r['variant']} seed {r['seed']}: {r['quantity']} {r['evaluations']}")
            if r["kind"] == "D":
                out.append(f"  neg. cos {r['neg_cos_evaluations']}")
    return "\n".join(out)


def judge_all(recovery_paths, out_dir=None):
    """The noise and the verdicts of every finding (FINDINGS_JUDGED) from the --recovery CSVs and
    the committed ones; printed, and written to <out_dir>/noise.csv and verdicts.csv."""
    sources = load_sources(recovery_paths)
    pairs = noise_pairs(sources)
    delta, delta_rows = noise_delta(pairs, sources)
    rows = verdicts(sources, delta)
    print(verdict_report(rows, delta_rows))
    if out_dir is not None:
        write_csv(Path(out_dir) / "noise.csv", NOISE_COLUMNS, pairs + delta_rows)
        write_csv(Path(out_dir) / "verdicts.csv", VERDICT_COLUMNS, rows)
    return rows, pairs, delta


def left_collapse(by_epoch, leave_at=0.99):
    """The first epoch after the collapse (negative cosine >= 0.999) at which it is back at <= 0.99."""
    neg = [(e, num(by_epoch[e], "neg_cos")) for e in sorted(by_epoch) if num(by_epoch[e], "neg_cos") is not None]
    start = next((e for e, c in neg if c >= COLLAPSE), None)
    return next((e for e, c in neg if start is not None and e > start and c <= leave_at), None)


# exp_mechanism.py's C1 controls, one row of panels per question; every row also shows c1 (the
# recovering run) and c1_healthy (the reference). A variant in no row gets a row of its own.
MECHANISM_ROWS = {"c1": (("Controls that could refute the effective-lr explanation", ("c1_norm_held", "c1_exp_lr")),
                         ("Where the decay goes", ("c1_all_decay", "c1_conv_pred", "c1_conv_proj")),
                         ("Decay on one MLP alone (DirectPred's predictor-only rescue)", ("c1_pred_only", "c1_proj_only")))}


def mechanism_rows(runs, family):
    """[(title, {(variant, seed): by_epoch})]: MECHANISM_ROWS' questions with the family's run and
    healthy reference added to each; one row of everything when the family has no questions."""
    base = {k: by for k, by in runs.items() if k[0] in (family, f"{family}_healthy")}
    rows, placed = [], set(base)
    for title, variants in MECHANISM_ROWS.get(family, ()):
        mine = {k: by for k, by in runs.items() if k[0] in variants}
        if mine:
            rows.append((title, {**base, **mine}))
            placed |= set(mine)
    rest = {k: by for k, by in runs.items() if k not in placed}
    if rest or not rows:
        rows.append(("" if not rows else "Other variants", {**base, **rest}))
    return rows


def mechanism_figure(runs, out_dir, name, stage="layer1", family=None):
    """<out>/<name>_mechanism.png for CSVs with exp_recovery.py's columns: the depth of the collapse
    (1 - negative cosine), one stage's conv-weight norm |w|, its angle per step against spherical
    motion dynamics' equilibrium sqrt(2 lr wd / (1 + momentum)) (lr of the run's last epoch, wd
    from cfg_weight_decay), and the effective rank of z and y. One row of panels per question of
    MECHANISM_ROWS (family: c1, d1, ...). A thin vertical line marks where each run is back at
    negative cosine <= 0.99 after its collapse; seed 0 solid, others dashed."""
    runs = {k: by for k, by in runs.items() if any(f"angle:{stage}" in r for r in by.values())}
    if not runs:
        return None
    colors = {v: f"C{i % 10}" for i, v in enumerate(dict.fromkeys(v for v, _ in sorted(runs)))}
    rows = mechanism_rows(runs, family)
    fig, grid = plt.subplots(len(rows), 4, figsize=(20, 4.2 * len(rows)), squeeze=False)
    handles, equilibria = {}, {}
    titles = ("Depth of the collapse", f"Conv weight norm, {stage}", f"Angle per step, {stage}", "Effective rank: z (solid), y")
    ylabels = ("1 - negative cosine", "mean |w| over the stage's convs", "radians", "exp(entropy of singular values)")
    for axes, (row_title, row_runs) in zip(grid, rows):
        for (v, seed), by_epoch in sorted(row_runs.items()):
            kw = dict(color=colors[v], ls="-" if seed == min(s for n, s in runs if n == v) else "--", lw=1.1)
            es = sorted(e for e in by_epoch if e > 0)
            for ax, col in zip(axes, ("neg_gap", f"w_norm:{stage}", f"angle:{stage}", "z_rank")):
                pts = [(e, num(by_epoch[e], col)) for e in es if num(by_epoch[e], col) is not None]
                ax.plot([e for e, _ in pts], [y for _, y in pts], **kw)
            pts = [(e, num(by_epoch[e], "y_rank")) for e in es if num(by_epoch[e], "y_rank") is not None]
            axes[3].plot([e for e, _ in pts], [y for _, y in pts], **dict(kw, lw=0.8, alpha=0.7, ls=":"))
            leave = left_collapse(by_epoch)
            if leave is not None:
                for ax in axes:
                    ax.axvline(leave, color=colors[v], lw=0.7, alpha=0.5)
            wd, lr = num(by_epoch[es[-1]], "cfg_weight_decay"), num(by_epoch[es[-1]], "lr")
            if wd and lr:
                momentum = num(by_epoch[es[-1]], "cfg_momentum") or 0.9   # as recovery(): the Config default
                equilibria[v] = (2 * lr * wd / (1 + momentum)) ** 0.5
                axes[2].axhline(equilibria[v], color=colors[v], ls=":", lw=1)
            handles[(v, seed)] = Line2D([], [], **kw, label=f"{v} seed {seed}" + (f", back at <= 0.99 at epoch {leave}" if leave else ""))
        for ax, title, ylabel in zip(axes, titles, ylabels):
            ax.set(xlabel="epoch", title=f"{row_title}\n{title}" if row_title and ax is axes[0] else title, ylabel=ylabel)
            if ax is not axes[3]:
                ax.set_yscale("log")
    handles = [handles[k] for k in sorted(handles)]
    if equilibria:
        handles.append(Line2D([], [], color="0.3", ls=":", lw=1, label="sqrt(2 lr wd / (1 + momentum)): the angle at "
                              "equilibrium under decay (Wan et al. 2021)"))
    handles.append(Line2D([], [], color="0.3", ls=":", lw=0.8, label="effective rank of y, eval mode (dotted)"))
    legend_below(fig, handles)
    fig.suptitle(f"What moves when a collapse ends ({name})")
    return save(fig, Path(out_dir) / f"{name}_mechanism.png")


# ==================================== exp_escape_law.py: the decay clock of D1's collapsed loss
# Read off the per-epoch training loss (the signal of the blog's D1 figure), from the first epoch
# at which the run is collapsed (negative cosine >= 0.999):
#   rise   the first epoch whose loss is more than ESCAPE_RISE (3) times the lowest loss before it
#   turn   the epoch of that lowest loss: where the decay starts to win
# Steps are counted to the end of the epoch, and decay = wd x the sum of the scheduled lr over
# those steps. The cosines are not used beyond the collapse: a run can burst out of collapse and
# fall back with the negative cosine staying above 0.999. A run with no rise is censored (shown
# with its length, left out of the fit). The fit: least squares of log10(step) on log10(lr x wd)
# over the grid's runs that rise (exp_escape_law.py's controls, named ctl_*, are left out); the
# slope's uncertainty is its standard error. ESCAPE_RISE and the collapse threshold were set
# before the runs, from two exploratory runs, and are not tuned.
ESCAPE_RISE = 3.0
BLOG_ESCAPE = "blog (lr 0.2, wd 1e-5): turn ~24,600 steps (0.049), rise ~41,000 (0.082)"
ESCAPE_NEEDED = ("variant", "seed", "epoch", "loss", "neg_cos", "cfg_hash", "cfg_lr", "cfg_weight_decay")


def escape(rows):
    """(turn epoch, rise epoch) of one run's rows (sorted by epoch), None where absent."""
    losses = [(int(r["epoch"]), float(r["loss"])) for r in rows if r["loss"] not in ("", None)]
    start = next((int(r["epoch"]) for r in rows if r["neg_cos"] not in ("", None)
                  and float(r["neg_cos"]) >= COLLAPSE), None)
    if start is None:
        return None, None
    low, turn = math.inf, None
    for epoch, loss in losses:
        if epoch < start:
            continue
        if loss > ESCAPE_RISE * low:
            return turn, epoch
        if loss < low:
            low, turn = loss, epoch
    return None, None


def escape_config(csv_path):
    """The Config of the preset an escape_law_<preset>.csv was made with (exp_escape_law.py's
    presets are the appendix's; only their epochs differ, which the lr schedule of a preset with
    schedule_epochs does not read)."""
    preset = Path(csv_path).stem.removeprefix("escape_law_")
    if preset == "smoke":
        return common.Config(**{**presets.APPENDIX_PRESETS["cpu"], **harness.SMOKE})
    if preset not in presets.APPENDIX_PRESETS:
        raise UsageError(f"{csv_path}: not an escape_law_<preset>.csv of exp_escape_law.py")
    return common.Config(**presets.APPENDIX_PRESETS[preset])


def steps_per_epoch_of(cfg):
    n = cfg.train_subset or {"cifar10": 50000, "stl10": 105000, "synthetic": 512}[cfg.dataset]
    return n // cfg.batch_size   # drop_last, as train_byol


def decay_at(cfg, steps):
    """wd x the scheduled lr summed over the first `steps` steps: how far the decay has acted."""
    total = (cfg.schedule_epochs or cfg.epochs) * steps_per_epoch_of(cfg)   # as train_byol's
    return cfg.weight_decay * sum(common.lr_at(s, total, cfg.lr) for s in range(steps))


def escape_rows(csv_path):
    """One row per finished run: lr, wd, lr x wd, and its turn and rise (epoch, step, decay)."""
    base = escape_config(csv_path)
    rows = read_csv(csv_path, ESCAPE_NEEDED, "a results CSV of exp_escape_law.py")
    runs = {}
    for r in rows:
        runs.setdefault((r["variant"], int(r["seed"]), r["cfg_hash"]), []).append(r)
    out = []
    for (name, seed, _), rs in sorted(runs.items()):
        rs.sort(key=lambda r: int(r["epoch"]))
        cfg = dataclasses.replace(base, lr=float(rs[0]["cfg_lr"]), weight_decay=float(rs[0]["cfg_weight_decay"]))
        turn, rise = escape(rs)
        row = dict(variant=name, seed=seed, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_wd=cfg.lr * cfg.weight_decay,
                   epochs=int(rs[-1]["epoch"]))
        for key, epoch in (("turn", turn), ("rise", rise)):
            steps = epoch * steps_per_epoch_of(cfg) if epoch is not None else None
            row.update({f"{key}_epoch": epoch, f"{key}_step": steps,
                        f"{key}_decay": round(decay_at(cfg, steps), 4) if steps else None})
        out.append(row)
    return out


def is_control(row):
    return str(row.get("variant", "")).startswith("ctl_")   # exp_escape_law.py's CONTROLS


def escape_fit(rows, key):
    """(slope, standard error, n) of log10(step) on log10(lr x wd) over the grid's runs that escaped."""
    pts = [(math.log10(r["lr_wd"]), math.log10(r[f"{key}_step"])) for r in rows
           if r[f"{key}_step"] and not is_control(r)]
    if len({x for x, _ in pts}) < 2:
        return None, None, len(pts)
    x, y = np.array(pts).T
    (slope, _), cov = np.polyfit(x, y, 1, cov=True) if len(pts) > 2 else (np.polyfit(x, y, 1), None)
    return slope, (math.sqrt(cov[0, 0]) if cov is not None else None), len(pts)


def escape_law(csv_path, out_dir, name=None):
    """exp_escape_law.py's table and fit, printed; <out>/<name>_escape.csv (one row per run) and
    <out>/<name>_escape.png. Returns (rows, {key: (slope, se)})."""
    rows = escape_rows(csv_path)
    if not rows:
        raise UsageError(f"{csv_path}: no runs to analyze")
    print(f"\nescape from collapse (rise: loss > {ESCAPE_RISE:g}x its lowest so far; turn: that lowest epoch), "
          f"{steps_per_epoch_of(escape_config(csv_path))} steps an epoch; {BLOG_ESCAPE}")
    print(f"{'variant':<18}{'seed':>5}{'lr x wd':>10}{'turn step':>11}{'decay':>8}{'rise step':>11}{'decay':>8}")
    for r in rows:
        def show(key):
            return (f"{r[key + '_step']:>11}{r[key + '_decay']:>8.3f}" if r[key + "_step"]
                    else f"{'none':>11}{'-':>8}")
        print(f"{r['variant']:<18}{r['seed']:>5}{r['lr_wd']:>10.2g}{show('turn')}{show('rise')}")
    slopes = {}
    for key in ("turn", "rise"):
        slope, se, n = escape_fit(rows, key)
        slopes[key] = (slope, se)
        text = "too few runs escaped to fit" if slope is None else f"{slope:.2f}" + (f" +- {se:.2f}" if se else "")
        print(f"log-log slope of the {key} step against lr x wd ({n} runs): {text}  (decay alone: -1)")
    stem = name or Path(csv_path).stem
    harness.rewrite_rows(Path(out_dir) / f"{stem}_escape.csv", list(rows[0]), rows)
    print(f"wrote {Path(out_dir) / f'{stem}_escape.csv'}")
    escape_figure(rows, slopes, Path(out_dir) / f"{stem}_escape.png")
    return rows, slopes


def escape_figure(rows, slopes, png):
    """Turn and rise steps against lr x wd on log-log axes (the grid; the controls are in the
    table), with the blog's clocks as lines and its rise as a star."""
    fig, ax = plt.subplots(figsize=(5.5, 4.3))
    rows = [r for r in rows if not is_control(r)]
    for key, marker in (("turn", "o"), ("rise", "s")):
        for i, lr in enumerate(sorted({r["lr"] for r in rows})):
            pts = [(r["lr_wd"], r[f"{key}_step"]) for r in rows if r["lr"] == lr and r[f"{key}_step"]]
            if pts:
                x, y = zip(*pts)
                ax.loglog(x, y, marker, color=f"C{i}", mfc="none" if key == "turn" else f"C{i}", label=f"{key}, lr {lr:g}")
    xs = np.array(sorted({r["lr_wd"] for r in rows} | {2e-6}))
    for clock, style in ((0.049, ":"), (0.082, "--")):
        ax.loglog(xs, clock / xs, "k" + style, lw=1, label=f"lr x wd x steps = {clock} (blog's {'turn' if clock < 0.06 else 'rise'})")
    ax.loglog([2e-6], [41000], "k*", ms=10, label="blog: lr 0.2, wd 1e-5, rise")
    fits = ", ".join(f"{k} {sl:.2f}" + (f" ± {se:.2f}" if se else "") for k, (sl, se) in slopes.items() if sl is not None)
    ax.set(xlabel="lr x wd", ylabel="step", title="D1: when decay lifts the collapsed loss" + (f"\nslopes (all runs): {fits}" if fits else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, png, dpi=120)


# ==================================================================================== CLI

def get_parser():
    p = harness.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", nargs="*", metavar="CSV", help="result CSVs (default: every results/*.csv; --noise: "
                   f"{RECOVERY_CSV})")
    p.add_argument("--out", default=str(Path("runs") / "plots"),
                   help="folder for the figures and CSVs this writes (default runs/plots/; made if missing)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--table", action="store_true", help="print a markdown table per CSV (last epoch, mean ± std)")
    mode.add_argument("--recovery", action="store_true",
                      help="print each CSV's recovery table; for exp_recovery.py CSVs (taken together) also draw "
                           "recovery_<c1|d1|d2>.png and write recovery_fraction.csv into --out; then the noise and "
                           "every finding's verdict by the rule, into noise.csv and verdicts.csv")
    mode.add_argument("--noise", action="store_true",
                      help="the pairs of runs of the same seed and settings and the noise delta they give, into "
                           "noise.csv (the --recovery CSVs, default the committed one, and the verdicts' CSVs)")
    mode.add_argument("--depth", action="store_true", help="a collapse_depth CSV: its table and <stem>_depth.png")
    mode.add_argument("--escape-law", action="store_true",
                      help="an exp_escape_law.py CSV: each run's turn and rise, the log-log fit, "
                           "<stem>_escape.csv and <stem>_escape.png")
    p.add_argument("--steps-per-epoch", type=int, default=78,
                   help="optimizer steps per epoch of the CSVs' runs (--recovery; default 78: the appendix's "
                        "cpu and steps presets, 5,000 images at batch 64)")
    p.add_argument("--mechanism-epochs", type=int, default=0, metavar="N",
                   help="--recovery: draw <name>_<family>_mechanism.png over epochs 0..N only (default: every epoch), "
                        "to compare runs of different lengths over the shorter one")
    return p


def main(argv):
    args = get_parser().parse_intermixed_args(argv)
    if args.steps_per_epoch < 1:
        raise UsageError(f"--steps-per-epoch {args.steps_per_epoch}: must be >= 1")
    if args.mechanism_epochs < 0:
        raise UsageError(f"--mechanism-epochs {args.mechanism_epochs}: must be >= 0")
    named = args.table or args.recovery or args.depth or args.escape_law   # modes that need CSVs named
    paths = args.csvs or ([str(ROOT / RECOVERY_CSV)] if args.noise else [] if named
                          else sorted(str(p) for p in Path("results").glob("*.csv")))
    if not paths:
        raise UsageError("no CSV given" + ("" if named else " and none in results/"))
    for path in paths:   # every input checked before anything is written
        if not Path(path).is_file():
            raise UsageError(f"{path} does not exist")
        read_results(path)
        if args.escape_law:
            escape_config(path)
    if args.table:
        for path in paths:
            print(table(path))
        return
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or type(e).__name__})") from None
    inputs = {Path(x).resolve() for x in paths}
    # output names: the CSV's stem, or parent_stem where two inputs share a stem
    stems = defaultdict(list)
    for path in paths:
        stems[Path(path).stem].append(path)
    names = {path: (Path(path).stem if len(stems[Path(path).stem]) == 1 else f"{Path(path).parent.name}_{Path(path).stem}")
             for path in paths}
    planned = ([out / "recovery_fraction.csv", out / "noise.csv", out / "verdicts.csv"] if args.recovery else
               [out / "noise.csv"] if args.noise else
               [out / f"{Path(x).stem}_depth.png" for x in paths] if args.depth else
               [out / f"{names[x]}_escape{ext}" for x in paths for ext in (".csv", ".png")] if args.escape_law else
               [out / f"{names[x]}{suffix}.png" for x in paths for suffix in ("", "_vs_blog", "_k_parts")])
    clash = [str(x) for x in planned if x.resolve() in inputs]
    if clash:
        raise UsageError(f"--out {out}: would overwrite the input {clash[0]}; choose another --out")
    if args.noise:
        sources = load_sources(paths)
        pairs = noise_pairs(sources)
        _, delta_rows = noise_delta(pairs, sources)
        for r in pairs:
            print(f"{r['quantity']}: {r['csv_a']}:{r['variant_a']} (to epoch {r['last_epoch_a']}) vs "
                  f"{r['csv_b']}:{r['variant_b']} (to epoch {r['last_epoch_b']}), seed {r['seed']}: max |diff| "
                  f"{r['max_abs_diff']:.4g} at epoch {r['at_epoch']} over {r['shared_evaluations']} evaluations")
        for r in delta_rows:
            print(f"delta, {r['quantity']}: {r['max_abs_diff']} ({r['note']})")
        write_csv(out / "noise.csv", NOISE_COLUMNS, pairs + delta_rows)
        return
    if args.recovery:
        for path in paths:
            print(recovery(path, args.steps_per_epoch))
        runs = read_runs(paths)
        recovery_figures(paths, out, args.steps_per_epoch, runs)
        judge_all(paths, out)
        if args.mechanism_epochs:
            runs = {k: {e: r for e, r in by.items() if e <= args.mechanism_epochs} for k, by in runs.items()}
        for family in sorted({v.split("_")[0] for v, _ in runs}):   # c1, d1, ...: one figure each
            mechanism_figure({k: by for k, by in runs.items() if k[0].split("_")[0] == family}, out,
                             f"{names[paths[0]]}_{family}", family=family)
        return
    if args.depth:
        for path in paths:
            print(table(path, columns=DEPTH))
            print(f"figure: {depth_figure(path, out)}")
        return
    if args.escape_law:
        for path in paths:
            escape_law(path, out, names[path])
        return
    for path in paths:
        plot(path, out, names[path])


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
