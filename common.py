"""Shared code for reproducing "Understanding self-supervised and contrastive learning with
BYOL" (Untitled-AI blog post, 2020) and its appendix. One file, in dependency order:

    config . device/seeding . data . augmentations . models . EMA . optimizer/schedules
    . training loop . linear probe . experiment runner (CLI, CSV, resume, summary)

Names follow the BYOL paper (Grill et al. 2020): online network (encoder f, projector g,
predictor q), target network (EMA of f and g with rate tau), views v and v', online
projection z, target projection z'. Settings are cited from docs/SPEC.md.
"""
import argparse
import copy
import csv
import dataclasses
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl   # the CSV lock (POSIX); without it, runs on one --out are not guarded
except ImportError:
    fcntl = None

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# ============================================================================ config


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"         # stl10: the blog's; synthetic: tiny, for tests and --smoke
    data_dir: str = ""               # "" = $BYOL_DATA, ./data, ../shared/data (first that has it)
    train_subset: int = 0            # pretrain on the first N training images (0 = all)
    image_size: int = 0              # resize every image to N x N px once at load (0 = as stored)
    # encoder f: ResNet-18
    stem: str = "cifar"              # cifar: 3x3 conv, no maxpool; imagenet: 7x7/2 conv + maxpool
    width: int = 64                  # channels of stage 1; 64 = standard ResNet-18 (512-d y)
    encoder_norm: str = "bn"         # gn_ws: GroupNorm + weight standardization
    gn_groups: int = 32              # encoder GroupNorm: min(gn_groups, channels) groups. The blog's
                                     # 32 at width 64 is 2-16 channels a group; width w needs w / 2
    # projector g and predictor q: Linear -> norm -> ReLU -> Linear
    proj_norm: str = "bn"            # bn_noaffine, bn_center, bn_scale: BN's parts (BatchNormParts)
    pred_norm: str = "bn"            # the same choices, for the predictor
    mlp_bn_group: int = 0            # BN-type MLP norms: statistics over groups of k samples of
                                     # the batch (ghost BN); 0 = the whole batch
    mlp_hidden_dim: int = 512
    proj_dim: int = 128
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
    compile: bool = False            # torch.compile the online and target networks
    sync_bn: bool = False            # under torchrun: BN statistics over the global batch (all
                                     # ranks); off: each rank's BN sees batch_size / world samples


MLP_NORMS = ("none", "bn", "ln", "gn", "gn_ws", "bn_noaffine", "bn_center", "bn_scale")
CHOICES = dict(dataset=("cifar10", "stl10", "synthetic"), stem=("cifar", "imagenet"),
               encoder_norm=("bn", "gn", "gn_ws", "none"), proj_norm=MLP_NORMS,
               pred_norm=MLP_NORMS, objective=("byol", "contrastive"), loss_form=("cos", "sqdist"),
               decay_params=("all", "weights", "conv"),
               optimizer=("sgd", "lars"), lars_params=("all", "layer12", "mlp"),
               tau_schedule=("constant", "cosine"), probe=("blog", "standard"),
               probe_fit=("liblinear", "standardized"), lars_form=("blog", "byol"),
               probe_bn=("running", "recompute"), queue_init=("random", "data"),
               precision=("auto", "bf16", "fp32"))


class UsageError(Exception):
    """Bad input: the scripts print it as one line and exit with code 2."""


def check_config(cfg):
    """Raises UsageError for a value that can never make a valid run; returns cfg."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UsageError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key in ("width", "mlp_hidden_dim", "proj_dim", "gn_groups"):
        if getattr(cfg, key) < 1:
            raise UsageError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.batch_size < 2:   # BatchNorm and the negative cosine need two images per batch
        raise UsageError(f"batch_size must be >= 2, got {cfg.batch_size}")
    for key in ("epochs", "train_subset", "eval_every", "schedule_epochs", "queue_size", "proj_layers", "pred_layers",
                "image_size"):
        if getattr(cfg, key) < 0:
            raise UsageError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if 0 < cfg.image_size < 8:   # the encoder's three stride-2 stages need 8 px to leave one pixel
        raise UsageError(f"image_size must be 0 (as stored) or >= 8, got {cfg.image_size}")
    if not 0 <= cfg.seed < 2 ** 32:   # numpy's seed range
        raise UsageError(f"seed must be in [0, 2^32), got {cfg.seed}")
    # float settings: finite (nan and inf make NaN rows), and in their meaningful range
    def finite(key, ok, what):
        if not (math.isfinite(getattr(cfg, key)) and ok(getattr(cfg, key))):
            raise UsageError(f"{key} must be finite and {what}, got {getattr(cfg, key)}")
    for key in ("lr", "weight_decay", "warmup_epochs"):
        finite(key, lambda v: v >= 0, ">= 0")
    for key in ("lars_eta", "temperature"):
        finite(key, lambda v: v > 0, "> 0")
    finite("momentum", lambda v: 0 <= v < 1, "in [0, 1)")
    finite("base_tau", lambda v: 0 <= v <= 1, "in [0, 1]")
    if cfg.mlp_bn_group < 0 or cfg.mlp_bn_group == 1 or cfg.batch_size % max(cfg.mlp_bn_group, 1):
        raise UsageError(f"mlp_bn_group must be 0 (whole batch) or >= 2 and divide batch_size "
                         f"({cfg.batch_size}), got {cfg.mlp_bn_group}")
    if cfg.objective == "contrastive" and cfg.queue_size < cfg.batch_size:
        raise UsageError(f"queue_size ({cfg.queue_size}) must be >= batch_size ({cfg.batch_size})")
    # the encoder's GroupNorm uses min(gn_groups, channels) groups, which must divide the channels
    g = cfg.gn_groups
    if cfg.encoder_norm in ("gn", "gn_ws") and any(c % min(g, c) for c in (cfg.width * 2 ** i for i in range(4))):
        raise UsageError(f"width={cfg.width} with encoder_norm={cfg.encoder_norm}: GroupNorm's {g} groups need "
                         f"every stage's channels (width x 1, 2, 4, 8) below {g} or a multiple of {g}")
    if "gn" in (cfg.proj_norm[:2], cfg.pred_norm[:2]) and cfg.mlp_hidden_dim % min(32, cfg.mlp_hidden_dim):
        raise UsageError(f"mlp_hidden_dim={cfg.mlp_hidden_dim} with a GroupNorm MLP: 32 groups need a size "
                         f"below 32 or a multiple of 32")
    return cfg


# ==================================================================== device / seeding


def get_device(name="auto"):
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


def conv_format(device, width):
    """Memory format of the convolutions' inputs and weights. channels_last (NHWC) is faster on
    CUDA (cuDNN) and on CPU too (results/README.md, Speed), but on an
    AVX2-only CPU oneDNN computes the weight gradient of a 1x1 conv whose input channels are not
    a multiple of 8 with a kernel that writes out of bounds (a crash or a hang at width 4:
    test_no_avx2_crash_at_a_narrow_width). So on CPU, channels_last only when every channel
    count (width x 1, 2, 4, 8) is a multiple of 8."""
    if device.type == "cuda" or (device.type == "cpu" and width % 8 == 0):
        return torch.channels_last
    return torch.contiguous_format


def use_bf16(cfg, device):
    """bf16 autocast for the encoders f (projector, predictor, loss, cosines and the probe stay
    fp32: in deep collapse 1 - cos is ~1e-7, far below bf16's resolution of ~4e-3)."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def set_seed(seed):
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ================================================================ several processes (torchrun)
# Under `torchrun --nproc_per_node=N`, every rank runs the same script: the same seed, data
# order and augmentation parameters for the global batch, of which rank r trains on the r-th
# slice; DDP averages the gradients; the target EMA and the queue stay identical on every rank;
# only rank 0 evaluates, prints and writes. Without torchrun all of this is a no-op.


def world():
    """(rank, world_size); (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed(device_name="auto"):
    """Joins torchrun's process group (NCCL on GPUs, gloo on CPUs) when WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return world()


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(sum) with a gradient: the gradient of a sum over ranks is the sum over ranks
    of the gradients (each rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are over the batches of all ranks, for devices that
    torch's nn.SyncBatchNorm does not support (it is GPU-only; this runs the CPU test). Two-pass
    (mean, then the mean squared deviation from it), so a collapsed batch with a large mean and
    a tiny variance is still exact; the all_reduce is autograd-aware, so gradients flow through
    the global statistics as in BN. Same parameters and buffers as nn.BatchNorm*d."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x):
        n_ranks = world()[1]
        if not (self.training and n_ranks > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        n = xf.numel() // xf.shape[1] * n_ranks   # ranks have equal batches
        mean = _SumOverRanks.apply(xf.sum(dims)) / n
        xc = xf - mean.view(shape)
        var = _SumOverRanks.apply(xc.pow(2).sum(dims)) / n
        with torch.no_grad():   # running stats as nn.BatchNorm: unbiased variance
            self.num_batches_tracked += 1
            rate = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
            self.running_mean.lerp_(mean, rate)
            self.running_var.lerp_(var * n / max(n - 1, 1), rate)
        out = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def convert_sync_bn(module, device):
    """Every nn.BatchNorm*d of module to global-batch BN: nn.SyncBatchNorm on CUDA (fused
    kernels), GlobalBatchNorm elsewhere. BatchNormParts (exp_bn_anatomy.py) stays per rank."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            new.weight, new.bias = child.weight, child.bias   # the same tensors (a frozen target stays frozen)
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            setattr(module, name, new)
        else:
            convert_sync_bn(child, device)
    return module


def all_gather_cat(t):
    """Concatenation over ranks in rank order (= the global batch's order); t alone if one."""
    n_ranks = world()[1]
    if n_ranks == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n_ranks)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# ================================================================================ data

CIFAR_DIR, STL_DIR = "cifar-10-batches-py", "stl10_binary"
# per-channel mean/std used to normalize inputs: CIFAR-10's own; the blog used ImageNet's on STL-10
MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "stl10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))}


def data_roots(data_dir=""):
    """Where datasets are looked for: --data-dir, else $BYOL_DATA, ./data, ../shared/data."""
    if data_dir:
        return [Path(data_dir)]
    here = Path(__file__).resolve().parent
    roots = [Path(os.environ["BYOL_DATA"])] if os.environ.get("BYOL_DATA") else []
    return roots + [Path("data"), here / "data", here.parent / "shared" / "data"]


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


def load_dataset(name, data_dir="", download=False):
    """Returns uint8 image tensors (N, 3, H, W) and int64 labels: pretrain_x, train_x/y, test_x/y."""
    if name == "synthetic":
        return make_synthetic()
    sub, files = {"cifar10": (CIFAR_DIR, ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]),
                  "stl10": (STL_DIR, [f"{s}.bin" for s in ("train_X", "train_y", "test_X",
                                                             "test_y", "unlabeled_X")])}[name]
    roots = data_roots(data_dir)
    for root in roots:
        folder = root / sub
        if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):
            raise UsageError(f"{folder} exists but cannot be read (permission denied); fix its "
                             f"permissions (chmod -R u+rX {folder}) or pass another --data-dir")
        if all((folder / f).is_file() for f in files):
            unreadable = [f for f in files if not os.access(folder / f, os.R_OK)]
            if unreadable:
                raise UsageError(f"{folder}: {', '.join(unreadable)} cannot be read (permission denied); "
                                 f"fix the permissions (chmod u+r) or pass another --data-dir")
            return (load_cifar10 if name == "cifar10" else load_stl10)(folder)
    if download:
        import torchvision  # only for the download itself
        root = roots[0]
        try:
            if name == "cifar10":
                torchvision.datasets.CIFAR10(str(root), download=True)
            else:
                torchvision.datasets.STL10(str(root), split="train+unlabeled", download=True)
        except Exception as e:
            raise UsageError(f"could not download {name} into {root}: {e}") from None
        return load_dataset(name, str(root))
    looked = ", ".join(str(r / sub) for r in roots)
    raise UsageError(f"{name} not found (need {sub}/ with {', '.join(files)}); looked in {looked}. "
                     f"Pass --data-dir DIR, set BYOL_DATA, or add --download")


# ======================================================================= augmentations
# The blog's augmentations (Appendix B = MoCo v2's), done on a whole uint8 batch on the training
# device, with independent random parameters for every image and every view. They match
# torchvision's per-image functional ops for the same parameters (see test_common.py).


def sample_aug_params(n, size, gen, device, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), jitter=(0.4, 0.4, 0.4, 0.1),
                      p_jitter=0.8, p_gray=0.2, p_blur=0.5, sigma=(0.1, 2.0)):
    """Per-image parameters, drawn like torchvision's RandomResizedCrop/ColorJitter/... do."""
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
        sigma=u(n, lo=sigma[0], hi=sigma[1]))


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
    return normalize(img, mean, std)


def normalize(img, mean, std):
    """mean, std: (1, 3, 1, 1) tensors on img's device, made once by mean_std()."""
    return (img - mean) / std


def mean_std(dataset, device):
    """Per-channel mean and std of a dataset as device tensors (made once: a host-to-device
    copy inside the step would be a sync on CUDA)."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in MEAN_STD[dataset])


def augment(x_u8, gen, mean, std, part=slice(None)):
    """One random view of every image of a uint8 batch, on x's device. part: the slice of the
    batch to make views of (a rank's share); the parameters are drawn for the whole batch, so
    a view does not depend on how the batch is split over ranks."""
    params = sample_aug_params(len(x_u8), x_u8.shape[-1], gen, x_u8.device)
    return apply_aug(x_u8[part], {k: v[part] for k, v in params.items()}, mean, std)


# ============================================================================== models


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


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (fc removed) with a width multiplier, a CIFAR or ImageNet
    stem, and a selectable norm. Output: the pooled representation y, 8 * width dims."""

    def __init__(self, width=64, stem="imagenet", norm="bn", gn_groups=32):
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
        for i, c in enumerate(chans):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, c, stride, norm, conv),
                                                         BasicBlock(c, c, 1, norm, conv)))
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


def mlp_norm(kind, dim, bn_group=0):
    """The norm after the MLP's first Linear. Plain "bn" over the whole batch is nn.BatchNorm1d
    (so --sync-bn can convert it); ghost groups and BN's parts are BatchNormParts."""
    if kind == "bn" and not bn_group:
        return nn.BatchNorm1d(dim)
    parts = {"bn": {}, "bn_noaffine": dict(affine=False),
             "bn_center": dict(scale=False, affine=False), "bn_scale": dict(center=False, affine=False)}
    if kind in parts:
        return BatchNormParts(dim, bn_group, **parts[kind])
    if kind in ("gn", "gn_ws"):
        return nn.GroupNorm(min(32, dim), dim)
    if kind == "ln":
        return nn.LayerNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise UsageError(f"unknown MLP norm {kind!r}; choose from {', '.join(MLP_NORMS)}")


def build_mlp(in_dim, hidden_dim, out_dim, norm="bn", bn_group=0, num_layers=2):
    """Projector / predictor, as the blog's utils.MLP: num_layers 0 = identity, 1 = one Linear,
    n >= 2 = (Linear -> norm -> ReLU) x (n - 1) -> Linear. The norm follows every hidden Linear,
    never the last (the blog's Figure 'byol_arch', the BYOL paper). gn_ws: the Linear before each
    GroupNorm is weight-standardized, as each conv before a norm is in a gn_ws encoder."""
    if num_layers == 0:
        return nn.Identity()
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        first = WSLinear if norm == "gn_ws" else nn.Linear
        layers += [first(dim, hidden_dim), mlp_norm(norm, hidden_dim, bn_group), nn.ReLU(inplace=True)]
        dim = hidden_dim
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))


class BYOL(nn.Module):
    """Online network (encoder f, projector g, predictor q) and target network (EMA copies of f
    and g, no gradient). The two views go through each network in separate calls, as the blog's
    code and DeepMind's do: each view is its own BatchNorm batch, and BN batch composition is the
    object of study. forward() has no side effects: the EMA and the queue update are explicit
    calls in the training loop."""

    def __init__(self, cfg):
        super().__init__()
        self.online_encoder = ResNet18(cfg.width, cfg.stem, cfg.encoder_norm, cfg.gn_groups)
        y_dim = self.online_encoder.out_dim
        z_dim = cfg.proj_dim if cfg.proj_layers else y_dim   # no projector: z = y
        self.online_projector = build_mlp(y_dim, cfg.mlp_hidden_dim, z_dim, cfg.proj_norm, cfg.mlp_bn_group,
                                          cfg.proj_layers)
        self.predictor = build_mlp(z_dim, cfg.mlp_hidden_dim, z_dim, cfg.pred_norm, cfg.mlp_bn_group, cfg.pred_layers)
        self.target_encoder = copy.deepcopy(self.online_encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.online_projector).requires_grad_(False)
        self.objective, self.temperature, self.loss_form = cfg.objective, cfg.temperature, cfg.loss_form
        if cfg.objective == "contrastive":
            # memory bank of target projections z' (MoCo): random unit vectors at first
            self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

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
        """Returns the loss and detached diagnostics. Under bf16 autocast only the encoders run in
        bf16: the projector, predictor, loss and cosines are fp32, since in deep collapse the
        cosines differ from 1 by ~1e-7 and bf16 rounding would scramble the gradient's direction."""
        z1, p1 = self.online(v1)
        z2, p2 = self.online(v2)
        t1, t2 = self.target(v1), self.target(v2)
        with torch.autocast(v1.device.type, enabled=False):   # no bf16 matmuls from here on
            p1, p2, t1, t2 = (F.normalize(a.float(), dim=1) for a in (p1, p2, t1, t2))
            if self.objective == "byol":
                # blog: mean(1 - cos(q, z')) per view order, summed over both orders
                # (= half the BYOL paper's symmetric 2 - 2cos, so the blog's lr 0.8 means the same)
                if self.loss_form == "cos":
                    loss = (1 - (p1 * t2).sum(1)).mean() + (1 - (p2 * t1).sum(1)).mean()
                else:   # the same number, and gradients, without fp32's cancellation of 1 - cos near 1
                    loss = 0.5 * ((p1 - t2).pow(2).sum(1).mean() + (p2 - t1).pow(2).sum(1).mean())
            else:
                loss = self.info_nce(p1, t2) + self.info_nce(p2, t1)
            return dict(loss=loss, new_keys=t2, **collapse_stats(z1, z2, t1, t2))

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


# ================================================================================= EMA


@torch.no_grad()
def ema_update_(target, online, tau):
    """target <- tau * target + (1 - tau) * online, on parameters: tau=1 leaves them unchanged,
    tau=0 copies the online ones. Buffers (BN running statistics) are copied at every tau. They
    never reach a result: the target only runs in training mode, where BN normalizes with the
    batch's own statistics (the blog's code leaves them alone instead)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - tau)
    buffers = list(target.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(online.buffers()))


def tau_at(step, total_steps, base_tau, schedule="constant"):
    """BYOL's tau = 1 - (1 - base_tau) (cos(pi k / K) + 1) / 2, k counted in steps."""
    if schedule == "constant" or total_steps == 0:
        return base_tau
    return 1 - (1 - base_tau) * (math.cos(math.pi * step / total_steps) + 1) / 2


# ============================================================== optimizer / schedules


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


def decays(p, cfg):
    """Whether weight decay acts on p. The blog's SGD decays everything; LARS (BYOL paper) spares
    the 1-D parameters (biases, norm gains). decay_params=weights spares them for SGD too; conv
    decays only the encoder's conv weights (4-D), each of which feeds a BN/GN or is standardized,
    so shrinking it changes no output, only its effective lr (which rises as |w| shrinks)."""
    if cfg.decay_params == "conv":
        return p.ndim == 4
    return p.ndim > 1 or (cfg.decay_params == "all" and cfg.optimizer != "lars")


def lr_at(step, steps_per_epoch, cfg):
    """Linear warmup, then cosine decay to 0 over schedule_epochs (per step)."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (step + 1) / warm
    total = (cfg.schedule_epochs or cfg.epochs) * steps_per_epoch
    progress = min((step - warm) / max(total - warm, 1), 1.0)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


# ======================================================================= training loop


def train_byol(cfg, on_epoch=None, data=None, checkpoint=None, model_fn=None, groups_fn=None):
    """Pretrains BYOL per cfg; returns one dict per epoch (epoch 0 = the untrained network):
    epoch, loss, probe_acc (None where not evaluated), pos_cos, neg_cos, z_std, lr, tau, wall_s,
    probe_liblinear, probe_standardized (and lars_lr:*, lr:* where they apply).
    on_epoch(row) is called as each row is made. data: a load_dataset() dict, to share a load.
    checkpoint: a file path; the state after every epoch is saved there, and a run that finds a
    checkpoint of the same config continues from it (rows before it are passed to on_epoch
    again), giving the same numbers as an uninterrupted run.
    Your own pieces, without editing this file: model_fn(cfg) -> a module with BYOL's attributes
    and forward (default BYOL); groups_fn(model, cfg) -> optimizer parameter groups (default
    param_groups; a group may carry lr_mult and label, see param_groups)."""
    check_config(cfg)
    set_seed(cfg.seed)
    rank, n_ranks = world()
    device = get_device(cfg.device)
    if device.type == "cuda" and n_ranks > 1:
        device = torch.device("cuda", torch.cuda.current_device())   # set per rank by init_distributed
    check_ranks(cfg, n_ranks)
    if device.type == "cpu":
        # Weight decay can shrink a collapsed network's weights into denormal floats (< 1.2e-38),
        # where CPU arithmetic runs many times slower (results/denormal_conv.txt).
        # Flushing them to zero changes no result that matters and keeps such runs at full speed.
        torch.set_flush_denormal(True)
    data = data or load_dataset(cfg.dataset, cfg.data_dir)
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
    if cfg.sync_bn and n_ranks > 1:
        model = convert_sync_bn(model, device)
    # plain SGD (the blog's torch.optim.SGD) is LARS without adapted groups, in the byol form
    opt = LARS((groups_fn or param_groups)(model, cfg), lr=cfg.lr, momentum=cfg.momentum, eta=cfg.lars_eta,
               form=cfg.lars_form if cfg.optimizer == "lars" else "byol")
    amp = use_bf16(cfg, device)
    step_fn = model
    if n_ranks > 1:   # the buffers (BN running stats, queue) are kept in step without broadcasts
        step_fn = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          forward_sync_buffers=False)
    part = slice(rank * cfg.batch_size // n_ranks, (rank + 1) * cfg.batch_size // n_ranks)
    step_fn = torch.compile(step_fn) if cfg.compile else step_fn

    steps_per_epoch = len(pretrain) // cfg.batch_size   # drop_last, as the blog
    total_steps = (cfg.schedule_epochs or cfg.epochs) * steps_per_epoch   # tau's cosine period, as lr's
    rows, start, step = [], time.time(), 0
    saved = load_checkpoint(checkpoint, cfg)
    if saved:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
        rows, step = saved["rows"], saved["step"]
        start -= rows[-1]["wall_s"]
        print(f"  resuming from the checkpoint after epoch {rows[-1]['epoch']}")
        for row in rows:
            if on_epoch:
                on_epoch(row)
    elif cfg.objective == "contrastive" and cfg.queue_init == "data":
        fill_queue_(model, pretrain, gen, cfg.batch_size, mean, std, fmt)
    for epoch in range(len(rows), cfg.epochs + 1):
        sums = torch.zeros(len(STATS), device=device)   # the epoch's STATS, synced once an epoch
        lr = tau = None
        if epoch > 0:
            model.train()
            perm = torch.randperm(len(pretrain), generator=gen, device=device)
            for i in range(steps_per_epoch):
                x = pretrain[perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
                lr, tau = lr_at(step, steps_per_epoch, cfg), tau_at(step, total_steps, cfg.base_tau, cfg.tau_schedule)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_mult", 1.0)
                out = train_step(model, step_fn, opt, *two_views(x, gen, mean, std, part, fmt), tau, amp)
                sums += torch.stack([out[k].detach() for k in STATS])
                step += 1
        if n_ranks > 1:   # the epoch's means over the global batch
            dist.all_reduce(sums)
            sums /= n_ranks
        means = dict(zip(STATS, (sums / max(steps_per_epoch, 1)).tolist() if epoch > 0 else [None] * len(STATS)))
        diverged = means["loss"] is not None and not math.isfinite(means["loss"])
        evaluate = epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0)
        acc = linear_probe(model.online_encoder, data, cfg, device) if evaluate and not diverged and rank == 0 else {}
        row = dict(epoch=epoch, loss=means["loss"], probe_acc=acc.get(cfg.probe_fit), pos_cos=means["pos_cos"],
                   neg_cos=means["neg_cos"], z_std=means["z_std"], lr=lr, tau=tau, wall_s=round(time.time() - start, 2),
                   probe_liblinear=acc.get("liblinear"), probe_standardized=acc.get("standardized"),
                   pos_gap=means["pos_gap"], neg_gap=means["neg_gap"])
        if cfg.optimizer == "lars":
            row.update(lars_lrs(opt))
        row.update({f"lr:{g.get('label', i)}": None if lr is None else lr * g["lr_mult"]
                    for i, g in enumerate(opt.param_groups) if g.get("lr_mult", 1.0) != 1.0})
        rows.append(row)
        if checkpoint and epoch < cfg.epochs and rank == 0:
            save_checkpoint(checkpoint, cfg, model, opt, gen, rows, step)
        if on_epoch:
            on_epoch(row)
        if diverged:
            print(f"  stopping: loss is {row['loss']} at epoch {epoch} (diverged)", file=sys.stderr)
            break
    return rows


# the per-step statistics the loop averages over an epoch (BYOL.forward's outputs)
STATS = ("loss", "pos_cos", "neg_cos", "z_std", "pos_gap", "neg_gap")


def check_ranks(cfg, n_ranks):
    """What a run split over n_ranks processes needs: equal shares of the batch (and of ghost
    BN groups), and no BN pass on rank 0 alone while BN is synced across ranks."""
    if n_ranks == 1:
        return
    if cfg.batch_size % n_ranks:
        raise UsageError(f"batch_size {cfg.batch_size} must be a multiple of the {n_ranks} processes")
    if cfg.mlp_bn_group and (cfg.batch_size // n_ranks) % cfg.mlp_bn_group:
        raise UsageError(f"mlp_bn_group {cfg.mlp_bn_group} must divide the per-process batch {cfg.batch_size // n_ranks}")
    if cfg.sync_bn and cfg.probe_bn == "recompute":
        raise UsageError("probe_bn=recompute cannot run with --sync-bn over several processes")


def two_views(x_u8, gen, mean, std, part=slice(None), fmt=torch.contiguous_format):
    """Two independent random views of a uint8 batch (of its part), in the convolutions'
    memory format fmt (conv_format)."""
    return tuple(augment(x_u8, gen, mean, std, part).contiguous(memory_format=fmt) for _ in range(2))


def train_step(model, step_fn, opt, v1, v2, tau, amp):
    """One BYOL step: forward both views (step_fn = model, or its compiled version), backward,
    optimizer step, then the target EMA with rate tau and, for the contrastive loss, the queue."""
    with torch.autocast(v1.device.type, dtype=torch.bfloat16, enabled=amp):
        out = step_fn(v1, v2)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    ema_update_(model.target_encoder, model.online_encoder, tau)
    ema_update_(model.target_projector, model.online_projector, tau)
    if model.objective == "contrastive":
        model.enqueue_(all_gather_cat(out["new_keys"]))   # every rank's keys, as one process would
    return out


def save_checkpoint(path, cfg, model, opt, gen, rows, step):
    """Everything a run needs to continue: networks (queue and BN stats included), optimizer
    state, the generator behind data order and augmentations, the rows so far. Written to a
    temporary file of this process's own and renamed, so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(cfg=_resumable(cfg), model=model.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                 rows=rows, step=step)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, cfg):
    """The saved state if path holds a checkpoint of this config, else None. A file that cannot
    be read (truncated, garbage) is renamed to <name>.bad, named in a warning, and the run
    starts afresh."""
    if not path or not Path(path).exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        return state if state["cfg"] == _resumable(cfg) else None
    except Exception as e:
        bad = Path(path).with_name(Path(path).name + ".bad")
        if world()[0] == 0:
            os.replace(path, bad)
            print(f"warning: checkpoint {path} is unreadable ({type(e).__name__}); kept as {bad}, "
                  f"starting this run afresh", file=sys.stderr)
        return None


def _resumable(cfg):
    """The config fields a checkpoint must match (where it runs may change)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "data_dir", "compile")}


@torch.no_grad()
def fill_queue_(model, images_u8, gen, batch_size, mean, std, fmt=torch.contiguous_format):
    """Fills the queue with target projections of augmented real images before training. With
    a randomly initialized queue, a network whose initial projections are already similar can
    lower the loss by collapsing onto one direction away from the random negatives; once the
    queue holds only collapsed keys the gradient vanishes (measured on the cpu preset)."""
    idx = torch.randperm(len(images_u8), generator=gen, device=images_u8.device)[:len(model.queue)]
    for chunk in idx.split(batch_size):
        views = augment(images_u8[chunk], gen, mean, std).contiguous(memory_format=fmt)
        keys = model.target(views)
        model.enqueue_(F.normalize(keys.float(), dim=1))


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


# ======================================================================== linear probe


@torch.no_grad()
def extract_features(encoder, images_u8, mean, std, device, batch_size=1024, fmt=torch.contiguous_format):
    """Frozen-encoder features of uint8 images, eval mode, always fp32 (bf16 would round away the
    small spread of a collapsing encoder's features); the encoder's mode is restored."""
    was_training = encoder.training
    encoder.eval()
    feats = []
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


# ================================================================= experiment runner

# Settings the scripts' presets share (SPEC.md section 2); each script adds epochs and its own.
# blog: the blog's STL-10 runs. cifar10: the same recipe on CIFAR-10, for a GPU. cpu: minutes on
# 2 cores (chosen by measurement, README "The CPU preset"): a narrow CIFAR-stem ResNet-18 on the
# first 10k CIFAR-10 images; batch 64 gives 4x the steps of 256 at the same images/s on 2 cores.
BLOG_STL10 = dict(dataset="stl10", stem="imagenet", width=64, batch_size=256, lr=0.8, weight_decay=1e-4,
                  base_tau=0.996, queue_size=65536)
CIFAR10_GPU = dict(BLOG_STL10, dataset="cifar10", stem="cifar", queue_size=16384)
CPU_SMALL = dict(dataset="cifar10", stem="cifar", width=16, train_subset=10000, batch_size=64, lr=0.1,
                 weight_decay=1e-4, base_tau=0.99, queue_size=4096, queue_init="data")
# The appendix scripts' presets: 320 epochs, as the blog's appendix runs. cpu: the first 8 epochs
# of that 320-epoch schedule (lr and tau as at the start of a long run) on 5k images (78 steps
# each): what collapses early can show, recoveries at epoch 10-100 cannot.
# Table 1's presets (10 epochs of the blog's 320-epoch schedule), shared by every script built on
# Table 1 (exp_table1_norms.py, exp_bn_anatomy.py, bench.py, examples/). cpu: 12 epochs, lr 0.1 and
# tau 0.99 (a faster target) for the short horizon (results/tuning/README.md).
TABLE1_PRESETS = {"blog": dict(BLOG_STL10, epochs=10, schedule_epochs=320),
                  "cifar10": dict(CIFAR10_GPU, epochs=10, schedule_epochs=320),
                  "cpu": dict(CPU_SMALL, epochs=12, schedule_epochs=320)}
BLOG_STEPS = 320 * 410   # the blog's appendix runs: 320 epochs of 410 steps (105k STL-10 images, batch 256)
APPENDIX_PRESETS = {"blog": dict(BLOG_STL10, epochs=320), "cifar10": dict(CIFAR10_GPU, epochs=320),
                    "cpu": dict(CPU_SMALL, train_subset=5000, epochs=8, eval_every=2, schedule_epochs=320),
                    "steps": dict(CPU_SMALL, width=8, image_size=16, train_subset=5000, lr=0.8, weight_decay=1e-4,
                                  base_tau=0.996, epochs=8, eval_every=5, schedule_epochs=BLOG_STEPS // 78)}
# steps: the appendix's recoveries on a CPU. The cpu preset made smaller for steps per second
# (width 8, CIFAR-10 at 16 px, 5k images, batch 64: 78 steps an epoch; measured 15.6 steps/s on 2 cores,
# against 3.6-4.1 for the cpu preset: `python bench.py --preset steps --steps 40`),
# run on the blog's own step schedule: its cosines (lr, and tau where scheduled) span the blog's
# 320 x 410 steps, and it keeps the blog's lr 0.8, wd 1e-4 and tau 0.996, so that lr x wd x steps, the
# clock of the decay, reads as in the blog. Each script sets how many epochs a finding needs.
# Speed and untrained probe accuracy: results/README.md ('A preset built for steps').
# LARS with the BYOL paper's settings (section 3.3 and DeepMind's config: trust 1e-3, weight decay
# 1.5e-6 off biases and norms, tau 0.996 -> 1 on a per-step cosine), run through the blog's own LARS
# update (lars_form="blog": the blog's appendix runs used its lars.py; see LARS)
LARS_BYOL = dict(optimizer="lars", lars_eta=1e-3, weight_decay=1.5e-6, tau_schedule="cosine", lars_form="blog")

COLUMNS = ["exp", "variant", "seed", "epoch", "loss", "probe_acc", "pos_cos", "neg_cos", "z_std",
           "lr", "tau", "wall_s", "probe_liblinear", "probe_standardized", "pos_gap", "neg_gap"]
# --smoke: seconds on synthetic data, same code path and CSV shape (what CI runs)
SMOKE = dict(dataset="synthetic", width=4, mlp_hidden_dim=32, proj_dim=16, batch_size=64,
             epochs=2, queue_size=256, train_subset=0, schedule_epochs=0)


def config_help():
    """--help's list of Config fields, read from the Config class itself (its comments are the one
    place the fields are documented), with the values check_config allows (CHOICES)."""
    out = ["Config fields (--set KEY=VALUE, or a variant's overrides):"]
    for line in inspect.getsource(Config).splitlines()[2:]:
        field = re.match(r"    (\w+): \w+ = (.+?)\s*(?:#\s*(.*))?$", line)
        if field:
            allowed = f" [{'|'.join(CHOICES[field[1]])}]" if field[1] in CHOICES else ""
            out.append(f"  {field[1]} = {field[2]}{allowed}  {field[3] or ''}".rstrip())
        elif re.match(r" {8,}#", line):   # a comment continued under the previous field's
            out.append(" " * 6 + line.strip().lstrip("#").strip())
        elif line.strip().startswith("#"):   # a group heading
            out.append(f" {line.strip().lstrip('#').strip()}:")
    return "\n".join(out)


def get_parser(doc, presets, variants):
    p = argparse.ArgumentParser(description=doc, epilog=config_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(presets), help="default: cifar10 on a GPU, cpu otherwise")
    p.add_argument("--epochs", type=int, help="override the preset's number of epochs")
    p.add_argument("--seeds", type=str, default="1",
                   help=f"N (seeds 0..N-1, N <= {MAX_SEEDS}), or a list like 3,4 (one seed: 3,); default 1")
    p.add_argument("--variants", type=str, default="", help=f"comma list of: {', '.join(variants)} (default: all)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any Config field for every variant, e.g. --set lr=0.2 (repeatable)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--data-dir", default="", help="folder holding cifar-10-batches-py/ or stl10_binary/")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--out", default="runs", help="folder for the CSV (default runs/; the committed "
                   "reference results are in results/)")
    p.add_argument("--fresh", action="store_true", help="retrain runs whose identical settings are already "
                   "finished in the CSV (their old rows are replaced)")
    p.add_argument("--smoke", action="store_true", help="seconds-long run on synthetic data (CI)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (default: per process)")
    return p


MAX_SEEDS = 1000


def parse_seeds(text):
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            n = int(text)
            if not 1 <= n <= MAX_SEEDS:
                raise UsageError(f"--seeds {text}: a count must be 1..{MAX_SEEDS}")
            seeds = list(range(n))
    except ValueError:
        raise UsageError(f"--seeds {text!r}: give a count like 3 or a list like 0,2") from None
    if not seeds or min(seeds) < 0 or max(seeds) >= 2 ** 32:
        raise UsageError(f"--seeds {text!r}: need at least one seed, each in 0..2^32-1")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_overrides(pairs):
    fields = {f.name: getattr(f.type, "__name__", f.type) for f in dataclasses.fields(Config)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE with KEY a Config field ({', '.join(fields)})")
        kind = fields[key]
        if kind == "bool":
            if value.lower() not in BOOLS:
                raise UsageError(f"--set {pair!r}: {value!r} is not a bool (true/false/1/0/yes/no)")
            out[key] = BOOLS[value.lower()]
            continue
        try:
            out[key] = {"int": int, "float": float, "str": str}[kind](value)
        except ValueError:
            raise UsageError(f"--set {pair!r}: {value!r} is not a valid {kind}") from None
    return out


def build_configs(args, presets, variants, extra_variants=None):
    """(preset name, {variant: Config}, CLI overrides) for the chosen preset, variants and
    overrides. extra_variants can be named with --variants but are not in the default grid."""
    preset = args.preset or ("cifar10" if torch.cuda.is_available() else "cpu")
    if not args.preset and not args.smoke:
        print(f"no --preset given: using '{preset}' ({'GPU' if preset == 'cifar10' else 'no GPU'} found)")
    names = [v for v in args.variants.split(",") if v] or list(variants)
    variants = {**variants, **(extra_variants or {})}
    unknown = [v for v in names if v not in variants]
    if unknown:
        raise UsageError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(variants)}")
    base = dict(presets[preset], device=args.device, data_dir=args.data_dir, compile=args.compile,
                sync_bn=args.sync_bn)
    if args.smoke:
        base.update(SMOKE)
    cli = parse_overrides(args.set)
    if args.epochs is not None:
        cli["epochs"] = args.epochs
    if args.batch_size is not None:
        cli["batch_size"] = args.batch_size
    configs, warnings = {}, []
    for v in dict.fromkeys(names):
        over = {k: x for k, x in variants[v].items() if k not in HOOKS}
        # a variant that never trains (random init) keeps epochs=0 whatever --epochs says
        used = {k: x for k, x in cli.items() if not (k == "epochs" and over.get("epochs") == 0)}
        warnings += [f"warning: --set {k}={used[k]} replaces variant {v}'s own {k}={over[k]}"
                     for k in used if k in over and used[k] != over[k]]
        configs[v] = check_config(Config(**{**base, **over, **used}))
    for w in warnings:   # once every config is valid (bad input stays a one-line error)
        print(w, file=sys.stderr)
    return ("smoke" if args.smoke else preset), configs, cli


# Config fields added after the committed results/ were made, with their defaults (config_hash)
LATER_FIELDS = dict(gn_groups=32, loss_form="cos", decay_params="all")

# A variant's dict may also hold these, for a script's own pieces (train_byol's model_fn, groups_fn)
HOOKS = ("model_fn", "groups_fn")


def config_hash(cfg, n_ranks=1, hooks=None):
    """12 hex digits naming every setting that changes a run's results: all Config fields but
    the seed (its own column), where the data lives, the device name and compile, with precision
    'auto' resolved (bf16 on CUDA, fp32 elsewhere); plus the process count under torchrun (BN
    batches are per process) and the names of a variant's hooks. A CSV row with the same hash,
    variant, seed and final epoch is a finished run of exactly these settings."""
    d = _resumable(cfg)
    del d["seed"]
    for k, default in LATER_FIELDS.items():   # fields added after results were committed: at their
        if d[k] == default:                   # default they leave the hash as it was before them
            del d[k]
    d["precision"] = "bf16" if use_bf16(cfg, get_device(cfg.device)) else "fp32"
    if n_ranks > 1:
        d["processes"] = n_ranks
    if hooks:   # a script's own model or parameter groups, by name
        d["hooks"] = {k: f"{fn.__module__}.{fn.__qualname__}" for k, fn in hooks.items()}
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- results CSV on disk
# One writer per CSV (a lock file), rows of a run appended together once it ends, every rewrite
# atomic (temporary file + rename), and a torn tail (a crash mid-append) cut off on disk before
# anything is appended, so a line can never be glued onto half of another.


def read_rows(path, header):
    """Rows of an existing results CSV ([] if missing or empty). A torn last line (no final
    newline, or too few cells) is removed from the file, with a warning."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if not lines or (len(lines) == 1 and not text.endswith("\n") and ",".join(header).startswith(lines[0])):
        return []   # empty, or a header cut short: rewritten whole by the first write
    if lines[0].split(",") != header:
        raise UsageError(f"{path} exists with other columns; move it away or use another --out")
    torn = not text.endswith("\n") or len(next(csv.reader([lines[-1]]))) != len(header)
    rows = list(csv.DictReader(lines[:-1] if torn and len(lines) > 1 else lines))
    if torn:
        print(f"warning: {path}: removed a torn last line (a crash mid-write): {lines[-1][:60]!r}",
              file=sys.stderr)
        rewrite_rows(path, header, rows)
    return rows


def rewrite_rows(path, header, rows):
    """Replaces the CSV with header + rows, atomically."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_rows(path, header, rows):
    """Appends rows (with the header first if the file is new or empty) and syncs them to disk."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, header, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def open_out(out, csv_name):
    """Makes the output folder, checks that the CSV can be written, and locks it against a second
    run on the same file (held until the process ends). Returns (csv path, lock file)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / csv_name
        lock = open(path.with_name(path.name + ".lock"), "a+")
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or type(e).__name__})") from None
    if path.exists() and (path.is_dir() or not os.access(path, os.W_OK)):
        raise UsageError(f"--out {out}: {path} is not a writable file")
    if fcntl:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise UsageError(f"another run (pid {lock.read().strip() or '?'}) is writing {path}; wait for it "
                             f"to end or use another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
    return path, lock


def save_run(path, header, rows, replace=False):
    """Appends one run's rows; replace: first removes the CSV's rows of the same run (variant,
    seed, cfg_hash), in one atomic rewrite (--fresh: the old result stays until the new one is in)."""
    if not replace:
        return write_rows(path, header, rows)
    key = (rows[0]["variant"], str(rows[0]["seed"]), rows[0]["cfg_hash"])
    old = [r for r in read_rows(path, header) if (r["variant"], r["seed"], r["cfg_hash"]) != key]
    rewrite_rows(path, header, old + rows)


def cell(v):
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)


def is_final(row, epochs):
    """A run's last row: its final epoch, or the epoch where its loss diverged."""
    return int(row["epoch"]) == epochs or row["loss"] in ("nan", "inf", "-inf")


def run_grid(exp, args, presets, variants, blog=None, extra_columns=(), extra_variants=None):
    """Runs seeds x variants, appending one CSV row per epoch to <out>/<exp>_<preset>.csv (a
    run's rows land together when it ends). A run whose identical settings (cfg_hash) already
    finished in that CSV is reused, not retrained (--fresh retrains it); an interrupted run
    continues from its checkpoint under <out>/checkpoints/. Ends with a summary of exactly the
    requested runs beside the blog's numbers."""
    preset, configs, cli = build_configs(args, presets, variants, extra_variants)
    variants = {**variants, **(extra_variants or {})}
    hooks = {name: {k: variants[name][k] for k in HOOKS if k in variants[name]} for name in configs}
    seeds = parse_seeds(args.seeds)
    over_keys = sorted({k for v in variants.values() for k in v if k not in HOOKS})
    header = COLUMNS + list(extra_columns) + ["cfg_hash"] + [f"cfg_{k}" for k in over_keys]
    rank, n_ranks = world()
    hashes = {name: config_hash(cfg, n_ranks, hooks[name]) for name, cfg in configs.items()}
    wanted = {(name, seed): hashes[name] for seed in seeds for name in configs}
    path, lock = Path(args.out) / f"{exp}_{preset}.csv", None
    done, other = set(), set()   # other: runs of a requested (variant, seed) under other settings
    try:
        if rank == 0:   # under torchrun, rank 0 alone reads and writes the CSV
            path, lock = open_out(args.out, f"{exp}_{preset}.csv")
            old = read_rows(path, header)
            mine = {}   # the CSV's rows of the requested runs, by (variant, seed, cfg_hash)
            for r in old:
                key = (r["variant"], int(r["seed"]), r["cfg_hash"])
                if wanted.get(key[:2]) == key[2]:
                    mine.setdefault(key, []).append(r)
                elif key[:2] in wanted:   # rows land only when a run ends (or diverges)
                    other.add(key)
            finished = {key for key, rows in mine.items() if any(is_final(r, configs[key[0]].epochs) for r in rows)}
            # rows of a requested run that never finished (a crash while appending) are dropped, so
            # that its new rows are not duplicates
            drop = mine.keys() - finished
            done = set() if args.fresh else {key[:2] for key in finished}
            if drop:
                rewrite_rows(path, header, [r for r in old if (r["variant"], int(r["seed"]), r["cfg_hash"]) not in drop])
        if n_ranks > 1:
            shared = [done]
            dist.broadcast_object_list(shared)
            done = shared[0]
            print(f"{n_ranks} processes, batch {configs[next(iter(configs))].batch_size // n_ranks} each, BN statistics "
                  + ("over the global batch (--sync-bn)" if args.sync_bn else "per process (no --sync-bn)"))
        print(f"{exp} / preset {preset}: {len(configs)} variants x {len(seeds)} seeds -> {path}")
        if done:
            print(f"reused {len(done)} finished run(s) with identical settings from {path} (--fresh to retrain)")
        if other:   # say why they train again: a changed flag, or code that added a Config field
            print(f"{len(other)} earlier run(s) of these variants and seeds in {path} have other settings "
                  f"(cfg_hash differs): they stay in the CSV, these train anew")
        if len(done) < len(wanted):
            if n_ranks > 1 and args.download and rank > 0:
                dist.barrier()   # rank 0 downloads first
            data = load_dataset(next(iter(configs.values())).dataset, args.data_dir, args.download)
            if n_ranks > 1 and args.download and rank == 0:
                dist.barrier()
        for seed in seeds:
            for name, cfg in configs.items():
                if (name, seed) in done:
                    continue
                cfg = dataclasses.replace(cfg, seed=seed)
                # the values actually used, and the variant's own pieces
                shown = [f"{k}={getattr(cfg, k)}" for k in {**variants[name], **cli} if k not in HOOKS]
                shown += [f"{k}={fn.__name__}" for k, fn in hooks[name].items()]
                print(f"[{name} seed {seed}] {', '.join(shown) or 'preset settings'}  (cfg_hash {hashes[name]})")
                buffer = []

                def log(row, name=name, seed=seed, cfg=cfg):
                    print(f"  epoch {row['epoch']:3d}  loss {cell(row['loss']) or '-':>9}  probe {cell(row['probe_acc']) or '-':>7}"
                          f"  pos_cos {cell(row['pos_cos']) or '-':>9}  neg_cos {cell(row['neg_cos']) or '-':>9}"
                          f"  z_std {cell(row['z_std']) or '-':>9}  neg_gap {cell(row['neg_gap']) or '-':>9}"
                          f"  {row['wall_s']:.0f}s", flush=True)
                    full = dict(exp=exp, variant=name, seed=seed, **row, cfg_hash=hashes[name],
                                **{f"cfg_{k}": getattr(cfg, k) for k in over_keys})
                    buffer.append({k: cell(v) for k, v in full.items()})
                    if row["epoch"] == cfg.epochs and rank == 0:   # a run's rows land together: no half-run
                        save_run(path, header, buffer, replace=args.fresh)
                ckpt = Path(args.out) / "checkpoints" / f"{exp}_{preset}_{name}_seed{seed}_{hashes[name]}.pt"
                rows = train_byol(cfg, on_epoch=log, data=data, checkpoint=ckpt, **hooks[name])
                if rank == 0:
                    if rows[-1]["epoch"] != cfg.epochs:   # diverged: keep its rows as a result
                        save_run(path, header, buffer, replace=args.fresh)
                    ckpt.unlink(missing_ok=True)
        if rank == 0:
            final = [r for r in read_rows(path, header) if wanted.get((r["variant"], int(r["seed"]))) == r["cfg_hash"]
                     and is_final(r, configs[r["variant"]].epochs)]
            print_summary(final, list(configs), blog or {})
        return path
    finally:
        if lock:
            lock.close()


def print_summary(rows, names, blog):
    """Probe accuracy and cosines of each run's last row, mean +- std over seeds (sample std,
    n - 1), beside the blog's numbers."""
    last = {}
    for r in rows:
        key = (r["variant"], r["seed"])
        if r["variant"] in names and (key not in last or int(r["epoch"]) > int(last[key]["epoch"])):
            last[key] = r

    def ms(name, col):
        vals = [float(r[col]) for (v, _), r in last.items() if v == name and r.get(col) not in ("", None)]
        if not vals:
            return "-"
        return f"{np.mean(vals):.4g} +- {np.std(vals, ddof=1):.2g}" if len(vals) > 1 else f"{vals[0]:.4g}"
    epochs = sorted({int(r["epoch"]) for r in last.values()})
    print(f"\nlast epoch ({', '.join(map(str, epochs))}), mean +- std over {len({s for _, s in last})} seed(s); "
          f"probe_acc is the blog's liblinear fit unless probe_fit says otherwise, std_probe the standardized fit:")
    print(f"{'variant':<22}{'probe_acc':>16}{'std_probe':>16}{'pos_cos':>20}{'neg_cos':>20}   blog (acc / pos / neg)")
    for name in names:
        ref = blog.get(name, "")
        print(f"{name:<22}{ms(name, 'probe_acc'):>16}{ms(name, 'probe_standardized'):>16}{ms(name, 'pos_cos'):>20}"
              f"{ms(name, 'neg_cos'):>20}   {ref}")


def main(exp, doc, presets, variants, blog=None, extra_columns=(), extra_variants=None, argv=None):
    """Entry point of every exp_*.py: bad input ends with one line and exit code 2."""
    args = get_parser(doc, presets, variants).parse_args(argv)
    try:
        rank, _ = init_distributed(args.device)   # a no-op without torchrun
        if rank != 0:
            sys.stdout = open(os.devnull, "w")
        results = run_grid(exp, args, presets, variants, blog, extra_columns, extra_variants)
        if dist.is_initialized():
            dist.barrier()   # leave together: a gloo rank that exits while its peer still works can abort
        return results
    except UsageError as e:
        if world()[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume (finished runs are in the CSV, the "
              "current one continues from its last epoch)",
              file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
