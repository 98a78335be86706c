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
            # with the conv-weight columns also <out>/<name>_<c1|d1|d2>_mechanism.png
    python plot_results.py --depth results/steps/depth/collapse_depth_steps.csv
            # markdown and figure: each lever's last-epoch loss, gaps and z_std
    python plot_results.py --escape-law results/steps/law/escape_law_steps.csv
            # exp_escape_law.py: each run's turn and rise of the collapsed loss and the log-log fit
            # against lr x wd; <out>/<stem>_escape.csv and <stem>_escape.png

The numbers behind the figures (recovered fractions, the escape law's clocks) and every verdict
are verdicts.py's. Uses matplotlib (plots are the one place a library clearly beats hand-written code).
"""
import argparse
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

import harness  # noqa: E402
import verdicts  # noqa: E402
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
    epochs = sorted({int(r["epoch"]) for r in verdicts.last_rows(rows).values()})
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


def read_results(csv_path):
    """Rows of a results CSV; a variant run under several settings (cfg_hash) gets one curve per
    setting, labelled with the hash."""
    rows = verdicts.read_rows(csv_path, NEEDED)
    hashes = defaultdict(set)
    for r in rows:
        hashes[r["variant"]].add(r.get("cfg_hash", ""))
    for r in rows:
        if len(hashes[r["variant"]]) > 1:
            r["variant"] = f"{r['variant']} [{r['cfg_hash'][:6]}]"
    return rows


DEPTH = ("loss", "pos_gap", "neg_gap", "z_std", "probe_acc", "probe_standardized")


def depth_figure(csv_path, out_dir):
    """<csv>_depth.png: each variant's last-epoch loss and neg_gap (log scale, one dot a seed),
    beside the blog's floors (D1's loss ~1e-4, D2's ~1e-3)."""
    last = verdicts.last_rows(read_results(csv_path))
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

MARK_NAMES = {"fraction": "recovered fraction", "neg_cos": "negative cosine"}
FAMILY_NAMES = {"c1": "C1, BN encoder without BN in the MLPs (SGD)",
                "d1": "D1, GroupNorm encoder without any BN (SGD + weight decay)",
                "d2": "D2, GroupNorm + weight standardization without any BN (SGD)"}


def recovery_figures(paths, out_dir, steps_per_epoch, runs=None):
    """<out>/recovery_<family>.png for each of c1, d1, d2 in the CSVs, and <out>/recovery_fraction.csv.
    Panels: probe, negative cosine, recovered fraction, against the fraction of the blog's 131,200
    steps; each seed a thin line, the mean over seeds a thick one, the healthy reference in black,
    the blog's readings (SPEC.md section 3) as red crosses. runs: verdicts.read_runs(paths), where the
    caller has read them already. Returns the paths written."""
    runs = runs if runs is not None else verdicts.read_runs(paths)
    fractions = verdicts.recovered_fractions(runs, steps_per_epoch)
    written = []
    for family in verdicts.FAMILIES:
        names = [n for n in (family, f"{family}_all_decay") if any(v == n for v, _ in runs)]
        if not names:
            continue
        # one x range for all three panels, the blog's whole schedule: where our runs stop (the blog's
        # epoch 100 = 0.31) and where the blog's readings go on
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharex=True)
        axes[0].set_xlim(0, 1.02)
        x = lambda e: e * steps_per_epoch / verdicts.BLOG_STEPS   # noqa: E731
        handles = []
        colors = {family: "C0", f"{family}_all_decay": "C1", f"{family}_healthy": "k"}
        for ax, col in zip(axes[:2], ("probe_acc", "neg_cos")):
            for v in [*names, f"{family}_healthy"]:
                seeds = sorted(s for n, s in runs if n == v)
                per_epoch = defaultdict(list)
                for s in seeds:
                    pts = [(e, verdicts.num(r, col)) for e, r in sorted(runs[(v, s)].items()) if verdicts.num(r, col) is not None]
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
        for (fam, what), marks in verdicts.BLOG_MARKS.items():
            if fam == family:
                ax = axes[2] if what == "fraction" else axes[1]
                ax.plot([e / verdicts.BLOG_EPOCHS for e, _ in marks], [y for _, y in marks], "X", color="C3", ms=8, ls=":",
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
        marks = [what for (fam, what) in verdicts.BLOG_MARKS if fam == family]
        if marks:
            handles.append(Line2D([], [], color="C3", marker="X", ls=":", lw=0.8, ms=8,
                                  label=f"blog's {' and '.join(MARK_NAMES[m] for m in marks)} "
                                        f"(SPEC.md section 3; x = blog epoch / 320)"))
        axes[0].set(ylabel="linear probe accuracy (%)", title="Linear evaluation accuracy")
        axes[1].set(ylabel="negative cosine (1 = collapse)", title="Negative cosine", ylim=(-0.05, 1.05))
        axes[2].set(ylabel="(probe - untrained) / (healthy - untrained)", title="Recovered fraction")
        for ax in axes:
            ax.set_xlabel(f"fraction of the blog's schedule (step / {verdicts.BLOG_STEPS:,}; {steps_per_epoch} steps an epoch)")
        legend_below(fig, handles)
        fig.suptitle(f"{FINDINGS['recovery']}: {FAMILY_NAMES[family]}")
        written.append(save(fig, Path(out_dir) / f"recovery_{family}.png"))
    if fractions:
        written.append(verdicts.write_csv(Path(out_dir) / "recovery_fraction.csv", verdicts.FRACTION_COLUMNS, fractions))
    return written


def left_collapse(by_epoch, leave_at=0.99):
    """The first epoch after the collapse (negative cosine >= 0.999) at which it is back at <= 0.99."""
    neg = [(e, verdicts.num(by_epoch[e], "neg_cos")) for e in sorted(by_epoch) if verdicts.num(by_epoch[e], "neg_cos") is not None]
    start = next((e for e, c in neg if c >= verdicts.COLLAPSE), None)
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
                pts = [(e, verdicts.num(by_epoch[e], col)) for e in es if verdicts.num(by_epoch[e], col) is not None]
                ax.plot([e for e, _ in pts], [y for _, y in pts], **kw)
            pts = [(e, verdicts.num(by_epoch[e], "y_rank")) for e in es if verdicts.num(by_epoch[e], "y_rank") is not None]
            axes[3].plot([e for e, _ in pts], [y for _, y in pts], **dict(kw, lw=0.8, alpha=0.7, ls=":"))
            leave = left_collapse(by_epoch)
            if leave is not None:
                for ax in axes:
                    ax.axvline(leave, color=colors[v], lw=0.7, alpha=0.5)
            wd, lr = verdicts.num(by_epoch[es[-1]], "cfg_weight_decay"), verdicts.num(by_epoch[es[-1]], "lr")
            if wd and lr:
                momentum = verdicts.num(by_epoch[es[-1]], "cfg_momentum") or 0.9   # as recovery(): the Config default
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


def escape_figure(rows, slopes, png):
    """Turn and rise steps against lr x wd on log-log axes (the grid; the controls are in the
    table), with the blog's clocks as lines and its rise as a star."""
    fig, ax = plt.subplots(figsize=(5.5, 4.3))
    rows = [r for r in rows if not verdicts.is_control(r)]
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
    p.add_argument("csvs", nargs="*", metavar="CSV", help="result CSVs (default: every results/*.csv)")
    p.add_argument("--out", default=str(Path("runs") / "plots"),
                   help="folder for the figures and CSVs this writes (default runs/plots/; made if missing)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--table", action="store_true", help="print a markdown table per CSV (last epoch, mean ± std)")
    mode.add_argument("--recovery", action="store_true",
                      help="print each CSV's recovery table; for exp_recovery.py CSVs (taken together) also draw "
                           "recovery_<c1|d1|d2>.png, the mechanism figures, and write recovery_fraction.csv into "
                           "--out (the verdicts: python verdicts.py)")
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
    paths = args.csvs or ([] if named else sorted(str(p) for p in Path("results").glob("*.csv")))
    if not paths:
        raise UsageError("no CSV given" + ("" if named else " and none in results/"))
    for path in paths:   # every input checked before anything is written
        if not Path(path).is_file():
            raise UsageError(f"{path} does not exist")
        read_results(path)
        if args.escape_law:
            verdicts.escape_steps_per_epoch(path)
    if args.table:
        for path in paths:
            print(verdicts.table(read_results(path)))
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
    planned = ([out / "recovery_fraction.csv"] if args.recovery else
               [out / f"{Path(x).stem}_depth.png" for x in paths] if args.depth else
               [out / f"{names[x]}_escape{ext}" for x in paths for ext in (".csv", ".png")] if args.escape_law else
               [out / f"{names[x]}{suffix}.png" for x in paths for suffix in ("", "_vs_blog", "_k_parts")])
    clash = [str(x) for x in planned if x.resolve() in inputs]
    if clash:
        raise UsageError(f"--out {out}: would overwrite the input {clash[0]}; choose another --out")
    if args.recovery:
        for path in paths:
            print(verdicts.recovery(path, args.steps_per_epoch))
        runs = verdicts.read_runs(paths)
        recovery_figures(paths, out, args.steps_per_epoch, runs)
        if args.mechanism_epochs:
            runs = {k: {e: r for e, r in by.items() if e <= args.mechanism_epochs} for k, by in runs.items()}
        for family in sorted({v.split("_")[0] for v, _ in runs}):   # c1, d1, ...: one figure each
            mechanism_figure({k: by for k, by in runs.items() if k[0].split("_")[0] == family}, out,
                             f"{names[paths[0]]}_{family}", family=family)
        return
    if args.depth:
        for path in paths:
            print(verdicts.table(read_results(path), columns=DEPTH))
            print(f"figure: {depth_figure(path, out)}")
        return
    if args.escape_law:
        for path in paths:
            rows, slopes = verdicts.escape_law(path, out, names[path])
            escape_figure(rows, slopes, out / f"{names[path]}_escape.png")
        return
    for path in paths:
        plot(path, out, names[path])


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
