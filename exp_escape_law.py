"""Beyond the blog: the decay clock of D1's collapsed loss (a clock, not an escape).

Finding under test: in D1 (GroupNorm encoder, no norm in the MLPs, SGD) the blog's network leaves
collapse once weight decay has shrunk its weights for long enough. SGD's decay shrinks every
weight by lr x wd a step (lr x wd / (1 - momentum) once momentum has built up), so if decay alone
sets when the collapsed loss rises, the rise comes after a number of steps proportional to
(1 - momentum) / (lr x wd): slope -1 against lr x wd on log-log axes, the same step for any lr at a
fixed product, twice the steps at momentum 0.8. The blog has one point (lr 0.2, wd 1e-5; SPEC.md
section 3, figure 'weight_decay_train_loss').

Variants (the D1 network of exp_weight_decay.py: GN encoder, 32 groups, no MLP norm, decay on
every parameter, tau 0.996 constant), on the steps preset (the blog's step schedule):
  lr<lr>_wd<wd>            lr x wd in PRODUCTS, each once at lr 0.2 and once at lr 0.1; each runs
                           until lr x wd x steps = CLOCK (0.25, three times the blog's escape)
  ctl_m0.8_lr0.2_wd0.0005  control: momentum 0.8 (decay alone: the rise after 2x the steps)
  ctl_lr0.025_wd0.004      control: 8x lower lr than lr0.2_wd0.0005 at the same lr x wd (decay
                           alone: the same step); the controls run to 2.5 e-folds of decay, as the
                           grid at momentum 0.9, and are named with --variants

    python exp_escape_law.py --preset steps --seeds 2          # each variant its own length
    python plot_results.py --escape-law results/steps/law/escape_law_steps.csv --out results/steps/law

Expect: every run collapses; the loss then rises at a decay clock (lr x wd x steps) that
plot_results.py reads off (turn, rise, log-log slope; the definitions are there).
Results: results/README.md#beyond-the-blog
"""
import math
import sys

import harness
import presets

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
PRESETS = dict(presets.APPENDIX_PRESETS)
PRESETS["steps"] = dict(PRESETS["steps"], epochs=max(epochs_for(v) for v in VARIANTS.values()))


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
    run_all(sys.argv[1:])
