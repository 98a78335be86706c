"""Appendix C1 and D3: LARS, with a BN encoder and where it matters without BN.

C1, encoder with BN (blog appendix, Figure 'accuracy_resnet_batch_norm'; STL-10, 320 epochs;
probe accuracy read off the figure):
    bn_sgd_no_mlp_bn    SGD, no BN in the MLPs     30.1 at epoch 10 (collapsed), 72.1 at 319
    bn_lars_no_mlp_bn   LARS (BYOL paper), no BN   47.6 at epoch 10 (no collapse), 76.7 at 319
    bn_sgd_mlp_bn       SGD, BN in the MLPs        54.6 at epoch 10, 81.4 at 319 (control)
D3, GroupNorm encoder, no BN anywhere (Figures 'lars_layer12_*', 'lars_mlp_*', 'lars_lr',
'lars_loss'):
    gn_lars_layer12     LARS on encoder layer1 + layer2 only (SGD elsewhere): the LARS lr of
                        layer1 peaks ~79 near epoch 6 as gradients vanish under collapse, which
                        knocks the network out of it; the negative cosine falls to ~0.40
    gn_lars_mlp         LARS on the projector and predictor only: briefly disrupts collapse,
                        then collapses again
    gn_lars_lr0.5       LARS everywhere, base lr 0.5: layer1's LARS lr peaks at epoch 2, then
                        the network learns
    gn_lars_lr0.1       LARS everywhere, base lr 0.1: the peak comes at epoch 9, no recovery
The CSV logs the effective LARS lr (lr x trust ratio, last step of each epoch) of encoder conv1,
the first conv of each encoder stage and both layers of the projector and predictor.

For the steps preset (130 epochs unless --epochs), at the blog's lr per image (a quarter of its lr):
  bn_sgd_no_mlp_bn_conv_wd     C1 at lr 0.2, wd 4e-4 on the encoder's conv weights only
  bn_sgd_no_mlp_bn_wd_weights  the same with every weight matrix decaying (not biases, BN gains)
  bn_sgd_no_mlp_bn_lr0.2       the same with decay on every parameter
  gn4_lars_layer12, gn4_lars_mlp, gn4_lars_lr0.125   D3 at a quarter of the lr (0.05; 0.125 for
                               the blog's 0.5), GroupNorm with 4 groups

Expect: SGD without MLP BN collapses early where LARS does not; without BN, layer1's LARS lr climbs.
Results: results/README.md#c1-bn-encoder-no-mlp-bn-sgd and #d3-lars-without-bn

    python exp_lars.py --preset cpu --seeds 2
    python exp_lars.py --preset steps --epochs 60 --seeds 2 --variants gn4_lars_layer12,gn4_lars_mlp,gn4_lars_lr0.125

Choices where the blog is silent (SPEC.md section 7): LARS = presets.LARS_BYOL (trust 1e-3,
wd 1.5e-6 off biases/norms, tau 0.996 -> 1 cosine) in the blog's form (its lars.py: trust =
eta |w| / (|g| + wd |w|), the formula the appendix quotes, with lr inside the momentum;
common.LARS's form="byol" is DeepMind's eta |w| / |g + wd w|), no warmup (as the blog's LARS code in
effect), lr 0.2 unless named; in the partial-LARS variants the other weights get plain SGD
with the same lr; the D3 lr comparison uses LARS on every layer; GroupNorm has 32 groups.
"""
import common
import harness
import presets

PRESETS = presets.APPENDIX_PRESETS   # blog / cifar10: 320 epochs; cpu: first 8 of 320 epochs, 5k images
# steps: 130 epochs = 10,140 steps, past C1's escape (blog: epochs 12-15, 4,900-6,200 steps)
PRESETS = dict(PRESETS, steps=dict(PRESETS["steps"], epochs=130))

NO_MLP_BN = dict(proj_norm="none", pred_norm="none")
GN_LARS = dict(NO_MLP_BN, **presets.LARS_BYOL, encoder_norm="gn", lr=0.2)
VARIANTS = {
    "bn_sgd_no_mlp_bn": dict(NO_MLP_BN),
    "bn_lars_no_mlp_bn": dict(NO_MLP_BN, **presets.LARS_BYOL, lr=0.2),
    "bn_sgd_mlp_bn": dict(),
    # C1 at lr 0.2 (the blog's lr per image at batch 64; a smaller lr keeps the collapse shallow, at
    # the blog's depth: exp_collapse_depth.py) and the blog's decay per step (lr x wd = 8e-5), with decay on the
    # encoder's conv weights only (scale-invariant under BN), or on no 1-D parameter (biases, BN
    # gains): results/history/notebook.md, 'Recoveries'
    "bn_sgd_no_mlp_bn_conv_wd": dict(NO_MLP_BN, lr=0.2, weight_decay=4e-4, decay_params="conv"),
    "bn_sgd_no_mlp_bn_wd_weights": dict(NO_MLP_BN, lr=0.2, weight_decay=4e-4, decay_params="weights"),
    "bn_sgd_no_mlp_bn_lr0.2": dict(NO_MLP_BN, lr=0.2, weight_decay=4e-4),   # decay on every parameter
    "gn_lars_layer12": dict(GN_LARS, lars_params="layer12"),
    "gn_lars_mlp": dict(GN_LARS, lars_params="mlp"),
    "gn_lars_lr0.5": dict(GN_LARS, lr=0.5),
    "gn_lars_lr0.1": dict(GN_LARS, lr=0.1),
}
# D3 at a quarter of the lr (the blog's lr per image at batch 64, as the C2 and D2 runs) with the
# blog's channels per group (4 groups at width 8); the quarter of lr 0.1 is exp_encoder_gn.py's
# lars_lr0.025 (the same config)
GN4_LARS = dict(GN_LARS, gn_groups=4, lr=0.05)
VARIANTS.update({"gn4_lars_layer12": dict(GN4_LARS, lars_params="layer12"),
                 "gn4_lars_mlp": dict(GN4_LARS, lars_params="mlp"),
                 "gn4_lars_lr0.125": dict(GN4_LARS, lr=0.125),
                 # layers 1-2 at the blog's own lr (LARS bounds each step by lr x eta x |w|: a
                 # quarter of the lr is a quarter of the kick), with plain GN and with the blog's GN + WS
                 "gn4_lars_layer12_lr0.2": dict(GN4_LARS, lars_params="layer12", lr=0.2),
                 "gn4ws_lars_layer12_lr0.2": dict(GN4_LARS, lars_params="layer12", lr=0.2, encoder_norm="gn_ws")})


BLOG = {"bn_sgd_no_mlp_bn": "30.1 (ep 10) -> 72.1 (ep 319)", "bn_lars_no_mlp_bn": "47.6 -> 76.7",
        "bn_sgd_mlp_bn": "54.6 -> 81.4", "gn_lars_layer12": "neg cos ~0.40 at ep 20",
        "gn_lars_mlp": "re-collapses", "gn_lars_lr0.5": "recovers after ep 2", "gn_lars_lr0.1": "no recovery"}

if __name__ == "__main__":
    harness.main("lars", __doc__, PRESETS, VARIANTS, BLOG, extra_columns=common.LARS_LR_COLUMNS)
