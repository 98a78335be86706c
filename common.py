"""BYOL, as the blog post "Understanding self-supervised and contrastive learning with BYOL"
(Untitled-AI, 2020) ran it, told in the order of one training step:

    Config . views . networks (ResNet, MLPs, BYOL) . loss and collapse statistics . EMA and
    schedules . LARS and parameter groups . build, train_step, train_byol . linear probe

Names follow the BYOL paper (Grill et al. 2020): the online network (encoder f, projector g,
predictor q), the target network (an EMA of f and g with rate tau), views v and v', online
projection z, target projection z'. Settings are cited from docs/SPEC.md. Plumbing lives
elsewhere: runtime.py (validation, device, torchrun, data on disk), augment.py (the batched
augmentation ops), presets.py, harness.py (command line, CSV, checkpoints). Without the harness,
`train_byol(Config(dataset="synthetic", epochs=1))` runs as it is, in a notebook too.
"""
import contextlib
import copy
import math
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from augment import apply_aug, normalize, sample_aug_params
from runtime import ONE_PROCESS, check_config, fp32_math, get_device, hardware_flags, load_data, resize_images, \
    set_seed, use_bf16

# ============================================================================ config


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"         # stl10: the blog's; synthetic: tiny, for tests and --smoke
    data_dir: str = ""               # "" = $BYOL_DATA, ./data, ../shared/data (first that has it)
    train_subset: int = 0            # pretrain on the first N training images (0 = all)
    image_size: int = 0              # resize every image to N x N px once at load (0 = as stored)
    # augmentations (the blog's, Appendix B), a pair each: (view v, view v'); one number = both views
    aug_crop_scale: tuple = (0.2, 0.2)   # RandomResizedCrop's smallest area (BYOL paper: 0.08)
    aug_blur: tuple = (0.5, 0.5)     # Gaussian blur probability (BYOL paper: 1.0, 0.1)
    aug_solarize: tuple = (0.0, 0.0)   # solarize probability (BYOL paper: 0.0, 0.2)
    # encoder f: a ResNet (the blog's ResNet-18)
    stem: str = "cifar"              # cifar: 3x3 conv, no maxpool; imagenet: 7x7/2 conv + maxpool
    width: int = 64                  # channels of stage 1; 64 = standard ResNet-18 (512-d y)
    depth: int = 18                  # 18 or 34
    encoder_norm: str = "bn"         # bn, gn, gn_ws (GroupNorm + weight standardization), none
    gn_groups: int = 32              # min(gn_groups, channels) groups; the blog's 32 at width 64
    # projector g and predictor q: Linear -> norm -> ReLU -> Linear
    proj_norm: str = "bn"            # a name in MLP_NORMS
    pred_norm: str = "bn"
    mlp_bn_group: int = 0            # BN-type MLP norms: statistics over groups of k samples (ghost BN)
    mlp_hidden_dim: int = 512
    proj_dim: int = 128
    pred_layers: int = 2             # Linear layers of the predictor q (0 = identity: no predictor)
    # loss
    objective: str = "byol"          # byol: 1 - cos, both view orders; contrastive: InfoNCE + queue
    loss_form: str = "cos"           # cos: 1 - q.z' (the blog's); sqdist: 1/2 |q - z'|^2, the same
                                     # value without fp32 cancellation against 1
    queue_size: int = 65536          # contrastive only: number of stored target projections
    queue_init: str = "random"       # contrastive only: random unit vectors (the blog's) or data
    # optimization
    optimizer: str = "sgd"           # sgd: the blog's torch.optim.SGD; lars: see LARS
    lars_params: str = "all"         # weights LARS adapts; layer12: encoder layer1+2; mlp: g and q;
                                     # every: every parameter, 1-D too, adapted and decayed (the blog's default list)
    lr: float = 0.8                  # absolute (not scaled by batch size), as in the blog
    momentum: float = 0.9
    weight_decay: float = 1e-4
    decay_params: str = "all"        # all (blog's SGD; LARS spares 1-D), weights (no 1-D), conv
    lars_eta: float = 1e-3           # LARS trust coefficient
    lars_form: str = "blog"          # blog: the blog's lars.py; byol: DeepMind's (see LARS)
    schedule_epochs: int = 0         # period of the lr and tau cosines; 0 = epochs. Blog: 320 (runs 10)
    base_tau: float = 0.996          # target EMA rate
    tau_schedule: str = "constant"   # constant: the blog's; cosine: BYOL paper's, per step, to 1
    # run
    epochs: int = 10
    batch_size: int = 256
    seed: int = 0
    eval_every: int = 1              # probe every N epochs (the last epoch always); 0 = last only
    probe: str = "blog"              # blog: fit on half the test set, score the other half;
                                     # standard: fit on the train set, score the test set
    probe_bn: str = "running"        # running: BN as trained; recompute: re-estimated on the fit images
    device: str = "auto"             # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"          # auto: bf16 encoders on CUDA, fp32 elsewhere; MLPs, loss, probe: fp32
    compile: bool = False            # torch.compile the networks and the augmentation
    sync_bn: bool = False            # under torchrun: BN statistics over the global batch

    def __post_init__(self):   # one number for a per-view pair means both views
        for f in AUG_FIELDS:
            v = getattr(self, f)
            v = tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else (float(v),)
            object.__setattr__(self, f, v * 2 if len(v) == 1 else v)


AUG_FIELDS = ("aug_crop_scale", "aug_blur", "aug_solarize")


# ============================================================================= views

MEAN_STD = {   # per-channel input normalization: CIFAR-10's own; the blog used ImageNet's on STL-10
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "stl10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def mean_std(dataset, device):
    """Per-channel mean and std as device tensors, made once (a copy in the step would sync CUDA)."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in MEAN_STD[dataset])


def view_settings(cfg):
    """augment.sample_aug_params' settings for view v and view v' (the blog uses the same for both;
    the BYOL paper blurs v always and v' rarely, and solarizes v' only: presets.BYOL_AUG)."""
    return [dict(scale=(cfg.aug_crop_scale[i], 1.0), p_blur=cfg.aug_blur[i], p_solarize=cfg.aug_solarize[i])
            for i in (0, 1)]


def augment(x_u8, gen, mean, std, part=slice(None), **settings):
    """One random view of every image of a uint8 batch (of its part: a rank's share; the
    parameters are drawn for the whole batch, so a view does not depend on the split)."""
    params = sample_aug_params(len(x_u8), x_u8.shape[-1], gen, x_u8.device, **settings)
    return apply_aug(x_u8[part], {k: v[part] for k, v in params.items()}, mean, std)


def two_views(x_u8, gen, mean, std, part=slice(None), fmt=torch.contiguous_format, views=({}, {}),
              apply=apply_aug):
    """Two independent random views v, v' of a uint8 batch (of its part), in memory format fmt.
    The parameters are drawn view by view, as two augment() calls would, then applied to both views
    in one pass over a double batch: the same numbers in half the kernel launches."""
    n = len(x_u8)
    params = [sample_aug_params(n, x_u8.shape[-1], gen, x_u8.device, **v) for v in views]
    both = {k: torch.cat([p[k][part] for p in params]) for k in params[0]}
    x = x_u8[part]
    out = apply(torch.cat([x, x]), both, mean, std).contiguous(memory_format=fmt)
    return out.chunk(2)


# ========================================================================== networks


class WSConv2d(nn.Conv2d):
    """Conv with weight standardization (Qiao et al. 2019): each filter to zero mean, unit std."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def norm2d(kind, c, groups=32):
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind in ("gn", "gn_ws"):
        return nn.GroupNorm(min(groups, c), c)   # one channel a group when c < groups: InstanceNorm
    return nn.Identity()


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, norm, conv):
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


RESNET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class ResNet(nn.Module):
    """torchvision's resnet18 / resnet34 layout (fc removed) with a width multiplier, a CIFAR or
    ImageNet stem, and a selectable norm. Output: the pooled representation y, 8 * width dims."""

    def __init__(self, width=64, stem="imagenet", norm="bn", gn_groups=32, depth=18):
        super().__init__()
        conv = WSConv2d if norm == "gn_ws" else nn.Conv2d
        kind, norm = norm, (lambda c: norm2d(kind, c, gn_groups))
        if stem == "imagenet":
            self.conv1 = conv(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = conv(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = norm(width)
        chans = [width, 2 * width, 4 * width, 8 * width]
        cin = width
        for i, (c, blocks) in enumerate(zip(chans, RESNET_STAGES[depth])):
            stride = 1 if i == 0 else 2
            # made in this order, so a ResNet-18 draws its initial weights as it always did
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, c, stride, norm, conv),
                                                         *(BasicBlock(c, c, 1, norm, conv) for _ in range(blocks - 1))))
            cin = c
        self.out_dim = chans[-1]
        for m in self.modules():   # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class WSLinear(nn.Linear):
    """Linear with weight standardization: each output unit's weights to zero mean, unit std."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(1, keepdim=True)) / (w.std(1, keepdim=True) + 1e-5)
        return F.linear(x, w, self.bias)


class BatchNormParts(nn.Module):
    """BatchNorm of (n, d) features taken apart (exp_bn_anatomy.py): statistics over groups of
    `group` samples (ghost BN; 0 = the whole batch), and each part optional: center, scale (by the
    group std) and affine. Always batch statistics, as the MLPs only run in training; with every
    part on and group 0 it is nn.BatchNorm1d in training."""

    def __init__(self, dim, group=0, center=True, scale=True, affine=True, eps=1e-5):
        super().__init__()
        self.group, self.center, self.scale, self.eps = group, center, scale, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x):
        n, d = x.shape
        k = self.group or n
        if n % k:
            raise ValueError(f"BatchNormParts: batch of {n} is not a multiple of group {k}")
        g = x.float().view(n // k, k, d)   # fp32 statistics under autocast, as nn.BatchNorm
        var = g.var(1, unbiased=False, keepdim=True)
        if self.center:
            g = g - g.mean(1, keepdim=True)
        if self.scale:
            g = g * torch.rsqrt(var + self.eps)
        out = g.view(n, d)
        if self.weight is not None:
            out = out * self.weight + self.bias
        return out.to(x.dtype)


class RunningBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm that normalizes with its running statistics in training too (the blog's question:
    batch statistics, or BN's conditioning?). They are updated after use, without gradient."""

    def forward(self, x):
        mean, var = self.running_mean.clone(), self.running_var.clone()
        if self.training:
            with torch.no_grad():
                self.running_mean.lerp_(x.mean(0).float(), self.momentum)
                self.running_var.lerp_(x.var(0).float(), self.momentum)
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


_PARTS = {"bn_noaffine": dict(affine=False), "bn_center": dict(scale=False, affine=False),
          "bn_scale": dict(center=False, affine=False)}
MLP_NORMS = {
    "none": lambda dim, bn_group: nn.Identity(),
    "bn": lambda dim, bn_group: BatchNormParts(dim, bn_group) if bn_group else nn.BatchNorm1d(dim),
    "ln": lambda dim, bn_group: nn.LayerNorm(dim),
    "gn": lambda dim, bn_group: nn.GroupNorm(min(32, dim), dim),
    "gn_ws": lambda dim, bn_group: nn.GroupNorm(min(32, dim), dim),   # build_mlp standardizes the Linear
    "bn_running": lambda dim, bn_group: RunningBatchNorm1d(dim),
    **{name: (lambda dim, bn_group, kw=kw: BatchNormParts(dim, bn_group, **kw)) for name, kw in _PARTS.items()},
}
BUILTIN_NORMS = frozenset(MLP_NORMS)
UNGROUPED_NORMS = frozenset({"none", "ln", "gn", "gn_ws", "bn_running"})   # built-ins that ignore mlp_bn_group


def build_mlp(in_dim, hidden_dim, out_dim, norm="bn", bn_group=0, num_layers=2):
    """Projector / predictor, as the blog's utils.MLP: num_layers 0 = nn.Identity, 1 =
    Sequential(Linear), n >= 2 = (Linear -> norm -> ReLU) x (n - 1) -> Linear: the norm follows
    every hidden Linear, never the last (the blog's Figure 'byol_arch'). gn_ws standardizes the
    Linear before each GroupNorm, as a gn_ws encoder does its convs."""
    if num_layers == 0:
        return nn.Identity()
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        first = WSLinear if norm == "gn_ws" else nn.Linear
        layers += [first(dim, hidden_dim), MLP_NORMS[norm](hidden_dim, bn_group), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


def conv_format(device, width):
    """The convolutions' memory format: channels_last (faster on CUDA and CPU), except on CPU at a
    width that is not a multiple of 8, where oneDNN's AVX2 weight-gradient kernel writes out of
    bounds (test_no_avx2_crash_at_a_narrow_width)."""
    if device.type == "cuda" or (device.type == "cpu" and width % 8 == 0):
        return torch.channels_last
    return torch.contiguous_format


class BYOL(nn.Module):
    """The online network (encoder f, projector g, predictor q) and the target network (copies of
    f and g without gradient, moved towards the online ones after each step). Each view goes
    through each network in its own call, as in the blog's code: each view is its own BatchNorm
    batch, and BN is the object of study. forward has no side effects; the step's order is
    train_step's: forward, backward, optimizer step, update_target, after_step.

    forward(v1, v2) returns a dict: loss (with gradient into the online network); z, the online
    projections of v, detached; new_keys, the normalized target projections of v' (what the
    contrastive queue takes); pos_cos, neg_cos, z_std, pos_gap, neg_gap (collapse_stats).

    Extension points, for a subclass passed as a variant's model_fn (examples: ablation_*.py):
      build_encoder(cfg, image_size)  the online encoder f: any module with out_dim (the size of y)
      online(v) -> (z, p), target(v) -> z'   one view through each network
      loss(p1, p2, t1, t2, z1, z2)    the objective; z1, z2: the raw online projections (gradient)
      update_target(tau, step)        after each optimizer step: the EMA of EMA_PAIRS by default
      after_step(step, out)           after the target update, with forward's outputs: nothing
      EMA_PAIRS                       (target, online) attribute pairs: __init__ deep-copies each
                                      online module into its target without gradient
    With tau 0 at every step (SimSiam's stop-gradient) the target equals the online network, so
    forward reuses the online projections, detached: the same numbers, one forward fewer."""

    EMA_PAIRS = (("target_encoder", "online_encoder"), ("target_projector", "online_projector"))
    TEMPERATURE = 0.2   # InfoNCE's (MoCo v2's)

    def __init__(self, cfg, image_size=32):
        super().__init__()
        self.online_encoder = self.build_encoder(cfg, image_size)
        y_dim = self.online_encoder.out_dim
        self.online_projector = build_mlp(y_dim, cfg.mlp_hidden_dim, cfg.proj_dim, cfg.proj_norm, cfg.mlp_bn_group)
        self.predictor = build_mlp(cfg.proj_dim, cfg.mlp_hidden_dim, cfg.proj_dim, cfg.pred_norm, cfg.mlp_bn_group,
                                   cfg.pred_layers)
        for target, online in self.EMA_PAIRS:   # the target network: copies without gradient
            setattr(self, target, copy.deepcopy(getattr(self, online)).requires_grad_(False))
        # tau 0 at every step: ema_update_ copies the online weights exactly, so target(v) = online(v)'s z
        self.target_is_online = (cfg.base_tau == 0 and cfg.tau_schedule == "constant"
                                 and type(self).online is BYOL.online and type(self).target is BYOL.target)
        self.objective, self.loss_form = cfg.objective, cfg.loss_form
        if cfg.objective == "contrastive":
            # memory bank of target projections z' (MoCo): random unit vectors at first
            self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def build_encoder(self, cfg, image_size):
        return ResNet(cfg.width, cfg.stem, cfg.encoder_norm, cfg.gn_groups, cfg.depth)

    def online(self, v):
        y = self.online_encoder(v)
        with torch.autocast(v.device.type, enabled=False):   # projector and predictor in fp32
            z = self.online_projector(y.float())
            return z, self.predictor(z)

    @torch.no_grad()
    def target(self, v):
        y = self.target_encoder(v)
        with torch.autocast(v.device.type, enabled=False):
            return self.target_projector(y.float())

    def forward(self, v1, v2):
        z1, p1 = self.online(v1)
        z2, p2 = self.online(v2)
        if self.target_is_online:   # SimSiam: the stop-gradient of the online projections
            t1, t2 = z1.detach(), z2.detach()
        else:
            t1, t2 = self.target(v1), self.target(v2)
        # fp32 from here on: in deep collapse 1 - cos is ~1e-7, and bf16 would scramble the gradient
        with torch.autocast(v1.device.type, enabled=False):
            p1, p2, t1, t2 = (F.normalize(a.float(), dim=1) for a in (p1, p2, t1, t2))
            loss = self.loss(p1, p2, t1, t2, z1, z2)
            return dict(loss=loss, new_keys=t2, z=z1.detach(), **collapse_stats(z1, z2, t1, t2))

    def loss(self, p1, p2, t1, t2, z1, z2):
        """p1, p2: the online predictions q(z) of v and v'; t1, t2: the target projections z' (no
        gradient); each l2-normalized, fp32. byol: the blog's mean(1 - cos(q, z')) over both view
        orders (half the BYOL paper's 2 - 2cos, so the blog's lr 0.8 means the same); contrastive:
        InfoNCE against the queue, both orders."""
        if self.objective == "contrastive":
            return self.info_nce(p1, t2) + self.info_nce(p2, t1)
        if self.loss_form == "cos":
            return (1 - (p1 * t2).sum(1)).mean() + (1 - (p2 * t1).sum(1)).mean()
        # sqdist: the same number, and gradients, without fp32's cancellation of 1 - cos near 1
        return 0.5 * ((p1 - t2).pow(2).sum(1).mean() + (p2 - t1).pow(2).sum(1).mean())

    def update_target(self, tau, step):
        """The target's update after each optimizer step: BYOL's EMA of every EMA_PAIRS pair."""
        for target, online in self.EMA_PAIRS:
            ema_update_(getattr(self, target), getattr(self, online), tau)

    def after_step(self, step, out):
        """Called after each step's target update, with forward's outputs; nothing by default."""

    def info_nce(self, q, k):
        """Cross-entropy of the positive q.k against q.queue (the negatives)."""
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.T], 1) / self.TEMPERATURE
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))

    @torch.no_grad()
    def enqueue_(self, keys):
        """Writes keys into the queue ring buffer (no host sync)."""
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % len(self.queue))


@torch.no_grad()
def collapse_stats(z1, z2, t1, t2):
    """The blog's diagnostics, over both view orders: cosine of z of one view with z' of the other
    for the same image (pos) and other images (neg); the batch std of normalized z (~1/sqrt(d)
    spread out, 0 collapsed); pos_gap, neg_gap = 1 - cos from differences of unit vectors, which
    resolve a collapse's depth to ~1e-14 where fp32's 1 - cos stops near 1e-7."""
    z1, z2, t1, t2 = (F.normalize(a.float(), dim=1) for a in (z1, z2, t1, t2))
    n = len(z1)
    pos = neg = pos_gap = neg_gap = 0.0
    for z, t in ((z1, t2), (z2, t1)):
        sim = z @ t.T
        pos = pos + sim.diagonal().mean() / 2
        neg = neg + (sim.sum() - sim.diagonal().sum()) / (n * (n - 1)) / 2
        diag = (z - t).pow(2).sum(1)
        # sum over all pairs i, j of |z_i - t_j|^2 from the batch means (no n x n x d tensor):
        # n sum |z_i - mean z|^2 + n sum |t_j - mean t|^2 + n^2 |mean z - mean t|^2
        zm, tm = z.mean(0), t.mean(0)
        pairs = n * ((z - zm).pow(2).sum() + (t - tm).pow(2).sum()) + n * n * (zm - tm).pow(2).sum()
        pos_gap = pos_gap + diag.mean() / 4
        neg_gap = neg_gap + (pairs - diag.sum()) / (n * (n - 1)) / 4
    return dict(pos_cos=pos, neg_cos=neg, z_std=z1.std(0).mean(), pos_gap=pos_gap, neg_gap=neg_gap)


@torch.no_grad()
def effective_rank(x):
    """Effective rank (Roy & Vetterli 2007): exp of the entropy of the normalized singular values
    of the centered batch; 1 = complete collapse. float64: a deep collapse spans more than fp32."""
    s = torch.linalg.svdvals((x - x.mean(0)).double())
    p = s / s.sum().clamp_min(1e-300)
    return torch.exp(-(p * p.clamp_min(1e-300).log()).sum()).item()


# ================================================================== EMA / schedules


@torch.no_grad()
def ema_update_(target, online, tau):
    """target <- tau target + (1 - tau) online on parameters; buffers (BN running statistics) are
    copied, unused: the target only runs in training mode."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - tau)
    by_dtype = {}   # one fused copy per dtype (BN's int64 counters would push float32 ones off the fast path)
    for t, o in zip(target.buffers(), online.buffers()):
        by_dtype.setdefault(t.dtype, ([], []))
        by_dtype[t.dtype][0].append(t)
        by_dtype[t.dtype][1].append(o)
    for ts, os_ in by_dtype.values():
        torch._foreach_copy_(ts, os_)


def tau_at(step, total_steps, base_tau, schedule="constant"):
    """BYOL's tau = 1 - (1 - base_tau) (cos(pi k / K) + 1) / 2, k counted in steps."""
    if schedule == "constant" or total_steps == 0:
        return base_tau
    return 1 - (1 - base_tau) * (math.cos(math.pi * step / total_steps) + 1) / 2


def lr_at(step, steps_per_epoch, cfg):
    """Cosine decay from cfg.lr to 0 over schedule_epochs, per step (the blog has no warmup)."""
    total = (cfg.schedule_epochs or cfg.epochs) * steps_per_epoch
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


# =========================================================== LARS / parameter groups


class LARS(torch.optim.Optimizer):
    """SGD with momentum, plus a layer-wise trust ratio for groups with lars=True, in two forms:
      byol (DeepMind's BYOL code): u = g + wd w; u *= eta |w| / |u|; buf = m buf + u; w -= lr buf
      blog (the blog's lars.py):   trust = eta |w| / (|g| + wd |w|); buf = m buf + lr trust (g + wd w); w -= buf
    Groups with lars=False are SGD in the same placement of lr (byol: exactly torch.optim.SGD).
    The last trust ratio stays in state[p]["trust"] for logging."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=1e-3, form="byol"):
        if form not in ("blog", "byol"):
            raise ValueError(f"LARS form {form!r} is not blog or byol")
        self.form = form
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=False))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            if not ps:
                continue
            grads = [p.grad for p in ps]
            u = torch._foreach_add(grads, ps, alpha=g["weight_decay"])   # g + wd w
            if g["lars"]:
                w_norm = torch.stack(torch._foreach_norm(ps))
                if self.form == "byol":
                    denom = torch.stack(torch._foreach_norm(u))
                else:
                    denom = torch.stack(torch._foreach_norm(grads)) + g["weight_decay"] * w_norm
                # where |w| = 0 (a zero-initialised bias, lars_params="every") the blog's formula
                # gives trust 0, so such a parameter never moves; DeepMind's keeps the update
                fallback = torch.zeros_like(w_norm) if self.form == "blog" else torch.ones_like(w_norm)
                trust = torch.where((w_norm > 0) & (denom > 0), g["eta"] * w_norm / denom, fallback).unbind()
                torch._foreach_mul_(u, trust)
                for p, t in zip(ps, trust):
                    self.state[p]["trust"] = t
            bufs = []
            for p in ps:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(self.state[p]["momentum_buffer"])
            torch._foreach_mul_(bufs, g["momentum"])
            if self.form == "byol":
                torch._foreach_add_(bufs, u)
                torch._foreach_add_(ps, bufs, alpha=-g["lr"])
            else:
                torch._foreach_add_(bufs, u, alpha=g["lr"])
                torch._foreach_sub_(ps, bufs)


def lars_applies(name, which):
    if which in ("all", "every"):
        return True
    if which == "layer12":
        return name.startswith(("online_encoder.layer1.", "online_encoder.layer2."))
    return name.startswith(("online_projector.", "predictor."))   # "mlp"


def decays(p, cfg):
    """Whether weight decay acts on p: the blog's SGD decays everything, LARS spares the 1-D
    parameters; weights spares them for SGD too; conv decays only the encoder's (scale-invariant)
    conv weights, which changes no output, only their effective lr."""
    if cfg.decay_params == "conv":
        return p.ndim == 4
    spares_1d = cfg.optimizer == "lars" and cfg.lars_params != "every"
    return p.ndim > 1 or (cfg.decay_params == "all" and not spares_1d)


def param_groups(model, cfg, lr_mult=None):
    """SGD (blog): decay on every parameter. LARS (BYOL paper): the 1-D parameters get neither
    adaptation nor decay (lars_params every: both, as the blog's code by default); lars_params picks the adapted weights. lr_mult: {name prefix: factor}
    (e.g. {"predictor.": 10}); such a group's lr is factor x the schedule's, logged as lr:<prefix>."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lars = (cfg.optimizer == "lars" and (p.ndim > 1 or cfg.lars_params == "every")
                and lars_applies(name, cfg.lars_params))
        wd = cfg.weight_decay if decays(p, cfg) else 0.0
        prefix = next((k for k in (lr_mult or {}) if name.startswith(k)), None)
        g = groups.setdefault((lars, wd, prefix), dict(params=[], names=[], lars=lars, weight_decay=wd))
        if prefix is not None:
            g.update(lr_mult=float(lr_mult[prefix]), label=prefix.rstrip("."))
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


LARS_LOGGED = {"online_encoder.conv1.weight": "encoder.conv1",
               **{f"online_encoder.layer{i}.0.conv1.weight": f"encoder.layer{i}" for i in range(1, 5)},
               **{f"{m}.{i}.weight": f"{m.replace('online_', '')}.{i}"
                  for m in ("online_projector", "predictor") for i in (0, 3)}}

LARS_LR_COLUMNS = [f"lars_lr:{k}" for k in LARS_LOGGED.values()]


def lars_lrs(opt):
    """Effective LARS lr (group lr x last trust ratio) of the LARS_LOGGED weights."""
    return {f"lars_lr:{LARS_LOGGED[name]}": g["lr"] * opt.state[p]["trust"].item()
            for g in opt.param_groups for name, p in zip(g.get("names", []), g["params"])
            if name in LARS_LOGGED and "trust" in opt.state[p]}


# ========================================================================== training


@dataclass
class Setup:
    """What a step needs, made by build()."""
    model: nn.Module
    opt: torch.optim.Optimizer
    step_fn: object      # model, or its DDP-wrapped / compiled version: forward(v1, v2)
    aug_fn: object       # augment.apply_aug, or its compiled version
    views: list          # view_settings(cfg)
    fmt: torch.memory_format   # the convolutions' memory format (conv_format)
    amp: bool            # bf16 autocast for the encoders
    mean: torch.Tensor
    std: torch.Tensor


def build(cfg, device, model_fn=None, groups_fn=None, world=ONE_PROCESS, image_size=32):
    """The model (model_fn(cfg, image_size), default BYOL) and optimizer (groups_fn(model, cfg), default
    param_groups) on device, seeded first: the same initial weights wherever it is built."""
    set_seed(cfg.seed)
    fmt = conv_format(device, cfg.width)
    model = (model_fn or BYOL)(cfg, image_size).to(device, memory_format=fmt)
    if cfg.sync_bn and world.size > 1:
        model = world.sync_bn(model)
    # plain SGD (the blog's torch.optim.SGD) is LARS without adapted groups, in the byol form
    opt = LARS((groups_fn or param_groups)(model, cfg), lr=cfg.lr, momentum=cfg.momentum, eta=cfg.lars_eta,
               form=cfg.lars_form if cfg.optimizer == "lars" else "byol")
    step_fn = world.wrap(model, device)   # model itself in one process
    # applying the augmentation is ~370 small ops a step (results/op_count.txt): compiled, 28 kernels
    aug_fn = torch.compile(apply_aug, dynamic=False) if cfg.compile else apply_aug
    return Setup(model, opt, torch.compile(step_fn) if cfg.compile else step_fn, aug_fn, view_settings(cfg), fmt,
                 use_bf16(cfg, device), *mean_std(cfg.dataset, device))


def train_step(s, v1, v2, tau, step, world=ONE_PROCESS):
    """One BYOL step on views v1, v2: forward, backward, optimizer step, then the target update (EMA
    with rate tau by default), the contrastive queue (every rank's keys) and the after_step hook."""
    with torch.autocast(v1.device.type, dtype=torch.bfloat16, enabled=s.amp):
        out = s.step_fn(v1, v2)
    s.opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    s.opt.step()
    s.model.update_target(tau, step)
    if s.model.objective == "contrastive":
        s.model.enqueue_(world.gather(out["new_keys"]))
    s.model.after_step(step, out)
    return out


STATS = ("loss", "pos_cos", "neg_cos", "z_std", "pos_gap", "neg_gap")


def train_byol(cfg, on_epoch=None, data=None, checkpoint=None, model_fn=None, groups_fn=None, metrics_fn=None,
               device=None, world=ONE_PROCESS):
    """Pretrains BYOL per cfg; returns one dict per epoch (epoch 0 = the untrained network): loss,
    probe_acc (the blog's liblinear probe; None where not evaluated), pos_cos, neg_cos, z_std,
    pos_gap, neg_gap, lr, tau, wall_s, probe_liblinear, probe_standardized (lars_lr:*, lr:* where
    they apply). on_epoch(row) is called as each row is made. Your own pieces: model_fn and
    groups_fn (build), metrics_fn(model, views, out) -> {column: value} once an epoch on the
    epoch's last views. The harness passes data, device, world (torchrun) and a checkpoint
    store; the defaults are a notebook's: data from disk, one process, no checkpoints."""
    device = device or get_device(cfg.device)
    data = data or load_data(cfg.dataset, cfg.data_dir)
    check_config(cfg, data)
    hardware_flags(device)
    if cfg.image_size:
        data = resize_images(data, cfg.image_size)
    pretrain = data["pretrain_x"][:cfg.train_subset or None].to(device)
    gen = torch.Generator(device).manual_seed(cfg.seed)   # data order and views; the same on every rank
    s = build(cfg, device, model_fn, groups_fn, world, pretrain.shape[-1])
    part = world.share(cfg.batch_size)   # this process's share of every batch
    steps_per_epoch = len(pretrain) // cfg.batch_size   # drop_last, as the blog
    total_steps = (cfg.schedule_epochs or cfg.epochs) * steps_per_epoch   # tau's cosine period, as lr's
    rows, step = resume(checkpoint, cfg, s, gen, on_epoch)
    if not rows and cfg.objective == "contrastive" and cfg.queue_init == "data":
        fill_queue_(s.model, pretrain, gen, cfg.batch_size, s.mean, s.std, s.fmt, s.views[1])   # z' of views v'
    start = saved_at = time.time() - (rows[-1]["wall_s"] if rows else 0)
    for epoch in range(len(rows), cfg.epochs + 1):
        sums, lr, tau = torch.zeros(len(STATS), device=device), None, None   # STATS, read once an epoch
        if epoch > 0:
            s.model.train()
            perm = torch.randperm(len(pretrain), generator=gen, device=device)
            with fp32_math(not s.amp):
                for i in range(steps_per_epoch):
                    x = pretrain[perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
                    lr, tau = lr_at(step, steps_per_epoch, cfg), tau_at(step, total_steps, cfg.base_tau, cfg.tau_schedule)
                    for g in s.opt.param_groups:
                        g["lr"] = lr * g.get("lr_mult", 1.0)
                    v = two_views(x, gen, s.mean, s.std, part, s.fmt, s.views, s.aug_fn)
                    out = train_step(s, *v, tau, step, world)
                    sums += torch.stack([out[k].detach() for k in STATS])
                    step += 1
        means = (world.mean(sums) / max(steps_per_epoch, 1)).tolist() if epoch > 0 else [None] * len(STATS)
        row = dict(epoch=epoch, **dict(zip(STATS, means)), lr=lr, tau=tau)
        diverged = row["loss"] is not None and not math.isfinite(row["loss"])
        evaluate = epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0)
        acc = linear_probe(s.model.online_encoder, data, cfg, device) if evaluate and not diverged and world.rank == 0 else {}
        row.update(probe_acc=acc.get("liblinear"), probe_liblinear=acc.get("liblinear"),
                   probe_standardized=acc.get("standardized"), wall_s=round(time.time() - start, 2))
        if metrics_fn and epoch > 0:
            with torch.no_grad():
                row.update(metrics_fn(s.model, v, out))
        row.update(logged_lrs(s.opt, cfg, lr))
        rows.append(row)
        if checkpoint and epoch < cfg.epochs and (epoch <= 1 or time.time() - saved_at >= checkpoint.every_s):
            checkpoint.save(cfg, s.model, s.opt, gen, rows, step)   # rank 0 writes
            saved_at = time.time()
        if on_epoch:
            on_epoch(row)
        if diverged:
            print(f"  stopping: loss is {row['loss']} at epoch {epoch} (diverged)", file=sys.stderr)
            break
    return rows


def resume(checkpoint, cfg, s, gen, on_epoch):
    """(rows, step) of this config's checkpoint, its state loaded into s and gen; ([], 0) without one."""
    saved = checkpoint.load(cfg) if checkpoint else None
    if not saved:
        return [], 0
    s.model.load_state_dict(saved["model"])
    s.opt.load_state_dict(saved["opt"])
    gen.set_state(saved["gen"])
    print(f"  resuming from the checkpoint after epoch {saved['rows'][-1]['epoch']}")
    for row in saved["rows"]:
        if on_epoch:
            on_epoch(row)
    return saved["rows"], saved["step"]


def logged_lrs(opt, cfg, lr):
    """Per-group lrs worth a column: LARS's effective lrs, and groups with an lr_mult."""
    row = lars_lrs(opt) if cfg.optimizer == "lars" else {}
    row.update({f"lr:{g.get('label', i)}": None if lr is None else lr * g["lr_mult"]
                for i, g in enumerate(opt.param_groups) if g.get("lr_mult", 1.0) != 1.0})
    return row


@torch.no_grad()
def fill_queue_(model, images_u8, gen, batch_size, mean, std, fmt=torch.contiguous_format, view={}):
    """Fills the contrastive queue with target projections of augmented real images (with random
    unit vectors, the collapsed keys of a collapsing network can stall the gradient)."""
    idx = torch.randperm(len(images_u8), generator=gen, device=images_u8.device)[:len(model.queue)]
    for chunk in idx.split(batch_size):
        views = augment(images_u8[chunk], gen, mean, std, **view).contiguous(memory_format=fmt)
        keys = model.target(views)
        model.enqueue_(F.normalize(keys.float(), dim=1))


# ====================================================================== linear probe


@torch.no_grad()
def extract_features(encoder, images_u8, mean, std, device, batch_size=1024, fmt=torch.contiguous_format):
    """Frozen-encoder features in eval mode, in fp32 (bf16 or TF32 would round away a collapsing
    encoder's small spread); the encoder's mode is restored."""
    was_training = encoder.training
    encoder.eval()
    feats = []
    with fp32_math():   # no TF32 convolutions on CUDA either
        for i in range(0, len(images_u8), batch_size):
            x = normalize(images_u8[i:i + batch_size].to(device).float() / 255, mean, std)
            feats.append(encoder(x.contiguous(memory_format=fmt)).float())
    encoder.train(was_training)
    return torch.cat(feats)


def fit_liblinear(x, y, num_classes, C=1.0, tol=1e-4, max_iter=100):
    """The blog's probe, sklearn's LogisticRegression(solver="liblinear") with its defaults, on raw
    features: one-vs-rest, C=1, the intercept a penalized constant feature. Newton-CG with
    liblinear's stopping rule, all classes at once in float64; the objective is strictly convex,
    so it reaches liblinear's optimum (test_blog_probe_matches_sklearn_liblinear)."""
    def augment(q):
        return torch.cat([q.double(), torch.ones(len(q), 1, dtype=torch.float64, device=q.device)], 1)
    X, n = augment(x), len(x)
    Y = -torch.ones(n, num_classes, dtype=torch.float64, device=x.device)
    Y[torch.arange(n, device=x.device), y] = 1.0
    W = torch.zeros(X.shape[1], num_classes, dtype=torch.float64, device=x.device)
    pos = (Y > 0).sum(0).double()
    eps = tol * torch.clamp(torch.minimum(pos, n - pos), min=1) / n

    def objective(W):   # per class, (K,)
        return 0.5 * (W * W).sum(0) + C * F.softplus(-Y * (X @ W)).sum(0)
    f, g0 = objective(W), None
    for _ in range(max_iter):
        s = torch.sigmoid(-Y * (X @ W))
        grad = W - C * (X.T @ (Y * s))
        g0 = grad.norm(dim=0) if g0 is None else g0
        active = grad.norm(dim=0) > eps * g0
        if not active.any():
            break
        D = s * (1 - s)
        d = _conjugate_gradient(lambda V: V + C * (X.T @ (D * (X @ V))), -grad)
        step, slope = torch.ones_like(f), (grad * d).sum(0)
        for _ in range(30):   # halve each class's step until it decreases enough (Armijo)
            ok = objective(W + step * d) <= f + 0.01 * step * slope
            if ok.all():
                break
            step = torch.where(ok, step, step / 2)
        W = W + torch.where(active, step, torch.zeros_like(step)) * d
        f = objective(W)
    return lambda q: (augment(q) @ W).argmax(1)


def _conjugate_gradient(hv, b, rtol=0.1, max_iter=250):
    """Solves hv(d) = b for every column of b; a column stops at |residual| <= rtol |b| (liblinear's rule)."""
    d, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), (r * r).sum(0)
    stop = rtol ** 2 * rr
    for _ in range(max_iter):
        go = rr > stop
        if not go.any():
            break
        hp = hv(p)
        alpha = torch.where(go, rr / (p * hp).sum(0), torch.zeros_like(rr))
        d += alpha * p
        r -= alpha * hp
        rr_new = (r * r).sum(0)
        p = r + torch.where(go, rr_new / rr, torch.zeros_like(rr)) * p
        rr = rr_new
    return d


def fit_logreg(x, y, num_classes, l2, max_iter=100):
    """The 'standardized' probe: multinomial logistic regression (L-BFGS, l2/2 |W|^2) on
    standardized features."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda q: ((q - mu) / sd @ w + b).argmax(1)


def linear_probe(encoder, data, cfg, device):
    """Accuracy (%) of linear fits on frozen fp32 encoder features y: {"liblinear": the blog's,
    "standardized": fit_logreg}. probe blog: fit on half the test set, score the other half (the
    blog's protocol); standard: fit on the train set, score the test set."""
    mean, std = mean_std(cfg.dataset, device)
    if cfg.probe == "blog":
        half = len(data["test_x"]) // 2
        fit_x, fit_y = data["test_x"][:half], data["test_y"][:half]
        val_x, val_y = data["test_x"][half:2 * half], data["test_y"][half:2 * half]
    else:
        fit_x, fit_y, val_x, val_y = data["train_x"], data["train_y"], data["test_x"], data["test_y"]
    if cfg.probe_bn == "recompute":
        encoder = recompute_bn_stats(encoder, fit_x, mean, std, device)
    fmt = conv_format(device, cfg.width)
    f_fit = extract_features(encoder, fit_x, mean, std, device, fmt=fmt)
    f_val = extract_features(encoder, val_x, mean, std, device, fmt=fmt)
    if not (torch.isfinite(f_fit).all() and torch.isfinite(f_val).all()):
        # the encoder blew up (finite loss is possible: cosines of huge z)
        return dict(liblinear=float("nan"), standardized=float("nan"))
    fit_y, val_y, k = fit_y.to(device), val_y.to(device), int(data["test_y"].max()) + 1
    fits = dict(liblinear=fit_liblinear(f_fit, fit_y, k), standardized=fit_logreg(f_fit, fit_y, k, l2=1.0 / len(f_fit)))
    return {name: 100.0 * (predict(f_val) == val_y).float().mean().item() for name, predict in fits.items()}


@torch.no_grad()
def recompute_bn_stats(encoder, images_u8, mean, std, device, batch_size=256):
    """A copy of the encoder with its BN running statistics re-estimated on images (exact average)."""
    encoder = copy.deepcopy(encoder)
    for m in encoder.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None   # cumulative average
    encoder.train()
    for i in range(0, len(images_u8), batch_size):
        encoder(normalize(images_u8[i:i + batch_size].to(device).float() / 255, mean, std))
    return encoder.eval()
