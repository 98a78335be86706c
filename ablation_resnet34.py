"""Ablation (not in the blog): a deeper encoder, ResNet-34.

Question: Table 1 uses a ResNet-18. Does a ResNet-34 (BasicBlocks [3, 4, 6, 3] against
[2, 2, 2, 2], the same width and the same 8 x width dims of y) learn better with BN in the MLPs,
and does it collapse the same way without?

    variant      encoder     MLP norm
    r18          ResNet-18   BN (Table 1's byol)
    r34          ResNet-34   BN
    r18_no_norm  ResNet-18   none (Table 1's no_norm: collapses)
    r34_no_norm  ResNet-34   none

How: the Config field depth (18 or 34) at the preset's width and stem; no hook. Another encoder
altogether is a BYOL subclass overriding build_encoder(cfg, image_size) (any module with
out_dim), passed as model_fn. Settings: Table 1's presets. Expect: unknown.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_resnet34.py --epochs 10
"""
import harness
import presets

PRESETS = presets.TABLE1_PRESETS

NO_NORM = dict(proj_norm="none", pred_norm="none")
VARIANTS = {"r18": dict(), "r34": dict(depth=34), "r18_no_norm": dict(NO_NORM), "r34_no_norm": dict(NO_NORM, depth=34)}

if __name__ == "__main__":
    harness.main("resnet34", __doc__, PRESETS, VARIANTS)
