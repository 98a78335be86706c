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
    python plot_results.py --recovery results/steps/lars_steps.csv [--steps-per-epoch 78]
            # markdown: per run, how far it went (steps, lr x wd x steps) and whether it recovered;
            # for exp_recovery.py CSVs also <out>/recovery_<c1|d1|d2>.png and recovery_fraction.csv;
            # with the conv-weight columns also <out>/<name>_<c1|d1|d2>_mechanism.png
    python plot_results.py --depth results/steps/depth/collapse_depth_steps.csv
            # markdown and figure: each lever's last-epoch loss, gaps and z_std

Uses matplotlib (plots are the one place a library clearly beats hand-written code).
"""
import argparse
import csv
import os
import sys
from collections import defaultdict
from statistics import mean, stdev
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402


class UsageError(ValueError):
    """Bad input: one 'error:' line and exit code 2."""


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


def save(fig, path):
    """Writes the PNG through a temporary file, so a failure midway leaves the old one whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
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

BLOG_STEPS = 131_200   # the blog's schedule: 320 epochs x 410 steps (105k STL-10 images, batch 256)
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
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in NEEDED if c not in (reader.fieldnames or [])]
            if missing:
                raise UsageError(f"{path} is not a results CSV (no column {', '.join(missing)})")
            for r in reader:
                if None in r.values():   # a torn line
                    continue
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
        path = Path(out_dir) / "recovery_fraction.csv"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FRACTION_COLUMNS)
            w.writeheader()
            w.writerows({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
                        for r in fractions)
        os.replace(tmp, path)
        print(f"wrote {path}")
        written.append(path)
    return written


COLLAPSE, HELD_COS, FRACTION_MIN, TAIL = 0.999, 0.9, 0.5, 0.2   # the criterion (results/README.md)


def recovery_verdicts(runs, steps_per_epoch):
    """Markdown: each c1/d1/d2 run (controls included) judged by the criterion fixed before the
    41k-step runs (results/README.md, 'How a verdict is judged'), in every seed through the end of
    its run. A collapse first (negative cosine >= 0.999 at some epoch); then for c1 (the blog shows
    accuracy) the recovered fraction against the healthy run at the same epoch is >= 0.5 at the last
    evaluation and no lower there than at the first evaluation of the last 20% of the run; for d1
    and d2 (the blog shows cosines) the negative cosine stays <= 0.9 at every epoch of the last 20%
    and the probe ends >= 5 points above the untrained encoder."""
    fractions = defaultdict(dict)
    for r in recovered_fractions(runs, steps_per_epoch):
        if r["recovered_fraction"] is not None:
            fractions[(r["variant"], r["seed"])][r["epoch"]] = r["recovered_fraction"]
    out = ["| run | seed | steps (of the blog's 131,200) | collapsed at | last 20%: highest neg. cos | "
           "probe: untrained -> last | recovered fraction: start of last 20% -> last | meets the criterion |",
           "|---" * 8 + "|"]
    for (v, seed), by_epoch in sorted(runs.items()):
        family = v.split("_")[0]
        if family not in FAMILIES or v == f"{family}_healthy":
            continue
        end = max(by_epoch)
        neg = [(e, num(by_epoch[e], "neg_cos")) for e in sorted(by_epoch) if num(by_epoch[e], "neg_cos") is not None]
        start = next((e for e, c in neg if c >= COLLAPSE), None)
        tail_neg = max((c for e, c in neg if e >= (1 - TAIL) * end), default=None)
        probes = [(e, num(by_epoch[e], "probe_acc")) for e in sorted(by_epoch) if num(by_epoch[e], "probe_acc") is not None]
        untrained, last = probes[0][1], probes[-1][1]
        fr = sorted((e, f) for e, f in fractions[(v, seed)].items())
        fr_tail = [(e, f) for e, f in fr if e >= (1 - TAIL) * end]
        if start is None:
            ok = "no (never collapsed)"
        elif family == "c1":
            ok = ("no healthy reference" if not fr_tail else
                  "yes" if fr_tail[-1][1] >= FRACTION_MIN and fr_tail[-1][1] >= fr_tail[0][1] else "no")
        else:
            ok = "yes" if tail_neg <= HELD_COS and last - untrained >= RISE else "no"
        frac = f"{fr_tail[0][1]:.2f} -> {fr_tail[-1][1]:.2f}" if fr_tail else "-"
        steps = end * steps_per_epoch
        out.append(f"| {v} | {seed} | {steps:,} ({steps / BLOG_STEPS:.0%}) | {start if start is not None else 'never'} | "
                   f"{tail_neg:.4f} | {untrained:.1f} -> {last:.1f} ({last - untrained:+.1f}) | {frac} | {ok} |")
    return "\n".join(out)


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


# ==================================================================================== CLI

class OneLineParser(argparse.ArgumentParser):
    """argparse, but bad input is one 'error:' line (exit 2) as everywhere else, not the usage."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def get_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", nargs="*", metavar="CSV", help="result CSVs (default: every results/*.csv)")
    p.add_argument("--out", default=str(Path("runs") / "plots"),
                   help="folder for the figures and recovery_fraction.csv (default runs/plots/; made if missing)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--table", action="store_true", help="print a markdown table per CSV (last epoch, mean ± std)")
    mode.add_argument("--recovery", action="store_true",
                      help="print each CSV's recovery table; for exp_recovery.py CSVs (taken together) also draw "
                           "recovery_<c1|d1|d2>.png and write recovery_fraction.csv into --out")
    mode.add_argument("--depth", action="store_true", help="a collapse_depth CSV: its table and <stem>_depth.png")
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
    paths = args.csvs or ([] if args.table or args.recovery or args.depth
                          else sorted(str(p) for p in Path("results").glob("*.csv")))
    if not paths:
        raise UsageError("no CSV given" + ("" if args.table or args.recovery or args.depth else " and none in results/"))
    for path in paths:   # every input checked before anything is written
        if not Path(path).is_file():
            raise UsageError(f"{path} does not exist")
        read_results(path)
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
    planned = ([out / "recovery_fraction.csv"] if args.recovery else
               [out / f"{Path(x).stem}_depth.png" for x in paths] if args.depth else
               [out / f"{names[x]}{suffix}.png" for x in paths for suffix in ("", "_vs_blog", "_k_parts")])
    clash = [str(x) for x in planned if x.resolve() in inputs]
    if clash:
        raise UsageError(f"--out {out}: would overwrite the input {clash[0]}; choose another --out")
    if args.recovery:
        for path in paths:
            print(recovery(path, args.steps_per_epoch))
        runs = read_runs(paths)
        recovery_figures(paths, out, args.steps_per_epoch, runs)
        print(recovery_verdicts(runs, args.steps_per_epoch))
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
    for path in paths:
        plot(path, out, names[path])


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
