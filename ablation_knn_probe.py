"""Ablation (not in the blog): a kNN probe beside the blog's linear probe.

Question: the blog reads a representation through a linear fit. A weighted kNN classifier (Wu et
al. 2018, as DINO evaluates: cosine similarity, the k most similar fit images vote for their
label with weight exp(similarity / 0.07)) needs no fit at all. Does it read collapse, and BN's
effect, as the linear probe does?

    variant   MLP norm
    byol      BN      (Table 1's byol)
    no_norm   none    (Table 1's no_norm: collapses)

How: a BYOL subclass extends the stage evaluate(data, epoch, views, out): the default's linear
probe columns, then knn_20 and knn_200 at the same epochs, on the same frozen features and the
same split (common.probe_split: fit on the first half of the test set, score the second).
Settings: Table 1's presets. Expect: knn below the linear probe for byol; both at chance-like
levels for no_norm.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_knn_probe.py --epochs 10
"""
import torch
import torch.nn.functional as F

import common
import harness
import presets

PRESETS = presets.TABLE1_PRESETS
KS, T = (20, 200), 0.07   # neighbours; the vote's temperature (DINO's eval_knn)


def knn_accuracy(fit_f, fit_y, val_f, val_y, k, classes):
    """% of val_f whose k most cosine-similar fit_f, each voting weight exp(sim / T), name its label."""
    sim, idx = (F.normalize(val_f, dim=1) @ F.normalize(fit_f, dim=1).T).topk(min(k, len(fit_f)), dim=1)
    votes = torch.zeros(len(val_f), classes, device=val_f.device).scatter_add_(1, fit_y[idx], (sim / T).exp())
    return 100.0 * (votes.argmax(1) == val_y).float().mean().item()


class KNNProbeBYOL(common.BYOL):
    def evaluate(self, data, epoch, views=None, out=None):
        row = super().evaluate(data, epoch, views, out)
        if row["probe_acc"] is not None:   # at the linear probe's epochs, on its split
            (fit_x, fit_y), (val_x, val_y) = common.probe_split(data)
            f, g = (common.extract_features(self.online_encoder, x, self.cfg) for x in (fit_x, val_x))
            classes = int(data["test_y"].max()) + 1
            row.update({f"knn_{k}": knn_accuracy(f, fit_y.to(f.device), g, val_y.to(f.device), k, classes) for k in KS})
        return row


VARIANTS = {"byol": dict(model_fn=KNNProbeBYOL), "no_norm": dict(proj_norm="none", pred_norm="none", model_fn=KNNProbeBYOL)}

if __name__ == "__main__":
    harness.main("knn_probe", __doc__, PRESETS, VARIANTS, extra_columns=[f"knn_{k}" for k in KS])
