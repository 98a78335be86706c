"""The run harness: everything around the research code in common.py that a researcher never
needs to open. Validation, the device, finding the data on disk, checkpoints, the process group
under torchrun, the command line, the config hash, the results CSV (one writer, atomic rewrites,
torn-tail repair), the grid of variants x seeds and its summary.

It never changes a number: training, the probe and every metric are common.py's. What this
module adds is which runs happen, where their rows go, and that an interrupted or repeated
command gives the rows an uninterrupted one gives.

When a finished run is reused (run_grid): only when its row's cfg_hash equals the one computed
now, which covers every Config field (config_hash), what the variant's hooks are, and the code of
the script itself (script_identity: the __main__ file whole, so module constants, helpers, base
classes and patches of library functions; the modules it imports from its own folder; read as a
syntax tree, so docstrings, comments and layout do not count, nor the lines that only list the
grid: a new variant reuses the others). An edit of the library (common.py, harness.py) does not
retrain: the reused runs are counted in one line ("N of the reused run(s) were trained by other
library code"), from each row's lib_hash, and --fresh retrains them. Why not retrain: the
library's contract is that a config's numbers never move (new behaviour enters as a Config field
whose default keeps the old hash, LATER_FIELDS; tests pin the recorded smoke draws, seeded
reruns and the torchrun split), while a script's edit is made to change them. Retraining at every
library edit would redo hours of CPU grids for each refactor and leave LATER_FIELDS no purpose;
the line keeps it visible. Rows written before code was hashed carry a settings-only cfg_hash
(the committed results/), so a rerun trains them again once.

This module imports common.py, never the other way: it prepares what common.train_byol needs
(a config checked by check_config, the device by run_device, the data by load_data, the process
group by process_group, a checkpoint store, Checkpoints) and hands it over.
"""
import argparse
import ast
import csv
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import sys
from pathlib import Path

try:
    import fcntl   # the CSV lock (POSIX); without it, runs on one --out are not guarded
except ImportError:
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import common

# ============================================================================ validation


UsageError = common.UsageError   # bad input: main prints it as one line and exits with code 2


def check_config(cfg):
    """Raises UsageError for a value that can never make a valid run; returns cfg."""
    for key, allowed in common.CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UsageError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key in common.AUG_FIELDS:   # a pair (view v, view v')
        v, hi = getattr(cfg, key), (2 if key == "aug_jitter" else 1)
        if len(v) != 2 or not all(math.isfinite(x) and 0 <= x <= hi for x in v):
            raise UsageError(f"{key} must be one value or two (v, v'), each in [0, {hi}], got {v}")
    if min(cfg.aug_crop_scale) <= 0:
        raise UsageError(f"aug_crop_scale must be > 0, got {cfg.aug_crop_scale}")
    for key in ("width", "mlp_hidden_dim", "proj_dim", "gn_groups"):
        if getattr(cfg, key) < 1:
            raise UsageError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.depth not in common.RESNET_STAGES:
        raise UsageError(f"depth must be one of {', '.join(map(str, common.RESNET_STAGES))}, got {cfg.depth}")
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
    norms = (cfg.proj_norm, cfg.pred_norm, cfg.proj_out_norm)
    if cfg.mlp_bn_group and all(n in common.UNGROUPED_NORMS for n in norms):   # it would change nothing
        raise UsageError(f"mlp_bn_group={cfg.mlp_bn_group} needs a BN-type MLP norm with batch statistics; "
                         f"these take no groups: {', '.join(sorted(set(norms)))}")
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


# ================================================================================ device


get_device = common.get_device   # auto: cuda, mps, cpu; a named one is checked to exist


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
    """The device this process trains on (its own GPU under torchrun), after checking what a run
    split over several processes needs: equal shares of the batch (and of ghost BN groups), no BN
    pass on rank 0 alone while BN is synced, and synced BN only where nn.SyncBatchNorm runs (CUDA)."""
    device, n_ranks = get_device(cfg.device), world()[1]
    if n_ranks == 1:
        return device
    if cfg.batch_size % n_ranks:
        raise UsageError(f"batch_size {cfg.batch_size} must be a multiple of the {n_ranks} processes")
    if cfg.mlp_bn_group and (cfg.batch_size // n_ranks) % cfg.mlp_bn_group:
        raise UsageError(f"mlp_bn_group {cfg.mlp_bn_group} must divide the per-process batch "
                         f"{cfg.batch_size // n_ranks}")
    if cfg.sync_bn and cfg.probe_bn == "recompute":
        raise UsageError("probe_bn=recompute cannot run with --sync-bn over several processes")
    if cfg.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA (nn.SyncBatchNorm); without it each process's BN sees its own share")
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device


def convert_sync_bn(module):
    """Every nn.BatchNorm*d of module to nn.SyncBatchNorm (statistics over all ranks' batches, as
    the blog's one GPU saw); BatchNormParts (exp_bn_anatomy.py) stays per rank."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def ddp(model, device):
    """model in DistributedDataParallel (one process: model itself). The buffers (BN running stats,
    the queue) are kept identical by the loop, so DDP must not broadcast them: torch >= 2.13 says so
    with forward_sync_buffers=False, older versions with broadcast_buffers=False."""
    if world()[1] == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def rank_slice(batch_size):
    """The slice of the global batch this rank trains on."""
    rank, n_ranks = world()
    return slice(rank * batch_size // n_ranks, (rank + 1) * batch_size // n_ranks)


def all_gather_cat(t):
    """Concatenation over ranks in rank order (= the global batch's order); t alone if one."""
    n_ranks = world()[1]
    if n_ranks == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n_ranks)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def mean_over_ranks(t):
    """t averaged over ranks (t itself in one process)."""
    if world()[1] > 1:
        dist.all_reduce(t)
        t /= world()[1]
    return t


class Torchrun(common.OneProcess):
    """train_byol's process group under torchrun: this rank of the process group, with
    common.OneProcess's interface (its share of each batch is the same formula)."""

    def __init__(self):
        self.rank, self.size = world()

    def wrap(self, model, device):
        return ddp(model, device)

    def sync_bn(self, model):
        return convert_sync_bn(model)

    def mean(self, t):
        return mean_over_ranks(t)

    def gather(self, t):
        return all_gather_cat(t)


def process_group():
    """What train_byol's world is: Torchrun under torchrun, else common.ONE_PROCESS."""
    return Torchrun() if world()[1] > 1 else common.ONE_PROCESS

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
    """common.load_dataset of dataset `name`, found on disk by find_dataset (synthetic: made)."""
    return common.load_dataset(name, None if name == "synthetic" else find_dataset(name, data_dir, download))

# ============================================================================= checkpoints


def save_checkpoint(path, cfg, model, opt, gen, rows, step):
    """Everything a run needs to continue: networks (queue and BN stats included), optimizer
    state, the generator behind data order and augmentations, the rows so far. Written to a
    temporary file of this process's own and renamed, so a crash never leaves half a checkpoint."""
    if world()[0] != 0:   # under torchrun every rank holds the same state: rank 0 writes it
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(cfg=_resumable(cfg), model=model.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                 rows=rows, step=step)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


CHECKPOINT_EVERY_S = 120   # the loop saves after epoch 1, then at most this often (a GPU epoch takes
                           # seconds and the file is ~140 MB; a CPU epoch takes longer: every epoch)


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


class Checkpoints:
    """train_byol's checkpoint store: the file path, written by save_checkpoint (rank 0) and read
    by load_checkpoint, every CHECKPOINT_EVERY_S at most after epoch 1 (train_byol)."""

    def __init__(self, path):
        self.path = path

    @property
    def every_s(self):
        return CHECKPOINT_EVERY_S

    def load(self, cfg):
        return load_checkpoint(self.path, cfg)

    def save(self, cfg, model, opt, gen, rows, step):
        save_checkpoint(self.path, cfg, model, opt, gen, rows, step)


def _resumable(cfg):
    """The config fields a checkpoint must match (where it runs may change)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "data_dir", "compile")}


# ========================================================================= command line

COLUMNS = ["exp", "variant", "seed", "epoch", "loss", "probe_acc", "pos_cos", "neg_cos", "z_std",
           "lr", "tau", "wall_s", "probe_liblinear", "probe_standardized", "pos_gap", "neg_gap"]
# --smoke: seconds on synthetic data, same code path and CSV shape (what CI runs)
SMOKE = dict(dataset="synthetic", width=4, mlp_hidden_dim=32, proj_dim=16, batch_size=64,
             epochs=2, queue_size=256, train_subset=0, schedule_epochs=0)


def config_help(presets=None):
    """--help's list of Config fields: each field's default and allowed values (common.CHOICES),
    then, for a field some preset sets, every preset's value (what a run actually uses: a
    preset's values replace the defaults). What each field means is written beside it in
    common.Config."""
    presets = presets or {}
    out = ["Config fields (--set KEY=VALUE, or a variant's overrides; their meaning: common.Config). Each "
           "field's default, then the value of each preset (" + ", ".join(presets) + ") where a preset sets it:"
           if presets else "Config fields (--set KEY=VALUE, or a variant's overrides; their meaning: common.Config):"]
    for f in dataclasses.fields(common.Config):
        allowed = f" [{'|'.join(common.CHOICES[f.name])}]" if f.name in common.CHOICES else ""
        line = f"  {f.name} = {f.default!r}{allowed}"
        if any(f.name in preset for preset in presets.values()):
            line += "   presets: " + ", ".join(f"{name} {preset.get(f.name, f.default)!r}" for name, preset in presets.items())
        out.append(line)
    out.append("A variant may also name its own pieces (train_byol's hooks): " + ", ".join(
        f"{k}{sig}" for k, sig in HOOK_SIGNATURES.items()))
    return "\n".join(out)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown --preset, a flag without its value) are one 'error:' line
    and exit code 2, as every other bad input, instead of the usage text first."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def get_parser(doc, presets, variants):
    p = OneLineParser(description=doc, epilog=config_help(presets),
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
    p.add_argument("--compile", action="store_true", help="torch.compile the networks and the augmentation")
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
    fields = {f.name: getattr(f.type, "__name__", f.type) for f in dataclasses.fields(common.Config)}
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
            out[key] = tuple(float(x) for x in value.split(",")) if kind == "tuple" else \
                {"int": int, "float": float, "str": str}[kind](value)
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
        configs[v] = check_config(common.Config(**{**base, **over, **used}))
    for w in warnings:   # once every config is valid (bad input stays a one-line error)
        print(w, file=sys.stderr)
    if not args.smoke:
        note = departures(preset, presets[preset], cli)
        if note:
            print(note)
    return ("smoke" if args.smoke else preset), configs, cli


def departures(preset_name, preset, cli):
    """A line saying which command-line overrides (--epochs, --batch-size, --set) depart from the
    preset, whose values the README's and results/'s numbers came from; '' when none do. (A
    --epochs 10 on the cpu preset's 12 gives other numbers and another cfg_hash: issue 30.)"""
    defaults = {f.name: f.default for f in dataclasses.fields(common.Config)}
    changed = [f"{k}={v!r} (preset: {preset.get(k, defaults.get(k))!r})" for k, v in cli.items()
               if v != preset.get(k, defaults.get(k))]
    if not changed:
        return ""
    return (f"note: {', '.join(changed)} depart from preset '{preset_name}', the settings of the README's "
            f"numbers: these runs will not reproduce them (and get their own cfg_hash)")


# ======================================================================== config hash

# Config fields added after the committed results/ were made, with their defaults (config_hash)
LATER_FIELDS = dict(gn_groups=32, loss_form="cos", decay_params="all", proj_out_norm="none",
                    aug_crop_scale=(0.2, 0.2), aug_jitter=(1.0, 1.0), aug_blur=(0.5, 0.5), aug_solarize=(0.0, 0.0),
                    depth=18)

# A variant's dict may also hold these, for a script's own pieces (train_byol's model_fn, groups_fn)
HOOKS = ("model_fn", "groups_fn", "metrics_fn")
HOOK_SIGNATURES = {"model_fn": "(cfg) -> a common.BYOL subclass (its extension points: loss, EMA_PAIRS, "
                               "build_encoder, target; see its docstring)",
                   "groups_fn": "(model, cfg) -> optimizer parameter groups",
                   "metrics_fn": "(model, views, out) -> {column: value} once an epoch (name its columns in "
                                 "extra_columns)"}


# what a variant without the hook runs, for its cfg_<hook> column
HOOK_DEFAULTS = {"model_fn": "BYOL", "groups_fn": "param_groups", "metrics_fn": ""}


def hook_name(fn):
    """A hook's qualified name (the cfg_<hook> column), with a partial's bound arguments and a
    closure's values, so two hooks made by one factory with other arguments read apart."""
    if isinstance(fn, functools.partial):
        bound = [repr(a) for a in fn.args] + [f"{k}={v!r}" for k, v in fn.keywords.items()]
        return f"partial({', '.join([hook_name(fn.func), *bound])})"
    name = getattr(fn, "__qualname__", type(fn).__name__)
    if inspect.isfunction(fn) and fn.__closure__:
        def short(v):   # a plain value as written, anything else by its name
            if v is None or isinstance(v, (str, int, float, bool, tuple, list)):
                return repr(v)
            return getattr(v, "__qualname__", type(v).__name__)
        def content(cell):
            try:
                return short(cell.cell_contents)
            except ValueError:   # a cell not filled yet
                return "?"
        cells = [f"{n}={content(c)}" for n, c in zip(fn.__code__.co_freevars, fn.__closure__)]
        name += f"[{', '.join(cells)}]"
    return name


def hook_identity(fn):
    """What a hook does, for the hash: its name and a digest of its source code, of what its
    closure holds and, for functools.partial, of its bound arguments. So an edited hook (or a
    closure over other values) retrains, and an unedited one reuses its finished runs. A hook whose
    source cannot be read (defined in an interactive session or by exec) is refused."""
    if isinstance(fn, functools.partial):
        return [hook_identity(fn.func), repr(fn.args), repr(sorted(fn.keywords.items()))]
    target = fn if inspect.isfunction(fn) or inspect.isclass(fn) else type(fn)   # a callable object: its class
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):
        raise UsageError(f"hook {hook_name(fn)}: its source code cannot be read, so its runs cannot be told "
                         f"apart; define it in a .py file (a function, a class, or functools.partial of one)") from None
    cells = [repr(c.cell_contents) for c in (getattr(fn, "__closure__", None) or ())]
    digest = hashlib.sha1(json.dumps([source, cells]).encode()).hexdigest()[:12]
    return f"{getattr(target, '__module__', '?')}.{hook_name(fn)}:{digest}"


# Top-level names of a script that hold its grid, not code a run executes: each variant's values
# enter its hash as Config fields and hooks, so adding a variant reuses the others' runs.
GRID_NAMES = frozenset({"VARIANTS", "EXTRA_VARIANTS", "PRESETS", "BLOG"})


def _grid_only(stmt):
    """Whether a top-level statement only fills GRID_NAMES (x = ..., x[k] = ..., or a for loop of those)."""
    if isinstance(stmt, ast.For):
        return all(_grid_only(s) for s in stmt.body) and not stmt.orelse
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(
        stmt, (ast.AnnAssign, ast.AugAssign)) else None
    if not targets:
        return False
    names = [t.value if isinstance(t, ast.Subscript) else t for t in targets]
    return all(isinstance(n, ast.Name) and n.id in GRID_NAMES for n in names)


def source_digest(path):
    """12 hex digits of a Python file's code: its syntax tree without docstrings (where the
    scripts record their results), comments or layout, and without the statements that only
    fill its grid (GRID_NAMES). Any other edit (a constant, a helper, a class, a patch) changes it."""
    tree = ast.parse(Path(path).read_text())
    tree.body = [st for st in tree.body if not _grid_only(st)]
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha1(ast.dump(tree).encode()).hexdigest()[:12]


LIBRARY = ("common", "harness")   # the library: its edits are reported, not retrained (module docstring)


def _module_file(name):
    """The .py file module `name` was loaded from (None: a built-in, an extension, or a name that
    is no file on disk, as some packages set)."""
    f = getattr(sys.modules.get(name), "__file__", None)
    return Path(f).resolve() if isinstance(f, str) and f.endswith(".py") and os.path.isfile(f) else None


def script_identity(fns=()):
    """{file name: source_digest} of the code a run executes beyond the library: the script run as
    __main__, every module imported from its folder, and the modules defining fns (hooks, added
    norms). Keyed by file name, so a copy of the repo elsewhere hashes the same."""
    files = set()
    main = _module_file("__main__")
    if main:
        files.add(main)
        files.update(f for f in map(_module_file, list(sys.modules)) if f and f.parent == main.parent)
    for fn in fns:
        fn = fn.func if isinstance(fn, functools.partial) else fn
        target = fn if inspect.isfunction(fn) or inspect.isclass(fn) else type(fn)
        f = _module_file(getattr(target, "__module__", ""))
        if f:
            files.add(f)
    files -= {_module_file(m) for m in LIBRARY}
    return {f.name: source_digest(f) for f in sorted(files)}


def library_identity():
    """12 hex digits of the library's code (common.py and harness.py, as source_digest reads them):
    the lib_hash column."""
    return hashlib.sha1(" ".join(source_digest(_module_file(m)) for m in LIBRARY).encode()).hexdigest()[:12]


def config_hash(cfg, n_ranks=1, hooks=None, code=None):
    """12 hex digits naming every setting that changes a run's results: all Config fields but
    the seed (its own column), where the data lives, the device name and compile, with precision
    'auto' resolved (bf16 on CUDA, fp32 elsewhere); plus the process count under torchrun (BN
    batches are per process), what a variant's hooks do (hook_identity) and code, the script's
    own code (script_identity; run_grid always passes it). A CSV row with the same hash, variant,
    seed and final epoch is a finished run of exactly these settings and script. Without code
    (and hooks), the settings alone: the hash the committed results/ CSVs carry, made before
    code was hashed."""
    d = _resumable(cfg)
    del d["seed"]
    for k, default in LATER_FIELDS.items():   # fields added after results were committed: at their
        if d[k] == default:                   # default they leave the hash as it was before them
            del d[k]
    d["precision"] = "bf16" if common.use_bf16(cfg, get_device(cfg.device)) else "fp32"
    if n_ranks > 1:
        d["processes"] = n_ranks
    added = {getattr(cfg, k) for k in ("proj_norm", "pred_norm", "proj_out_norm")} - common.BUILTIN_NORMS
    if added:   # norms a script registered in common.MLP_NORMS, by what they do
        d["norms"] = {name: hook_identity(common.MLP_NORMS[name]) for name in sorted(added)}
    if hooks:   # a script's own model or parameter groups, by what they do
        d["hooks"] = {k: hook_identity(fn) for k, fn in hooks.items()}
    if code:
        d["code"] = code
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- results CSV on disk
# Columns added after CSVs were written: a CSV without them gains them, empty, on its next run
LATER_COLUMNS = frozenset({"lib_hash", *(f"cfg_{k}" for k in HOOKS)})

# One writer per CSV (a lock file), rows of a run appended together once it ends, every rewrite
# atomic (temporary file + rename), and a torn tail (a crash mid-append) cut off on disk before
# anything is appended, so a line can never be glued onto half of another.
def read_rows(path, header, upgrade=False):
    """Rows of an existing results CSV ([] if missing or empty). A torn last line (no final
    newline, or too few cells) is removed from the file, with a warning. A CSV with other columns
    is refused, except with upgrade where it lacks only LATER_COLUMNS: it is rewritten with them."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if not lines or (len(lines) == 1 and not text.endswith("\n") and ",".join(header).startswith(lines[0])):
        return []   # empty, or a header cut short: rewritten whole by the first write
    if lines[0].split(",") != header:
        old = lines[0].split(",")
        if not upgrade or [c for c in header if c not in LATER_COLUMNS] != old:
            raise UsageError(f"{path} exists with other columns; move it away or use another --out")
        # a CSV written before lib_hash and the cfg_<hook> columns: the same columns otherwise
        rows = read_rows(path, old)   # a torn tail repaired under its own header first
        rewrite_rows(path, header, rows)
        print(f"{path}: added column(s) {', '.join(c for c in header if c not in old)}, empty in its "
              f"{len(rows)} earlier row(s) (written before they existed)")
        return read_rows(path, header)
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


# ========================================================================== the grid


def finished_runs(args, name, header, wanted, configs):
    """Opens (and locks) <out>/name and reads which requested runs already finished there with the
    same cfg_hash: (path, lock, done, other, libs). Rows of a requested run that never finished (a
    crash while appending) are dropped, so that its new rows are not duplicates. other: runs of a
    requested (variant, seed) under other settings. libs: {(variant, seed): lib_hash} of the
    finished ones."""
    path, lock = open_out(args.out, name)
    try:   # the lock is the caller's once this returns; before that, an error releases it here
        old = read_rows(path, header, upgrade=True)
        mine, other = {}, set()   # the CSV's rows of the requested runs, by (variant, seed, cfg_hash)
        for r in old:
            key = (r["variant"], int(r["seed"]), r["cfg_hash"])
            if wanted.get(key[:2]) == key[2]:
                mine.setdefault(key, []).append(r)
            elif key[:2] in wanted:   # rows land only when a run ends (or diverges)
                other.add(key)
        finished = {key for key, rows in mine.items() if any(is_final(r, configs[key[0]].epochs) for r in rows)}
        drop = mine.keys() - finished
        if drop:
            rewrite_rows(path, header, [r for r in old if (r["variant"], int(r["seed"]), r["cfg_hash"]) not in drop])
    except BaseException:
        lock.close()
        raise
    libs = {key[:2]: mine[key][-1].get("lib_hash", "") for key in finished}
    return path, lock, set() if args.fresh else {key[:2] for key in finished}, other, libs


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
    # a hook's name is a column only in scripts whose variants name one: the other CSVs keep their header
    hook_keys = [k for k in HOOKS if any(k in v for v in variants.values())]
    header = (COLUMNS + list(extra_columns) + ["cfg_hash", "lib_hash"] + [f"cfg_{k}" for k in over_keys]
              + [f"cfg_{k}" for k in hook_keys])
    metric_columns = [c for c in extra_columns if not c.startswith(("lars_lr:", "lr:"))]   # a metrics_fn's
    rank, n_ranks = world()
    added_norms = [common.MLP_NORMS[n] for n in set(common.MLP_NORMS) - common.BUILTIN_NORMS]
    code = script_identity([fn for h in hooks.values() for fn in h.values()] + added_norms)
    lib = library_identity()
    hashes = {name: config_hash(cfg, n_ranks, hooks[name], code) for name, cfg in configs.items()}
    wanted = {(name, seed): hashes[name] for seed in seeds for name in configs}
    path, lock = Path(args.out) / f"{exp}_{preset}.csv", None
    done, other, libs = set(), set(), {}   # other: runs of a requested (variant, seed) under other settings
    try:
        setup_error = None
        if rank == 0:   # under torchrun, rank 0 alone reads and writes the CSV
            try:
                path, lock, done, other, libs = finished_runs(args, f"{exp}_{preset}.csv", header, wanted, configs)
            except UsageError as e:
                if n_ranks == 1:
                    raise
                setup_error = str(e)   # sent to every rank, so that they all stop now with it
        if n_ranks > 1:
            shared = [done, setup_error]
            dist.broadcast_object_list(shared)
            done, setup_error = shared
            if setup_error:
                raise UsageError(setup_error)
            share = configs[next(iter(configs))].batch_size // n_ranks
            print(f"{n_ranks} processes, batch {share} each, BN statistics "
                  + ("over the global batch (--sync-bn)" if args.sync_bn else "per process (no --sync-bn)"))
        print(f"{exp} / preset {preset}: {len(configs)} variants x {len(seeds)} seeds -> {path}")
        if done:
            print(f"reused {len(done)} finished run(s) with identical settings from {path} (--fresh to retrain)")
            older = sum(libs.get(key) != lib for key in done)
            if older:   # reused, not retrained: see this module's docstring for why
                print(f"{older} of the reused run(s) were trained by other library code (common.py/harness.py "
                      f"changed since; lib_hash differs): --fresh retrains them")
        other = {key for key in other if key[:2] not in done}   # only the runs that will train now
        if other:   # say why they train again: a changed flag or script, or code that added a Config field
            print(f"{len(other)} earlier run(s) of these variants and seeds in {path} have other settings "
                  f"or script code (cfg_hash differs): they stay in the CSV, these train anew")
        if len(done) < len(wanted):
            if n_ranks > 1 and args.download and rank > 0:
                dist.barrier()   # rank 0 downloads first
            data = load_data(next(iter(configs.values())).dataset, args.data_dir, args.download)
            if n_ranks > 1 and args.download and rank == 0:
                dist.barrier()
        for seed in seeds:
            for name, cfg in configs.items():
                if (name, seed) in done:
                    continue
                cfg = dataclasses.replace(cfg, seed=seed)
                # the values actually used, and the variant's own pieces
                shown = [f"{k}={getattr(cfg, k)}" for k in {**variants[name], **cli} if k not in HOOKS]
                shown += [f"{k}={hook_name(fn)}" for k, fn in hooks[name].items()]
                print(f"[{name} seed {seed}] {', '.join(shown) or 'preset settings'}  (cfg_hash {hashes[name]})")
                buffer = []

                def log(row, name=name, seed=seed, cfg=cfg):
                    print(f"  epoch {row['epoch']:3d}  loss {cell(row['loss']) or '-':>9}"
                          f"  probe {cell(row['probe_acc']) or '-':>7}"
                          f"  pos_cos {cell(row['pos_cos']) or '-':>9}  neg_cos {cell(row['neg_cos']) or '-':>9}"
                          f"  z_std {cell(row['z_std']) or '-':>9}  neg_gap {cell(row['neg_gap']) or '-':>9}"
                          + "".join(f"  {k} {cell(row.get(k)) or '-':>9}" for k in metric_columns)
                          + f"  {row['wall_s']:.0f}s", flush=True)
                    unknown = [k for k in row if k not in header and not k.startswith(("lars_lr:", "lr:"))]
                    if unknown:   # a metric with no column would be dropped from the CSV without a word
                        raise UsageError(f"variant {name}: row keys {', '.join(unknown)} have no CSV column; "
                                         f"add them to extra_columns in the script's harness.main call")
                    full = dict(exp=exp, variant=name, seed=seed, **row, cfg_hash=hashes[name], lib_hash=lib,
                                **{f"cfg_{k}": getattr(cfg, k) for k in over_keys},
                                **{f"cfg_{k}": hook_name(hooks[name][k]) if k in hooks[name] else HOOK_DEFAULTS[k]
                                   for k in hook_keys})
                    buffer.append({k: cell(v) for k, v in full.items()})
                    if row["epoch"] == cfg.epochs and rank == 0:   # a run's rows land together: no half-run
                        save_run(path, header, buffer, replace=args.fresh)
                ckpt = Path(args.out) / "checkpoints" / f"{exp}_{preset}_{name}_seed{seed}_{hashes[name]}.pt"
                rows = common.train_byol(cfg, on_epoch=log, data=data, checkpoint=Checkpoints(ckpt),
                                         device=run_device(cfg), world=process_group(), **hooks[name])
                if rank == 0:
                    if rows[-1]["epoch"] != cfg.epochs:   # diverged: keep its rows as a result
                        save_run(path, header, buffer, replace=args.fresh)
                    ckpt.unlink(missing_ok=True)
        if rank == 0:
            final = [r for r in read_rows(path, header) if wanted.get((r["variant"], int(r["seed"]))) == r["cfg_hash"]
                     and is_final(r, configs[r["variant"]].epochs)]
            print_summary(final, list(configs), blog or {}, metric_columns)
        return path
    finally:
        if lock:
            lock.close()


def print_summary(rows, names, blog, metric_columns=()):
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
    print(f"{'variant':<22}{'probe_acc':>16}{'std_probe':>16}{'pos_cos':>20}{'neg_cos':>20}"
          + "".join(f"{c:>20}" for c in metric_columns) + "   blog (acc / pos / neg)")
    for name in names:
        ref = blog.get(name, "")
        print(f"{name:<22}{ms(name, 'probe_acc'):>16}{ms(name, 'probe_standardized'):>16}{ms(name, 'pos_cos'):>20}"
              f"{ms(name, 'neg_cos'):>20}" + "".join(f"{ms(name, c):>20}" for c in metric_columns) + f"   {ref}")


def main(exp, doc, presets, variants, blog=None, extra_columns=(), extra_variants=None, argv=None):
    """Entry point of every exp_*.py: bad input ends with one line and exit code 2."""
    args = get_parser(doc, presets, variants).parse_args(argv)
    code = None   # the exit code, where it is known; under torchrun the process leaves with it at once
    try:
        rank, _ = init_distributed(args.device)   # a no-op without torchrun
        if rank != 0:
            sys.stdout = open(os.devnull, "w")
        results = run_grid(exp, args, presets, variants, blog, extra_columns, extra_variants)
        if dist.is_initialized():
            dist.barrier()   # leave together: a gloo rank that exits while its peer still works can abort
        code = 0
        return results
    except UsageError as e:
        if world()[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        code = 2
        sys.exit(code)
    except Exception as e:
        if world()[0] > 0:   # most often a peer died first, with its own message: one line here, not a traceback
            print(f"rank {world()[0]} stopped: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}",
                  file=sys.stderr)
            code = 1
            sys.exit(code)
        raise
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume (finished runs are in the CSV, the "
              "current one continues from its last epoch)",
              file=sys.stderr)
        code = 130
        sys.exit(code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
            if code is not None:
                # gloo can abort a rank that has finished, after destroy_process_group and atexit,
                # while C++ tears down ("terminate called without an active exception"; measured:
                # 2 of 31 two-process runs on a loaded 2-core CPU). Every file is closed by now:
                # leave without that teardown, with the exit code the run would have had.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

