"""Appendix C2 and D2: a GroupNorm encoder, i.e. no BatchNorm unless it is in the MLPs.

Finding (blog appendix, Figure 'accuracy_resnet_group_norm'; ResNet-18 with GroupNorm, STL-10,
320 epochs; probe accuracy read off the figure, SPEC.md section 3):

    variant            encoder   MLP norm  optimizer        blog: epoch 10 -> 319
    sgd_no_mlp_bn      GN        none      SGD               33.7 -> 17.7   collapses for good
    lars_lr0.1         GN        none      LARS lr 0.1        9.6 ->  9.5   collapses at once
    lars_lr0.2         GN        none      LARS lr 0.2       41.6 -> 70.6   recovers
    sgd_mlp_bn         GN        BN        SGD               53.7 -> 75.1   control: no collapse
    ws_sgd_no_mlp_bn   GN + WS   none      SGD               (D2) separates within ~100 epochs,
                                                             keeps re-collapsing; final 51%

For the steps preset, GroupNorm with 4 groups at the blog's lr per image (a quarter of its lr):
  lars_lr0.05 / lars_lr0.025   C2: the blog's LARS lr 0.2 / 0.1 at a quarter (60 epochs; and 526 = 41,028 steps)
  lars_lr0.05_healthy, ...     their healthy references for C2's recovered fraction (BN in both MLPs)
  ws_sgd_lr0.2_conv            D2: SGD lr 0.2, wd 4e-4 on the WS convs only
  ws_sgd_lr0.2                 the same with decay on every parameter

Expect: without MLP BN, SGD collapses (both cosines ~1) while the BN-MLP control does not.
Results: results/README.md#c2-groupnorm-encoder and #d2-weight-standardization

    python exp_encoder_gn.py --preset steps --seeds 2 --epochs 60 --variants lars_lr0.05,lars_lr0.025
    python exp_encoder_gn.py --preset steps --seeds 2 --epochs 526 --variants lars_lr0.05,lars_lr0.05_healthy
    python exp_encoder_gn.py --preset steps --seeds 2 --epochs 130 --variants ws_sgd_lr0.2_conv,ws_sgd_lr0.2

Choices where the blog is silent (SPEC.md section 7): GroupNorm with 32 groups (one per channel
below 32 channels, so at the steps preset's width 8 layers 1-3 are InstanceNorm; lars_lr0.05,
lars_lr0.025 and ws_sgd_lr0.2 use 4 groups, the blog's 2-16 channels a group) and no weight
standardization except in the ws_* variants; SGD runs use the
Table 1 SGD settings (lr 0.8, wd 1e-4 on all params; ws_sgd_lr0.2: lr 0.2, wd 4e-4); LARS runs use the BYOL paper's settings
(presets.LARS_BYOL: trust 1e-3, wd 1.5e-6 off biases/norms, tau 0.996 -> 1 cosine) in the blog's
LARS form (its lars.py: trust = eta |w| / (|g| + wd |w|), lr inside the momentum; common.LARS
has DeepMind's form too, for a subclass's configure_optimizer), no warmup (the blog's LARS code had none in effect) and the lr
named. The probe is the blog's (sklearn liblinear on raw features, common.fit_liblinear); the
standardized fit is logged beside it (probe_standardized). The lr values are absolute, not
scaled by batch size, in every preset.
"""
import harness
import presets

PRESETS = presets.APPENDIX_PRESETS   # blog / cifar10: 320 epochs; cpu: first 8 of 320 epochs, 5k images
# steps: 160 epochs = 12,480 steps, past D2's first separation (blog: epoch ~20, 8,200 steps); C2's
# LARS runs part by blog epoch 10 (4,100 steps), which --epochs 60 (4,680 steps) passes
PRESETS = dict(PRESETS, steps=dict(PRESETS["steps"], epochs=160))

NO_MLP_BN = dict(encoder_norm="gn", proj_norm="none", pred_norm="none")
VARIANTS = {
    "sgd_no_mlp_bn": dict(NO_MLP_BN),
    "lars_lr0.1": dict(NO_MLP_BN, **presets.LARS_BYOL, lr=0.1),
    "lars_lr0.2": dict(NO_MLP_BN, **presets.LARS_BYOL, lr=0.2),
    "sgd_mlp_bn": dict(encoder_norm="gn"),
    "ws_sgd_no_mlp_bn": dict(NO_MLP_BN, encoder_norm="gn_ws"),
}
# The same at a 4x smaller lr (the blog's lr per image at batch 64; a smaller lr keeps the collapse
# shallow, at the blog's depth: exp_collapse_depth.py; SGD: wd x 4 keeps the decay per step) and
# the blog's channels per group (4 groups at width 8: 2-16
# channels each, where 32 groups are one channel each in layers 1-3): results/history/notebook.md, 'Recoveries'
GN4 = dict(NO_MLP_BN, gn_groups=4)
VARIANTS.update({"lars_lr0.025": dict(GN4, **presets.LARS_BYOL, lr=0.025),
                 "lars_lr0.05": dict(GN4, **presets.LARS_BYOL, lr=0.05),
                 "ws_sgd_lr0.2": dict(GN4, encoder_norm="gn_ws", lr=0.2, weight_decay=4e-4),
                 # WS convs are scale-invariant by construction: decay on them alone, as the C1 and
                 # D1 runs that left collapse (exp_lars.py bn_sgd_no_mlp_bn_conv_wd, lr x wd = 8e-5)
                 "ws_sgd_lr0.2_conv": dict(GN4, encoder_norm="gn_ws", lr=0.2, weight_decay=4e-4,
                                           decay_params="conv")})
# The blog's code can build only one GroupNorm ResNet, ws_resnet18: GN and weight standardization
# (docs/SPEC.md, C2), at the blog's lr and at a quarter of it; and plain GN with the blog's default
# LARS list (every parameter adapted and decayed: its exclude list is empty)
for lr in ("0.025", "0.05", "0.1", "0.2"):
    VARIANTS[f"ws_lars_lr{lr}"] = dict(GN4, encoder_norm="gn_ws", **presets.LARS_BYOL, lr=float(lr))
for lr in ("0.1", "0.2"):
    VARIANTS[f"every_lars_lr{lr}"] = dict(GN4, **presets.LARS_BYOL, lr=float(lr), lars_params="every")
for name in ["lars_lr0.025", "lars_lr0.05"] + [n for n in VARIANTS if n.startswith(("ws_lars", "every_lars"))]:
    # C2's healthy references: the only change, BN in both MLPs
    VARIANTS[f"{name}_healthy"] = dict(VARIANTS[name], proj_norm="bn", pred_norm="bn")

BLOG = {"sgd_no_mlp_bn": "33.7 -> 17.7 (ep 10 -> 319)", "lars_lr0.1": "9.6 -> 9.5",
        "lars_lr0.2": "41.6 -> 70.6", "sgd_mlp_bn": "53.7 -> 75.1", "ws_sgd_no_mlp_bn": "final 51"}

if __name__ == "__main__":
    harness.main("encoder_gn", __doc__, PRESETS, VARIANTS, BLOG)
