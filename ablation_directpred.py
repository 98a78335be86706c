"""Ablation (not in the blog): does BYOL need a learned predictor? DirectPred (Tian, Chen &
Ganguli 2021) sets a linear predictor q in closed form from the online projections' correlation
F = E[z z^T]: with F = U diag(s) U^T, q = U diag(sqrt(s / max s) + eps) U^T, every K steps, and
never trains it.

    variant           projector  predictor
    bn                BN         learned MLP (the blog's BYOL)
    bn_directpred     BN         DirectPred's linear q, no gradient
    no_norm_directpred  none     DirectPred's linear q, no gradient

How: the BYOL extension points, no patch and nothing in forward(): __init__ swaps the predictor
for a frozen Linear and registers F as a buffer (so a resumed run keeps it); after_step(step, out)
updates F from the step's projections out["z"] and sets q every K steps. DirectPred's own
choices: F's moving average rho 0.3, eps 0.1; K 5 is ours. Table 1's presets.
Expect (DirectPred's paper, not measured here): bn_directpred close to bn.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_directpred.py --epochs 10
"""
import torch

import common
import harness
import presets

PRESETS = presets.TABLE1_PRESETS
K, RHO, EPS = 5, 0.3, 0.1   # steps between updates of q; F's moving-average rate; added to q's eigenvalues


class DirectPredBYOL(common.BYOL):
    def __init__(self, cfg, image_size=32):
        super().__init__(cfg, image_size)
        self.predictor = torch.nn.Linear(cfg.proj_dim, cfg.proj_dim, bias=False).requires_grad_(False)
        torch.nn.init.eye_(self.predictor.weight)
        self.register_buffer("corr", torch.zeros(cfg.proj_dim, cfg.proj_dim))

    @torch.no_grad()
    def after_step(self, step, out):
        z = out["z"].float()
        self.corr.lerp_(z.T @ z / len(z), 1 - RHO)   # F <- rho F + (1 - rho) E[z z^T]
        if step % K == 0:
            s, u = torch.linalg.eigh(self.corr)
            p = (s.clamp_min(0) / s.max().clamp_min(1e-12)).sqrt() + EPS
            self.predictor.weight.copy_(u @ torch.diag(p) @ u.T)


VARIANTS = {"bn": dict(), "bn_directpred": dict(model_fn=DirectPredBYOL),
            "no_norm_directpred": dict(proj_norm="none", model_fn=DirectPredBYOL)}

if __name__ == "__main__":
    harness.main("directpred", __doc__, PRESETS, VARIANTS)
