"""Beyond the blog: the decay clock of D1's collapsed loss (a clock, not an escape).

Question: in D1 (GroupNorm encoder, no norm in the MLPs, SGD) the blog's network leaves collapse
after weight decay has shrunk its weights for long enough (the blog: the collapsed mode relies on
a few large weights; decay shrinks them, the loss rises, learning resumes). SGD's decay shrinks
every weight by lr x wd a step, by lr x wd / (1 - momentum) once momentum has built up, so if
decay alone sets when the collapsed loss rises, the rise comes after a number of steps
proportional to (1 - momentum) / (lr x wd): slope -1 against lr x wd on log-log axes, the same
step for any lr at a fixed product, and twice the steps at momentum 0.8. The blog has one point
(lr 0.2, wd 1e-5; SPEC.md section 3, figure 'weight_decay_train_loss'): the loss is lowest near
epoch 60 and rises steeply around epochs 90-110 of 410 steps, i.e. lr x wd x steps = 0.049 and
~0.082.

What this measures, on the steps preset: the clock of a rise of the loss, which in every run here
stays a collapsed rise (negative cosine >= 0.999 throughout, probe at or below the untrained
encoder; results/history/notebook.md, 'The decay clock'). It is not an escape of the representation.

Grid: lr x wd in {2e-4, 1e-4, 5e-5, 2.5e-5}, each product once at lr 0.2 and once at lr 0.1, on the
steps preset (the blog's step schedule). Each run lasts until lr x wd x steps = 0.25, three times
the blog's escape (rounded up to whole epochs). wd here is 12-80x the blog's 1e-5, so that a run
takes minutes; the blog's own point is exp_weight_decay.py --preset steps (wd_1e-05, 640 epochs).

Controls (CONTROLS, outside the grid and its fit): momentum 0.8 against 0.9 at lr 0.2 / wd 5e-4,
and lr 0.025 / wd 4e-3 (8x lower lr than lr0.2_wd0.0005 at the same lr x wd). Each runs to 2.5
e-folds of decay (lr x wd x steps / (1 - momentum)), as the grid does at momentum 0.9.

Rise, read off the per-epoch training loss (the signal of the blog's D1 figure), from the first
epoch at which the run is collapsed (negative cosine >= 0.999):
  rise   the first epoch whose loss is more than RISE (3) times the lowest loss before it
  turn   the epoch of that lowest loss: where the decay starts to win
Steps are counted to the end of the epoch (78 steps each: the resolution), and decay = wd x the sum
of the scheduled lr over those steps. The cosines are not used: at these decays the network
can burst out of collapse and fall back with the negative cosine staying above 0.999
(results/README.md). A run with no rise is censored: shown with its length, left out of the fit.
The fit is least squares of log10(step) on log10(lr x wd) over the runs that rise; the slope's
uncertainty is its standard error.

    python exp_escape_law.py --preset steps --seeds 2     # ~2 h on 2 cores; table, CSV and figure
    python exp_escape_law.py --analyze results/steps/law/escape_law_steps.csv   # no training

Writes <out>/escape_law_<preset>.csv (per epoch, as every script), then
<out>/escape_law_<preset>_escape.csv (one row per run) and <out>/escape_law_<preset>_escape.png.
Choices: the D1 network of exp_weight_decay.py (GN encoder, 32 groups, no MLP norm, decay on
every parameter, tau 0.996 constant); RISE = 3 and the collapse threshold 0.999 were set before
the runs, from two exploratory runs (wd 1e-3 and 3e-4 at lr 0.2), and are not tuned.
"""
import argparse
import csv
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np

import common
import harness

RISE = 3.0          # a loss this many times its lowest value so far counts as the escape
COLLAPSED = 0.999   # negative cosine at or above this: collapsed
CLOCK = 0.25        # each run lasts until lr x wd x steps reaches this (the blog's escape: ~0.082)
PRODUCTS = (2e-4, 1e-4, 5e-5, 2.5e-5)   # lr x wd
LRS = (0.2, 0.1)
D1 = dict(encoder_norm="gn", proj_norm="none", pred_norm="none", eval_every=10)
VARIANTS = {f"lr{lr:g}_wd{p / lr:.3g}": dict(D1, lr=lr, weight_decay=float(f"{p / lr:.3g}")) for p in PRODUCTS
            for lr in LRS}
# Two controls that passive decay would fail, outside the grid and its fit (--variants names them):
# momentum 0.8 instead of 0.9 (decay alone: e-folds lr x wd x steps / (1 - momentum), so the rise
# comes after 2x the steps), and lr 8x lower than lr0.2_wd0.0005 at the same lr x wd (decay alone:
# the same step)
CONTROLS = {"ctl_m0.8_lr0.2_wd0.0005": dict(D1, lr=0.2, weight_decay=5e-4, momentum=0.8),
            "ctl_lr0.025_wd0.004": dict(D1, lr=0.025, weight_decay=4e-3)}
BLOG = {}   # the blog has one point, lr 0.2 / wd 1e-5: rise near 41,000 steps (epoch ~100)


def epochs_for(cfg, steps_per_epoch=78):
    """Epochs until lr x wd x steps reaches CLOCK (the nominal lr; the cosine has barely moved),
    in e-folds of the decay: at momentum 0.8 twice as long as at 0.9."""
    efolds = CLOCK / (1 - 0.9) * (1 - cfg.get("momentum", 0.9))
    return math.ceil(efolds / (cfg["lr"] * cfg["weight_decay"]) / steps_per_epoch)


# steps: each variant's own length is set by --epochs per run in run_all; the preset's value is the
# longest (lr x wd = 2.5e-5: 128 epochs)
PRESETS = dict(common.APPENDIX_PRESETS)
PRESETS["steps"] = dict(PRESETS["steps"], epochs=max(epochs_for(v) for v in VARIANTS.values()))


def escape(rows):
    """(turn epoch, rise epoch) of one run's rows (sorted by epoch), None where absent."""
    losses = [(int(r["epoch"]), float(r["loss"])) for r in rows if r["loss"] not in ("", None)]
    start = next((int(r["epoch"]) for r in rows if r["neg_cos"] not in ("", None)
                  and float(r["neg_cos"]) >= COLLAPSED), None)
    if start is None:
        return None, None
    low, turn = math.inf, None
    for epoch, loss in losses:
        if epoch < start:
            continue
        if loss > RISE * low:
            return turn, epoch
        if loss < low:
            low, turn = loss, epoch
    return None, None


def preset_config(csv_path):
    """The Config of the preset a CSV was made with (its name: escape_law_<preset>.csv)."""
    preset = Path(csv_path).stem.removeprefix("escape_law_")
    if preset == "smoke":
        return common.Config(**{**PRESETS["cpu"], **harness.SMOKE})
    if preset not in PRESETS:
        raise harness.UsageError(f"{csv_path}: not an escape_law_<preset>.csv of this script")
    return common.Config(**PRESETS[preset])


def steps_per_epoch(cfg):
    n = cfg.train_subset or {"cifar10": 50000, "stl10": 105000, "synthetic": 512}[cfg.dataset]
    return n // cfg.batch_size   # drop_last, as train_byol


def decay_at(cfg, steps):
    """wd x the scheduled lr summed over the first `steps` steps: how far the decay has acted."""
    return cfg.weight_decay * sum(common.lr_at(s, steps_per_epoch(cfg), cfg) for s in range(steps))


def analyze(csv_path):
    """One row per finished run: lr, wd, lr x wd, and its turn and rise (epoch, step, decay)."""
    base = preset_config(csv_path)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"cfg_lr", "cfg_weight_decay", "neg_cos"} <= rows[0].keys():
        raise harness.UsageError(f"{csv_path}: not a results CSV of exp_escape_law.py")
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
            steps = epoch * steps_per_epoch(cfg) if epoch is not None else None
            row.update({f"{key}_epoch": epoch, f"{key}_step": steps,
                        f"{key}_decay": round(decay_at(cfg, steps), 4) if steps else None})
        out.append(row)
    return out


def fit(rows, key):
    """(slope, standard error, n) of log10(step) on log10(lr x wd) over runs that escaped."""
    pts = [(math.log10(r["lr_wd"]), math.log10(r[f"{key}_step"])) for r in rows
           if r[f"{key}_step"] and r.get("variant") not in CONTROLS]   # the grid: not the controls
    if len({x for x, _ in pts}) < 2:
        return None, None, len(pts)
    x, y = np.array(pts).T
    (slope, _), cov = np.polyfit(x, y, 1, cov=True) if len(pts) > 2 else (np.polyfit(x, y, 1), None)
    return slope, (math.sqrt(cov[0, 0]) if cov is not None else None), len(pts)


def report(csv_path):
    if not Path(csv_path).is_file():
        raise harness.UsageError(f"{csv_path}: no such file")
    rows = analyze(csv_path)
    if not rows:
        raise harness.UsageError(f"{csv_path}: no runs to analyze")
    print(f"\nescape from collapse (rise: loss > {RISE:g}x its lowest so far; turn: that lowest epoch), "
          f"{steps_per_epoch(preset_config(csv_path))} steps an epoch; blog (lr 0.2, wd 1e-5): turn ~24,600 steps (0.049), rise ~41,000 (0.082)")
    print(f"{'variant':<18}{'seed':>5}{'lr x wd':>10}{'turn step':>11}{'decay':>8}{'rise step':>11}{'decay':>8}")
    for r in rows:
        def show(key):
            return (f"{r[key + '_step']:>11}{r[key + '_decay']:>8.3f}" if r[key + "_step"]
                    else f"{'none':>11}{'-':>8}")
        print(f"{r['variant']:<18}{r['seed']:>5}{r['lr_wd']:>10.2g}{show('turn')}{show('rise')}")
    slopes = {}
    for key in ("turn", "rise"):
        slope, se, n = fit(rows, key)
        slopes[key] = (slope, se)
        text = "too few runs escaped to fit" if slope is None else f"{slope:.2f}" + (f" +- {se:.2f}" if se else "")
        print(f"log-log slope of the {key} step against lr x wd ({n} runs): {text}  (decay alone: -1)")
    path = Path(csv_path)
    out = path.with_name(path.stem + "_escape.csv")
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"-> {out}")
    figure(rows, slopes, path.with_name(path.stem + "_escape.png"))
    return rows, slopes


def figure(rows, slopes, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4.3))
    rows = [r for r in rows if r.get("variant") not in CONTROLS]   # the grid (the controls are in the table)
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
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"-> {png}")


def run_all(argv):
    """Each variant with its own length (epochs_for), unless --epochs is given."""
    probe = harness.get_parser(__doc__, PRESETS, VARIANTS).parse_args(argv)
    names = [v for v in probe.variants.split(",") if v] or list(VARIANTS)
    every = {**VARIANTS, **CONTROLS}
    # one plain run: a fixed length, another preset, or an unknown name (main's one-line error
    # before any training)
    if (probe.epochs is not None or probe.smoke or (probe.preset or "") != "steps"
            or any(name not in every for name in names)):
        return harness.main("escape_law", __doc__, PRESETS, VARIANTS, BLOG, argv=argv, extra_variants=CONTROLS)
    path = None
    for name in names:
        path = harness.main("escape_law", __doc__, PRESETS, VARIANTS, BLOG, extra_variants=CONTROLS,
                            argv=[*argv, "--variants", name, "--epochs", str(epochs_for(every[name]))])
    return path


if __name__ == "__main__":
    if "--analyze" in sys.argv:
        p = argparse.ArgumentParser(description="escape steps and the fitted slope of a finished escape_law CSV")
        p.add_argument("--analyze", required=True, metavar="CSV")
        csv_path = p.parse_args().analyze
    else:
        csv_path = run_all(sys.argv[1:])
    try:
        report(csv_path)
    except harness.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
