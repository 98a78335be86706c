"""Appendix D1: weight decay as a way out of collapse without any BatchNorm.

Finding (blog appendix, Figures 'weight_decay_distance' and 'weight_decay_train_loss'; no BN
anywhere, SGD lr 0.2, STL-10, 320 epochs; SPEC.md section 3):
  - wd 1e-5: positive and negative cosine ~1 from epoch ~2 to ~100 (collapse), the loss falls
    to ~1e-4 by epoch 60, then rises steeply around epochs 90-110 as the network leaves the
    collapsed state; negative cosine ends at ~0.56, probe accuracy 56% at epoch 320.
  - wd 1e-4: "occasionally" some recovery. Lower or higher: no recovery.
Mechanism offered: the collapsed solution relies on a few large weights; decay shrinks them,
output variation returns, the loss rises, learning resumes.

Variants: wd_0, wd_1e-05 (the blog's), wd_0.0001 and wd_0.001 at lr 0.2; and D1 at a quarter of
the lr (0.05, GroupNorm 4 groups): wd_lr0.05 (wd 1.6e-4 on every parameter), wd_lr0.05_conv (on
the encoder's conv weights only) and wd_lr0.05_conv_x10 (wd 1.6e-3 on them).

Expect: every variant collapses within the first epochs; only long runs can show the escape.
Results: results/README.md#d1-weight-decay-no-bn-anywhere (the decay clock: exp_escape_law.py)

    python exp_weight_decay.py --preset steps --seeds 2 --variants wd_1e-05
    python exp_weight_decay.py --preset steps --epochs 130 --seeds 2 --variants wd_lr0.05_conv_x10

Choices where the blog is silent: "without any BN" = GroupNorm encoder (32 groups, one channel
each below 32 channels; the *_gn4 / wd_lr0.05* variants: 4 groups at width 8, the blog's 2-16
channels a group; no weight standardization) and no norm in the MLPs; weight decay on every parameter (as the blog's SGD);
tau 0.996 constant; lr 0.2 in every preset (absolute, not scaled by batch size).
"""
import harness
import presets

PRESETS = presets.APPENDIX_PRESETS   # blog / cifar10: 320 epochs; cpu: first 8 of 320 epochs, 5k images
# steps: 640 epochs = 49,920 steps, past D1's escape (blog: epoch ~100, 41,000 steps at lr 0.2, wd 1e-5)
PRESETS = dict(PRESETS, steps=dict(PRESETS["steps"], epochs=640))

NO_BN = dict(encoder_norm="gn", proj_norm="none", pred_norm="none", lr=0.2)
VARIANTS = {f"wd_{wd:g}": dict(NO_BN, weight_decay=wd) for wd in (0.0, 1e-5, 1e-4, 1e-3)}
# D1 at lr 0.05 (a smaller lr keeps the collapse shallow, at the blog's depth: exp_collapse_depth.py)
# with the blog's channels per GroupNorm group (4 groups at width 8), decay on every parameter as the
# blog's SGD, 4x its decay per step (lr x wd 8e-6 against 2e-6) so that the blog's escape clock
# (0.082) comes within 10,300 steps: results/history/notebook.md, 'Recoveries'
VARIANTS["wd_lr0.05"] = dict(NO_BN, lr=0.05, weight_decay=1.6e-4, gn_groups=4)
# the same with decay on the encoder's conv weights only (scale-invariant under GN), as C1's recovery
VARIANTS["wd_lr0.05_conv"] = dict(VARIANTS["wd_lr0.05"], decay_params="conv")
# ... and at 10x that decay (lr x wd 8e-5, C1's recovery's decay per step), so that the conv
# weights shrink as far as C1's did before it recovered (2.8 e-folds by epoch ~45) within 80 epochs
VARIANTS["wd_lr0.05_conv_x10"] = dict(VARIANTS["wd_lr0.05_conv"], weight_decay=1.6e-3)

BLOG = {"wd_1e-05": "escapes ~epoch 100; 56% at 320", "wd_0.0001": "occasional recovery",
        "wd_0": "no recovery", "wd_0.001": "no recovery"}

if __name__ == "__main__":
    harness.main("weight_decay", __doc__, PRESETS, VARIANTS, BLOG)
