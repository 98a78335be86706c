"""Ablation (not in the blog): a target predictor.

Question: BYOL's target network has an encoder and a projector but no predictor; the online
prediction q(z) is compared with the target projection z'. Give the target an EMA twin q' of
the predictor and compare q(z) with q'(z') instead: is the asymmetry of the predictor what keeps
BYOL from collapsing (with BN in the MLPs), and does the twin change the no-norm collapse?

    variant                    MLP norm   compared with q(z)
    bn                         BN         z' (Table 1's byol)
    bn_target_predictor        BN         q'(z'), q' the EMA of q
    no_norm                    none       z' (Table 1's no_norm: collapses)
    no_norm_target_predictor   none       q'(z')

How: a BYOL subclass adds ("target_predictor", "predictor") to BYOL.EMA_PAIRS (BYOL.__init__
copies the predictor without gradient, update_target moves it with rate tau) and overrides target().
The CSV's cosines then compare z with q'(z'). Settings: Table 1's presets. Expect: unknown.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_target_predictor.py --epochs 10
"""
import torch

import common
import harness
import presets

PRESETS = presets.TABLE1_PRESETS


class TargetPredictorBYOL(common.BYOL):
    EMA_PAIRS = common.BYOL.EMA_PAIRS + (("target_predictor", "predictor"),)

    @torch.no_grad()
    def target(self, v):
        z = super().target(v)
        with torch.autocast(v.device.type, enabled=False):   # fp32, as the online predictor
            return self.target_predictor(z)


NO_NORM = dict(proj_norm="none", pred_norm="none")
VARIANTS = {"bn": dict(), "bn_target_predictor": dict(model_fn=TargetPredictorBYOL),
            "no_norm": dict(NO_NORM), "no_norm_target_predictor": dict(NO_NORM, model_fn=TargetPredictorBYOL)}

if __name__ == "__main__":
    harness.main("target_predictor", __doc__, PRESETS, VARIANTS)
