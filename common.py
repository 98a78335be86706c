"""BYOL, as the blog post "Understanding self-supervised and contrastive learning with BYOL"
(Untitled-AI, 2020) ran it, told in the order of one training step:

    Config . networks (ResNet, MLPs) . BYOL and its stages (views, forward and loss, optimizer
    and lr, before/after the step, target update, evaluation) . collapse statistics . EMA and
    schedules . LARS and parameter groups . build, train_step, train_byol . linear probe

Names follow the BYOL paper (Grill et al. 2020): the online network (encoder f, projector g,
predictor q), the target network (an EMA of f and g with rate tau), views v and v', online
projection z, target projection z'. Settings are cited from docs/SPEC.md. A new ablation is a
subclass of BYOL that overrides one of its stages (its docstring). Plumbing lives elsewhere:
runtime.py (validation, device, torchrun, data on disk), augment.py (drawing and applying the
views' augmentations), presets.py, harness.py (command line, CSV, checkpoints). Without the
harness, `train_byol(Config(dataset="synthetic", epochs=1))` runs as it is, in a notebook too.
"""
import copy
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from augment import apply_aug, compiled_apply_aug, mean_std, normalize, two_views
from logreg import fit_liblinear, fit_logreg
from runtime import ONE_PROCESS, check_config, fp32_math, get_device, hardware_flags, load_data, process_group, \
    resize_images, set_seed, use_bf16

# ============================================================================ config


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"         # stl10: the blog's; synthetic: tiny, for tests and --smoke
    data_dir: str = ""               # "" = $BYOL_DATA, ./data, ../shared/data (first that has it)
    train_subset: int = 0            # pretrain on the first N training images (0 = all)
    image_size: int = 0              # resize every image to N x N px once at load (0 = as stored)
    # views: the blog's augmentations (Appendix B), a pair each: (view v, view v'); one number = both
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
    mlp_hidden_dim: int = 512
    proj_dim: int = 128
    pred_layers: int = 2             # Linear layers of the predictor q (0 = identity: no predictor)
    # the contrastive row's queue (contrastive.InfoNCE; BYOL has none)
    queue_size: int = 65536          # number of stored target projections, the negatives
    queue_init: str = "random"       # random unit vectors (the blog's) or target projections of data
    # optimization
    optimizer: str = "sgd"           # sgd: the blog's torch.optim.SGD; lars: LARS in the blog's form
    lars_params: str = "all"         # weights LARS adapts; layer12: encoder layer1+2; mlp: g and q;
                                     # every: every parameter, 1-D too, adapted and decayed (the blog's code)
    lr: float = 0.8                  # absolute (not scaled by batch size), as in the blog
    momentum: float = 0.9
    weight_decay: float = 1e-4
    decay_params: str = "all"        # all (blog's SGD; LARS spares 1-D), weights (no 1-D), conv
    schedule_epochs: int = 0         # period of the lr and tau cosines; 0 = epochs. Blog: 320 (runs 10)
    base_tau: float = 0.996          # target EMA rate
    tau_schedule: str = "constant"   # constant: the blog's; cosine: BYOL paper's, per step, to 1
    # run
    epochs: int = 10
    batch_size: int = 256
    seed: int = 0
    eval_every: int = 1              # probe every N epochs (the last epoch always); 0 = last only
    device: str = "auto"             # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"          # auto: bf16 encoders on CUDA, fp32 elsewhere; MLPs, loss, probe: fp32
    compile: bool = False            # torch.compile the networks and the augmentation
    sync_bn: bool = False            # under torchrun: BN statistics over the global batch

    def __post_init__(self):   # one number for a per-view pair means both views
        for f in ("aug_crop_scale", "aug_blur", "aug_solarize"):
            v = getattr(self, f)
            v = tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else (float(v),)
            object.__setattr__(self, f, v * 2 if len(v) == 1 else v)


def view_settings(cfg):
    """augment.sample_aug_params' settings for view v and view v' (the blog uses the same for both;
    the BYOL paper blurs v always and v' rarely, and solarizes v' only: presets.BYOL_AUG)."""
    return [dict(scale=(cfg.aug_crop_scale[i], 1.0), p_blur=cfg.aug_blur[i], p_solarize=cfg.aug_solarize[i])
            for i in (0, 1)]


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


MLP_NORMS = {   # name -> factory(dim); a script may register its own (exp_bn_anatomy.py)
    "none": lambda dim: nn.Identity(),
    "bn": nn.BatchNorm1d,
    "ln": nn.LayerNorm,
    "gn": lambda dim: nn.GroupNorm(min(32, dim), dim),
    "gn_ws": lambda dim: nn.GroupNorm(min(32, dim), dim),   # build_mlp standardizes the Linear before it
}
BUILTIN_NORMS = frozenset(MLP_NORMS)


def build_mlp(in_dim, hidden_dim, out_dim, norm="bn", num_layers=2):
    """Projector / predictor, as the blog's utils.MLP: num_layers 0 = nn.Identity, 1 =
    Sequential(Linear), n >= 2 = (Linear -> norm -> ReLU) x (n - 1) -> Linear: the norm follows
    every hidden Linear, never the last (the blog's Figure 'byol_arch'). gn_ws standardizes the
    Linear before each GroupNorm, as a gn_ws encoder does its convs."""
    if num_layers == 0:
        return nn.Identity()
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        first = WSLinear if norm == "gn_ws" else nn.Linear
        layers += [first(dim, hidden_dim), MLP_NORMS[norm](hidden_dim), nn.ReLU(inplace=True)]
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
    batch, and BN is the object of study.

    Its stages are the whole run: train_byol calls nothing of the model but these, each a plain
    method whose default is the blog's BYOL. An ablation is a subclass that overrides one (a
    variant's model_fn; examples: ablation_*.py, contrastive.py, instruments.py):
      start(images, gen)                      before a fresh run's first step: nothing
      views(x, gen) -> [v, v', ...]           a uint8 batch's views: v, v' at the run's size
      param_groups() -> [group]               the optimizer's groups (default_param_groups)
      configure_optimizer() -> optimizer      the blog's SGD, or LARS, over param_groups()
      set_lr(opt, step, total_steps) -> lr    each group's lr for this step: the cosine x lr_mult
      before_step(step)                       before the forward: nothing
      forward(views) -> out                   online(v) of every view, target(v) of the first two,
                                              loss(ps, ts, zs); out: loss, z, targets, collapse stats
      update_target(tau, step)                after the optimizer step: the EMA of EMA_PAIRS
      after_step(step, out)                   after the target update: nothing
      evaluate(data, epoch, views, out) -> {column: value}   after each epoch: the linear probe
    and the pieces they use: build_encoder(cfg, image_size), online(v) -> (z, p), target(v) -> z',
    loss(ps, ts, zs); EMA_PAIRS, the (target, online) attribute pairs that __init__ copies; and
    LR_MULT, {parameter name prefix: factor}: such a group's lr is factor x the schedule's.
    The model keeps its config (self.cfg); what it must carry between steps are buffers, so that
    a resumed run keeps them. With tau 0 at every step (SimSiam's stop-gradient) the target is the
    online network, so forward reuses the online projections, detached: one forward fewer."""

    EMA_PAIRS = (("target_encoder", "online_encoder"), ("target_projector", "online_projector"))
    LR_MULT = {}

    def __init__(self, cfg, image_size=32):
        super().__init__()
        self.cfg = cfg
        self.online_encoder = self.build_encoder(cfg, image_size)
        y_dim = self.online_encoder.out_dim
        self.online_projector = build_mlp(y_dim, cfg.mlp_hidden_dim, cfg.proj_dim, cfg.proj_norm)
        self.predictor = build_mlp(cfg.proj_dim, cfg.mlp_hidden_dim, cfg.proj_dim, cfg.pred_norm, cfg.pred_layers)
        for target, online in self.EMA_PAIRS:   # the target network: copies without gradient
            setattr(self, target, copy.deepcopy(getattr(self, online)).requires_grad_(False))
        self.target_is_online = (cfg.base_tau == 0 and cfg.tau_schedule == "constant"
                                 and type(self).online is BYOL.online and type(self).target is BYOL.target)
        for name, t in zip(("mean", "std"), mean_std(cfg.dataset, "cpu")):   # the views' normalization
            self.register_buffer(name, t, persistent=False)   # on the model's device, made once

    def start(self, images, gen):
        """Once, before a fresh run's first step (not on resume), with the pretraining images and
        the run's generator: nothing (contrastive.InfoNCE fills its queue here)."""

    def views(self, x, gen):
        """The views of a uint8 batch x (under torchrun, of this process's share of it): the blog's
        v and v', each image augmented on its own (view_settings), at the run's size."""
        apply = compiled_apply_aug() if self.cfg.compile else apply_aug
        return list(two_views(x, gen, self.mean, self.std, process_group().share(len(x)),
                              conv_format(self.mean.device, self.cfg.width), view_settings(self.cfg), apply))

    def build_encoder(self, cfg, image_size):
        """The online encoder f: any module with out_dim, the size of its representation y."""
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

    def forward(self, views):
        """The step's forward, without side effects: the online network on every view, the target
        on the first two (the large views v, v'), then loss. Returns a dict: loss (with gradient
        into the online network); z, the online projections of v, detached; targets, the
        normalized target projections; pos_cos, neg_cos, z_std, pos_gap, neg_gap (collapse_stats)."""
        zs, ps = zip(*map(self.online, views))
        ts = [z.detach() for z in zs[:2]] if self.target_is_online else [self.target(v) for v in views[:2]]
        # fp32 from here on: in deep collapse 1 - cos is ~1e-7, and bf16 would scramble the gradient
        with torch.autocast(views[0].device.type, enabled=False):
            ps, ts = [F.normalize(p.float(), dim=1) for p in ps], [F.normalize(t.float(), dim=1) for t in ts]
            return dict(loss=self.loss(ps, ts, zs), z=zs[0].detach(), targets=ts, **collapse_stats(*zs[:2], *ts))

    def loss(self, ps, ts, zs):
        """ps: the online predictions q(z) of every view; ts: the target projections z' of v, v' (no
        gradient); both l2-normalized, fp32; zs: the raw online projections, with gradient. The
        blog's mean(1 - cos(q, z')), summed over each view against every other view's target: at
        two views its two orders, half the BYOL paper's 2 - 2cos, so the blog's lr 0.8 means the same."""
        return sum((1 - (p * t).sum(1)).mean() for i, p in enumerate(ps) for j, t in enumerate(ts) if i != j)

    def param_groups(self):
        """The optimizer's parameter groups: dicts of params, names, lars, weight_decay, and where
        wanted momentum, lr_mult and label (a labelled group's lr is logged as lr:<label>)."""
        return default_param_groups(self, self.cfg, self.LR_MULT)

    def configure_optimizer(self):
        """The blog's SGD (torch.optim.SGD's update) or LARS in the blog's form, over param_groups()."""
        return LARS(self.param_groups(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                    form="blog" if self.cfg.optimizer == "lars" else "byol")

    def set_lr(self, opt, step, total_steps):
        """Each group's lr for this step: the cosine lr_at x the group's lr_mult. Returns the
        schedule's lr, the CSV's lr column (lr:<label> logs what this set)."""
        lr = lr_at(step, total_steps, self.cfg.lr)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        return lr

    def before_step(self, step):
        """Before each step's forward: nothing."""

    def update_target(self, tau, step):
        """After each optimizer step: BYOL's EMA of every EMA_PAIRS pair with rate tau."""
        for target, online in self.EMA_PAIRS:
            ema_update_(getattr(self, target), getattr(self, online), tau)

    def after_step(self, step, out):
        """After each step's target update, with forward's outputs: nothing."""

    def evaluate(self, data, epoch, views=None, out=None):
        """The epoch's metrics, {CSV column: value}, after every epoch without gradient (epoch 0:
        the untrained network; views, out: the epoch's last step's, None at epoch 0): the blog's
        linear probe every eval_every epochs and at the last, None between."""
        due = epoch == self.cfg.epochs or (self.cfg.eval_every and epoch % self.cfg.eval_every == 0)
        return linear_probe(self.online_encoder, data, self.cfg) if due else dict.fromkeys(PROBE_COLUMNS)


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


def lr_at(step, total_steps, base_lr):
    """Cosine decay from base_lr to 0 over total_steps, then 0 (the blog has no warmup)."""
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))


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
    parameters (but with lars_params every); weights spares them for SGD too; conv decays only the
    encoder's (scale-invariant) conv weights, which changes no output, only their effective lr."""
    if cfg.decay_params == "conv":
        return p.ndim == 4
    spares_1d = cfg.optimizer == "lars" and cfg.lars_params != "every"
    return p.ndim > 1 or (cfg.decay_params == "all" and not spares_1d)


def default_param_groups(model, cfg, lr_mult=None):
    """SGD (blog): decay on every parameter. LARS (BYOL paper): the 1-D parameters get neither
    adaptation nor decay (lars_params every: both, as the blog's code by default); lars_params
    picks the adapted weights. lr_mult: {name prefix: factor} (e.g. {"predictor.": 10}); such a
    group's lr is factor x the schedule's, logged as lr:<prefix>."""
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


def logged_lrs(opt, cfg, lr):
    """The lrs worth a column: LARS's effective lrs, and each labelled group's lr as set_lr set it."""
    row = lars_lrs(opt) if cfg.optimizer == "lars" else {}
    row.update({f"lr:{g['label']}": None if lr is None else g["lr"] for g in opt.param_groups if "label" in g})
    return row


# ========================================================================== training


@dataclass
class Setup:
    """What a step needs, made by build()."""
    model: nn.Module
    opt: torch.optim.Optimizer
    step_fn: object      # model, or its DDP-wrapped / compiled version: forward(views)
    amp: bool            # bf16 autocast for the encoders


def build(cfg, device, model_fn=None, world=ONE_PROCESS, image_size=32):
    """The model (model_fn(cfg, image_size), default BYOL) and its configure_optimizer() on device,
    seeded first: the same initial weights wherever it is built."""
    set_seed(cfg.seed)
    model = (model_fn or BYOL)(cfg, image_size).to(device, memory_format=conv_format(device, cfg.width))
    if cfg.sync_bn and world.size > 1:
        model = world.sync_bn(model)
    opt = model.configure_optimizer()
    step_fn = world.wrap(model, device)   # model itself in one process
    return Setup(model, opt, torch.compile(step_fn) if cfg.compile else step_fn, use_bf16(cfg, device))


def train_step(s, views, tau, step):
    """One step on a batch's views: before_step, forward, backward, optimizer step, then
    update_target (the EMA with rate tau by default) and after_step."""
    s.model.before_step(step)
    with torch.autocast(views[0].device.type, dtype=torch.bfloat16, enabled=s.amp):
        out = s.step_fn(views)
    s.opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    s.opt.step()
    s.model.update_target(tau, step)
    s.model.after_step(step, out)
    return out


STATS = ("loss", "pos_cos", "neg_cos", "z_std", "pos_gap", "neg_gap")


def train_byol(cfg, on_epoch=None, data=None, checkpoint=None, model_fn=None, device=None):
    """Pretrains model_fn(cfg, image_size) (default BYOL) per cfg through its stages; returns one
    row (dict) per epoch, epoch 0 the untrained network: loss, pos_cos, neg_cos, z_std, pos_gap,
    neg_gap (the epoch's means), lr, tau, wall_s, lr:* and lars_lr:* where they apply, and what the
    model's evaluate() returns. on_epoch(row) is called as each row is made. The harness passes
    data, device and a checkpoint store; the defaults are a notebook's: data from disk, none."""
    device, world = device or get_device(cfg.device), process_group()   # world: one process, or torchrun's
    data = data or load_data(cfg.dataset, cfg.data_dir)
    check_config(cfg, MLP_NORMS, data)
    hardware_flags(device)
    data = resize_images(data, cfg.image_size) if cfg.image_size else data
    pretrain = data["pretrain_x"][:cfg.train_subset or None].to(device)
    gen = torch.Generator(device).manual_seed(cfg.seed)   # data order and views; the same on every rank
    s = build(cfg, device, model_fn, world, pretrain.shape[-1])
    steps_per_epoch, n = len(pretrain) // cfg.batch_size, cfg.batch_size   # drop_last, as the blog
    total_steps = (cfg.schedule_epochs or cfg.epochs) * steps_per_epoch   # the lr and tau cosines' period
    rows, step = resume(checkpoint, cfg, s, gen, on_epoch)
    if not rows:
        s.model.start(pretrain, gen)
    start = saved_at = time.time() - (rows[-1]["wall_s"] if rows else 0)
    for epoch in range(len(rows), cfg.epochs + 1):
        sums, lr, tau, views, out = torch.zeros(len(STATS), device=device), None, None, None, None
        if epoch > 0:
            s.model.train()
            perm = torch.randperm(len(pretrain), generator=gen, device=device)
            with fp32_math(not s.amp):
                for i in range(steps_per_epoch):
                    lr = s.model.set_lr(s.opt, step, total_steps)
                    tau = tau_at(step, total_steps, cfg.base_tau, cfg.tau_schedule)
                    views = s.model.views(pretrain[perm[i * n:(i + 1) * n]], gen)
                    out = train_step(s, views, tau, step)
                    sums += torch.stack([out[k].detach() for k in STATS])
                    step += 1
        means = (world.mean(sums) / max(steps_per_epoch, 1)).tolist() if epoch > 0 else [None] * len(STATS)
        row = dict(epoch=epoch, **dict(zip(STATS, means)), lr=lr, tau=tau)
        diverged = row["loss"] is not None and not math.isfinite(row["loss"])
        if world.rank == 0 and not diverged:   # rank 0 alone evaluates
            with torch.no_grad():
                row.update(s.model.evaluate(data, epoch, views, out))
        rows.append(dict(row, **logged_lrs(s.opt, cfg, lr), wall_s=round(time.time() - start, 2)))
        if checkpoint and epoch < cfg.epochs and (epoch <= 1 or time.time() - saved_at >= checkpoint.every_s):
            checkpoint.save(cfg, s.model, s.opt, gen, rows, step)   # rank 0 writes
            saved_at = time.time()
        if on_epoch:
            on_epoch(rows[-1])
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


# ====================================================================== linear probe

PROBE_COLUMNS = ("probe_acc", "probe_liblinear", "probe_standardized")


def probe_split(data):
    """The blog's probe protocol: ((fit images, labels), (scored images, labels)), the first and
    the second half of the test set."""
    x, y, half = data["test_x"], data["test_y"], len(data["test_x"]) // 2
    return (x[:half], y[:half]), (x[half:2 * half], y[half:2 * half])


def linear_probe(encoder, data, cfg):
    """Accuracy (%) of linear fits on frozen fp32 encoder features y of probe_split's images:
    probe_acc = probe_liblinear, the blog's (fit_liblinear), and probe_standardized (fit_logreg)."""
    (fit_x, fit_y), (val_x, val_y) = probe_split(data)
    f_fit, f_val = extract_features(encoder, fit_x, cfg), extract_features(encoder, val_x, cfg)
    if not (torch.isfinite(f_fit).all() and torch.isfinite(f_val).all()):
        # the encoder blew up (finite loss is possible: cosines of huge z)
        return dict.fromkeys(PROBE_COLUMNS, float("nan"))
    fit_y, val_y, k = fit_y.to(f_fit.device), val_y.to(f_fit.device), int(data["test_y"].max()) + 1
    fits = dict(liblinear=fit_liblinear(f_fit, fit_y, k), standardized=fit_logreg(f_fit, fit_y, k, l2=1.0 / len(f_fit)))
    acc = {name: 100.0 * (predict(f_val) == val_y).float().mean().item() for name, predict in fits.items()}
    return dict(probe_acc=acc["liblinear"], probe_liblinear=acc["liblinear"], probe_standardized=acc["standardized"])


@torch.no_grad()
def extract_features(encoder, images_u8, cfg, batch_size=1024):
    """Frozen-encoder features in eval mode, in fp32 (bf16 or TF32 would round away a collapsing
    encoder's small spread), on the encoder's device; the encoder's mode is restored."""
    device = next(encoder.parameters()).device
    (mean, std), fmt = mean_std(cfg.dataset, device), conv_format(device, cfg.width)
    was_training = encoder.training
    encoder.eval()
    feats = []
    with fp32_math():   # no TF32 convolutions on CUDA either
        for i in range(0, len(images_u8), batch_size):
            x = normalize(images_u8[i:i + batch_size].to(device).float() / 255, mean, std)
            feats.append(encoder(x.contiguous(memory_format=fmt)).float())
    encoder.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def recompute_bn_stats(encoder, images_u8, cfg, batch_size=256):
    """A copy of the encoder with its BN running statistics re-estimated on images (exact average)."""
    device = next(encoder.parameters()).device
    mean, std = mean_std(cfg.dataset, device)
    encoder = copy.deepcopy(encoder)
    for m in encoder.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None   # cumulative average
    encoder.train()
    for i in range(0, len(images_u8), batch_size):
        encoder(normalize(images_u8[i:i + batch_size].to(device).float() / 255, mean, std))
    return encoder.eval()
