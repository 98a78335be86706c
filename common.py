"""The research code for reproducing "Understanding self-supervised and contrastive learning with
BYOL" (Untitled-AI blog post, 2020) and its appendix, in the order of one training step:

    config and presets . data . augmentations (views) . networks, loss and collapse statistics
    . EMA and schedules . LARS and parameter groups . train_step, train_byol . linear probe

Names follow the BYOL paper (Grill et al. 2020): online network (encoder f, projector g,
predictor q), target network (EMA of f and g with rate tau), views v and v', online
projection z, target projection z'. Settings are cited from docs/SPEC.md. The run harness
(command line, CSV, checkpoints, torchrun, validation) is harness.py; it never changes a number.
This module imports nothing of the repo: the harness prepares what a run needs (a validated
config, the device, the data, the process group, a checkpoint store) and hands it to
train_byol, whose defaults are one process without checkpoints, so that
`train_byol(Config(dataset="synthetic", epochs=1))` runs as it is, in a notebook too.
"""
import contextlib
import copy
import math
import pickle
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ============================================================================ config


class UsageError(Exception):
    """Bad input: a value or a file that can never make a valid run. The scripts print it as one
    line and exit with code 2 (harness.main)."""


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"         # stl10: the blog's; synthetic: tiny, for tests and --smoke
    data_dir: str = ""               # "" = $BYOL_DATA, ./data, ../shared/data (first that has it)
    train_subset: int = 0            # pretrain on the first N training images (0 = all)
    image_size: int = 0              # resize every image to N x N px once at load (0 = as stored)
    # augmentations (the blog's, Appendix B), a pair each: (view v, view v'); one number = both views
    aug_crop_scale: tuple = (0.2, 0.2)   # RandomResizedCrop's smallest area (BYOL paper: 0.08)
    aug_jitter: tuple = (1.0, 1.0)   # colour-jitter strength: x (0.4, 0.4, 0.4, 0.1), applied w.p. 0.8
    aug_blur: tuple = (0.5, 0.5)     # Gaussian blur probability (BYOL paper: 1.0, 0.1)
    aug_solarize: tuple = (0.0, 0.0)   # solarize probability (BYOL paper: 0.0, 0.2)
    # encoder f: a ResNet (the blog's ResNet-18)
    stem: str = "cifar"              # cifar: 3x3 conv, no maxpool; imagenet: 7x7/2 conv + maxpool
    width: int = 64                  # channels of stage 1; 64 = standard ResNet-18 (512-d y)
    depth: int = 18                  # 18 or 34: BasicBlocks per stage [2, 2, 2, 2] or [3, 4, 6, 3]
    encoder_norm: str = "bn"         # gn_ws: GroupNorm + weight standardization
    gn_groups: int = 32              # encoder GroupNorm: min(gn_groups, channels) groups. The blog's
                                     # 32 at width 64 is 2-16 channels a group; width w needs w / 2
    # projector g and predictor q: Linear -> norm -> ReLU -> Linear
    proj_norm: str = "bn"            # a name in MLP_NORMS: none, bn, ln, gn, gn_ws, bn_running (BN with
                                     # running stats in training), bn_noaffine/center/scale: BN's parts
    pred_norm: str = "bn"            # the same choices, for the predictor
    mlp_bn_group: int = 0            # BN-type MLP norms: statistics over groups of k samples of
                                     # the batch (ghost BN); 0 = the whole batch
    mlp_hidden_dim: int = 512
    proj_dim: int = 128
    proj_out_norm: str = "none"      # a norm on the projector's output z (SimSiam: bn); none: the blog's
    proj_layers: int = 2             # Linear layers of the projector g (0 = identity, z = y)
    pred_layers: int = 2             # ... of the predictor q (0 = identity: BYOL without a predictor)
    # loss
    objective: str = "byol"          # byol: 1 - cos, both view orders; contrastive: InfoNCE + queue
    loss_form: str = "cos"           # byol only. cos: 1 - q.z' (the blog's); sqdist: 1/2 |q - z'|^2,
                                     # the same value computed without cancellation against 1
    temperature: float = 0.2         # contrastive only
    queue_size: int = 65536          # contrastive only: number of stored target projections
    queue_init: str = "random"       # contrastive only: random unit vectors (the blog's MoCo code);
                                     # data: target projections of real images (see fill_queue_)
    # optimization
    optimizer: str = "sgd"           # sgd: the blog's torch.optim.SGD; lars: see LARS
    lars_params: str = "all"         # weights LARS adapts; layer12: encoder layer1+2; mlp: g and q
    lr: float = 0.8                  # absolute (not scaled by batch size), as in the blog
    momentum: float = 0.9
    weight_decay: float = 1e-4       # SGD: on every parameter (blog). LARS: not on biases/norms
    decay_params: str = "all"        # which parameters decay. all: as above; weights: none of the
                                     # 1-D ones (biases, norm gains); conv: only the encoder's conv
                                     # weights, scale-invariant when a norm (or WS) follows each
    lars_eta: float = 1e-3           # LARS trust coefficient
    lars_form: str = "blog"          # blog: the blog's lars.py, trust eta|w| / (|g| + wd|w|), lr inside
                                     # the momentum; byol: DeepMind's, eta|w| / |g + wd w|, lr outside
    warmup_epochs: float = 0.0
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
    probe_fit: str = "liblinear"     # liblinear: the blog's sklearn LogisticRegression(solver=
                                     # "liblinear"), one-vs-rest, C=1, raw features; standardized:
                                     # multinomial L-BFGS on standardized features (both are logged)
    probe_bn: str = "running"        # running: BN in eval mode as trained; recompute: BN stats
                                     # re-estimated on the probe's fit images first
    device: str = "auto"             # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"          # auto: bf16 autocast on CUDA, fp32 elsewhere; for the encoders
                                     # only: projector, predictor, loss, probe are always fp32
    compile: bool = False            # torch.compile the online and target networks and the augmentation
    sync_bn: bool = False            # under torchrun: BN statistics over the global batch (all
                                     # ranks); off: each rank's BN sees batch_size / world samples

    def __post_init__(self):   # one number for a per-view pair means both views
        for f in AUG_FIELDS:
            v = getattr(self, f)
            v = tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else (float(v),)
            object.__setattr__(self, f, v * 2 if len(v) == 1 else v)


AUG_FIELDS = ("aug_crop_scale", "aug_jitter", "aug_blur", "aug_solarize")


# the values each str field allows (the MLP norms' names join below, with MLP_NORMS)
CHOICES = dict(dataset=("cifar10", "stl10", "synthetic"), stem=("cifar", "imagenet"),
               encoder_norm=("bn", "gn", "gn_ws", "none"), objective=("byol", "contrastive"),
               loss_form=("cos", "sqdist"), decay_params=("all", "weights", "conv"),
               optimizer=("sgd", "lars"), lars_params=("all", "layer12", "mlp"),
               tau_schedule=("constant", "cosine"), probe=("blog", "standard"),
               probe_fit=("liblinear", "standardized"), lars_form=("blog", "byol"),
               probe_bn=("running", "recompute"), queue_init=("random", "data"),
               precision=("auto", "bf16", "fp32"))


# ============================================================================ presets
# Settings the scripts' presets share (SPEC.md section 2); each script adds epochs and its own.
# blog: the blog's STL-10 runs. cifar10: the same recipe on CIFAR-10, for a GPU. cpu: minutes on
# 2 cores (chosen by measurement, README "The CPU preset"): a narrow CIFAR-stem ResNet-18 on the
# first 10k CIFAR-10 images; batch 64 gives 4x the steps of 256 at the same images/s on 2 cores.
BLOG_STL10 = dict(dataset="stl10", stem="imagenet", width=64, batch_size=256, lr=0.8, weight_decay=1e-4,
                  base_tau=0.996, queue_size=65536)

CIFAR10_GPU = dict(BLOG_STL10, dataset="cifar10", stem="cifar", queue_size=16384, eval_every=5)   # probe: 1 in 5

CPU_SMALL = dict(dataset="cifar10", stem="cifar", width=16, train_subset=10000, batch_size=64, lr=0.1,
                 weight_decay=1e-4, base_tau=0.99, queue_size=4096, queue_init="data")

# Table 1's presets (10 epochs of the blog's 320-epoch schedule), shared by every script built on
# Table 1 (exp_table1_norms.py, exp_bn_anatomy.py, bench.py, the ablations). cpu: 12 epochs, lr 0.1
# and tau 0.99 (a faster target) for the short horizon (results/tuning/README.md).
TABLE1_PRESETS = {"blog": dict(BLOG_STL10, epochs=10, schedule_epochs=320),
                  "cifar10": dict(CIFAR10_GPU, epochs=10, schedule_epochs=320),
                  "cpu": dict(CPU_SMALL, epochs=12, schedule_epochs=320)}

# The appendix scripts' presets: 320 epochs, as the blog's appendix runs. cpu: the first 8 epochs
# of that 320-epoch schedule (lr and tau as at the start of a long run) on 5k images (78 steps
# each): what collapses early can show, recoveries at epoch 10-100 cannot.
# steps: the appendix's recoveries on a CPU. The cpu preset made smaller for steps per second
# (width 8, CIFAR-10 at 16 px, 5k images, batch 64: 78 steps an epoch; measured 15.6 steps/s on 2
# cores, against 3.6-4.1 for the cpu preset: `python bench.py --preset steps --steps 40`), run on
# the blog's own step schedule: its cosines (lr, and tau where scheduled) span the blog's 320 x 410
# steps, and it keeps the blog's lr 0.8, wd 1e-4 and tau 0.996, so that lr x wd x steps, the clock
# of the decay, reads as in the blog. Each script sets how many epochs a finding needs. Its
# GroupNorm has the default 32 groups, one channel each in layers 1-3 at width 8; the *_gn4
# variants have the blog's 2-16 channels a group. Speed: results/history/notebook.md ('A preset built for steps').
BLOG_STEPS = 320 * 410   # the blog's appendix runs: 320 epochs of 410 steps (105k STL-10 images, batch 256)

APPENDIX_PRESETS = {"blog": dict(BLOG_STL10, epochs=320), "cifar10": dict(CIFAR10_GPU, epochs=320),
                    "cpu": dict(CPU_SMALL, train_subset=5000, epochs=8, eval_every=2, schedule_epochs=320),
                    "steps": dict(CPU_SMALL, width=8, image_size=16, train_subset=5000, lr=0.8, weight_decay=1e-4,
                                  base_tau=0.996, epochs=8, eval_every=5, schedule_epochs=BLOG_STEPS // 78)}

# LARS with the BYOL paper's settings (section 3.3 and DeepMind's config: trust 1e-3, weight decay
# 1.5e-6 off biases and norms, tau 0.996 -> 1 on a per-step cosine), run through the blog's own LARS
# update (lars_form="blog": the blog's appendix runs used its lars.py; see LARS)
LARS_BYOL = dict(optimizer="lars", lars_eta=1e-3, weight_decay=1.5e-6, tau_schedule="cosine", lars_form="blog")
# The BYOL paper's asymmetric augmentations (its Table 6): crops down to 8% of the area, view v
# always blurred and never solarized, view v' blurred w.p. 0.1 and solarized w.p. 0.2. (Its
# saturation jitter is 0.2 where the blog's is 0.4; aug_jitter scales all four together, so that
# one difference stays.)
BYOL_AUG = dict(aug_crop_scale=0.08, aug_blur=(1.0, 0.1), aug_solarize=(0.0, 0.2))


# ============================================================================== device


def get_device(name="auto"):
    """auto: cuda, else mps, else cpu; or the named device, checked to exist here."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise UsageError(f"--device {name!r}: {e}") from None
        if device.type not in ("cpu", "cuda", "mps"):
            raise UsageError(f"--device {name}: choose auto, cpu, cuda, cuda:N or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"--device {name}: MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class OneProcess:
    """The process group train_byol runs in, by default: one process, rank 0 of 1, where every
    method leaves its argument as it is. harness.Torchrun is the same interface over torchrun's
    ranks (DDP, the rank's slice of each batch, means and gathers over ranks)."""
    rank, size = 0, 1

    def wrap(self, model, device):   # DistributedDataParallel under torchrun
        return model

    def sync_bn(self, model):   # nn.SyncBatchNorm under torchrun with --sync-bn
        return model

    def share(self, batch_size):   # the slice of every batch this process trains on
        return slice(self.rank * batch_size // self.size, (self.rank + 1) * batch_size // self.size)

    def mean(self, t):   # t averaged over ranks
        return t

    def gather(self, t):   # t of every rank, concatenated in rank order
        return t


ONE_PROCESS = OneProcess()


# ================================================================================ data
# Images stay uint8 tensors on the training device; views are made there (augmentations below).

# per-channel mean/std used to normalize inputs: CIFAR-10's own; the blog used ImageNet's on STL-10
MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "stl10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))}


def load_dataset(name, folder=None):
    """uint8 image tensors (N, 3, H, W) and int64 labels: pretrain_x, train_x/y, test_x/y, read
    from the dataset's folder (cifar-10-batches-py/ or stl10_binary/; harness.load_data finds it
    on disk, or downloads it). synthetic needs none: make_synthetic()."""
    if name == "synthetic":
        return make_synthetic()
    if folder is None:
        raise UsageError(f"{name}: give its folder, or load it with harness.load_data({name!r}, data_dir), "
                         f"which looks in --data-dir, $BYOL_DATA, ./data and ../shared/data")
    return (load_cifar10 if name == "cifar10" else load_stl10)(Path(folder))


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated or not a pickle
        raise UsageError(f"{path} is unreadable ({type(e).__name__}: {e}); delete it and "
                         f"download CIFAR-10 again (--download)") from None


def load_cifar10(folder):
    """CIFAR-10 python-format batches read directly (torchvision's class would check md5s)."""
    def batches(names):
        xs, ys = [], []
        for name in names:
            d = _unpickle(folder / name)
            x = np.asarray(d.get(b"data", []), dtype=np.uint8)
            if x.ndim != 2 or x.shape[1] != 3072 or len(d.get(b"labels", [])) != len(x):
                raise UsageError(f"{folder / name} is not a CIFAR-10 batch (data shape {x.shape})")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    train_x, train_y = batches([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = batches(["test_batch"])
    return dict(pretrain_x=train_x, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)


def _read_stl(path, images):
    n_bytes = path.stat().st_size
    if images and n_bytes % (3 * 96 * 96):
        raise UsageError(f"{path}: {n_bytes} bytes is not a whole number of 96x96 RGB images")
    a = np.fromfile(path, dtype=np.uint8)
    if not images:
        return torch.from_numpy(a.astype(np.int64) - 1)  # labels are stored as 1..10
    # STL-10 binary stores each image channel-major and column-major: (N, C, W, H)
    return torch.from_numpy(a.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy())


def load_stl10(folder):
    """STL-10 binary format. Pretraining uses train+unlabeled (105k images), as the blog."""
    train_x, unlabeled = _read_stl(folder / "train_X.bin", True), _read_stl(folder / "unlabeled_X.bin", True)
    d = dict(pretrain_x=torch.cat([train_x, unlabeled]), train_x=train_x,
             train_y=_read_stl(folder / "train_y.bin", False),
             test_x=_read_stl(folder / "test_X.bin", True), test_y=_read_stl(folder / "test_y.bin", False))
    for split in ("train", "test"):
        if len(d[f"{split}_x"]) != len(d[f"{split}_y"]):
            raise UsageError(f"{folder}: {split}_X.bin and {split}_y.bin hold different counts")
    return d


def make_synthetic(n_train=512, n_test=512, size=32, num_classes=10, seed=0):
    """Tiny dataset with class-dependent structure (a colour and an oriented grating per class,
    plus noise), so a linear probe on good features beats chance. For tests and --smoke."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(num_classes, 3, 1, 1, generator=g)
    angles = torch.rand(num_classes, generator=g) * math.pi
    freq = 2 * math.pi * (2 + 4 * torch.rand(num_classes, generator=g)) / size
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")

    def sample(n):
        y = torch.randint(num_classes, (n,), generator=g)
        phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
        proj = xx * angles[y, None, None].cos() + yy * angles[y, None, None].sin()
        grating = torch.sin(freq[y, None, None] * proj + phase)[:, None]
        brightness = 0.3 * torch.rand(n, 1, 1, 1, generator=g)
        img = (0.3 * colours[y] + 0.15 * grating + brightness
               + 0.4 * torch.rand(n, 3, size, size, generator=g))
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), y
    train_x, train_y = sample(n_train)
    test_x, test_y = sample(n_test)
    return dict(pretrain_x=train_x, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)


def resize_images(data, size):
    """A copy of a load_dataset() dict with every image area-averaged to size x size (uint8)."""
    def resize(x):
        if x.shape[-1] == size:
            return x
        return F.interpolate(x.float(), size=(size, size), mode="area").round().clamp(0, 255).to(torch.uint8)
    return {k: resize(v) if k.endswith("_x") else v for k, v in data.items()}


# ======================================================================= augmentations
# The blog's augmentations (Appendix B = MoCo v2's), done on a whole uint8 batch on the training
# device, with independent random parameters for every image and every view. They match
# torchvision's per-image functional ops for the same parameters (see test_common.py).
def sample_aug_params(n, size, gen, device, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), jitter=(0.4, 0.4, 0.4, 0.1),
                      p_jitter=0.8, p_gray=0.2, p_blur=0.5, sigma=(0.1, 2.0), p_solarize=0.0):
    """Per-image parameters, drawn like torchvision's RandomResizedCrop/ColorJitter/... do. The
    solarize draw comes last and only where p_solarize > 0, so the blog's views draw as before."""
    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, device=device)
    # RandomResizedCrop: 10 tries of (area, log-uniform aspect), first valid one wins,
    # else the whole (square) image
    area = size * size * u(n, 10, lo=scale[0], hi=scale[1])
    aspect = torch.exp(u(n, 10, lo=math.log(ratio[0]), hi=math.log(ratio[1])))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = ok.int().argmax(1, keepdim=True)
    any_ok = ok.any(1)
    w = torch.where(any_ok, w.gather(1, first)[:, 0], torch.full_like(w[:, 0], size))
    h = torch.where(any_ok, h.gather(1, first)[:, 0], torch.full_like(h[:, 0], size))
    top = torch.floor(u(n) * (size - h + 1))
    left = torch.floor(u(n) * (size - w + 1))
    b, c, s, hue = jitter
    return dict(
        box=torch.stack([top, left, h, w], 1),                        # (n, 4) pixels
        flip=u(n) < 0.5,
        jitter=u(n) < p_jitter,
        factors=torch.stack([u(n, lo=1 - b, hi=1 + b), u(n, lo=1 - c, hi=1 + c),
                             u(n, lo=1 - s, hi=1 + s), u(n, lo=-hue, hi=hue)], 1),
        order=torch.argsort(u(n, 4), dim=1),                         # random op order per image
        gray=u(n) < p_gray,
        blur=u(n) < p_blur,
        sigma=u(n, lo=sigma[0], hi=sigma[1]),
        solarize=u(n) < p_solarize if p_solarize > 0 else torch.zeros(n, dtype=torch.bool, device=device))


def resized_crop_flip(img, box, flip, size):
    """Bilinear crop-and-resize of float images (n, 3, H, W) to size x size, per-image box
    (top, left, h, w) and horizontal flip, as one grid_sample. Sample points are clamped to
    the crop box, which is what torchvision's crop-then-resize does at the box's edges."""
    n, _, H, W = img.shape
    top, left, h, w = box.unbind(1)
    t = (torch.arange(size, device=img.device, dtype=img.dtype) + 0.5) / size   # (size,)
    ys = (top[:, None] + t * h[:, None] - 0.5).clamp(top[:, None], (top + h - 1)[:, None])
    xs = (left[:, None] + t * w[:, None] - 0.5).clamp(left[:, None], (left + w - 1)[:, None])
    xs = torch.where(flip[:, None], xs.flip(1), xs)
    gx = (2 * xs + 1) / W - 1                                        # align_corners=False
    gy = (2 * ys + 1) / H - 1
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], -1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(img):
    """ITU-R 601 luma, torchvision's weights; (n, 3, H, W) -> (n, 1, H, W)."""
    return (0.2989 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3])


def _blend(img, other, factor):
    return (factor * img + (1 - factor) * other).clamp(0, 1)


def adjust_hue(img, shift):
    """Rotate hue by shift (fraction of a turn, per image) via HSV, as torchvision does."""
    r, g, b = img.unbind(1)
    maxc, minc = img.max(1).values, img.min(1).values
    delta = maxc - minc
    sat = delta / torch.where(delta > 0, maxc, torch.ones_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    hue = torch.remainder(hue / 6.0 + shift[:, None, None], 1.0)
    # HSV -> RGB in closed form: channel n = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    n = 5.0 - 2.0 * torch.arange(3, device=img.device, dtype=img.dtype)   # 5, 3, 1 for R, G, B
    k = torch.remainder(n[None, :, None, None] + 6 * hue[:, None], 6.0)
    return maxc[:, None] * (1 - sat[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1))


def color_jitter(img, factors, order, apply):
    """ColorJitter(brightness, contrast, saturation, hue) in a random order per image (order[i]
    is a permutation of 0..3); images with apply=False are left untouched. Without a per-image
    loop and without host syncs: brightness, contrast and saturation are all blends
    f * img + (1 - f) * other (other = 0, the mean grey, the grey image), so each slot is one
    masked blend; hue, the costly op, runs once, between the blends before and after its slot."""
    col = (-1, 1, 1, 1)
    hue_slot = (order == 3).int().argmax(1)

    def blends(img, slots, before):
        for slot in slots:
            op = order[:, slot]
            take = apply & (op != 3) & ((slot < hue_slot) if before else (slot > hue_slot))
            gray = grayscale(img)
            other = torch.where((op == 0).view(col), torch.zeros_like(gray),
                                torch.where((op == 1).view(col), gray.mean((1, 2, 3), keepdim=True), gray))
            img = torch.where(take.view(col), _blend(img, other, factors.gather(1, op[:, None]).view(col)), img)
        return img
    img = blends(img, range(3), before=True)
    img = torch.where(apply.view(col), adjust_hue(img, factors[:, 3]), img)
    return blends(img, range(1, 4), before=False)


def gaussian_blur(img, sigma, apply, kernel_size):
    """Separable Gaussian blur with a per-image sigma and reflect padding (torchvision's
    kernel); images with apply=False get a delta kernel, i.e. are unchanged."""
    n, c, H, W = img.shape
    x = torch.arange(kernel_size, device=img.device, dtype=img.dtype) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)
    delta = (x == 0).to(img.dtype).expand_as(k)
    k = torch.where(apply[:, None], k, delta).repeat_interleave(c, 0)   # (n*c, K)
    p = kernel_size // 2
    out = F.pad(img.reshape(1, n * c, H, W), (p, p, p, p), mode="reflect")
    out = F.conv2d(out, k[:, None, None, :], groups=n * c)
    out = F.conv2d(out, k[:, None, :, None], groups=n * c)
    return out.reshape(n, c, H, W)


def blur_kernel_size(size):
    """Blur sigma is U[0.1, 2] in pixels at STL-10's 96 px (blog); we scale sigma with the image
    size (so 32 px CIFAR gets U[0.033, 0.67]) and cut the kernel at 3 sigma_max."""
    return 2 * math.ceil(3 * 2.0 * size / 96) + 1


def apply_aug(x_u8, params, mean, std):
    """uint8 (n, 3, H, W) + params -> normalized float views (n, 3, H, W)."""
    size = x_u8.shape[-1]
    img = resized_crop_flip(x_u8.float() / 255, params["box"], params["flip"], size)
    img = color_jitter(img, params["factors"], params["order"], params["jitter"])
    img = torch.where(params["gray"][:, None, None, None], grayscale(img).expand_as(img), img)
    img = gaussian_blur(img, params["sigma"] * size / 96, params["blur"], blur_kernel_size(size))
    img = torch.where(params["solarize"][:, None, None, None], solarize(img), img)
    return normalize(img, mean, std)


def solarize(img):
    """The BYOL paper's solarization (its Table 6): x if x < 0.5 else 1 - x, on [0, 1] images."""
    return torch.where(img < 0.5, img, 1.0 - img)


def normalize(img, mean, std):
    """mean, std: (1, 3, 1, 1) tensors on img's device, made once by mean_std()."""
    return (img - mean) / std


def mean_std(dataset, device):
    """Per-channel mean and std of a dataset as device tensors (made once: a host-to-device
    copy inside the step would be a sync on CUDA)."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in MEAN_STD[dataset])


def view_settings(cfg):
    """sample_aug_params' settings for view v and view v' from cfg's aug_* fields (a pair each:
    the blog uses the same for both views, the BYOL paper blurs v always and v' rarely, and
    solarizes v' only)."""
    return [dict(scale=(cfg.aug_crop_scale[i], 1.0), jitter=tuple(cfg.aug_jitter[i] * j for j in (0.4, 0.4, 0.4, 0.1)),
                 p_blur=cfg.aug_blur[i], p_solarize=cfg.aug_solarize[i]) for i in (0, 1)]


def augment(x_u8, gen, mean, std, part=slice(None), **settings):
    """One random view of every image of a uint8 batch, on x's device. part: the slice of the
    batch to make views of (a rank's share); the parameters are drawn for the whole batch, so
    a view does not depend on how the batch is split over ranks. settings: sample_aug_params'."""
    params = sample_aug_params(len(x_u8), x_u8.shape[-1], gen, x_u8.device, **settings)
    return apply_aug(x_u8[part], {k: v[part] for k, v in params.items()}, mean, std)


def two_views(x_u8, gen, mean, std, part=slice(None), fmt=torch.contiguous_format, views=({}, {}),
              apply=apply_aug):
    """Two independent random views v, v' of a uint8 batch (of its part), in the convolutions'
    memory format fmt (conv_format); views: each view's settings (view_settings; default the blog's).
    The parameters are drawn view by view, as two augment() calls would, and applied to both views
    in one pass over a double batch: the same numbers (every op is per image) in half the kernel
    launches. apply: apply_aug, or its torch.compile'd version (train_byol with cfg.compile)."""
    n = len(x_u8)
    params = [sample_aug_params(n, x_u8.shape[-1], gen, x_u8.device, **v) for v in views]
    both = {k: torch.cat([p[k][part] for p in params]) for k in params[0]}
    x = x_u8[part]
    out = apply(torch.cat([x, x]), both, mean, std).contiguous(memory_format=fmt)
    return out.chunk(2)


# ============================================================================== networks


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


# BasicBlocks in each of the four stages, by depth (He et al. 2016, Table 1)
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
    """BatchNorm of (n, d) features taken apart, for exp_bn_anatomy.py. Statistics over groups
    of `group` consecutive samples of the batch (ghost BN; 0 = the whole batch; batches are
    shuffled, so a group is a random subset), and each step optional: center (subtract the
    group mean), scale (divide by the group std, the std of the uncentered x when center is
    off) and affine (gamma, beta). Gradients flow through the statistics, as in BN. It always
    uses the current batch's statistics, in train and eval mode alike: the projector and
    predictor only ever run in training here, so it keeps no running statistics. With every
    part on and group 0 (or = n) it computes what nn.BatchNorm1d computes in training."""

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
    """BatchNorm that normalizes with its running statistics in training too (eval-mode BN, a
    question the blog raises: is it the batch statistics that prevent collapse, or BN's
    conditioning?). The running statistics are updated from each batch after it is normalized, as
    plain constants: no gradient flows through them, and each view's forward reads a copy, so the
    update does not touch a tensor that backward still needs."""

    def forward(self, x):
        mean, var = self.running_mean.clone(), self.running_var.clone()
        if self.training:
            with torch.no_grad():
                self.running_mean.lerp_(x.mean(0).float(), self.momentum)
                self.running_var.lerp_(x.var(0).float(), self.momentum)
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


# MLP norms by name: (dim, bn_group) -> the module after each hidden Linear (and after the
# projector's last one with proj_out_norm). Plain "bn" over the whole batch is nn.BatchNorm1d (so
# --sync-bn can convert it); ghost groups and BN's parts are BatchNormParts. A script adds its own
# with MLP_NORMS["name"] = lambda dim, bn_group: ..., then proj_norm="name" (validated, in the hash
# and the cfg_* columns like any other; a norm added this way is hashed by its code).
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
CHOICES.update(proj_norm=MLP_NORMS, pred_norm=MLP_NORMS, proj_out_norm=MLP_NORMS)   # the dict itself:
                                                                                 # added names count


def mlp_norm(kind, dim, bn_group=0):
    if kind not in MLP_NORMS:
        raise UsageError(f"unknown MLP norm {kind!r}; choose from {', '.join(MLP_NORMS)}")
    return MLP_NORMS[kind](dim, bn_group)


def build_mlp(in_dim, hidden_dim, out_dim, norm="bn", bn_group=0, num_layers=2, out_norm="none"):
    """Projector / predictor, as the blog's utils.MLP: num_layers 0 = identity, 1 = one Linear,
    n >= 2 = (Linear -> norm -> ReLU) x (n - 1) -> Linear. The norm follows every hidden Linear,
    never the last (the blog's Figure 'byol_arch', the BYOL paper), unless out_norm names one for
    the output (SimSiam's BN on z); it comes last, so the layers keep their indices (0, 3, ...).
    gn_ws: the Linear before each GroupNorm is weight-standardized, as each conv before a norm is
    in a gn_ws encoder."""
    if num_layers == 0:
        return nn.Identity()
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        first = WSLinear if norm == "gn_ws" else nn.Linear
        layers += [first(dim, hidden_dim), mlp_norm(norm, hidden_dim, bn_group), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    if out_norm != "none":
        layers.append(mlp_norm(out_norm, out_dim, bn_group))
    return nn.Sequential(*layers)


def conv_format(device, width):
    """Memory format of the convolutions' inputs and weights. channels_last (NHWC) is faster on
    CUDA (cuDNN) and on CPU too (results/history/notebook.md, Speed), but on an
    AVX2-only CPU oneDNN computes the weight gradient of a 1x1 conv whose input channels are not
    a multiple of 8 with a kernel that writes out of bounds (a crash or a hang at width 4:
    test_no_avx2_crash_at_a_narrow_width). So on CPU, channels_last only when every channel
    count (width x 1, 2, 4, 8) is a multiple of 8."""
    if device.type == "cuda" or (device.type == "cpu" and width % 8 == 0):
        return torch.channels_last
    return torch.contiguous_format


class BYOL(nn.Module):
    """Online network (encoder f, projector g, predictor q) and target network (EMA copies of f
    and g, no gradient). The two views go through each network in separate calls, as the blog's
    code and DeepMind's do: each view is its own BatchNorm batch, and BN batch composition is the
    object of study. forward() has no side effects: the EMA and the queue update are explicit
    calls in the training loop (train_step).

    forward(v1, v2) returns a dict, the one contract train_byol reads (a subclass keeps it):
      loss      scalar tensor, the objective to minimize (with gradient into the online network)
      z         the online projections z of view v, (n, d), detached (metrics_fn reads it)
      new_keys  the l2-normalized target projections z' of view v', (n, d), no gradient: what the
                contrastive objective enqueues after the step
      pos_cos, neg_cos, z_std, pos_gap, neg_gap   scalar tensors, no gradient (collapse_stats)

    Extension points, for a subclass passed as a variant's model_fn (the ablation_*.py examples):
      build_encoder(cfg)        the online encoder f: a module with out_dim (default: the ResNet of
                                cfg.width, stem, encoder_norm, gn_groups and depth)
      loss(p1, p2, t1, t2)      the objective (ablation_one_sided_loss.py)
      EMA_PAIRS                 (target attribute, online attribute) pairs: __init__ makes each
                                target a deep copy of its online module without gradient, and
                                train_step moves each towards it with rate tau; add
                                ("target_predictor", "predictor") for a target predictor
                                (ablation_target_predictor.py)
      online(v) -> (z, p), target(v) -> z'   one view through each network
    With tau 0 at every step (base_tau 0, constant: SimSiam's stop-gradient), the target is the
    online network itself, so forward uses the online projections, detached, instead of a second
    forward of equal weights: the same numbers (test_simsiam_skips_the_target_with_the_same_numbers).
    A subclass that overrides online() or target() always runs the target."""

    EMA_PAIRS = (("target_encoder", "online_encoder"), ("target_projector", "online_projector"))

    def __init__(self, cfg):
        super().__init__()
        self.online_encoder = self.build_encoder(cfg)
        y_dim = self.online_encoder.out_dim
        z_dim = cfg.proj_dim if cfg.proj_layers else y_dim   # no projector: z = y
        self.online_projector = build_mlp(y_dim, cfg.mlp_hidden_dim, z_dim, cfg.proj_norm, cfg.mlp_bn_group,
                                          cfg.proj_layers, cfg.proj_out_norm)
        self.predictor = build_mlp(z_dim, cfg.mlp_hidden_dim, z_dim, cfg.pred_norm, cfg.mlp_bn_group, cfg.pred_layers)
        for target, online in self.EMA_PAIRS:   # the target network: copies without gradient
            setattr(self, target, copy.deepcopy(getattr(self, online)).requires_grad_(False))
        # tau 0 at every step: ema_update_ copies the online weights and buffers exactly (lerp
        # with weight 1 is `online - 0 * diff`), so target(v) would equal online(v)'s z bit for bit
        self.target_is_online = (cfg.base_tau == 0 and cfg.tau_schedule == "constant"
                                 and type(self).online is BYOL.online and type(self).target is BYOL.target)
        self.objective, self.temperature, self.loss_form = cfg.objective, cfg.temperature, cfg.loss_form
        if cfg.objective == "contrastive":
            # memory bank of target projections z' (MoCo): random unit vectors at first
            self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def build_encoder(self, cfg):
        """The online encoder f; the target's is its deep copy. Any module with out_dim (the
        size of y) will do."""
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
        """The contract is in the class docstring. Under bf16 autocast only the encoders run in
        bf16: the projector, predictor, loss and cosines are fp32, since in deep collapse the
        cosines differ from 1 by ~1e-7 and bf16 rounding would scramble the gradient's direction."""
        z1, p1 = self.online(v1)
        z2, p2 = self.online(v2)
        if self.target_is_online:   # SimSiam: the stop-gradient of the online projections
            t1, t2 = z1.detach(), z2.detach()
        else:
            t1, t2 = self.target(v1), self.target(v2)
        with torch.autocast(v1.device.type, enabled=False):   # no bf16 matmuls from here on
            p1, p2, t1, t2 = (F.normalize(a.float(), dim=1) for a in (p1, p2, t1, t2))
            loss = self.loss(p1, p2, t1, t2)
            return dict(loss=loss, new_keys=t2, z=z1.detach(), **collapse_stats(z1, z2, t1, t2))

    def loss(self, p1, p2, t1, t2):
        """The objective. p1, p2: the online predictions q(z) of views v and v'; t1, t2: the target
        projections z' of v and v' (no gradient); each (n, d), l2-normalized, fp32. byol: the
        blog's mean(1 - cos(q, z')) per view order, summed over both orders (= half the BYOL
        paper's symmetric 2 - 2cos, so the blog's lr 0.8 means the same); contrastive: InfoNCE
        against the queue, both orders."""
        if self.objective == "contrastive":
            return self.info_nce(p1, t2) + self.info_nce(p2, t1)
        if self.loss_form == "cos":
            return (1 - (p1 * t2).sum(1)).mean() + (1 - (p2 * t1).sum(1)).mean()
        # sqdist: the same number, and gradients, without fp32's cancellation of 1 - cos near 1
        return 0.5 * ((p1 - t2).pow(2).sum(1).mean() + (p2 - t1).pow(2).sum(1).mean())

    def info_nce(self, q, k):
        """Cross-entropy of the positive q.k against q.queue (negatives), temperature T."""
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.T], 1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))

    @torch.no_grad()
    def enqueue_(self, keys):
        """Writes keys into the queue ring buffer (no host sync)."""
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % len(self.queue))


@torch.no_grad()
def collapse_stats(z1, z2, t1, t2):
    """Blog's diagnostics: cosine of the online projection z of one view with the target
    projection z' of the other view, for the same image (pos) and for other images of the batch
    (neg), averaged over both orders; plus the std over the batch of the l2-normalized z,
    averaged over dims (SimSiam's: ~1/sqrt(d) when spread out, 0 when collapsed).
    pos_gap, neg_gap: 1 - pos_cos and 1 - neg_cos, the depth of a collapse, computed as
    1/2 |a - b|^2 of the unit vectors from their differences. 1 - cos in fp32 bottoms out near
    1e-7 (and can go negative); these resolve gaps down to ~1e-14. Logging only: no gradient."""
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
    """Effective rank (Roy & Vetterli 2007) of a batch of vectors: exp of the entropy of the
    normalized singular values of the centered batch. 1 = a line (complete collapse); d = spread
    evenly over d directions; a few live directions under a dominant one read in between
    (the dimensional collapse of Jing et al. 2022). In float64: a deep collapse's singular values
    span more than fp32's range."""
    s = torch.linalg.svdvals((x - x.mean(0)).double())
    p = s / s.sum().clamp_min(1e-300)
    return torch.exp(-(p * p.clamp_min(1e-300).log()).sum()).item()


# ====================================================================== EMA / schedules


@torch.no_grad()
def ema_update_(target, online, tau):
    """target <- tau * target + (1 - tau) * online, on parameters: tau=1 leaves them unchanged,
    tau=0 copies the online ones. Buffers (BN running statistics) are copied at every tau. They
    never reach a result: the target only runs in training mode, where BN normalizes with the
    batch's own statistics (the blog's code leaves them alone instead)."""
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
    """Linear warmup, then cosine decay to 0 over schedule_epochs (per step)."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (step + 1) / warm
    total = (cfg.schedule_epochs or cfg.epochs) * steps_per_epoch
    progress = min((step - warm) / max(total - warm, 1), 1.0)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


# ============================================================== LARS / parameter groups


class LARS(torch.optim.Optimizer):
    """SGD with momentum where groups with lars=True get a layer-wise trust ratio. Two forms:
      byol (DeepMind's BYOL code): u = g + wd w; u *= eta |w| / |u|; buf = m buf + u; w -= lr buf
      blog (the blog's lars.py):   trust = eta |w| / (|g| + wd |w|); buf = m buf + lr trust (g + wd w);
                                   w -= buf
    The norm of the sum against the sum of the norms: for a conv weight in front of a norm layer g
    is orthogonal to w, and they differ by up to sqrt(2), most where |g| ~ wd |w| (deep collapse).
    Groups with lars=False are plain SGD with momentum in the same placement of lr (byol: exactly
    torch.optim.SGD). A zero |w| or denominator gives trust 1. The last trust ratio of every adapted
    parameter stays in state[p]["trust"] for logging."""

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
                trust = torch.where((w_norm > 0) & (denom > 0), g["eta"] * w_norm / denom,
                                    torch.ones_like(w_norm)).unbind()
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
    if which == "all":
        return True
    if which == "layer12":
        return name.startswith(("online_encoder.layer1.", "online_encoder.layer2."))
    return name.startswith(("online_projector.", "predictor."))   # "mlp"


def decays(p, cfg):
    """Whether weight decay acts on p. The blog's SGD decays everything; LARS (BYOL paper) spares
    the 1-D parameters (biases, norm gains). decay_params=weights spares them for SGD too; conv
    decays only the encoder's conv weights (4-D), each of which feeds a BN/GN or is standardized,
    so shrinking it changes no output, only its effective lr (which rises as |w| shrinks)."""
    if cfg.decay_params == "conv":
        return p.ndim == 4
    return p.ndim > 1 or (cfg.decay_params == "all" and cfg.optimizer != "lars")


def param_groups(model, cfg, lr_mult=None):
    """SGD (blog): weight decay on every parameter, biases and BN included. LARS (BYOL paper):
    biases and norm parameters (the 1-D ones) get neither adaptation nor weight decay; with
    lars_params = layer12 or mlp, only those weights are adapted, the rest is plain SGD.
    lr_mult: {parameter-name prefix: factor}, e.g. {"predictor.": 10} for SimSiam's / DirectPred's
    faster predictor; such a group carries lr_mult (the loop sets its lr to factor x the schedule's
    lr and logs it as lr:<prefix>) and label."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lars = cfg.optimizer == "lars" and p.ndim > 1 and lars_applies(name, cfg.lars_params)
        wd = cfg.weight_decay if decays(p, cfg) else 0.0
        prefix = next((k for k in (lr_mult or {}) if name.startswith(k)), None)
        g = groups.setdefault((lars, wd, prefix), dict(params=[], names=[], lars=lars, weight_decay=wd))
        if prefix is not None:
            g.update(lr_mult=float(lr_mult[prefix]), label=prefix.rstrip("."))
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


# weights whose effective LARS lr is logged (the blog plots layer1's conv and each MLP layer)
LARS_LOGGED = {"online_encoder.conv1.weight": "encoder.conv1",
               **{f"online_encoder.layer{i}.0.conv1.weight": f"encoder.layer{i}" for i in range(1, 5)},
               **{f"{m}.{i}.weight": f"{m.replace('online_', '')}.{i}"
                  for m in ("online_projector", "predictor") for i in (0, 3)}}

LARS_LR_COLUMNS = [f"lars_lr:{k}" for k in LARS_LOGGED.values()]


def lars_lrs(opt):
    """Effective LARS lr (the group's lr x trust ratio, at the last step) of the LARS_LOGGED weights."""
    return {f"lars_lr:{LARS_LOGGED[name]}": g["lr"] * opt.state[p]["trust"].item()
            for g in opt.param_groups for name, p in zip(g.get("names", []), g["params"])
            if name in LARS_LOGGED and "trust" in opt.state[p]}


# ======================================================================= training


def set_seed(seed):
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_bf16(cfg, device):
    """bf16 autocast for the encoders f (projector, predictor, loss, cosines and the probe stay
    fp32: in deep collapse 1 - cos is ~1e-7, far below bf16's resolution of ~4e-3)."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


@contextlib.contextmanager
def fp32_math(enabled=True):
    """Real fp32 in convolutions and matmuls inside the block. On CUDA, cuDNN runs fp32
    convolutions as TF32 by default (a 10-bit mantissa, ~5e-4 relative), which is the size of a
    collapsing encoder's feature spread; the flags are restored on exit, so bf16 training keeps
    its speed. (The flags exist, and are read, on any machine.)"""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if enabled:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def train_step(model, step_fn, opt, v1, v2, tau, amp, world=ONE_PROCESS):
    """One BYOL step: forward both views (step_fn = model, or its compiled or DDP-wrapped
    version), backward, optimizer step, then the target EMA with rate tau (every pair of
    model.EMA_PAIRS) and, for the contrastive loss, the queue (with every rank's keys of world)."""
    with torch.autocast(v1.device.type, dtype=torch.bfloat16, enabled=amp):
        out = step_fn(v1, v2)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    for target, online in model.EMA_PAIRS:   # BYOL: the encoder and projector; a subclass may add more
        ema_update_(getattr(model, target), getattr(model, online), tau)
    if model.objective == "contrastive":
        model.enqueue_(world.gather(out["new_keys"]))   # every rank's keys, as one process would
    return out


@torch.no_grad()
def fill_queue_(model, images_u8, gen, batch_size, mean, std, fmt=torch.contiguous_format, view={}):
    """Fills the queue with target projections of augmented real images before training. With
    a randomly initialized queue, a network whose initial projections are already similar can
    lower the loss by collapsing onto one direction away from the random negatives; once the
    queue holds only collapsed keys the gradient vanishes (measured on the cpu preset)."""
    idx = torch.randperm(len(images_u8), generator=gen, device=images_u8.device)[:len(model.queue)]
    for chunk in idx.split(batch_size):
        views = augment(images_u8[chunk], gen, mean, std, **view).contiguous(memory_format=fmt)
        keys = model.target(views)
        model.enqueue_(F.normalize(keys.float(), dim=1))


# the per-step statistics the loop averages over an epoch (BYOL.forward's outputs)
STATS = ("loss", "pos_cos", "neg_cos", "z_std", "pos_gap", "neg_gap")


def train_byol(cfg, on_epoch=None, data=None, checkpoint=None, model_fn=None, groups_fn=None, metrics_fn=None,
               device=None, world=ONE_PROCESS):
    """Pretrains BYOL per cfg; returns one dict per epoch (epoch 0 = the untrained network):
    epoch, loss, probe_acc (None where not evaluated), pos_cos, neg_cos, z_std, pos_gap, neg_gap,
    lr, tau, wall_s, probe_liblinear, probe_standardized (and lars_lr:*, lr:* where they apply).
    on_epoch(row) is called as each row is made. What a run needs comes in ready (the harness
    prepares it; each default is what a notebook needs): cfg, valid (harness.check_config);
    data, a load_dataset() dict (default: loaded here, which for a dataset on disk needs
    harness.load_data); device (default get_device(cfg.device)); world, the process group
    (default one process; harness.Torchrun under torchrun); checkpoint, a store with load(cfg) ->
    the saved state or None, save(cfg, model, opt, gen, rows, step) and every_s (default none;
    harness.Checkpoints(path)): the state after epochs 0 and 1, then at most every every_s
    seconds, is saved, and a run that finds a checkpoint of the same config continues from it
    (rows before it are passed to on_epoch again), giving the same numbers as an uninterrupted run.
    Your own pieces, without editing this file: model_fn(cfg) -> the model (default BYOL): a
    subclass of BYOL overriding its extension points (its own loss, encoder, or more EMA twins
    such as a target predictor: see BYOL's docstring, which also gives forward's contract);
    groups_fn(model, cfg) -> optimizer parameter groups (default
    param_groups; a group may carry lr_mult and label, see param_groups); metrics_fn(model, views,
    out) -> {column: value}, called once an epoch with the epoch's last views and the model's
    outputs on them (out["z"]: the online projections of v), adds its columns to the row (no extra
    forward: BN's running statistics stay as training left them). model_fn builds both
    networks: BYOL.__init__ deep-copies each online module of EMA_PAIRS into its target twin, so
    a change to an online module made after that must be made to its twin too. The loop
    puts the model in train mode every epoch and the probe's encoder in eval mode."""
    set_seed(cfg.seed)
    device = device or get_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed shapes: cuDNN picks its fastest kernels once
    if device.type == "cpu":
        # Weight decay can shrink a collapsed network's weights into denormal floats (< 1.2e-38),
        # where CPU arithmetic runs many times slower (results/denormal_conv.txt).
        # Flushing them to zero changes no result that matters and keeps such runs at full speed.
        torch.set_flush_denormal(True)
    data = data or load_dataset(cfg.dataset)
    if cfg.image_size > data["pretrain_x"].shape[-1]:
        raise UsageError(f"image_size={cfg.image_size} is larger than the {cfg.dataset} images "
                         f"({data['pretrain_x'].shape[-1]} px): it only downsamples")
    if cfg.image_size:
        data = resize_images(data, cfg.image_size)
    pretrain = data["pretrain_x"][:cfg.train_subset or None].to(device)
    if cfg.epochs and cfg.batch_size > len(pretrain):
        raise UsageError(f"batch_size {cfg.batch_size} > {len(pretrain)} training images")
    mean, std = mean_std(cfg.dataset, device)
    gen = torch.Generator(device).manual_seed(cfg.seed)   # the same on every rank
    fmt = conv_format(device, cfg.width)
    model = (model_fn or BYOL)(cfg).to(device, memory_format=fmt)
    if cfg.sync_bn and world.size > 1:
        model = world.sync_bn(model)
    # plain SGD (the blog's torch.optim.SGD) is LARS without adapted groups, in the byol form
    opt = LARS((groups_fn or param_groups)(model, cfg), lr=cfg.lr, momentum=cfg.momentum, eta=cfg.lars_eta,
               form=cfg.lars_form if cfg.optimizer == "lars" else "byol")
    amp = use_bf16(cfg, device)
    step_fn = world.wrap(model, device)   # model itself in one process
    step_fn = torch.compile(step_fn) if cfg.compile else step_fn
    # applying the augmentation is ~370 small ops a step (results/op_count.txt): compiled, 28 kernels
    aug_fn = torch.compile(apply_aug, dynamic=False) if cfg.compile else apply_aug
    part = world.share(cfg.batch_size)   # this process's share of every batch
    views = view_settings(cfg)

    steps_per_epoch = len(pretrain) // cfg.batch_size   # drop_last, as the blog
    total_steps = (cfg.schedule_epochs or cfg.epochs) * steps_per_epoch   # tau's cosine period, as lr's
    rows, step = [], 0
    saved = checkpoint.load(cfg) if checkpoint else None
    if saved:   # continue where it stopped: the rows so far are passed to on_epoch again
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
        rows, step = saved["rows"], saved["step"]
        print(f"  resuming from the checkpoint after epoch {rows[-1]['epoch']}")
        for row in rows:
            if on_epoch:
                on_epoch(row)
    elif cfg.objective == "contrastive" and cfg.queue_init == "data":
        fill_queue_(model, pretrain, gen, cfg.batch_size, mean, std, fmt, views[1])   # keys: z' of views v'
    start = saved_at = time.time() - (rows[-1]["wall_s"] if rows else 0)
    for epoch in range(len(rows), cfg.epochs + 1):
        sums = torch.zeros(len(STATS), device=device)   # the epoch's STATS, read once an epoch
        lr = tau = None
        if epoch > 0:
            model.train()
            perm = torch.randperm(len(pretrain), generator=gen, device=device)
            with fp32_math(not amp):
                for i in range(steps_per_epoch):
                    x = pretrain[perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
                    lr = lr_at(step, steps_per_epoch, cfg)
                    tau = tau_at(step, total_steps, cfg.base_tau, cfg.tau_schedule)
                    for g in opt.param_groups:
                        g["lr"] = lr * g.get("lr_mult", 1.0)
                    v = two_views(x, gen, mean, std, part, fmt, views, aug_fn)
                    out = train_step(model, step_fn, opt, *v, tau, amp, world)
                    sums += torch.stack([out[k].detach() for k in STATS])
                    step += 1
        sums = world.mean(sums)   # the global batch's means under torchrun
        means = dict(zip(STATS, (sums / max(steps_per_epoch, 1)).tolist() if epoch > 0 else [None] * len(STATS)))
        diverged = means["loss"] is not None and not math.isfinite(means["loss"])
        evaluate = epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0)
        probe = evaluate and not diverged and world.rank == 0   # rank 0 alone evaluates
        acc = linear_probe(model.online_encoder, data, cfg, device) if probe else {}
        row = dict(epoch=epoch, loss=means["loss"], probe_acc=acc.get(cfg.probe_fit), pos_cos=means["pos_cos"],
                   neg_cos=means["neg_cos"], z_std=means["z_std"], lr=lr, tau=tau, wall_s=round(time.time() - start, 2),
                   probe_liblinear=acc.get("liblinear"), probe_standardized=acc.get("standardized"),
                   pos_gap=means["pos_gap"], neg_gap=means["neg_gap"])
        if metrics_fn and epoch > 0:
            with torch.no_grad():
                row.update(metrics_fn(model, v, out))
        if cfg.optimizer == "lars":
            row.update(lars_lrs(opt))
        row.update({f"lr:{g.get('label', i)}": None if lr is None else lr * g["lr_mult"]
                    for i, g in enumerate(opt.param_groups) if g.get("lr_mult", 1.0) != 1.0})
        rows.append(row)
        if checkpoint and epoch < cfg.epochs and (epoch <= 1 or time.time() - saved_at >= checkpoint.every_s):
            checkpoint.save(cfg, model, opt, gen, rows, step)   # rank 0 writes
            saved_at = time.time()
        if on_epoch:
            on_epoch(row)
        if diverged:
            print(f"  stopping: loss is {row['loss']} at epoch {epoch} (diverged)", file=sys.stderr)
            break
    return rows


# ======================================================================== linear probe


@torch.no_grad()
def extract_features(encoder, images_u8, mean, std, device, batch_size=1024, fmt=torch.contiguous_format):
    """Frozen-encoder features of uint8 images, eval mode, always fp32 (bf16 or TF32 would round away the
    small spread of a collapsing encoder's features); the encoder's mode is restored."""
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
    """The blog's probe: sklearn's LogisticRegression(solver="liblinear") with its defaults, on raw
    features. One-vs-rest: class k minimizes 0.5 |w_k|^2 + C sum_i log(1 + exp(-y_ik w_k . [x_i, 1]))
    with y_ik = +-1, the intercept being the weight of a constant feature 1, penalized like the
    others. Newton's method with conjugate-gradient steps and a backtracking line search, all
    classes at once, in float64, stopped as liblinear stops (|grad| <= tol min(pos, neg) / n |grad_0|,
    at most max_iter Newton steps). The objective is strictly convex, so this reaches the optimum
    liblinear reaches (test_blog_probe_matches_sklearn_liblinear). Returns predict(x) = argmax_k."""
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
    """Solves hv(d) = b for every column of b at once; a column stops at |residual| <= rtol |b|
    (liblinear's rule for its Newton steps)."""
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
    """The 'standardized' probe: multinomial logistic regression by full-batch L-BFGS on
    standardized features (scale-invariant, unlike the blog's). Minimizes mean cross-entropy +
    l2/2 |W|^2. Returns a predict(x) function."""
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
    """Linear evaluation accuracy (%) of frozen fp32 encoder features (y, before the projector),
    by both fits: {"liblinear": the blog's (fit_liblinear), "standardized": fit_logreg with
    l2 = 1/n_fit}. cfg.probe picks the split. blog: fit on the first half of the test set, score
    on the second half (the blog's protocol). standard: fit on the train set, score on the test set."""
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
    """A copy of the encoder whose BN running statistics are re-estimated on images (exact
    average over the batches), instead of those it was initialized or trained with."""
    encoder = copy.deepcopy(encoder)
    for m in encoder.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None   # cumulative average
    encoder.train()
    for i in range(0, len(images_u8), batch_size):
        encoder(normalize(images_u8[i:i + batch_size].to(device).float() / 255, mean, std))
    return encoder.eval()

