"""Why only decay on the scale-invariant conv weights ends C1's collapse: controls that could
refute the effective-lr explanation, and whether C1 recovers with an MLP's weights decaying.

The explanation under test (results/README.md, 'Why the recoveries happen'): every encoder
conv weight feeds a BatchNorm, so the loss does not depend on its norm |w|; weight decay shrinks
|w| and so raises its effective lr, lr / |w|^2, until the collapsed state can no longer hold. All variants run C1's recovering
settings (exp_recovery.py's c1: BN encoder, no MLP norm, SGD lr 0.2, wd 4e-4 on the conv
weights only, steps preset) and change:

    variant         change                                              the explanation predicts
    c1              none (the reference)                                recovers (epoch ~50-90)
    c1_norm_held    (a) decay on, but each conv weight is put back to   no recovery
                    its norm at the collapse (neg. cos >= 0.999) after
                    every step, so its effective lr cannot rise
    c1_exp_lr       (b) no decay; the conv weights' gradients are       recovery at about the
                    scaled by Li & Arora's (2020) exponential factor    same step as c1
                    and their momentum is 0.901453: three changes,
                    together the no-decay twin of decay for
                    scale-invariant weights
    c1_conv_pred    decay on the conv weights and the predictor's       (does one MLP's decay keep
    c1_conv_proj    ... and the projector's weight matrices              the collapse, as both MLPs'
    c1_pred_only    decay on the predictor's weight matrices only        did to epoch 130 in
    c1_proj_only    decay on the projector's weight matrices only        exp_lars.py's wd_weights?
                                                                        DirectPred's predictor-only
                                                                        decay: issue 28)

(b), derived (Li & Arora 2020, Theorem 1.1, redone for our SGD): with heavy-ball momentum mu,
decay lambda and lr eta, w_t = (1 + mu - eta lambda) w_{t-1} - mu w_{t-2} - eta grad L(w_{t-1}). For a
scale-invariant w (grad L(c w) = grad L(w) / c), w~_t = alpha^-t w_t follows the same recursion
without decay, with momentum mu~ = mu / alpha^2 and lr eta alpha^-(2t-1), where alpha is the larger
root of alpha^2 - (1 + mu - eta lambda) alpha + mu = 0. Our SGD (buf = m buf + g; w -= eta buf) is
heavy-ball with m = mu~ when the gradient is scaled instead of the lr, so the conv weights get no
decay, momentum mu~ and gradients times c_t = alpha^-(2t-1) (ExpLrBYOL, exp_lr_groups); alpha is
taken step by step from the scheduled lr (the steps preset's cosine moves it < 2% over 130
epochs). At lr 0.2, lambda 4e-4, mu 0.9: alpha = 0.999194, mu~ = 0.901453, c grows 0.16% a step,
e^16 (9 million) by step 10,140, and |w| grows as sqrt(c). test_mechanism checks the equivalence
on a scale-invariant toy loss against common.LARS with decay.

Expect: (a) stays collapsed and (b) recovers near c1's epoch, if the effective lr's rise ends it.
Results: results/README.md#why-the-recoveries-happen

    python exp_mechanism.py --preset steps --seeds 2
"""
import torch

import common
import harness
import presets
from instruments import COLUMNS, TRACK, TrackedBYOL

# steps: 130 epochs = 10,140 steps, past the c1 reference's recovery (epochs ~50-90 in both seeds)
PRESETS = dict(presets.APPENDIX_PRESETS, steps=dict(presets.APPENDIX_PRESETS["steps"], epochs=130))


def conv_weights(model):
    return [p for p in model.online_encoder.parameters() if p.ndim == 4]


class NormHeldBYOL(TrackedBYOL):
    """(a): once the batch's negative cosine first reaches 0.999, each online conv weight is
    rescaled to the norm it had then, before every later step (so after every step but the
    run's last). Decay still acts within a step; the effective lr lr / |w|^2 stays where it was.
    The held norms are buffers, so a resumed run keeps them."""

    def __init__(self, cfg, image_size=32):
        super().__init__(cfg, image_size)
        self.register_buffer("held_norms", torch.zeros(len(conv_weights(self))))
        self.register_buffer("holding", torch.zeros((), dtype=torch.bool))

    def forward(self, v1, v2):
        if self.holding:
            with torch.no_grad():
                for w, n in zip(conv_weights(self), self.held_norms):
                    w.mul_(n / w.norm())
        out = super().forward(v1, v2)
        if not self.holding and out["neg_cos"].item() >= 0.999:   # one host sync a step: an ablation
            self.held_norms.copy_(torch.stack([w.detach().norm() for w in conv_weights(self)]))
            self.holding.fill_(True)
        return out


def alpha(lr, momentum, decay):
    """The larger root of alpha^2 - (1 + momentum - lr decay) alpha + momentum = 0 (docstring)."""
    b = 1 + momentum - lr * decay
    return (b + (b * b - 4 * momentum) ** 0.5) / 2


class ExpLrBYOL(TrackedBYOL):
    """(b): the conv weights' gradients are multiplied by c_t = alpha^-(2t-1) (module docstring),
    with alpha from the scheduled lr and EXP_LR_DECAY, the decay the run itself does not apply.
    The step count and c_t are buffers, so a resumed run continues them."""

    def __init__(self, cfg, image_size=32):
        super().__init__(cfg, image_size)
        self.cfg = cfg
        # the scheduled lr needs the steps per epoch, known here from train_subset (the steps
        # preset's 5,000 images); without a subset the peak lr stands in for it
        self.steps_per_epoch = cfg.train_subset // cfg.batch_size
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("grad_scale", torch.ones((), dtype=torch.float64))
        for w in conv_weights(self):
            w.register_hook(lambda g: g * self.grad_scale.to(g.dtype))

    def forward(self, v1, v2):
        lr = common.lr_at(int(self.step), self.steps_per_epoch, self.cfg) if self.steps_per_epoch else self.cfg.lr
        a = alpha(lr, self.cfg.momentum, EXP_LR_DECAY)
        self.grad_scale.mul_(a ** -2 if self.step > 0 else a ** -1)   # c_1 = alpha^-1, then x alpha^-2 a step
        self.step += 1
        return super().forward(v1, v2)


def exp_lr_groups(model, cfg):
    """groups_fn for (b): the conv weights with momentum mu / alpha^2 and no decay, the rest as
    common.param_groups gives it (no decay either at weight_decay=0)."""
    convs = {id(p) for p in conv_weights(model)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in convs]
    mu = cfg.momentum / alpha(cfg.lr, cfg.momentum, EXP_LR_DECAY) ** 2
    return [dict(params=conv_weights(model), momentum=mu, weight_decay=0.0, lars=False),
            dict(params=rest, weight_decay=cfg.weight_decay, lars=False)]


EXP_LR_DECAY = 4e-4   # the reference's wd, applied through the lr instead


def decay_on(*prefixes):
    """groups_fn: weight decay (cfg.weight_decay) on the conv weights (prefix 'conv') and/or on the
    weight matrices of the modules named by prefix; nothing else decays."""
    def groups(model, cfg):
        decayed, rest = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                conv = "conv" in prefixes and p.ndim == 4
                (decayed if conv or (p.ndim == 2 and name.startswith(prefixes)) else rest).append(p)
        return [dict(params=decayed, weight_decay=cfg.weight_decay, lars=False),
                dict(params=rest, weight_decay=0.0, lars=False)]
    return groups


# exp_recovery.py's c1: BN encoder, no MLP norm, lr 0.2, wd 4e-4 on the conv weights, instrumented
C1 = dict(TRACK, proj_norm="none", pred_norm="none", encoder_norm="bn", lr=0.2, weight_decay=4e-4, decay_params="conv")
VARIANTS = {
    "c1": C1,
    "c1_norm_held": dict(C1, model_fn=NormHeldBYOL),
    "c1_exp_lr": dict(C1, model_fn=ExpLrBYOL, groups_fn=exp_lr_groups, weight_decay=0.0),
    "c1_conv_pred": dict(C1, groups_fn=decay_on("conv", "predictor.")),
    "c1_conv_proj": dict(C1, groups_fn=decay_on("conv", "online_projector.")),
    "c1_pred_only": dict(C1, groups_fn=decay_on("predictor.")),
    "c1_proj_only": dict(C1, groups_fn=decay_on("online_projector.")),
}

if __name__ == "__main__":
    harness.main("mechanism", __doc__, PRESETS, VARIANTS, extra_columns=COLUMNS)
