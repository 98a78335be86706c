"""The reuse key: a run's cfg_hash, what it covers and how a finished run is known to be current.
A finished run is reused only while its cfg_hash is today's: every Config field, the variant's
model class, and the code that variant runs: every module the script loads from its folder or the
library's, subfolders included, and of the script itself only what the variant reaches
(script_identity; an edit of another variant's class leaves it alone); and code a run imported
while it trained, recorded in its rows (late_code) and checked on reuse. The library (LIBRARY)
keeps a config's numbers by contract (new behaviour comes as a Config field whose default keeps
the hash, LATER_FIELDS): its edits do not retrain, the runs they reuse are counted in one line
(lib_hash), and --fresh retrains them."""
import ast
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import sys
import sysconfig
from pathlib import Path

import common
from runtime import UsageError, get_device, use_bf16


def resumable(cfg):
    """The config fields a checkpoint must match (where it runs may change)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "data_dir", "compile")}


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
LIBRARY = ("common", "harness", "runtime", "augment", "logreg", "presets", "reuse", "executor")   # edits: reported
HERE = Path(__file__).resolve().parent   # the library's folder
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)   # what has a docstring
_INSTALLED = [sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
INSTALLED = [Path(p).resolve() for p in _INSTALLED]
# the same as strings, as given and resolved: a cheap first test for the ~1,600 modules of torch and numpy
INSTALLED_PREFIXES = tuple({*_INSTALLED, *map(str, INSTALLED)})


def _grid_only(st):
    """Whether a top-level statement only fills GRID_NAMES: NAME = ..., NAME[k] = ...,
    NAME.update(...), or a for loop of those."""
    if isinstance(st, ast.For):
        return not st.orelse and all(map(_grid_only, st.body))
    call = isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) and isinstance(st.value.func, ast.Attribute)
    targets = [st.value.func.value] if call else getattr(st, "targets", None) or [getattr(st, "target", None)]
    names = [t.value if isinstance(t, ast.Subscript) else t for t in targets]
    return bool(names) and all(isinstance(n, ast.Name) and n.id in GRID_NAMES for n in names)


def source_digest(path, uses=None):
    """12 hex digits of a Python file's code: its syntax tree (not comments, not layout) without
    docstrings and the statements that only fill its grid. Any other edit changes it. uses: the
    names of a variant's hooks defined here, and the digest covers only what that variant runs:
    the top-level functions and classes reachable from them or from the other statements, so an
    edit of another variant's class leaves this variant's digest alone."""
    tree = ast.parse(Path(path).read_text())
    tree.body = [st for st in tree.body if not _grid_only(st)]
    if uses is not None:
        defs = {st.name: st for st in tree.body if isinstance(st, (ast.FunctionDef, ast.ClassDef))}

        def names(node):
            return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        todo, keep = [*uses, *(n for st in tree.body if not isinstance(st, (ast.FunctionDef, ast.ClassDef))
                               for n in names(st))], set()
        while todo:
            n = todo.pop()
            if n in defs and n not in keep:
                keep.add(n)
                todo += names(defs[n])
        tree.body = [st for st in tree.body if not (isinstance(st, (ast.FunctionDef, ast.ClassDef)) and st.name not in keep)]
    for node in ast.walk(tree):
        if isinstance(node, DOCUMENTED) and ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    return hashlib.sha1(ast.dump(tree).encode()).hexdigest()[:12]


def _source_file(module):
    """The .py file a module was loaded from; None for a built-in, an extension, a namespace
    package, or an installed module (the standard library, site-packages)."""
    f = getattr(module, "__file__", None)
    if not isinstance(f, str) or not f.endswith(".py") or "site-packages" in f or f.startswith(INSTALLED_PREFIXES):
        return None
    f = Path(f).resolve() if os.path.isfile(f) else None
    return None if f is None or any(map(f.is_relative_to, INSTALLED)) or "site-packages" in f.parts else f


def code_roots():
    """The folders whose modules are a run's code: the script's, and the library's."""
    main = _source_file(sys.modules.get("__main__"))
    return [HERE] if main is None else [main.parent, HERE]


def script_identity(fns=None):
    """{file: source_digest} of the code a run executes beyond LIBRARY: every module loaded from the
    script's folder or the library's, subfolders included, and those defining fns (a variant's
    hooks, added norms) wherever they are; named by their path there, so a copy of the repo hashes
    the same. With fns, the script itself counts only what the variant runs (source_digest's uses)."""
    main, roots = _source_file(sys.modules.get("__main__")), code_roots()
    files = {f for f in map(_source_file, list(sys.modules.values())) if f and any(map(f.is_relative_to, roots))}
    uses = None if fns is None else []
    for fn in (f.func if isinstance(f, functools.partial) else f for f in fns or ()):
        target = fn if inspect.isfunction(fn) or inspect.isclass(fn) else type(fn)
        files.add(_source_file(sys.modules.get(getattr(target, "__module__", ""))))
        if getattr(target, "__module__", "") in ("__main__", "__mp_main__"):
            uses.append(target.__qualname__.split(".")[0])
    files -= {None, *(HERE / f"{m}.py" for m in LIBRARY)}
    names = {f: next((f.relative_to(r).as_posix() for r in roots if f.is_relative_to(r)), f.name) for f in files}
    return {names[f]: source_digest(f, uses if f == main else None) for f in sorted(files)}


def late_code_changed(cell):
    """The files a run imported while training (its late_code cell: file=digest;...) whose code
    has changed since, or gone: such a run is not reused."""
    roots, out = code_roots(), []
    for name, _, digest in (item.partition("=") for item in cell.split(";") if item):
        path = next((r / name for r in roots if (r / name).is_file()), None)
        if path is None or source_digest(path) != digest:
            out.append(name)
    return out


def library_identity():
    """12 hex digits of the library's code (LIBRARY, as source_digest reads it): the lib_hash column."""
    return hashlib.sha1(" ".join(source_digest(HERE / f"{m}.py") for m in LIBRARY).encode()).hexdigest()[:12]


def config_hash(cfg, n_ranks=1, hooks=None, code=None):
    """12 hex digits naming what changes a run's results: every Config field but seed, data_dir,
    device and compile ('auto' precision resolved), the process count, the hooks and code
    (script_identity). Without hooks and code: the settings alone, as the committed results/ carry."""
    # the fields added after results were committed leave the hash as it was, at their defaults
    d = {k: v for k, v in resumable(cfg).items() if k != "seed" and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
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
