"""Ablation (not in the blog): the predictor on an lr schedule of its own.

Question: SimSiam (Chen & He 2021) keeps the predictor's lr constant while the rest follows the
cosine, and DirectPred (Tian et al. 2021) argues the predictor must keep adapting. With the
predictor's lr warmed up linearly from 0 to the base lr over its first WARMUP_STEPS steps and
then held there, does BYOL without MLP BN still collapse, and does BYOL with BN change?

    variant               MLP norm   predictor lr
    bn                    BN         the cosine, as everything (Table 1's byol)
    bn_pred_warmup        BN         0 -> lr over 1,000 steps, then lr
    no_norm               none       the cosine (Table 1's no_norm: collapses)
    no_norm_pred_warmup   none       0 -> lr over 1,000 steps, then lr

How: a BYOL subclass sets LR_MULT = {"predictor.": 1}, so that param_groups() puts the predictor
in a group of its own, labelled (its lr is logged as lr:predictor, the lr the epoch's last step
used), and overrides the stage set_lr(): the default's lrs, then the predictor's. Settings: Table 1's presets (the cpu preset
runs 156 steps an epoch, so the warmup ends in epoch 7). Expect: unknown.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_predictor_warmup.py --epochs 10
"""
import common
import harness
import presets

PRESETS = presets.TABLE1_PRESETS
WARMUP_STEPS = 1000


class PredictorWarmupBYOL(common.BYOL):
    LR_MULT = {"predictor.": 1.0}   # the predictor in a group of its own, labelled: logged as lr:predictor

    def set_lr(self, opt, step, total_steps):
        lr = super().set_lr(opt, step, total_steps)
        for g in opt.param_groups:
            if g.get("label") == "predictor":
                g["lr"] = self.cfg.lr * min(1.0, (step + 1) / WARMUP_STEPS)
        return lr


NO_NORM = dict(proj_norm="none", pred_norm="none")
VARIANTS = {"bn": dict(), "bn_pred_warmup": dict(model_fn=PredictorWarmupBYOL),
            "no_norm": dict(NO_NORM), "no_norm_pred_warmup": dict(NO_NORM, model_fn=PredictorWarmupBYOL)}

if __name__ == "__main__":
    harness.main("predictor_warmup", __doc__, PRESETS, VARIANTS, extra_columns=["lr:predictor"])
