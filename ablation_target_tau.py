"""Ablation (not in the blog): how fast must the target follow the online network?

Question: BYOL's target is an exponential moving average of the online network with rate tau
(BYOL paper, section 3.2 and Table 5a: tau = 1, a target that never moves, gives 18.8% on
ImageNet; tau = 0, the target being the online network, collapses to 0.3%; 0.9-0.999 all work).
Does the same hold in the blog's setting, BN in both MLPs, at Table 1's scale?

    variant     base_tau   the target ...
    tau_0       0          is the online network itself (no EMA, still no gradient)
    tau_0.9     0.9        follows within ~10 steps
    tau_0.99    0.99       ~100 steps (the cpu preset's Table 1 value)
    tau_0.996   0.996      ~250 steps (the blog's)
    tau_1       1          never moves: the online network learns to predict a random network

Settings: Table 1's presets (presets.TABLE1_PRESETS), tau constant as in the blog. Expect (from
the BYOL paper, not measured here): tau_1 well below the others, tau_0 at or below it.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_target_tau.py --epochs 10
"""
import harness
import presets

PRESETS = presets.TABLE1_PRESETS

VARIANTS = {f"tau_{tau:g}": dict(base_tau=tau) for tau in (0.0, 0.9, 0.99, 0.996, 1.0)}

if __name__ == "__main__":
    harness.main("target_tau", __doc__, PRESETS, VARIANTS)
