"""Ablation (not in the blog): one more per-epoch metric, the effective rank of z.

Question: the blog reads collapse off the cosines of z and z'. The effective rank of the online
projections z (Roy & Vetterli 2007: exp of the entropy of the normalized singular values of the
centered batch; 1 for a batch on one line, up to proj_dim for a spread one) says in how many
directions the batch still varies. Does it fall with the cosines without MLP norm, and stay high
with BN?

    variant     MLP norm
    byol        BN
    no_norm     none

Shows the evaluate stage extended: called after every epoch with its last step's views and
outputs (no extra forward), the default's probe columns and its own, which become CSV columns
(named in extra_columns), appear on the console and in the summary, and survive a resume. Settings: Table 1's presets. Expect (not measured here): rank well above 1 for
byol, near 1 for no_norm.
Results: not run at scale (results/README.md#ablations-not-run-at-scale).

    python ablation_effective_rank.py --epochs 10
"""
import common
import harness
import presets

PRESETS = presets.TABLE1_PRESETS


class ZRankBYOL(common.BYOL):
    def evaluate(self, data, epoch, views=None, out=None):   # + z's effective rank, last batch (none at epoch 0)
        return dict(super().evaluate(data, epoch, views, out), z_rank=out and common.effective_rank(out["z"].float()))


VARIANTS = {"byol": dict(model_fn=ZRankBYOL), "no_norm": dict(proj_norm="none", pred_norm="none", model_fn=ZRankBYOL)}

if __name__ == "__main__":
    harness.main("effective_rank", __doc__, PRESETS, VARIANTS, extra_columns=["z_rank"])
