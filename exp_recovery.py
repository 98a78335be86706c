"""Appendix C1, D1 and D2 at the blog's horizon: each recovery beside a healthy reference, with
the quantities its explanation says move.

Finding (blog appendix; SPEC.md section 3): after a collapse (positive and negative cosine ~1),
  C1  BN encoder, SGD, no BN in the MLPs: the probe recovers from epoch ~12-15 and reaches 0.79
      of the BN-MLP run's gain over the untrained encoder by epoch 100 (0.83 at 319)
  D1  GroupNorm encoder, no BN anywhere, SGD wd 1e-5: leaves collapse around epoch 100 (neg. cos
      0.07 at 140, 0.56 at 320; final probe 0.54 of the GN + BN-MLP run's)
  D2  GroupNorm + weight standardization: separates within ~100 epochs, ends at neg. cos 0.22

    variant          encoder   MLP norm  lr    weight decay (on)            the blog's run
    c1               BN        none      0.2   4e-4 (encoder conv weights)  C1
    c1_healthy       BN        BN        0.2   4e-4 (encoder conv weights)  reference for c1
    c1_all_decay     BN        none      0.2   4e-4 (every parameter)       control: decay target
    d1               GN, 4 gr. none      0.05  1.6e-3 (encoder conv weights) D1
    d1_healthy       GN, 4 gr. BN        0.05  1.6e-3 (encoder conv weights) reference for d1
    d1_all_decay     GN, 4 gr. none      0.05  1.6e-3 (every parameter)      control: decay target
    d2               GN + WS   none      0.2   4e-4 (encoder conv weights)  D2
    d2_healthy       GN + WS   BN        0.2   4e-4 (encoder conv weights)  reference for d2
    d2_all_decay     GN + WS   none      0.2   4e-4 (every parameter)       control: decay target

Settings that differ from the blog's (every row): the steps preset (CIFAR-10 at 16 px, 5,000
images, width 8, batch 64), run for 526 epochs = 41,028 steps, the blog's epoch 100 by step
count (the lr and tau cosines run over the blog's 131,200 steps, so lr is at 0.78 of its peak at
the end, as the blog's at its epoch 100); decay on the encoder's conv weights only (the blog's SGD
decays everything: the *_all_decay rows are that, each changing only this one setting); C1 and D2
at the blog's lr per image (0.2 at batch 64 = 0.8 at 256) with its decay per step (lr x wd 8e-5);
D1 at a quarter of that lr with 160x the blog's wd (its wd 1e-5 did not escape on this preset in
640 epochs: results/README.md). Why the smaller lrs: exp_collapse_depth.py (at lr 0.8 this
network collapses 20-70x deeper than the blog's).

Criterion (judged per seed, README's 'How a recovery is judged'): after a collapse (neg. cos
>= 0.999), C1 recovers if the recovered fraction (probe - untrained) / (healthy - untrained) at
the same epoch is >= 0.5 at the end and does not fall over the last 20% of the run; D1 and D2
recover if neg. cos stays <= 0.9 over the last 20% and the probe ends >= 5 points above the
untrained encoder.

Logged once an epoch beside the blog's instruments (metrics_fn): for the stem conv and each
encoder stage, the mean norm |w| of its conv weights, the mean of 1/|w|^2 (x lr = the effective
lr of a scale-invariant weight), and the mean angle (radians) between each conv weight before and
after the epoch's last step; spherical motion dynamics (Wan et al. 2021) puts that angle at
sqrt(2 lr wd / (1 + momentum)) at equilibrium under decay (0.0092 for all three:
lr x wd is 8e-5 in each).
And the effective rank (Roy & Vetterli 2007) of the online projections z and of the encoder's
eval-mode features y (the probe's input) on the epoch's last batch.

Measured (results/README.md, C1; 41,028 steps, 2 seeds, one thread, 50-80 minutes a run): c1
collapses at epoch 4 / 5, is back at neg. cos <= 0.99 at epoch 76 / 62, a few epochs after the conv
weights' angle per step reaches the equilibrium above, and ends at probe 37.3 / 44.1 (untrained
25.1 / 25.8, c1_healthy 48.5 / 48.7): recovered fraction 0.52 / 0.80 (the blog's: 0.79), neg. cos
0.993 / 0.984. Both meet the criterion. d1 (2 seeds): collapses at epoch 7 / 7, back at neg. cos
<= 0.99 at epoch 77 / 43 as the conv angles reach their equilibrium, ends at probe 35.9 / 36.9
(untrained 19.4 / 19.7, d1_healthy 42.2 / 41.9): recovered fraction 0.72 / 0.78, neg. cos
0.68 / 0.49 (the blog's: 0.54, 0.56). Both meet the criterion. d2 (seed 0):
collapses at epoch 4, back at neg. cos <= 0.99 at epoch 92, <= 0.9 only at epochs 113-131, and ends
at neg. cos 0.92 and probe 30.4 (untrained 14.1, d2_healthy 43.5): recovered fraction 0.55 (the
blog's: 0.42, neg. cos 0.22); it does not meet the criterion. d2 seed 1: collapses at 4, back at
<= 0.99 at 68, <= 0.9 only at 83-85, ends at neg. cos 0.96 and probe 31.4 (untrained 15.3,
d2_healthy 43.3): recovered fraction 0.57; it does not meet the criterion either.

    python exp_recovery.py --preset steps --variants c1,c1_healthy --seeds 2
"""
import torch

import common
import harness

PRESETS = common.APPENDIX_PRESETS   # blog / cifar10: 320 epochs
# steps: 526 epochs = 41,028 steps, the blog's epoch 100 (41,000 steps at batch 256 on 105k images)
PRESETS = dict(PRESETS, steps=dict(PRESETS["steps"], epochs=526))

STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")
COLUMNS = [f"{q}:{s}" for s in STAGES for q in ("w_norm", "inv_w2", "angle")] + ["z_rank", "y_rank"]


def stage_convs(encoder):
    """The encoder's conv weights (4-D), by stage: the stem conv1 and layer1-4."""
    return {s: [p for n, p in encoder.named_parameters() if p.ndim == 4 and n.split(".")[0] == s] for s in STAGES}


class TrackedBYOL(common.BYOL):
    """BYOL that keeps the encoder's conv weights from before each step, so that the per-step
    angle can be read after it (a copy of ~0.2M floats a step at width 8; no effect on training)."""

    def forward(self, v1, v2):
        self.convs_before = {s: [w.detach().clone() for w in ws] for s, ws in stage_convs(self.online_encoder).items()}
        return super().forward(v1, v2)


def angle(a, b):
    """The angle between two tensors as vectors, in radians: 2 atan2(|a^ - b^|, |a^ + b^|), exact
    for the small angles of one step (acos of an fp32 cosine rounds below ~3e-4)."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a / a.norm(), b / b.norm()
    return 2 * torch.atan2((a - b).norm(), (a + b).norm()).item()


def recovery_metrics(model, views, out):
    row = {}
    for s, ws in stage_convs(model.online_encoder).items():
        norms = [w.norm() for w in ws]
        row[f"w_norm:{s}"] = torch.stack(norms).mean().item()
        row[f"inv_w2:{s}"] = torch.stack([n ** -2 for n in norms]).mean().item()
        row[f"angle:{s}"] = sum(angle(b, w) for b, w in zip(model.convs_before[s], ws)) / len(ws)
    encoder = model.online_encoder
    encoder.eval()   # the probe's features; eval-mode BN neither uses nor changes batch statistics
    y = encoder(views[0])
    encoder.train()
    return dict(row, z_rank=common.effective_rank(out["z"].float()), y_rank=common.effective_rank(y.float()))


TRACK = dict(model_fn=TrackedBYOL, metrics_fn=recovery_metrics)
NO_MLP_BN = dict(proj_norm="none", pred_norm="none")
C1 = dict(TRACK, **NO_MLP_BN, encoder_norm="bn", lr=0.2, weight_decay=4e-4, decay_params="conv")
D1 = dict(TRACK, **NO_MLP_BN, encoder_norm="gn", gn_groups=4, lr=0.05, weight_decay=1.6e-3, decay_params="conv")
D2 = dict(TRACK, **NO_MLP_BN, encoder_norm="gn_ws", gn_groups=4, lr=0.2, weight_decay=4e-4, decay_params="conv")
VARIANTS = {}
for name, base in (("c1", C1), ("d1", D1), ("d2", D2)):
    VARIANTS[name] = base
    VARIANTS[f"{name}_healthy"] = dict(base, proj_norm="bn", pred_norm="bn")   # the only change: BN in both MLPs
    VARIANTS[f"{name}_all_decay"] = dict(base, decay_params="all")   # the only change: the blog's decay target

BLOG = {"c1": "recovered fraction 0.79 at ep 100", "d1": "neg cos 0.07 at ep 140, 0.56 at 320",
        "d2": "neg cos 0.22 at ep 320"}

if __name__ == "__main__":
    harness.main("recovery", __doc__, PRESETS, VARIANTS, BLOG, extra_columns=COLUMNS)
