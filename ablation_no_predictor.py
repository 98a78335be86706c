"""Ablation (not in the blog): BYOL without a predictor.

Question: the BYOL paper (Table 5b, section 3.2) finds that removing the predictor q collapses
BYOL even with BN in the projector (0.2% on ImageNet), as SimSiam does (Chen & He 2021, Table 1).
The blog's Table 1 shows BN in the projector alone is enough *with* a predictor (proj_bn_only,
55.3). Is the predictor or the BN doing the work?

    variant               projector g   predictor q
    bn                    BN            BN (Table 1's byol)
    proj_bn_no_predictor  BN            none (identity: p = z)
    no_norm_no_predictor  none          none

How: pred_layers=0 makes the predictor the identity (common.build_mlp with num_layers=0, as the
blog's prediction_mlp_layers=0). Settings: Table 1's presets (presets.TABLE1_PRESETS).
Expect (BYOL paper): both no-predictor variants collapse, pos and neg cosine near 1.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_no_predictor.py --epochs 10
"""
import common
import harness
import presets

PRESETS = presets.TABLE1_PRESETS

VARIANTS = {
    "bn": dict(),
    "proj_bn_no_predictor": dict(pred_layers=0),
    "no_norm_no_predictor": dict(pred_layers=0, proj_norm="none", pred_norm="none"),
}

if __name__ == "__main__":
    harness.main("no_predictor", __doc__, PRESETS, VARIANTS)
