"""Ablation (not in the blog): Table 1's norm grid as SimSiam, without an EMA target.

Question: SimSiam (Chen & He 2021) is BYOL with tau = 0: the target is the online network itself
under a stop-gradient. Its Table 3 finds that without BN in the MLPs it learns far less (34.6%
against 67.4% on ImageNet) but does not collapse, where the blog's BYOL without BN collapses.
Which does the blog's Table 1 grid do when the target is the online network?

    variant        projector g  predictor q   (all with base_tau 0)
    byol           BN           BN
    proj_bn_only   BN           none
    pred_bn_only   none         BN
    no_norm        none         none
    layer_norm     LN           LN

How: base_tau=0 (constant): common.BYOL then uses the online projections, detached, as the
target's (the same numbers a target forward of equal weights gives, without its two passes).
SimSiam's own projector has 3 layers and BN on z; these keep Table 1's MLPs. Settings: Table 1's
presets. Expect: unknown; that is the question.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_simsiam_norms.py --epochs 10
"""
import common
import harness
import presets

PRESETS = presets.TABLE1_PRESETS

NORMS = {"byol": dict(), "proj_bn_only": dict(pred_norm="none"), "pred_bn_only": dict(proj_norm="none"),
         "no_norm": dict(proj_norm="none", pred_norm="none"), "layer_norm": dict(proj_norm="ln", pred_norm="ln")}
VARIANTS = {name: dict(norms, base_tau=0.0) for name, norms in NORMS.items()}

if __name__ == "__main__":
    harness.main("simsiam_norms", __doc__, PRESETS, VARIANTS)
