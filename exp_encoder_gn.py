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

Expect at any scale: without MLP BN, SGD collapses (positive and negative cosine ~1) while
the BN-MLP control does not. The recoveries (LARS lr 0.2 over tens of epochs, WS around epoch
100) need the long blog/cifar10 presets; the cpu preset shows the first epochs only. On the steps
preset (results/history/notebook.md, 'The appendix's recoveries at a shallow collapse'; 2 seeds each):
  lars_lr0.05 / lars_lr0.025  (the blog's 0.2 / 0.1 at a quarter, 60 epochs) the larger lr never
                              collapses and learns (probe +7.7 / +6.7); the smaller lags, and one
                              seed collapses and recovers: the blog's lr 0.1 stays collapsed
  ws_sgd_lr0.2_conv           (D2, 130 epochs) collapses (neg. cos 0.9997), then separates: neg.
                              cos <= 0.9 from epoch 113 / 83, probe 14.1 -> 30.5, 15.3 -> 31.6
  ws_sgd_lr0.2, ws_sgd_no_mlp_bn  decay on every parameter: the collapse deepens (ws_sgd_lr0.2:
                              z_std 5e-9 at epoch 130) and the blog's probe falls to chance
                              (ws_sgd_lr0.2's standardized probe still reads 25.5 / 25.4)

Choices where the blog is silent (SPEC.md section 7): GroupNorm with 32 groups (one per channel
below 32 channels, so at the steps preset's width 8 layers 1-3 are InstanceNorm; lars_lr0.05,
lars_lr0.025 and ws_sgd_lr0.2 use 4 groups, the blog's 2-16 channels a group) and no weight
standardization except in the ws_* variants; SGD runs use the
Table 1 SGD settings (lr 0.8, wd 1e-4 on all params; ws_sgd_lr0.2: lr 0.2, wd 4e-4); LARS runs use the BYOL paper's settings
(common.LARS_BYOL: trust 1e-3, wd 1.5e-6 off biases/norms, tau 0.996 -> 1 cosine) in the blog's
LARS form (its lars.py: trust = eta |w| / (|g| + wd |w|), lr inside the momentum; --set
lars_form=byol gives DeepMind's), no warmup (the blog's LARS code had none in effect) and the lr
named. The probe is the blog's (sklearn liblinear on raw features, common.fit_liblinear); the
standardized fit is logged beside it (probe_standardized). The lr values are absolute, not
scaled by batch size, in every preset.
"""
import common
import harness

PRESETS = common.APPENDIX_PRESETS   # blog / cifar10: 320 epochs; cpu: first 8 of 320 epochs, 5k images
# steps: 160 epochs = 12,480 steps, past D2's first separation (blog: epoch ~20, 8,200 steps); C2's
# LARS runs part by blog epoch 10 (4,100 steps), which --epochs 60 (4,680 steps) passes
PRESETS = dict(PRESETS, steps=dict(PRESETS["steps"], epochs=160))

NO_MLP_BN = dict(encoder_norm="gn", proj_norm="none", pred_norm="none")
VARIANTS = {
    "sgd_no_mlp_bn": dict(NO_MLP_BN),
    "lars_lr0.1": dict(NO_MLP_BN, **common.LARS_BYOL, lr=0.1),
    "lars_lr0.2": dict(NO_MLP_BN, **common.LARS_BYOL, lr=0.2),
    "sgd_mlp_bn": dict(encoder_norm="gn"),
    "ws_sgd_no_mlp_bn": dict(NO_MLP_BN, encoder_norm="gn_ws"),
}
# The same at a 4x smaller lr (the blog's lr per image at batch 64; a smaller lr keeps the collapse
# shallow, at the blog's depth: exp_collapse_depth.py; SGD: wd x 4 keeps the decay per step) and
# the blog's channels per group (4 groups at width 8: 2-16
# channels each, where 32 groups are one channel each in layers 1-3): results/history/notebook.md, 'Recoveries'
GN4 = dict(NO_MLP_BN, gn_groups=4)
VARIANTS.update({"lars_lr0.025": dict(GN4, **common.LARS_BYOL, lr=0.025),
                 "lars_lr0.05": dict(GN4, **common.LARS_BYOL, lr=0.05),
                 "ws_sgd_lr0.2": dict(GN4, encoder_norm="gn_ws", lr=0.2, weight_decay=4e-4),
                 # WS convs are scale-invariant by construction: decay on them alone, as the C1 and
                 # D1 runs that left collapse (exp_lars.py bn_sgd_no_mlp_bn_conv_wd, lr x wd = 8e-5)
                 "ws_sgd_lr0.2_conv": dict(GN4, encoder_norm="gn_ws", lr=0.2, weight_decay=4e-4,
                                           decay_params="conv")})

BLOG = {"sgd_no_mlp_bn": "33.7 -> 17.7 (ep 10 -> 319)", "lars_lr0.1": "9.6 -> 9.5",
        "lars_lr0.2": "41.6 -> 70.6", "sgd_mlp_bn": "53.7 -> 75.1", "ws_sgd_no_mlp_bn": "final 51"}

if __name__ == "__main__":
    harness.main("encoder_gn", __doc__, PRESETS, VARIANTS, BLOG)
