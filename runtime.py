"""What a run runs on, and whether it can: the checks of a config (check_config, the one place
every rule lives), the device, the process group (one process, or torchrun's ranks), and the
data on disk (CIFAR-10, STL-10, or a small synthetic set) as uint8 tensors. common.train_byol
takes each of these ready-made; a researcher does not need to read this file."""
import contextlib
import inspect
import math
import os
import pickle
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel


class UsageError(Exception):
    """Bad input: a value or a file that can never make a valid run. The scripts print it as one
    line and exit with code 2 (harness.main)."""


# ============================================================================ validation

# the values each str field allows (with proj_norm and pred_norm: the names in common.MLP_NORMS)
CHOICES = dict(dataset=("cifar10", "stl10", "synthetic"), stem=("cifar", "imagenet"),
               encoder_norm=("bn", "gn", "gn_ws", "none"), decay_params=("all", "weights", "conv"),
               optimizer=("sgd", "lars"), lars_params=("all", "layer12", "mlp", "every"),
               tau_schedule=("constant", "cosine"), queue_init=("random", "data"),
               precision=("auto", "bf16", "fp32"))
DEPTHS = (18, 34)   # common.RESNET_STAGES
AUG_FIELDS = ("aug_crop_scale", "aug_blur", "aug_solarize")   # pairs (view v, view v')


def choices(norms):
    """CHOICES with the MLP norms' names (norms: common.MLP_NORMS, where a script may add its own)."""
    return dict(CHOICES, proj_norm=tuple(norms), pred_norm=tuple(norms))


def check_config(cfg, norms, data=None):
    """Every rule a config must meet, in one place: raises UsageError for a value that can never
    make a valid run (norms: the MLP norms by name, common.MLP_NORMS; with data, a load_dataset()
    dict: also against its images); returns cfg."""
    for key, allowed in choices(norms).items():
        if getattr(cfg, key) not in allowed:
            raise UsageError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key in AUG_FIELDS:
        v = getattr(cfg, key)
        if len(v) != 2 or not all(math.isfinite(x) and 0 <= x <= 1 for x in v):
            raise UsageError(f"{key} must be one value or two (v, v'), each in [0, 1], got {v}")
    if min(cfg.aug_crop_scale) <= 0:
        raise UsageError(f"aug_crop_scale must be > 0, got {cfg.aug_crop_scale}")
    for key in ("width", "mlp_hidden_dim", "proj_dim", "gn_groups"):
        if getattr(cfg, key) < 1:
            raise UsageError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.depth not in DEPTHS:
        raise UsageError(f"depth must be one of {', '.join(map(str, DEPTHS))}, got {cfg.depth}")
    if cfg.batch_size < 2:   # BatchNorm and the negative cosine need two images per batch
        raise UsageError(f"batch_size must be >= 2, got {cfg.batch_size}")
    for key in ("epochs", "train_subset", "eval_every", "schedule_epochs", "queue_size", "pred_layers",
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
    for key in ("lr", "weight_decay"):
        finite(key, lambda v: v >= 0, ">= 0")
    finite("momentum", lambda v: 0 <= v < 1, "in [0, 1)")
    finite("base_tau", lambda v: 0 <= v <= 1, "in [0, 1]")
    if cfg.queue_size < cfg.batch_size:   # the contrastive queue takes a batch of keys a step
        raise UsageError(f"queue_size ({cfg.queue_size}) must be >= batch_size ({cfg.batch_size})")
    # the encoder's GroupNorm uses min(gn_groups, channels) groups, which must divide the channels
    g = cfg.gn_groups
    if cfg.encoder_norm in ("gn", "gn_ws") and any(c % min(g, c) for c in (cfg.width * 2 ** i for i in range(4))):
        raise UsageError(f"width={cfg.width} with encoder_norm={cfg.encoder_norm}: GroupNorm's {g} groups need "
                         f"every stage's channels (width x 1, 2, 4, 8) below {g} or a multiple of {g}")
    if "gn" in (cfg.proj_norm[:2], cfg.pred_norm[:2]) and cfg.mlp_hidden_dim % min(32, cfg.mlp_hidden_dim):
        raise UsageError(f"mlp_hidden_dim={cfg.mlp_hidden_dim} with a GroupNorm MLP: 32 groups need a size "
                         f"below 32 or a multiple of 32")
    n_ranks = world()[1]
    if n_ranks > 1:   # each rank trains on an equal share of every batch
        if cfg.batch_size % n_ranks:
            raise UsageError(f"batch_size {cfg.batch_size} must be a multiple of the {n_ranks} processes")
        if cfg.sync_bn and get_device(cfg.device).type != "cuda":
            raise UsageError("--sync-bn needs CUDA (nn.SyncBatchNorm); without it each process's BN sees its own share")
    if data is not None:
        px, n = data["pretrain_x"].shape[-1], len(data["pretrain_x"][:cfg.train_subset or None])
        if cfg.image_size > px:
            raise UsageError(f"image_size={cfg.image_size} is larger than the {cfg.dataset} images ({px} px): "
                             f"it only downsamples")
        if cfg.epochs and cfg.batch_size > n:
            raise UsageError(f"batch_size {cfg.batch_size} > {n} training images")
    return cfg


# ================================================================================ device


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
    method leaves its argument as it is. Torchrun is the same interface over torchrun's ranks
    (DDP, the rank's slice of each batch, means, gathers and broadcasts over ranks, barriers)."""
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

    def broadcast(self, obj):   # rank 0's obj, on every rank
        return obj

    def barrier(self):   # waits for every rank
        pass


ONE_PROCESS = OneProcess()


# ================================================================ several processes (torchrun)
# Under `torchrun --nproc_per_node=N`, every rank runs the same script: the same seed, data
# order and augmentation parameters for the global batch, of which rank r trains on the r-th
# slice; DDP averages the gradients; the target EMA and the queue stay identical on every rank;
# only rank 0 evaluates, prints and writes. Without torchrun all of this is a no-op.
def world():
    """(rank, world_size); (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed(device_name="auto"):
    """Joins torchrun's process group (NCCL on GPUs, gloo on CPUs) when WORLD_SIZE > 1. More
    processes than GPUs is refused in one line (each rank needs its own GPU)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if cuda:
            local, n_gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
            if local >= n_gpus:
                raise UsageError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on a node "
                                 f"with {n_gpus} GPU(s): use --nproc_per_node={n_gpus} or fewer, or --device cpu")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    return world()


def run_device(cfg):
    """The device this process trains on: get_device's, or this rank's own GPU under torchrun."""
    device = get_device(cfg.device)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and world()[1] > 1 else device


class Torchrun(OneProcess):
    """train_byol's process group under torchrun: OneProcess's interface over this rank."""

    def __init__(self):
        self.rank, self.size = world()

    def wrap(self, model, device):
        """DistributedDataParallel. The loop keeps the buffers (BN running stats, the queue)
        identical on every rank, so DDP must not broadcast them: torch >= 2.13 says so with
        forward_sync_buffers=False, older versions with broadcast_buffers=False."""
        if self.size == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
            return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def sync_bn(self, model):
        """Every nn.BatchNorm*d to nn.SyncBatchNorm (statistics over all ranks' batches, as the
        blog's one GPU saw); BatchNormParts (exp_bn_anatomy.py) stays per rank."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def mean(self, t):
        if self.size > 1:
            dist.all_reduce(t)
            t /= self.size
        return t

    def gather(self, t):   # rank order = the global batch's order
        if self.size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def broadcast(self, obj):
        shared = [obj]
        dist.broadcast_object_list(shared)
        return shared[0]

    def barrier(self):
        dist.barrier()


def process_group():
    """What train_byol's world is: Torchrun under torchrun, else ONE_PROCESS."""
    return Torchrun() if world()[1] > 1 else ONE_PROCESS


def leave_process_group(code):
    """Leaves torchrun's process group (a no-op without torchrun). gloo can abort a rank that has
    finished, after destroy_process_group and atexit, while C++ tears down ("terminate called
    without an active exception": 2 of 31 two-process runs on a loaded 2-core CPU): with its exit
    code known, the process leaves without that teardown, every file closed by then."""
    if dist.is_initialized():
        dist.destroy_process_group()
        if code is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


# ================================================================================ data


def load_dataset(name, folder=None):
    """uint8 image tensors (N, 3, H, W) and int64 labels: pretrain_x, train_x/y, test_x/y, read
    from the dataset's folder (cifar-10-batches-py/ or stl10_binary/; load_data finds it
    on disk, or downloads it). synthetic needs none: make_synthetic()."""
    if name == "synthetic":
        return make_synthetic()
    if folder is None:
        raise UsageError(f"{name}: give its folder, or load it with runtime.load_data({name!r}, data_dir), "
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


# ================================================================================ data on disk

CIFAR_DIR, STL_DIR = "cifar-10-batches-py", "stl10_binary"
DATA_FILES = {"cifar10": (CIFAR_DIR, ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]),
              "stl10": (STL_DIR, [f"{s}.bin" for s in ("train_X", "train_y", "test_X", "test_y", "unlabeled_X")])}


def data_roots(data_dir=""):
    """Where datasets are looked for: --data-dir, else $BYOL_DATA, ./data, ../shared/data."""
    if data_dir:
        return [Path(data_dir)]
    here = Path(__file__).resolve().parent
    roots = [Path(os.environ["BYOL_DATA"])] if os.environ.get("BYOL_DATA") else []
    return roots + [Path("data"), here / "data", here.parent / "shared" / "data"]


def find_dataset(name, data_dir="", download=False):
    """The folder holding dataset `name` (cifar10, stl10): the first root of data_roots that has
    all its files; with download, torchvision fetches it into the first root if none has."""
    sub, files = DATA_FILES[name]
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
            print(f"data: {name} from {folder}")   # which copy, of the several places looked in
            return folder
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
        return find_dataset(name, str(root))
    looked = ", ".join(str(r / sub) for r in roots)
    raise UsageError(f"{name} not found (need {sub}/ with {', '.join(files)}); looked in {looked}. "
                     f"Pass --data-dir DIR, set BYOL_DATA, or add --download")


def load_data(name, data_dir="", download=False):
    """load_dataset of dataset `name`, found on disk by find_dataset (synthetic: made)."""
    return load_dataset(name, None if name == "synthetic" else find_dataset(name, data_dir, download))


# ============================================================================== hardware


def set_seed(seed):
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def hardware_flags(device):
    """cuDNN picks its fastest kernels once (fixed shapes). On CPU, denormal floats are flushed
    to zero: weight decay can shrink a collapsed network's weights into them, where CPU arithmetic
    runs many times slower (results/denormal_conv.txt)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def machine(device):
    """Where a run ran, for its rows (bitwise reruns hold only on the same): torch's version, the
    CPU model and the ISA its kernels may use (oneDNN's cap, ONEDNN_MAX_CPU_ISA, where set), or the
    GPU, and the thread count."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            cpu = platform.processor() or platform.machine()
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
        where = f"{cpu} {torch.backends.cpu.get_cpu_capability()}" + (f" (oneDNN max {cap})" if cap else "")
    return f"torch {torch.__version__}; {where}; {torch.get_num_threads()} thread(s)"


def use_bf16(cfg, device):
    """bf16 autocast for the encoders (the MLPs, loss and probe stay fp32)."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


@contextlib.contextmanager
def fp32_math(enabled=True):
    """Real fp32 convolutions and matmuls inside the block (CUDA runs them as TF32 by default,
    ~5e-4 relative: the size of a collapsing encoder's spread); flags restored on exit."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if enabled:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
