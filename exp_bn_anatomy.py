"""Beyond the blog: which part of BatchNorm keeps BYOL from collapsing?

The blog's hypothesis: BN in the projector/predictor leaks information across the batch and so
acts as implicit negatives. Two later results push back: Richemond et al. 2020 (GroupNorm +
weight standardization, no batch statistics anywhere: 73.9 vs 74.3 on ImageNet) and Tian et
al. 2020 (the centering step together with the predictor is what matters). This script puts
them side by side. Every variant is Table 1's byol row (BN encoder, SGD) with another norm
in the projector g and predictor q (after their first Linear), except the last two, which
have no batch statistics anywhere.

    variant        MLP norm (g and q)                                   question
    no_norm        none                                                 reference: collapses
    ghost_k2 ..    BN with statistics over groups of k = 2, 4, 8, 32    how many other samples
    ghost_k32        samples of the batch (ghost BN)                    does BN need?
    bn             BN over the whole batch (k = batch size)
    bn_no_affine   BN without gamma / beta                              which step of BN
    center_only    subtract the batch mean, nothing else                carries the effect?
    scale_only     divide by the batch std, no centering, no affine
    gn_ws          GN + WS encoder, GN + WS projector and predictor     no batch statistics
    gn_ws_ln       GN + WS encoder, LayerNorm projector and predictor   (Richemond et al.)

Expect (the implicit-negatives view): collapse at small k, centering over scaling, GN + WS collapsing.
Results: results/README.md#beyond-the-blog (no figure in the blog to compare with; plot_results.py
draws the probe and negative cosine against k, and a bar chart of the parts)

    python exp_bn_anatomy.py --preset cpu --seeds 2

Presets (the Table 1 recipe; SPEC.md section 2):
  blog / cifar10  as exp_table1_norms.py: batch 256, SGD lr 0.8, 10 of 320 cosine epochs.
  cpu             presets.CPU_SMALL on the first 5k CIFAR-10 images, the first 6 of 320 cosine
                  epochs, probe at epochs 0, 3, 6. Batch 64, so k = 32 is half a batch.
Choices where nothing is published: ghost groups are consecutive samples of the shuffled
batch, and each view is its own BN batch (as everywhere here); the parts have no affine
except full BN, so that bn_no_affine, center_only and scale_only differ by one step each;
in the MLPs, GN has 32 groups (16 features each) and WS standardizes the Linear before it.
"""
import harness
import presets

PRESETS = {
    **presets.TABLE1_PRESETS,
    "cpu": dict(presets.TABLE1_PRESETS["cpu"], train_subset=5000, epochs=6, eval_every=3),
}

GROUP_SIZES = (2, 4, 8, 32)


def mlp(norm, **extra):
    return dict(proj_norm=norm, pred_norm=norm, **extra)


VARIANTS = {
    "no_norm": mlp("none"),
    **{f"ghost_k{k}": mlp("bn", mlp_bn_group=k) for k in GROUP_SIZES},
    "bn": mlp("bn"),
    "bn_no_affine": mlp("bn_noaffine"),
    "center_only": mlp("bn_center"),
    "scale_only": mlp("bn_scale"),
    "gn_ws": mlp("gn_ws", encoder_norm="gn_ws"),
    "gn_ws_ln": mlp("ln", encoder_norm="gn_ws"),
}

BLOG = {"no_norm": "Table 1: 28.3 / 1.00 / 1.00", "bn": "Table 1: 57.7 / 0.88 / 0.27",
        "gn_ws": "RWBS (ImageNet, 1000 ep): 73.9 vs 74.3 with BN"}

if __name__ == "__main__":
    harness.main("bn_anatomy", __doc__, PRESETS, VARIANTS, BLOG)
