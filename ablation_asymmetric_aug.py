"""Ablation (not in the blog): the BYOL paper's asymmetric augmentations against the blog's.

Question: the blog used MoCo v2's augmentations, the same for both views (Appendix B: crops down
to 20% of the area, blur w.p. 0.5, no solarize). The BYOL paper (its Table 6) crops down to 8%,
blurs view v always and view v' w.p. 0.1, and solarizes v' w.p. 0.2 (presets.BYOL_AUG). Does the
recipe change Table 1's finding: BN in the MLPs learns, no norm collapses?

    variant         MLP norm   augmentations
    byol            BN         the blog's (symmetric)
    byol_asym       BN         the BYOL paper's (asymmetric)
    no_norm         none       the blog's
    no_norm_asym    none       the BYOL paper's

Settings: Table 1's presets (presets.TABLE1_PRESETS). Expect (not measured here): the collapse
without MLP norm does not depend on the augmentations; the BN rows may differ by a few points.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_asymmetric_aug.py --epochs 10
"""
import harness
import presets

PRESETS = presets.TABLE1_PRESETS
NO_NORM = dict(proj_norm="none", pred_norm="none")
VARIANTS = {"byol": dict(), "byol_asym": dict(presets.BYOL_AUG),
            "no_norm": dict(NO_NORM), "no_norm_asym": dict(NO_NORM, **presets.BYOL_AUG)}

if __name__ == "__main__":
    harness.main("asymmetric_aug", __doc__, PRESETS, VARIANTS)
