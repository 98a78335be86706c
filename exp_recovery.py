"""Appendix C1, D1 and D2 at the blog's horizon: each recovery beside a healthy reference, with
the quantities its explanation says move.

Finding (blog appendix; SPEC.md section 3): after a collapse (positive and negative cosine ~1),
  C1  BN encoder, SGD, no BN in the MLPs: the probe recovers from epoch ~12-15 and reaches 0.79
      of the BN-MLP run's gain over the untrained encoder by epoch 100 (0.83 at 319)
  D1  GroupNorm encoder, no BN anywhere, SGD wd 1e-5: leaves collapse around epoch 100 (neg. cos
      0.07 at 140, 0.56 at 320; final probe 0.54 of the GN + BN-MLP run's)
  D2  GroupNorm + weight standardization: separates within ~100 epochs, ends at neg. cos 0.22

    variant          encoder   MLP norm  lr    weight decay (on)            the blog's run
    c1               BN        none      0.2   4e-4 (encoder conv weights)  C1
    c1_healthy       BN        BN        0.2   4e-4 (encoder conv weights)  reference for c1
    c1_all_decay     BN        none      0.2   4e-4 (every parameter)       control: decay target
    d1               GN, 4 gr. none      0.05  1.6e-3 (encoder conv weights) D1
    d1_healthy       GN, 4 gr. BN        0.05  1.6e-3 (encoder conv weights) reference for d1
    d1_all_decay     GN, 4 gr. none      0.05  1.6e-3 (every parameter)      control: decay target
    d2               GN + WS   none      0.2   4e-4 (encoder conv weights)  D2
    d2_healthy       GN + WS   BN        0.2   4e-4 (encoder conv weights)  reference for d2
    d2_all_decay     GN + WS   none      0.2   4e-4 (every parameter)       control: decay target

Settings that differ from the blog's (every row): the steps preset (CIFAR-10 at 16 px, 5,000
images, width 8, batch 64), run for 526 epochs = 41,028 steps, the blog's epoch 100 by step
count (the lr and tau cosines run over the blog's 131,200 steps, so lr is at 0.78 of its peak at
the end, as the blog's at its epoch 100); decay on the encoder's conv weights only (the blog's SGD
decays everything: the *_all_decay rows are that, each changing only this one setting); C1 and D2
at the blog's lr per image (0.2 at batch 64 = 0.8 at 256) with its decay per step (lr x wd 8e-5);
D1 at a quarter of that lr with 160x the blog's wd (why: results/README.md, D1). Why the smaller
lrs: exp_collapse_depth.py, the lr as a lever of the collapse's depth.

Criterion, judged per seed: results/README.md, 'How a verdict is judged'.

Logged once an epoch beside the blog's instruments (instruments.py): for the stem conv and each
encoder stage, the conv weights' mean norm |w|, mean 1/|w|^2 (x lr = the effective lr of a
scale-invariant weight) and mean angle per step; the effective rank of z and of the encoder's
eval-mode features y. Spherical motion dynamics (Wan et al. 2021) puts the angle at
sqrt(2 lr wd / (1 + momentum)) at equilibrium under decay: 0.0092 for all three at the peak lr
(lr x wd is 8e-5 in each), 0.0081 at the lr scheduled for epoch 526.

Expect: every variant but the healthy ones collapses within ~10 epochs, then may leave it.
Results: results/README.md#c1-bn-encoder-no-mlp-bn-sgd, #d1-weight-decay-no-bn-anywhere and
#d2-weight-standardization

    python exp_recovery.py --preset steps --variants c1,c1_healthy --seeds 2
"""
import harness
import presets
from instruments import COLUMNS, TRACK

PRESETS = presets.APPENDIX_PRESETS   # blog / cifar10: 320 epochs
# steps: 526 epochs = 41,028 steps, the blog's epoch 100 (41,000 steps at batch 256 on 105k images)
PRESETS = dict(PRESETS, steps=dict(PRESETS["steps"], epochs=526))

NO_MLP_BN = dict(proj_norm="none", pred_norm="none")
C1 = dict(TRACK, **NO_MLP_BN, encoder_norm="bn", lr=0.2, weight_decay=4e-4, decay_params="conv")
D1 = dict(TRACK, **NO_MLP_BN, encoder_norm="gn", gn_groups=4, lr=0.05, weight_decay=1.6e-3, decay_params="conv")
D2 = dict(TRACK, **NO_MLP_BN, encoder_norm="gn_ws", gn_groups=4, lr=0.2, weight_decay=4e-4, decay_params="conv")
VARIANTS = {}
for name, base in (("c1", C1), ("d1", D1), ("d2", D2)):
    VARIANTS[name] = base
    VARIANTS[f"{name}_healthy"] = dict(base, proj_norm="bn", pred_norm="bn")   # the only change: BN in both MLPs
    VARIANTS[f"{name}_all_decay"] = dict(base, decay_params="all")   # the only change: the blog's decay target

BLOG = {"c1": "recovered fraction 0.79 at ep 100", "d1": "neg cos 0.07 at ep 140, 0.56 at 320",
        "d2": "neg cos 0.22 at ep 320"}

if __name__ == "__main__":
    harness.main("recovery", __doc__, PRESETS, VARIANTS, BLOG, extra_columns=COLUMNS)
