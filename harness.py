"""The run harness, around the research code: the command line, checkpoints, the results CSV (one
writer, atomic rewrites, torn-tail repair), the grid of variants x seeds and its summary. It never
changes a number: it decides which runs happen and where their rows go, so that an interrupted or
repeated command gives an uninterrupted one's rows. What decides that a finished run is current
(its cfg_hash) is reuse.py's; running several runs at once, executor.py's; validation, the
device, torchrun and the data on disk, runtime.py's."""
import argparse
import csv
import dataclasses
import functools
import os
import sys
from pathlib import Path

try:
    import fcntl   # the CSV lock (POSIX); without it, runs on one --out are not guarded
except ImportError:
    fcntl = None

import numpy as np
import torch

import common
import executor
from reuse import (HOOK_DEFAULTS, HOOKS, LIBRARY, config_hash, hook_name, late_code_changed, library_identity,
                   resumable, script_identity)
from runtime import (UsageError, check_config, choices, get_device, init_distributed, leave_process_group,
                     load_data, machine, process_group, run_device, world)
from runtime import find_dataset  # noqa: F401   (gpu_report.py calls harness.find_dataset)

# ============================================================================= checkpoints
CHECKPOINT_EVERY_S = 120   # after epoch 1, saves at most this often (a GPU epoch: seconds; a file: ~140 MB)


def save_checkpoint(path, cfg, model, opt, gen, rows, step):
    """What a run needs to continue (networks with queue and BN stats, optimizer, generator, rows),
    written to a temporary file and renamed: a crash never leaves half a checkpoint."""
    if world()[0] != 0:   # under torchrun every rank holds the same state: rank 0 writes it
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(dict(cfg=resumable(cfg), model=model.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                    rows=rows, step=step), tmp)
    os.replace(tmp, path)


class Checkpoints:
    """train_byol's checkpoint store, one file: saved by save_checkpoint (rank 0) after epoch 1,
    then every CHECKPOINT_EVERY_S at most."""

    def __init__(self, path):
        self.path, self.every_s = Path(path), CHECKPOINT_EVERY_S

    def save(self, cfg, model, opt, gen, rows, step):
        save_checkpoint(self.path, cfg, model, opt, gen, rows, step)

    def load(self, cfg):
        """The saved state if the file holds a checkpoint of this config, else None. An unreadable
        file (truncated, garbage) is renamed to <name>.bad, named in a warning: the run starts afresh."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            return state if state["cfg"] == resumable(cfg) else None
        except Exception as e:
            bad = self.path.with_name(self.path.name + ".bad")
            if world()[0] == 0:
                os.replace(self.path, bad)
                print(f"warning: checkpoint {self.path} is unreadable ({type(e).__name__}); kept as {bad}, "
                      f"starting this run afresh", file=sys.stderr)
            return None


# ========================================================================= command line
COLUMNS = ["exp", "variant", "seed", "epoch", "loss", "probe_acc", "pos_cos", "neg_cos", "z_std",
           "lr", "tau", "wall_s", "probe_liblinear", "probe_standardized", "pos_gap", "neg_gap"]
LOGGED = dict(loss="loss", probe="probe_acc", pos_cos="pos_cos", neg_cos="neg_cos", z_std="z_std", neg_gap="neg_gap")
# --smoke: seconds on synthetic data, same code path and CSV shape (what CI runs)
SMOKE = dict(dataset="synthetic", width=4, mlp_hidden_dim=32, proj_dim=16, batch_size=64, epochs=2, queue_size=256,
             train_subset=0, schedule_epochs=0)
MAX_SEEDS = 1000
BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def config_help(presets):
    """--help's list of Config fields: each field's default and allowed values, then, where a
    preset sets it, every preset's value (what a run uses). Their meaning: common.Config."""
    out = ["Config fields (--set KEY=VALUE, or a variant's overrides; their meaning: common.Config). Each "
           f"field's default, then the value of each preset ({', '.join(presets)}) where a preset sets it:"]
    allowed = choices(common.MLP_NORMS)
    for f in dataclasses.fields(common.Config):
        line = f"  {f.name} = {f.default!r}" + (f" [{'|'.join(allowed[f.name])}]" if f.name in allowed else "")
        if any(f.name in preset for preset in presets.values()):
            line += "   presets: " + ", ".join(f"{n} {p.get(f.name, f.default)!r}" for n, p in presets.items())
        out.append(line)
    return "\n".join(out)


STAGES_HELP = """A variant's model_fn=<a common.BYOL subclass> overrides any of its stages (BYOL's docstring;
README, 'Your own ablation'): start(images, gen), views(x, gen), param_groups(), configure_optimizer(),
set_lr(opt, step, total_steps), before_step(step), forward(views) with online(v), target(v) and
loss(ps, ts, zs), update_target(tau, step), after_step(step, out), evaluate(data, epoch, views, out)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown --preset, a flag without its value) are one 'error:' line
    and exit code 2, as every other bad input, instead of the usage text first."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def get_parser(doc, presets, variants):
    p = OneLineParser(description=f"{doc}\n{STAGES_HELP}", epilog=config_help(presets),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = functools.partial(p.add_argument, action="store_true")
    p.add_argument("--preset", choices=list(presets), help="default: cifar10 on a GPU, cpu otherwise")
    p.add_argument("--epochs", type=int, help="override the preset's number of epochs")
    p.add_argument("--seeds", type=str, default="1",
                   help=f"N (seeds 0..N-1, N <= {MAX_SEEDS}), or a list like 3,4 (one seed: 3,); default 1")
    p.add_argument("--variants", type=str, default="", help=f"comma list of: {', '.join(variants)} (default: all)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any Config field for every variant, e.g. --set lr=0.2 (repeatable)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps, or a list cuda:0,cuda:1 (the "
                   "runs take turns on them, --jobs at a time)")
    p.add_argument("--jobs", type=int, help="runs trained at once, each in a worker process (default: on a CPU, one a "
                   "core for the cpu and steps presets when 2 or more runs are left, else 1; one a listed GPU)")
    p.add_argument("--threads", type=int, help="threads a run (default: $OMP_NUM_THREADS, else the cores over --jobs)")
    p.add_argument("--shard", default="", metavar="K/N", help="only the K-th of N slices of the (variant, seed) "
                   "runs, K = 0..N-1 (a cluster's job array: docs/runs.md)")
    p.add_argument("--data-dir", default="", help="folder holding cifar-10-batches-py/ or stl10_binary/")
    p.add_argument("--out", default="runs", help="folder for the CSV (default runs/; the committed reference "
                   "results are in results/)")
    flag("--download", help="download the dataset if it is missing")
    flag("--fresh", help="retrain runs whose identical settings are already finished in the CSV (their old rows "
         "are replaced)")
    flag("--smoke", help="seconds-long run on synthetic data (CI)")
    flag("--compile", help="torch.compile the networks and the augmentation")
    flag("--sync-bn", help="under torchrun: BatchNorm statistics over the global batch (default: per process)")
    flag("--no-weights", help="do not keep each finished run's final weights under <out>/weights/")
    return p


def parse_seeds(text):
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        elif 1 <= int(text) <= MAX_SEEDS:
            seeds = list(range(int(text)))
        else:
            raise UsageError(f"--seeds {text}: a count must be 1..{MAX_SEEDS}")
    except ValueError:
        raise UsageError(f"--seeds {text!r}: give a count like 3 or a list like 0,2") from None
    if not seeds or min(seeds) < 0 or max(seeds) >= 2 ** 32:
        raise UsageError(f"--seeds {text!r}: need at least one seed, each in 0..2^32-1")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


def parse_overrides(pairs):
    """{field: value} of --set KEY=VALUE pairs, each value read as its Config field's type."""
    fields = {f.name: getattr(f.type, "__name__", f.type) for f in dataclasses.fields(common.Config)}
    read = dict(int=int, float=float, str=str, bool=lambda v: BOOLS[v.lower()],
                tuple=lambda v: tuple(float(x) for x in v.split(",")))
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE with KEY a Config field ({', '.join(fields)})")
        try:
            out[key] = read[fields[key]](value)
        except (ValueError, KeyError):
            what = "a bool (true/false/1/0/yes/no)" if fields[key] == "bool" else f"a valid {fields[key]}"
            raise UsageError(f"--set {pair!r}: {value!r} is not {what}") from None
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
    base = dict(presets[preset], device=args.device.split(",")[0], data_dir=args.data_dir, compile=args.compile,
                sync_bn=args.sync_bn, **(SMOKE if args.smoke else {}))
    cli = parse_overrides(args.set)
    cli.update({k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size)) if v is not None})
    configs, warnings = {}, []
    for v in dict.fromkeys(names):
        over = {k: x for k, x in variants[v].items() if k not in HOOKS}
        # a variant that never trains (random init) keeps epochs=0 whatever --epochs says
        used = {k: x for k, x in cli.items() if not (k == "epochs" and over.get("epochs") == 0)}
        warnings += [f"warning: --set {k}={used[k]} replaces variant {v}'s own {k}={over[k]}"
                     for k in used if k in over and used[k] != over[k]]
        configs[v] = check_config(common.Config(**{**base, **over, **used}), common.MLP_NORMS)
    for w in warnings:   # once every config is valid (bad input stays a one-line error)
        print(w, file=sys.stderr)
    # overrides that depart from the preset, whose values the README's and results/'s numbers came
    # from (a --epochs 10 on the cpu preset's 12 gives other numbers and another cfg_hash: issue 30)
    was = {**{f.name: f.default for f in dataclasses.fields(common.Config)}, **presets[preset]}
    changed = [f"{k}={x!r} (preset: {was[k]!r})" for k, x in cli.items() if x != was[k]]
    if changed and not args.smoke:
        print(f"note: {', '.join(changed)} depart from preset '{preset}', the settings of the README's "
              f"numbers: these runs will not reproduce them (and get their own cfg_hash)")
    return ("smoke" if args.smoke else preset), configs, cli


# ---------------------------------------------------------------- results CSV on disk
# One writer per CSV (a lock file), a run's rows appended together when it ends, every rewrite
# atomic (temporary file + rename), a torn tail (a crash mid-append) cut off before anything is
# appended. Columns added after CSVs were written (a CSV gains them, empty, on its next run):
LATER_COLUMNS = frozenset({"lib_hash", "late_code", "machine", *(f"cfg_{k}" for k in HOOKS)})


def read_rows(path, header, upgrade=False):
    """Rows of a results CSV ([] if missing or empty); a torn last line (no final newline, too few
    cells) is cut from the file, with a warning. Other columns are refused, but with upgrade a
    CSV that lacks only LATER_COLUMNS is rewritten with them."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if not lines or (len(lines) == 1 and not text.endswith("\n") and ",".join(header).startswith(lines[0])):
        return []   # empty, or a header cut short: rewritten whole by the first write
    old = lines[0].split(",")
    if old != header:
        if not upgrade or [c for c in header if c not in LATER_COLUMNS] != old:
            raise UsageError(f"{path} exists with other columns; move it away or use another --out")
        rows = read_rows(path, old)   # a torn tail repaired under its own header first
        rewrite_rows(path, header, rows)
        print(f"{path}: added column(s) {', '.join(c for c in header if c not in old)}, empty in its "
              f"{len(rows)} earlier row(s) (written before they existed)")
        return read_rows(path, header)
    torn = not text.endswith("\n") or len(next(csv.reader([lines[-1]]))) != len(header)
    rows = list(csv.DictReader(lines[:-1] if torn and len(lines) > 1 else lines))
    if torn:
        print(f"warning: {path}: removed a torn last line (a crash mid-write): {lines[-1][:60]!r}", file=sys.stderr)
        rewrite_rows(path, header, rows)
    return rows


def write_rows(path, header, rows, mode="a"):
    """Appends rows (the header first in a new or empty file), synced to disk; mode "w": rewrites it."""
    new = mode == "w" or not path.exists() or path.stat().st_size == 0
    with open(path, mode, newline="") as f:
        w = csv.DictWriter(f, header, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def rewrite_rows(path, header, rows):
    """Replaces the CSV with header + rows, atomically."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write_rows(tmp, header, rows, mode="w")
    os.replace(tmp, path)


def save_run(path, header, rows, replace=False):
    """Appends one run's rows; replace: first removes the CSV's rows of the same run (variant,
    seed, cfg_hash), in one atomic rewrite (--fresh: the old result stays until the new one is in)."""
    if not replace:
        return write_rows(path, header, rows)
    key = (rows[0]["variant"], str(rows[0]["seed"]), rows[0]["cfg_hash"])
    rewrite_rows(path, header, [r for r in read_rows(path, header) if (r["variant"], r["seed"], r["cfg_hash"]) != key]
                 + rows)


def cell(v):
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)


def is_final(row, epochs):
    """A run's last row: its final epoch, or the epoch where its loss diverged."""
    return int(row["epoch"]) == epochs or row["loss"] in ("nan", "inf", "-inf")


# ========================================================================== the grid
def finished_runs(args, csv_name, header, wanted, configs, lib):
    """Opens <out>/csv_name, locked against a second run until this process ends: (path, lock, done),
    done the requested (variant, seed) finished there with the wanted cfg_hash (none with --fresh),
    said in a line. A requested run that never finished (a crash mid-append) loses its rows."""
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / csv_name
        lock = open(path.with_name(path.name + ".lock"), "a+")
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or type(e).__name__})") from None
    try:   # the lock is the caller's once this returns; before that, an error releases it here
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
    stale = {key: late_code_changed(mine[key][-1].get("late_code", "")) for key in finished}
    stale = {key: files for key, files in stale.items() if files}
    if stale and not args.fresh:   # code a run imported while it trained has changed: it trains again
        print(f"{len(stale)} finished run(s) imported code while training that has changed since "
              f"({', '.join(sorted({f for files in stale.values() for f in files}))}): they train again")
    done = set() if args.fresh else {key[:2] for key in finished if key not in stale}
    if done:
        print(f"reused {len(done)} finished run(s) with identical settings from {path} (--fresh to retrain)")
        older = sum(mine[key][-1].get("lib_hash", "") != lib for key in finished)
        if older:   # reused, not retrained: see this module's docstring for why
            print(f"{older} of the reused run(s) were trained by other library code (lib_hash differs: "
                  f"{', '.join(LIBRARY)} changed since): --fresh retrains them")
    other = {key for key in other if key[:2] not in done}   # only the runs that will train now
    if other:   # say why they train again: a changed flag or code, or code that added a Config field
        print(f"{len(other)} earlier run(s) of these variants and seeds in {path} have other settings "
              f"or script code (cfg_hash differs): they stay in the CSV, these train anew")
    return path, lock, done


@dataclasses.dataclass
class Run:
    """One (variant, seed) run of a grid: what train_one needs, in this process or a worker's."""
    exp: str
    name: str
    cfg: common.Config            # its seed set
    cfg_hash: str
    lib: str
    cells: dict                   # its cfg_* cells
    header: list
    ckpt: str
    model_fn: object = None
    code: dict = None             # script_identity before training: what it imports later is recorded
    data: dict = None             # the data, when it trains in this process
    keep_weights: str = ""        # where its final weights go ("": nowhere)

    @property
    def label(self):
        return f"{self.name} seed {self.cfg.seed}"

    def on_device(self, device):
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, device=device))


def train_one(run):
    """Trains one run, from its checkpoint if there is one, and returns its CSV rows; prints each
    epoch's line with the run's name and ETA. Records the code it imported while training
    (late_code) and where it ran (machine)."""
    data, rows, extra = run.data or load_data(run.cfg.dataset, run.cfg.data_dir), [], run.header[len(COLUMNS):]
    metric_columns = [c for c in extra if not c.startswith(("lars_lr:", "lr:", "cfg_")) and c not in LATER_COLUMNS]

    def log(row):
        unknown = [k for k in row if k not in run.header and not k.startswith(("lars_lr:", "lr:"))]
        if unknown:   # a metric with no column would be dropped from the CSV without a word
            raise UsageError(f"variant {run.name}: row keys {', '.join(unknown)} have no CSV column; "
                             f"add them to extra_columns in the script's harness.main call")
        rows.append({k: cell(v) for k, v in dict(exp=run.exp, variant=run.name, seed=run.cfg.seed, **row,
                                                  cfg_hash=run.cfg_hash, lib_hash=run.lib, **run.cells).items()})
        done = row["epoch"] - rows[0]["epoch"]
        left = (row["wall_s"] - float(rows[0]["wall_s"])) / done * (run.cfg.epochs - row["epoch"]) if done else None
        print(f"  [{run.label}] epoch {row['epoch']:3d}" + "".join(f"  {k} {cell(row.get(c)) or '-':>9}" for k, c in
              [*LOGGED.items(), *zip(metric_columns, metric_columns)]) + f"  {row['wall_s']:.0f}s" +
              (f", eta {executor.eta(left)}" if left else ""), flush=True)
    device, built = run_device(run.cfg), []

    def model_fn(cfg, image_size):   # the run's model, kept to save its final weights
        built.append((run.model_fn or common.BYOL)(cfg, image_size))
        return built[-1]
    common.train_byol(run.cfg, on_epoch=log, data=data, checkpoint=Checkpoints(run.ckpt), device=device,
                      model_fn=model_fn)
    if run.keep_weights and built and world()[0] == 0:
        Path(run.keep_weights).parent.mkdir(parents=True, exist_ok=True)
        torch.save(built[0].state_dict(), run.keep_weights)
    late = ";".join(f"{f}={d}" for f, d in script_identity().items() if f not in (run.code or {}))
    where = machine(device)
    return [dict(r, late_code=late, machine=where) for r in rows]


def run_grid(exp, args, presets, variants, blog=None, extra_columns=(), extra_variants=None):
    """Runs seeds x variants, one CSV row per epoch in <out>/<exp>_<preset>.csv (a run's rows land
    together when it ends), --jobs at a time (executor.py), reusing the runs finished there with
    the same cfg_hash (--fresh retrains them); an interrupted run continues from its checkpoint
    under <out>/checkpoints/. Ends with a summary of exactly the requested runs beside the blog's."""
    for flag in ("jobs", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    devices = args.device.split(",")
    for d in devices:
        get_device(d)   # a bad or missing device: one line, exit 2
    shard([], args.shard)   # checked
    preset, configs, cli = build_configs(args, presets, variants, extra_variants)
    variants = {**variants, **(extra_variants or {})}
    hooks = {name: {k: variants[name][k] for k in HOOKS if k in variants[name]} for name in configs}
    seeds, group = parse_seeds(args.seeds), process_group()   # group: one process, or torchrun's ranks
    over_keys = sorted({k for v in variants.values() for k in v if k not in HOOKS})
    # a hook's name is a column only in scripts whose variants name one: the other CSVs keep their header
    hook_keys = [k for k in HOOKS if any(k in v for v in variants.values())]
    header = (COLUMNS + list(extra_columns) + ["cfg_hash", "lib_hash", "late_code", "machine"]
              + [f"cfg_{k}" for k in over_keys + hook_keys])
    metric_columns = [c for c in extra_columns if not c.startswith(("lars_lr:", "lr:"))]   # an evaluate()'s
    added_norms = [common.MLP_NORMS[n] for n in set(common.MLP_NORMS) - common.BUILTIN_NORMS]
    code = {name: script_identity([*hooks[name].values(), *added_norms]) for name in configs}   # each variant's
    lib = library_identity()
    hashes = {name: config_hash(cfg, group.size, hooks[name], code[name]) for name, cfg in configs.items()}
    mine = shard([(seed, name) for seed in seeds for name in configs], args.shard)   # this process's runs
    wanted = {(name, seed): hashes[name] for seed, name in mine}
    csv_name, cfg0 = f"{exp}_{preset}.csv", next(iter(configs.values()))
    path, lock, done, error = Path(args.out) / csv_name, None, set(), None
    if group.size > 1:
        bn = "over the global batch (--sync-bn)" if args.sync_bn else "per process (no --sync-bn)"
        print(f"{group.size} processes, batch {cfg0.batch_size // group.size} each, BN statistics {bn}")
    print(f"{exp} / preset {preset}: {len(configs)} variants x {len(seeds)} seeds -> {path}")
    try:
        if group.rank == 0:   # under torchrun, rank 0 alone reads and writes the CSV
            try:
                path, lock, done = finished_runs(args, csv_name, header, wanted, configs, lib)
            except UsageError as e:   # sent to every rank, so that they all stop now with it
                error = str(e)
        done, error = group.broadcast([done, error])
        if error:
            raise UsageError(error)
        todo = [(seed, name) for seed, name in mine if (name, seed) not in done]
        if group.size > 1 and (args.jobs or 1) > 1:
            raise UsageError("--jobs runs several runs at once; under torchrun each run already takes every process")
        jobs, threads = executor.plan(args.jobs or (1 if group.size > 1 else None), args.threads, devices,
                                      get_device(devices[0]).type == "cuda", preset, len(todo))
        data = None
        if todo:
            if args.download and group.rank > 0:
                group.barrier()   # rank 0 downloads first
            data = load_data(cfg0.dataset, args.data_dir, args.download)
            if args.download and group.rank == 0:
                group.barrier()
            for name in {name for _, name in todo}:   # every run's config against the data, before any trains
                check_config(configs[name], common.MLP_NORMS, data)
        runs = []
        for seed, name in todo:
            cfg = dataclasses.replace(configs[name], seed=seed)
            # the values actually used, and the variant's own pieces
            shown = [f"{k}={getattr(cfg, k)}" for k in {**variants[name], **cli} if k not in HOOKS]
            shown += [f"{k}={hook_name(fn)}" for k, fn in hooks[name].items()]
            print(f"[{name} seed {seed}] {', '.join(shown) or 'preset settings'}  (cfg_hash {hashes[name]})")
            cells = {**{f"cfg_{k}": getattr(cfg, k) for k in over_keys}, **{
                f"cfg_{k}": hook_name(hooks[name][k]) if k in hooks[name] else HOOK_DEFAULTS[k] for k in hook_keys}}
            stem = f"{exp}_{preset}_{name}_seed{seed}_{hashes[name]}.pt"
            runs.append(Run(exp, name, cfg, hashes[name], lib, cells, header, str(Path(args.out) / "checkpoints" / stem),
                            hooks[name].get("model_fn"), code[name], data if jobs == 1 else None,
                            "" if args.no_weights else str(Path(args.out) / "weights" / stem)))

        def landed(run, rows):   # a run's rows land together when it ends (or diverges): no half-run
            if group.rank == 0 and rows:
                save_run(path, header, rows, replace=True)   # a retrained run's old rows go
                Path(run.ckpt).unlink(missing_ok=True)
        if todo:
            print(f"{len(todo)} run(s) to train, {jobs} at a time, {threads} thread(s) each")
        failed = executor.run(train_one, runs, jobs, threads, devices, landed) if runs else []
        if group.rank == 0:
            final = [r for r in read_rows(path, header) if wanted.get((r["variant"], int(r["seed"]))) == r["cfg_hash"]
                     and is_final(r, configs[r["variant"]].epochs)]
            print_summary(final, list(configs), blog or {}, metric_columns)
        if failed:
            raise RunsFailed(f"{len(failed)} of {len(runs)} run(s) failed: "
                             + "; ".join(f"{run.label}: {e}" for run, e in failed))
        return path
    finally:
        if lock:
            lock.close()


class RunsFailed(Exception):
    """Some runs of a grid failed (the others' rows landed): one line, exit code 1."""


def shard(todo, spec):
    """The K-th of N slices of the runs (--shard K/N), every N-th from the K-th; all without spec."""
    if not spec:
        return todo
    try:
        k, n = map(int, spec.split("/"))
    except ValueError:
        raise UsageError(f"--shard {spec!r}: give K/N, e.g. 0/4") from None
    if not 0 <= k < n:
        raise UsageError(f"--shard {spec}: K must be in 0..N-1")
    return todo[k::n]


def print_summary(rows, names, blog, metric_columns=()):
    """Probe accuracy and cosines of each run's last row, mean +- std over seeds (sample std,
    n - 1), beside the blog's numbers."""
    last = {(r["variant"], r["seed"]): r for r in sorted(rows, key=lambda r: int(r["epoch"])) if r["variant"] in names}

    def ms(name, col):
        vals = [float(r[col]) for (v, _), r in last.items() if v == name and r.get(col) not in ("", None)]
        return (f"{np.mean(vals):.4g} +- {np.std(vals, ddof=1):.2g}" if len(vals) > 1 else
                f"{vals[0]:.4g}" if vals else "-")
    columns = dict(probe_acc=16, probe_standardized=16, pos_cos=20, neg_cos=20, **dict.fromkeys(metric_columns, 20))
    epochs = sorted({int(r["epoch"]) for r in last.values()})
    print(f"\nlast epoch ({', '.join(map(str, epochs))}), mean +- std over {len({s for _, s in last})} seed(s); "
          f"probe_acc is the blog's liblinear fit, std_probe the standardized fit:")
    print(f"{'variant':<22}" + "".join(f"{c.replace('probe_standardized', 'std_probe'):>{w}}"
                                       for c, w in columns.items()) + "   blog (acc / pos / neg)")
    for name in names:
        print(f"{name:<22}" + "".join(f"{ms(name, c):>{w}}" for c, w in columns.items()) + f"   {blog.get(name, '')}")


def main(exp, doc, presets, variants, blog=None, extra_columns=(), extra_variants=None, argv=None):
    """Entry point of every exp_*.py: bad input ends with one line and exit code 2."""
    args = get_parser(doc, presets, variants).parse_args(argv)
    code = None   # the exit code, where it is known; under torchrun the process leaves with it at once
    try:
        if init_distributed(args.device)[0] != 0:   # a no-op without torchrun
            sys.stdout = open(os.devnull, "w")
        results = run_grid(exp, args, presets, variants, blog, extra_columns, extra_variants)
        process_group().barrier()   # leave together: a gloo rank that exits while its peer still works can abort
        code = 0
        return results
    except UsageError as e:
        if world()[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        code = 2
        sys.exit(code)
    except RunsFailed as e:   # the other runs' rows are in the CSV
        print(f"error: {e}", file=sys.stderr)
        code = 1
        sys.exit(code)
    except Exception as e:
        if world()[0] > 0:   # most often a peer died first, with its own message: one line here, not a traceback
            print(f"rank {world()[0]} stopped: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}",
                  file=sys.stderr)
            code = 1
            sys.exit(code)
        raise
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume (finished runs are in the CSV, the current one "
              "continues from its last epoch)", file=sys.stderr)
        code = 130
        sys.exit(code)
    finally:
        leave_process_group(code)   # torchrun's; a no-op in one process
