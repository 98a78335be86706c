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
import functools

import torch
import torch.nn as nn

import common
import harness
import presets
from runtime import UsageError


class BatchNormParts(nn.Module):
    """BatchNorm of (n, d) features taken apart: statistics over groups of `group` samples (ghost
    BN; 0 = the whole batch), and each part optional: center, scale (by the group std) and affine.
    Always batch statistics, as the MLPs only run in training; with every part on and group 0 it
    is nn.BatchNorm1d in training."""

    def __init__(self, dim, group=0, center=True, scale=True, affine=True, eps=1e-5):
        super().__init__()
        self.group, self.center, self.scale, self.eps = group, center, scale, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x):
        n, d = x.shape
        k = self.group or n
        if n % k:   # a bad --batch-size for a ghost variant: one line, exit 2 (harness.main)
            raise UsageError(f"BatchNormParts: batch of {n} is not a multiple of group {k}")
        g = x.float().view(n // k, k, d)   # fp32 statistics under autocast, as nn.BatchNorm
        var = g.var(1, unbiased=False, keepdim=True)
        if self.center:
            g = g - g.mean(1, keepdim=True)
        if self.scale:
            g = g * torch.rsqrt(var + self.eps)
        out = g.view(n, d)
        if self.weight is not None:
            out = out * self.weight + self.bias
        return out.to(x.dtype)


GROUP_SIZES = (2, 4, 8, 32)
# the MLP norms this script adds, by name (common.MLP_NORMS: validated, hashed by their code)
NORMS = {**{f"bn_ghost{k}": functools.partial(BatchNormParts, group=k) for k in GROUP_SIZES},
         "bn_noaffine": functools.partial(BatchNormParts, affine=False),
         "bn_center": functools.partial(BatchNormParts, scale=False, affine=False),
         "bn_scale": functools.partial(BatchNormParts, center=False, affine=False)}
common.MLP_NORMS.update(NORMS)

PRESETS = {
    **presets.TABLE1_PRESETS,
    "cpu": dict(presets.TABLE1_PRESETS["cpu"], train_subset=5000, epochs=6, eval_every=3),
}


def mlp(norm, **extra):
    return dict(proj_norm=norm, pred_norm=norm, **extra)


VARIANTS = {
    "no_norm": mlp("none"),
    **{f"ghost_k{k}": mlp(f"bn_ghost{k}") for k in GROUP_SIZES},
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
