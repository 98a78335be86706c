"""Ablation (not in the blog): a one-sided loss.

Question: the blog's loss, like the BYOL paper's, is symmetric: q(z) of view v predicts z' of
view v', and q(z) of v' predicts z' of v. With the first term only, does BYOL with BN in its MLPs
still learn, and does it still collapse without them?

    variant            MLP norm   loss
    bn                 BN         both view orders (Table 1's byol)
    bn_one_sided       BN         q(z) of v against z' of v' only
    no_norm            none       both view orders (Table 1's no_norm: collapses)
    no_norm_one_sided  none       one order

How: a BYOL subclass overrides BYOL.loss, which forward calls with the l2-normalized predictions
ps of each view and target projections ts of v, v' (fp32; and the raw projections zs). Its one
term is doubled, so the gradient has the symmetric loss's scale at the preset's lr. Settings: Table 1's presets. Expect: unknown.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_one_sided_loss.py --epochs 10
"""
import common
import harness
import presets

PRESETS = presets.TABLE1_PRESETS
LOSS_SCALE = 2.0   # one term for the symmetric loss's two


class OneSidedBYOL(common.BYOL):
    def loss(self, ps, ts, zs):
        return LOSS_SCALE * (1 - (ps[0] * ts[1]).sum(1)).mean()   # q(z) of v' and z' of v go unused


NO_NORM = dict(proj_norm="none", pred_norm="none")
VARIANTS = {"bn": dict(), "bn_one_sided": dict(model_fn=OneSidedBYOL),
            "no_norm": dict(NO_NORM), "no_norm_one_sided": dict(NO_NORM, model_fn=OneSidedBYOL)}

if __name__ == "__main__":
    harness.main("one_sided_loss", __doc__, PRESETS, VARIANTS)
