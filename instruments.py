"""Instruments that the appendix scripts (exp_recovery.py, exp_mechanism.py) log once an epoch:
for the stem conv and each encoder stage, the mean norm |w| of its conv weights, the mean of
1/|w|^2 (x lr = the effective lr of a scale-invariant weight) and the mean angle between each conv
weight before and after the epoch's last step; and the effective rank of the online projections z
and of the encoder's eval-mode features y. Pass TRACK in a variant and COLUMNS as extra_columns."""
import torch

import common

STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")
COLUMNS = [f"{q}:{s}" for s in STAGES for q in ("w_norm", "inv_w2", "angle")] + ["z_rank", "y_rank"]


def stage_convs(encoder):
    """The encoder's conv weights (4-D), by stage: the stem conv1 and layer1-4."""
    return {s: [p for n, p in encoder.named_parameters() if p.ndim == 4 and n.split(".")[0] == s] for s in STAGES}


class TrackedBYOL(common.BYOL):
    """BYOL that keeps the encoder's conv weights from before each step (before_step), so that
    evaluate can log the last step's angle beside the other instruments (a copy of ~0.2M floats a
    step at width 8; no effect on training)."""

    def before_step(self, step):
        self.convs_before = {s: [w.detach().clone() for w in ws] for s, ws in stage_convs(self.online_encoder).items()}

    def evaluate(self, data, epoch, views=None, out=None):
        row = super().evaluate(data, epoch, views, out)
        return row if views is None else dict(row, **recovery_metrics(self, views, out))


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


TRACK = dict(model_fn=TrackedBYOL)
