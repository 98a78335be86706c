"""Ablation (not in the blog): does a faster predictor stand in for BatchNorm in the MLPs?

Question: SimSiam (Chen & He 2021, --fix-pred-lr) and DirectPred (Tian et al. 2021) argue that
the predictor must adapt faster than the encoder for non-contrastive learning to avoid
collapse; the BYOL paper (Table 5b) recovers 66.6% without an EMA target by giving the predictor
10x the learning rate. Does a 10x predictor lr keep BYOL from collapsing without MLP BN (Table 1's
no_norm row), and does it change BYOL with BN?

    variant             MLP norm   predictor lr
    bn                  BN         1x (Table 1's byol)
    bn_pred_lr10        BN         10x
    no_norm             none       1x (Table 1's no_norm: collapses)
    no_norm_pred_lr10   none       10x

How: a BYOL subclass sets LR_MULT = {"predictor.": 10}: param_groups() puts the predictor in a
group of its own whose lr set_lr() sets to 10x the schedule's every step (logged as
lr:predictor). Nothing in common.py changes.
Settings: Table 1's presets (presets.TABLE1_PRESETS). Expect: unknown; that is the question.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_predictor_lr.py --epochs 10
"""
import common
import harness
import presets

PRESETS = presets.TABLE1_PRESETS


class PredictorLr10(common.BYOL):
    LR_MULT = {"predictor.": 10.0}   # the predictor's lr at 10x the schedule's, logged as lr:predictor


NO_NORM = dict(proj_norm="none", pred_norm="none")
VARIANTS = {
    "bn": dict(),
    "bn_pred_lr10": dict(model_fn=PredictorLr10),
    "no_norm": dict(NO_NORM),
    "no_norm_pred_lr10": dict(NO_NORM, model_fn=PredictorLr10),
}

if __name__ == "__main__":
    harness.main("predictor_lr", __doc__, PRESETS, VARIANTS, extra_columns=["lr:predictor"])
