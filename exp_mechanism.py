"""Why only decay on the scale-invariant conv weights ends C1's collapse: controls that could
refute the effective-lr explanation, and whether C1 recovers with an MLP's weights decaying.

The explanation under test (results/README.md, 'Why the recoveries happen'): every encoder
conv weight feeds a BatchNorm, so the loss does not depend on its norm |w|; weight decay shrinks
|w| and so raises its effective lr, lr / |w|^2, until the collapsed state can no longer hold. All variants run C1's recovering
settings (exp_recovery.py's c1: BN encoder, no MLP norm, SGD lr 0.2, wd 4e-4 on the conv
weights only, steps preset) and change:

    variant         change                                              the explanation predicts
    c1              none (the reference)                                leaves the collapse
    c1_norm_held    (a) decay on, but each conv weight is put back to   no recovery
                    its norm at the collapse (neg. cos >= 0.999) after
                    every step, so its effective lr cannot rise
    c1_exp_lr       (b) no decay; the conv weights' gradients are       recovery at about the
                    scaled by Li & Arora's (2020) exponential factor    same step as c1
                    and their momentum is 0.901453: three changes,
                    together the no-decay twin of decay for
                    scale-invariant weights
    c1_conv_pred    decay on the conv weights and the predictor's       (does one MLP's decay keep
    c1_conv_proj    ... and the projector's weight matrices              the collapse, as decay on
    c1_pred_only    decay on the predictor's weight matrices only        both MLPs' does in
    c1_proj_only    decay on the projector's weight matrices only        exp_lars.py's wd_weights?
                                                                        DirectPred's predictor-only
                                                                        decay: issue 28)

(b), derived (Li & Arora 2020, Theorem 1.1, redone for our SGD): with heavy-ball momentum mu,
decay lambda and lr eta, w_t = (1 + mu - eta lambda) w_{t-1} - mu w_{t-2} - eta grad L(w_{t-1}). For a
scale-invariant w (grad L(c w) = grad L(w) / c), w~_t = alpha^-t w_t follows the same recursion
without decay, with momentum mu~ = mu / alpha^2 and lr eta alpha^-(2t-1), where alpha is the larger
root of alpha^2 - (1 + mu - eta lambda) alpha + mu = 0. Our SGD (buf = m buf + g; w -= eta buf) is
heavy-ball with m = mu~ when the gradient is scaled instead of the lr, so the conv weights get no
decay, momentum mu~ and gradients times c_t = alpha^-(2t-1) (ExpLrBYOL); alpha is
taken step by step from the scheduled lr (the steps preset's cosine moves it < 2% over 130
epochs). At lr 0.2, lambda 4e-4, mu 0.9: alpha = 0.999194, mu~ = 0.901453, c grows 0.16% a step,
e^16 (9 million) by step 10,140, and |w| grows as sqrt(c). test_mechanism checks the equivalence
on a scale-invariant toy loss against common.LARS with decay.

Expect: (a) stays collapsed and (b) recovers near c1's epoch, if the effective lr's rise ends it.
Results: results/README.md#why-the-recoveries-happen

    python exp_mechanism.py --preset steps --seeds 2
"""
import functools

import torch

import common
import harness
import presets
from instruments import COLUMNS, TRACK, TrackedBYOL

# steps: 130 epochs = 10,140 steps, 8% of the blog's 131,200
PRESETS = dict(presets.APPENDIX_PRESETS, steps=dict(presets.APPENDIX_PRESETS["steps"], epochs=130))


def conv_weights(model):
    return [p for p in model.online_encoder.parameters() if p.ndim == 4]


class NormHeldBYOL(TrackedBYOL):
    """(a): once a step's negative cosine first reaches 0.999, each online conv weight is rescaled,
    before every later step, to the norm it had in that step's forward (so after every step but
    the run's last). Decay still acts within a step; the effective lr lr / |w|^2 stays where it
    was. The held norms are buffers, so a resumed run keeps them."""

    def __init__(self, cfg, image_size=32):
        super().__init__(cfg, image_size)
        self.register_buffer("held_norms", torch.zeros(len(conv_weights(self))))
        self.register_buffer("holding", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def before_step(self, step):
        if self.holding:
            for w, n in zip(conv_weights(self), self.held_norms):
                w.mul_(n / w.norm())
        super().before_step(step)   # TrackedBYOL keeps the weights the forward sees: convs_before

    def after_step(self, step, out):
        if not self.holding and out["neg_cos"].item() >= 0.999:   # one host sync a step: an ablation
            self.held_norms.copy_(torch.stack([w.norm() for ws in self.convs_before.values() for w in ws]))
            self.holding.fill_(True)


def alpha(lr, momentum, decay):
    """The larger root of alpha^2 - (1 + momentum - lr decay) alpha + momentum = 0 (docstring)."""
    b = 1 + momentum - lr * decay
    return (b + (b * b - 4 * momentum) ** 0.5) / 2


class ExpLrBYOL(TrackedBYOL):
    """(b): the conv weights' gradients are multiplied by c_t = alpha^-(2t-1) (module docstring),
    with alpha from each step's scheduled lr (set_lr) and EXP_LR_DECAY, the decay the run itself
    does not apply; the conv weights get momentum mu / alpha^2 and no decay (param_groups). c_t
    is a buffer, so a resumed run continues it."""

    def __init__(self, cfg, image_size=32):
        super().__init__(cfg, image_size)
        self.register_buffer("grad_scale", torch.ones((), dtype=torch.float64))
        for w in conv_weights(self):
            w.register_hook(lambda g: g * self.grad_scale.to(g.dtype))

    def set_lr(self, opt, step, total_steps):
        lr = super().set_lr(opt, step, total_steps)
        a = alpha(lr, self.cfg.momentum, EXP_LR_DECAY)
        self.grad_scale.mul_(a ** -2 if step > 0 else a ** -1)   # c_1 = alpha^-1, then x alpha^-2 a step
        return lr

    def param_groups(self):
        convs = {id(p) for p in conv_weights(self)}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in convs]
        mu = self.cfg.momentum / alpha(self.cfg.lr, self.cfg.momentum, EXP_LR_DECAY) ** 2
        return [dict(params=conv_weights(self), momentum=mu, weight_decay=0.0, lars=False),
                dict(params=rest, weight_decay=self.cfg.weight_decay, lars=False)]


EXP_LR_DECAY = 4e-4   # the reference's wd, applied through the lr instead


class DecayOnBYOL(TrackedBYOL):
    """Weight decay (cfg.weight_decay) on the conv weights (prefix 'conv') and/or on the weight
    matrices of the modules named by prefix; nothing else decays."""

    def __init__(self, cfg, image_size=32, prefixes=()):
        super().__init__(cfg, image_size)
        self.prefixes = prefixes

    def param_groups(self):
        decayed, rest = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                conv = "conv" in self.prefixes and p.ndim == 4
                (decayed if conv or (p.ndim == 2 and name.startswith(self.prefixes)) else rest).append(p)
        return [dict(params=decayed, weight_decay=self.cfg.weight_decay, lars=False),
                dict(params=rest, weight_decay=0.0, lars=False)]


def decay_on(*prefixes):
    return functools.partial(DecayOnBYOL, prefixes=prefixes)


# exp_recovery.py's c1: BN encoder, no MLP norm, lr 0.2, wd 4e-4 on the conv weights, instrumented
C1 = dict(TRACK, proj_norm="none", pred_norm="none", encoder_norm="bn", lr=0.2, weight_decay=4e-4, decay_params="conv")
VARIANTS = {
    "c1": C1,
    "c1_norm_held": dict(C1, model_fn=NormHeldBYOL),
    "c1_exp_lr": dict(C1, model_fn=ExpLrBYOL, weight_decay=0.0),
    "c1_conv_pred": dict(C1, model_fn=decay_on("conv", "predictor.")),
    "c1_conv_proj": dict(C1, model_fn=decay_on("conv", "online_projector.")),
    "c1_pred_only": dict(C1, model_fn=decay_on("predictor.")),
    "c1_proj_only": dict(C1, model_fn=decay_on("online_projector.")),
}

if __name__ == "__main__":
    harness.main("mechanism", __doc__, PRESETS, VARIANTS, extra_columns=COLUMNS)
