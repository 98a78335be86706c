"""Ablation (not in the blog): the target as a hard copy of the online network every K steps
(DQN's target network) instead of BYOL's moving average. BYOL's EMA with tau 0.99 averages over
~100 steps; a copy every 100 steps holds the target still in between and then jumps.

    variant          projector / predictor  target
    bn               BN                     EMA, tau as the preset (the blog's BYOL)
    bn_hard_copy     BN                     a copy of the online f and g every K = 100 steps
    no_norm_hard_copy  none                 the same, without BN in the MLPs

How: the BYOL extension point update_target(tau, step), called after each optimizer step,
overridden; no patch, nothing in forward(). Table 1's presets. Expect: bn_hard_copy learns, if
more slowly than bn; no_norm_hard_copy collapses like the no-BN BYOL of Table 1.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_hard_target.py --epochs 10
"""
import common
import harness
import presets

PRESETS = presets.TABLE1_PRESETS
K = 100   # steps between copies: ~1/(1 - tau) at the cpu preset's tau 0.99


class HardCopyBYOL(common.BYOL):
    def update_target(self, tau, step):
        if step % K == 0:   # tau 0: an exact copy of the weights (and buffers)
            for target, online in self.EMA_PAIRS:
                common.ema_update_(getattr(self, target), getattr(self, online), 0.0)


VARIANTS = {"bn": dict(), "bn_hard_copy": dict(model_fn=HardCopyBYOL),
            "no_norm_hard_copy": dict(proj_norm="none", pred_norm="none", model_fn=HardCopyBYOL)}

if __name__ == "__main__":
    harness.main("hard_target", __doc__, PRESETS, VARIANTS)
