"""Table 1 of the blog post: BYOL needs normalization in its MLPs (or explicit negatives).

Finding (blog, Table 1 and Figure 'cosine_similarity_10e'; ResNet-18, STL-10, 10 epochs,
linear probe on half the test set scored on the other half):

    variant        projector g  predictor q  loss          blog acc   pos / neg cosine
    contrastive    none         none         InfoNCE+queue   44.1      0.90 / 0.53  (contrastive.py)
    byol           BN           BN           1 - cos         57.7      0.88 / 0.27
    proj_bn_only   BN           none         1 - cos         55.3      0.87 / 0.265
    pred_bn_only   none         BN           1 - cos         48        0.95 / 0.73
    no_norm        none         none         1 - cos         28.3      1.00 / 1.00  (collapse)
    layer_norm     LN           LN           1 - cos         29.4      1.00 / 1.00  (collapse)
    random         untrained encoder, same probe               28.8

Expect: byol, proj_bn_only and contrastive well above random; no_norm and layer_norm collapse.
Results: results/README.md#table-1

    python exp_table1_norms.py --download     # the cpu preset on a CPU, cifar10 on a GPU

Presets:
  blog     the blog's settings (SPEC.md section 2): STL-10 train+unlabeled, ImageNet-stem
           ResNet-18, 96 px, batch 256, SGD lr 0.8 (contrastive 0.02), momentum 0.9, wd 1e-4
           on all params, cosine over 320 epochs but stopped at 10, tau 0.996 constant,
           MLP 512-512-128, queue 65536, blog probe.
  cifar10  the same recipe on full CIFAR-10 with the CIFAR stem (for a GPU); queue 16384
           (the dataset is half STL-10's).
  cpu      for 2 CPU cores (presets.CPU_SMALL): width-16 CIFAR-stem ResNet-18
           (128-d y) on the first 10k CIFAR-10 training images, batch 64 (4x the steps of 256
           at the same images/s here), lr 0.1, tau 0.99, 12 epochs, queue 4096 filled with real
           target projections before training, not the blog's random vectors (why:
           results/tuning/README.md). The contrastive lr stays 0.02 in every preset.
The random row is the untrained encoder through the same probe with BN in eval mode at its
initial statistics (what model.eval() gives); random_bn_recomputed re-estimates BN's
statistics on the probe's images first (not in the default grid: pass --variants).
"""
import common
import harness
import presets
from contrastive import InfoNCE

PRESETS = presets.TABLE1_PRESETS   # blog / cifar10: 10 of 320 epochs; cpu: 12 of 320 epochs, 10k images


class RecomputedBN(common.BYOL):
    """The probe on a copy of the encoder whose BN statistics are re-estimated on the probe's
    fit images (what the encoder's features look like with data statistics, not its initial ones)."""

    def evaluate(self, data, epoch, views=None, out=None):
        (fit_x, _), _ = common.probe_split(data)
        return common.linear_probe(common.recompute_bn_stats(self.online_encoder, fit_x, self.cfg), data, self.cfg)


# byol first: the grid (and its summary) starts with the method itself, the row the others are
# read against; contrastive is the blog's "xent" config, lr 0.02 (SPEC.md section 2)
VARIANTS = {
    "byol": dict(),
    "contrastive": dict(model_fn=InfoNCE, proj_norm="none", pred_norm="none", lr=0.02),
    "proj_bn_only": dict(pred_norm="none"),
    "pred_bn_only": dict(proj_norm="none"),
    "no_norm": dict(proj_norm="none", pred_norm="none"),
    "layer_norm": dict(proj_norm="ln", pred_norm="ln"),
    "random": dict(epochs=0),
}
EXTRA_VARIANTS = {"random_bn_recomputed": dict(epochs=0, model_fn=RecomputedBN)}
BLOG = {"contrastive": "44.1 / 0.90 / 0.53", "byol": "57.7 / 0.88 / 0.27",
        "proj_bn_only": "55.3 / 0.87 / 0.265", "pred_bn_only": "48 / 0.95 / 0.73",
        "no_norm": "28.3 / 1.00 / 1.00", "layer_norm": "29.4 / 1.00 / 1.00", "random": "28.8"}

if __name__ == "__main__":
    harness.main("table1", __doc__, PRESETS, VARIANTS, BLOG, extra_variants=EXTRA_VARIANTS)
