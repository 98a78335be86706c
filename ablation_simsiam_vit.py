"""Ablation (not in the blog): SimSiam (no target network) on a small Vision Transformer.

Question: SimSiam (Chen & He 2021) drops BYOL's target network: the target is the online network
under a stop-gradient. Asked of an encoder with no BatchNorm at all (a ViT has LayerNorm only),
does the blog's question still have the blog's answer: BN in the MLPs decides the collapse?

    variant       encoder               MLP norm
    vit           ViT, 4 blocks, LN     BN
    vit_no_norm   ViT, 4 blocks, LN     none

How: a BYOL subclass overrides build_encoder (a pre-norm ViT: 4 x 4 px patches, 4 blocks of
width 8 x cfg.width, 4 heads, learned positions, the tokens' mean as y) and sets EMA_PAIRS = ():
no target network is made; with base_tau 0, forward takes the online projections under a
stop-gradient, SimSiam's target. Settings: Table 1's presets with tau 0. Expect: unknown.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_simsiam_vit.py --epochs 10
"""
import torch
import torch.nn as nn

import common
import harness
import presets

PRESETS = presets.TABLE1_PRESETS
PATCH, BLOCKS, HEADS = 4, 4, 4


class TinyViT(nn.Module):
    def __init__(self, dim, image_size):
        super().__init__()
        self.patches = nn.Conv2d(3, dim, PATCH, PATCH)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image_size // PATCH) ** 2, dim))
        block = nn.TransformerEncoderLayer(dim, HEADS, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, BLOCKS, enable_nested_tensor=False)
        self.norm, self.out_dim = nn.LayerNorm(dim), dim

    def forward(self, x):   # (n, 3, H, W) -> (n, dim): the mean of the patch tokens
        return self.norm(self.blocks(self.patches(x).flatten(2).transpose(1, 2) + self.pos)).mean(1)


class SimSiamViT(common.BYOL):
    EMA_PAIRS = ()   # no target network: at base_tau 0, forward's target is the online z, detached

    def build_encoder(self, cfg, image_size):
        return TinyViT(8 * cfg.width, image_size)


SIMSIAM = dict(model_fn=SimSiamViT, base_tau=0.0)
VARIANTS = {"vit": dict(SIMSIAM), "vit_no_norm": dict(SIMSIAM, proj_norm="none", pred_norm="none")}

if __name__ == "__main__":
    harness.main("simsiam_vit", __doc__, PRESETS, VARIANTS)
