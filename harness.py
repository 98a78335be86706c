"""The run harness, around the research code: the command line, checkpoints, the config hash, the
results CSV (one writer, atomic rewrites, torn-tail repair), the grid of variants x seeds and its
summary. It never changes a number: it decides which runs happen and where their rows go, so that
an interrupted or repeated command gives an uninterrupted one's rows. Validation, the device,
torchrun and the data on disk are runtime.py's.

A finished run is reused only while its cfg_hash is today's: every Config field, the variant's
hooks, and the code of every module the script loads from its folder or the library's, subfolders
included (script_identity). The library (LIBRARY) keeps a config's numbers by contract (new
behaviour comes as a Config field whose default keeps the hash, LATER_FIELDS): its edits do not
retrain, the runs they reuse are counted in one line (lib_hash), and --fresh retrains them."""
import argparse
import ast
import csv
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import sys
import sysconfig
from pathlib import Path

try:
    import fcntl   # the CSV lock (POSIX); without it, runs on one --out are not guarded
except ImportError:
    fcntl = None

import numpy as np
import torch

import common
from runtime import (UsageError, check_config, choices, get_device, init_distributed, leave_process_group,
                     load_data, process_group, run_device, use_bf16, world)
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
    torch.save(dict(cfg=_resumable(cfg), model=model.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
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
            return state if state["cfg"] == _resumable(cfg) else None
        except Exception as e:
            bad = self.path.with_name(self.path.name + ".bad")
            if world()[0] == 0:
                os.replace(self.path, bad)
                print(f"warning: checkpoint {self.path} is unreadable ({type(e).__name__}); kept as {bad}, "
                      f"starting this run afresh", file=sys.stderr)
            return None


def _resumable(cfg):
    """The config fields a checkpoint must match (where it runs may change)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "data_dir", "compile")}


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
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--data-dir", default="", help="folder holding cifar-10-batches-py/ or stl10_binary/")
    p.add_argument("--out", default="runs", help="folder for the CSV (default runs/; the committed reference "
                   "results are in results/)")
    flag("--download", help="download the dataset if it is missing")
    flag("--fresh", help="retrain runs whose identical settings are already finished in the CSV (their old rows "
         "are replaced)")
    flag("--smoke", help="seconds-long run on synthetic data (CI)")
    flag("--compile", help="torch.compile the networks and the augmentation")
    flag("--sync-bn", help="under torchrun: BatchNorm statistics over the global batch (default: per process)")
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
    base = dict(presets[preset], device=args.device, data_dir=args.data_dir, compile=args.compile,
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


# ======================================================================== config hash
# Config fields added after the committed results/ were made, with their defaults (config_hash)
LATER_FIELDS = dict(gn_groups=32, decay_params="all", aug_crop_scale=(0.2, 0.2),
                    aug_blur=(0.5, 0.5), aug_solarize=(0.0, 0.0), depth=18)
# Config fields removed since, at the one value every run had: the hashes stay as they were
RETIRED_FIELDS = dict(proj_layers=2, temperature=0.2, warmup_epochs=0.0, probe_fit="liblinear", objective="byol",
                      mlp_bn_group=0, probe="blog", probe_bn="running", lars_eta=1e-3, lars_form="blog")

# A variant's dict may also hold model_fn(cfg, image_size) -> a common.BYOL subclass (STAGES_HELP)
HOOKS = ("model_fn",)
HOOK_DEFAULTS = {"model_fn": "BYOL"}   # cfg_<hook> without one


def hook_name(fn):
    """A hook's qualified name (the cfg_<hook> column), with a partial's bound arguments and a
    closure's values, so two hooks made by one factory with other arguments read apart."""
    if isinstance(fn, functools.partial):
        bound = [repr(a) for a in fn.args] + [f"{k}={v!r}" for k, v in fn.keywords.items()]
        return f"partial({', '.join([hook_name(fn.func), *bound])})"
    name = getattr(fn, "__qualname__", type(fn).__name__)
    if inspect.isfunction(fn) and fn.__closure__:
        name += f"[{', '.join(f'{n}={_cell_value(c)}' for n, c in zip(fn.__code__.co_freevars, fn.__closure__))}]"
    return name


def _cell_value(cell):
    """A closure cell's value: a plain value as written, anything else by its name; '?' if unfilled."""
    try:
        v = cell.cell_contents
    except ValueError:
        return "?"
    plain = v is None or isinstance(v, (str, int, float, bool, tuple, list))
    return repr(v) if plain else getattr(v, "__qualname__", type(v).__name__)


def hook_identity(fn):
    """What a hook does, for the hash: its name, a digest of its source and closure, a partial's
    arguments. A hook without readable source (made by exec, in a session) is refused."""
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


# a script's top-level names that only list its grid (its values are hashed as settings and hooks)
GRID_NAMES = frozenset({"VARIANTS", "EXTRA_VARIANTS", "PRESETS", "BLOG"})
LIBRARY = ("common", "harness", "runtime", "augment", "logreg", "presets")   # edits reported, not retrained
HERE = Path(__file__).resolve().parent   # the library's folder
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)   # what has a docstring
INSTALLED = [Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib")]


def _grid_only(st):
    """Whether a top-level statement only fills GRID_NAMES: NAME = ..., NAME[k] = ...,
    NAME.update(...), or a for loop of those."""
    if isinstance(st, ast.For):
        return not st.orelse and all(map(_grid_only, st.body))
    call = isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) and isinstance(st.value.func, ast.Attribute)
    targets = [st.value.func.value] if call else getattr(st, "targets", None) or [getattr(st, "target", None)]
    names = [t.value if isinstance(t, ast.Subscript) else t for t in targets]
    return bool(names) and all(isinstance(n, ast.Name) and n.id in GRID_NAMES for n in names)


def source_digest(path):
    """12 hex digits of a Python file's code: its syntax tree (not comments, not layout) without
    docstrings and the statements that only fill its grid. Any other edit changes it."""
    tree = ast.parse(Path(path).read_text())
    tree.body = [st for st in tree.body if not _grid_only(st)]
    for node in ast.walk(tree):
        if isinstance(node, DOCUMENTED) and ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    return hashlib.sha1(ast.dump(tree).encode()).hexdigest()[:12]


def _source_file(module):
    """The .py file a module was loaded from; None for a built-in, an extension, a namespace
    package, or an installed module (the standard library, site-packages)."""
    f = getattr(module, "__file__", None)
    f = Path(f).resolve() if isinstance(f, str) and f.endswith(".py") and os.path.isfile(f) else None
    return None if f is None or any(map(f.is_relative_to, INSTALLED)) or "site-packages" in f.parts else f


def script_identity(fns=()):
    """{file: source_digest} of the code a run executes beyond LIBRARY: every module loaded from the
    script's folder or the library's, subfolders included, and those defining fns (hooks, added
    norms) wherever they are; named by their path there, so a copy of the repo hashes the same."""
    main = _source_file(sys.modules.get("__main__"))
    roots = [HERE] if main is None else [main.parent, HERE]
    files = {f for f in map(_source_file, list(sys.modules.values())) if f and any(map(f.is_relative_to, roots))}
    for fn in (f.func if isinstance(f, functools.partial) else f for f in fns):
        target = fn if inspect.isfunction(fn) or inspect.isclass(fn) else type(fn)
        files.add(_source_file(sys.modules.get(getattr(target, "__module__", ""))))
    files -= {None, *(HERE / f"{m}.py" for m in LIBRARY)}
    names = {f: next((f.relative_to(r).as_posix() for r in roots if f.is_relative_to(r)), f.name) for f in files}
    return {names[f]: source_digest(f) for f in sorted(files)}


def library_identity():
    """12 hex digits of the library's code (LIBRARY, as source_digest reads it): the lib_hash column."""
    return hashlib.sha1(" ".join(source_digest(HERE / f"{m}.py") for m in LIBRARY).encode()).hexdigest()[:12]


def config_hash(cfg, n_ranks=1, hooks=None, code=None):
    """12 hex digits naming what changes a run's results: every Config field but seed, data_dir,
    device and compile ('auto' precision resolved), the process count, the hooks and code
    (script_identity). Without hooks and code: the settings alone, as the committed results/ carry."""
    # the fields added after results were committed leave the hash as it was, at their defaults
    d = {k: v for k, v in _resumable(cfg).items() if k != "seed" and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
    d.update(RETIRED_FIELDS)
    d["precision"] = "bf16" if use_bf16(cfg, get_device(cfg.device)) else "fp32"
    if n_ranks > 1:
        d["processes"] = n_ranks
    added = {getattr(cfg, k) for k in ("proj_norm", "pred_norm")} - common.BUILTIN_NORMS
    if added:   # norms a script registered in common.MLP_NORMS, by what they do
        d["norms"] = {name: hook_identity(common.MLP_NORMS[name]) for name in sorted(added)}
    if hooks:   # a script's own model or parameter groups, by what they do
        d["hooks"] = {k: hook_identity(fn) for k, fn in hooks.items()}
    if code:
        d["code"] = code
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- results CSV on disk
# One writer per CSV (a lock file), a run's rows appended together when it ends, every rewrite
# atomic (temporary file + rename), a torn tail (a crash mid-append) cut off before anything is
# appended. Columns added after CSVs were written (a CSV gains them, empty, on its next run):
LATER_COLUMNS = frozenset({"lib_hash", *(f"cfg_{k}" for k in HOOKS)})


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
    done = set() if args.fresh else {key[:2] for key in finished}
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


def run_grid(exp, args, presets, variants, blog=None, extra_columns=(), extra_variants=None):
    """Runs seeds x variants, one CSV row per epoch in <out>/<exp>_<preset>.csv (a run's rows land
    together when it ends), reusing the runs finished there with the same cfg_hash (--fresh
    retrains them); an interrupted run continues from its checkpoint under <out>/checkpoints/.
    Ends with a summary of exactly the requested runs beside the blog's numbers."""
    preset, configs, cli = build_configs(args, presets, variants, extra_variants)
    variants = {**variants, **(extra_variants or {})}
    hooks = {name: {k: variants[name][k] for k in HOOKS if k in variants[name]} for name in configs}
    seeds, group = parse_seeds(args.seeds), process_group()   # group: one process, or torchrun's ranks
    over_keys = sorted({k for v in variants.values() for k in v if k not in HOOKS})
    # a hook's name is a column only in scripts whose variants name one: the other CSVs keep their header
    hook_keys = [k for k in HOOKS if any(k in v for v in variants.values())]
    header = COLUMNS + list(extra_columns) + ["cfg_hash", "lib_hash"] + [f"cfg_{k}" for k in over_keys + hook_keys]
    metric_columns = [c for c in extra_columns if not c.startswith(("lars_lr:", "lr:"))]   # an evaluate()'s
    added_norms = [common.MLP_NORMS[n] for n in set(common.MLP_NORMS) - common.BUILTIN_NORMS]
    code, lib = script_identity([fn for h in hooks.values() for fn in h.values()] + added_norms), library_identity()
    hashes = {name: config_hash(cfg, group.size, hooks[name], code) for name, cfg in configs.items()}
    wanted = {(name, seed): hashes[name] for seed in seeds for name in configs}
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
        todo = [(seed, name) for seed in seeds for name in configs if (name, seed) not in done]
        if todo:
            if args.download and group.rank > 0:
                group.barrier()   # rank 0 downloads first
            data = load_data(cfg0.dataset, args.data_dir, args.download)
            if args.download and group.rank == 0:
                group.barrier()
        for seed, name in todo:
            cfg = dataclasses.replace(configs[name], seed=seed)
            # the values actually used, and the variant's own pieces
            shown = [f"{k}={getattr(cfg, k)}" for k in {**variants[name], **cli} if k not in HOOKS]
            shown += [f"{k}={hook_name(fn)}" for k, fn in hooks[name].items()]
            print(f"[{name} seed {seed}] {', '.join(shown) or 'preset settings'}  (cfg_hash {hashes[name]})")
            buffer, cells = [], {**{f"cfg_{k}": getattr(cfg, k) for k in over_keys}, **{
                f"cfg_{k}": hook_name(hooks[name][k]) if k in hooks[name] else HOOK_DEFAULTS[k] for k in hook_keys}}

            def log(row, name=name, seed=seed, cfg=cfg, cells=cells):
                print(f"  epoch {row['epoch']:3d}" + "".join(f"  {k} {cell(row.get(c)) or '-':>9}" for k, c in
                      [*LOGGED.items(), *zip(metric_columns, metric_columns)]) + f"  {row['wall_s']:.0f}s", flush=True)
                unknown = [k for k in row if k not in header and not k.startswith(("lars_lr:", "lr:"))]
                if unknown:   # a metric with no column would be dropped from the CSV without a word
                    raise UsageError(f"variant {name}: row keys {', '.join(unknown)} have no CSV column; "
                                     f"add them to extra_columns in the script's harness.main call")
                full = dict(exp=exp, variant=name, seed=seed, **row, cfg_hash=hashes[name], lib_hash=lib, **cells)
                buffer.append({k: cell(v) for k, v in full.items()})
                if row["epoch"] == cfg.epochs and group.rank == 0:   # a run's rows land together: no half-run
                    save_run(path, header, buffer, replace=args.fresh)
            ckpt = Path(args.out) / "checkpoints" / f"{exp}_{preset}_{name}_seed{seed}_{hashes[name]}.pt"
            rows = common.train_byol(cfg, on_epoch=log, data=data, checkpoint=Checkpoints(ckpt),
                                     device=run_device(cfg), **hooks[name])
            if group.rank == 0:
                if rows[-1]["epoch"] != cfg.epochs:   # diverged: keep its rows as a result
                    save_run(path, header, buffer, replace=args.fresh)
                ckpt.unlink(missing_ok=True)
        if group.rank == 0:
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
