"""Ablation (not in the blog): multi-crop (SwAV, Caron et al. 2020) for BYOL.

Question: two extra small views of each image, through the online network only, each predicting
both large views' target projections. Do more positive pairs per image change BYOL with BN in its
MLPs, or the collapse without it?

    variant             MLP norm   views
    bn                  BN         v, v' (Table 1's byol)
    bn_multicrop        BN         v, v' and 2 small views
    no_norm             none       v, v' (Table 1's no_norm: collapses)
    no_norm_multicrop   none       v, v' and 2 small views

How: a BYOL subclass overrides the stage views(x, gen): the default's v, v', then two views at
half the run's size, crops of 5-14% of the image (SwAV's), drawn per image like the others. The
default forward runs the online network on every view (each its own BN batch) and the target on
v, v'; the default loss sums each view against every other large view's target: 6 terms, not 2
(a sum, as solo-learn's BYOL with multi-crop). Settings: Table 1's presets. Expect: unknown.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_multicrop.py --epochs 10
"""
import augment
import common
import harness
import presets
from runtime import process_group

PRESETS = presets.TABLE1_PRESETS
SMALL_VIEWS, SMALL_SCALE = 2, (0.05, 0.14)   # SwAV's small crops: how many, and their area range


class MultiCropBYOL(common.BYOL):
    def views(self, x, gen):   # v, v', then the small views, of this process's share, as the convs want them
        small = dict(common.view_settings(self.cfg)[0], scale=SMALL_SCALE)
        part, fmt = process_group().share(len(x)), common.conv_format(x.device, self.cfg.width)
        return super().views(x, gen) + [augment.augment(x, gen, self.mean, self.std, part, x.shape[-1] // 2, fmt, **small)
                                        for _ in range(SMALL_VIEWS)]


NO_NORM = dict(proj_norm="none", pred_norm="none")
VARIANTS = {"bn": dict(), "bn_multicrop": dict(model_fn=MultiCropBYOL),
            "no_norm": dict(NO_NORM), "no_norm_multicrop": dict(NO_NORM, model_fn=MultiCropBYOL)}

if __name__ == "__main__":
    harness.main("multicrop", __doc__, PRESETS, VARIANTS)
