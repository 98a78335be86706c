"""The verdicts: every finding of the README's table judged by one rule, seed by seed, against the
noise measured between independent reruns of the same seed; and the per-finding numbers the
figures draw (recovered fractions, the escape law's clocks).

    python verdicts.py                       # results/verdicts/noise.csv and verdicts.csv
    python verdicts.py --root runs/reproduce --out runs/reproduce/verdicts   # reproduce.py's

The findings are data: results/findings.csv (finding, family, kind, the CSV under results/ and the
variant it judges, its healthy reference, what the blog's run shows, and at_epoch: where set, the
run is judged as if it ended there, its first epochs being a run of that length, since the lr and
tau cosines span the blog's schedule whatever --epochs is). The rule, stated once:
- window: a run's evaluations at epochs > 0.8 x its last epoch (its last 20%), means over them.
- C (the blog shows accuracy): the recovered fraction (probe - untrained) / (healthy - untrained)
  against the same settings with BN in both MLPs, same seed, same epoch. met: window mean >= 0.5 +
  delta and >= 80% of the window's evaluations >= 0.5; not met: window mean <= 0.5 - delta.
- D (the blog shows cosines): met: >= 80% of the window's epochs at negative cosine <= 0.9 and a
  window-mean probe gain over the untrained encoder >= 5 + delta; not met: window-mean negative
  cosine > 0.9 + delta_cos, or gain <= 5 - delta.
- T (Table 1, 12 epochs): learned: window-mean gain >= 5 + delta; collapsed: window-mean negative
  cosine >= 0.999 and gain <= 5 - delta (the blog's "random-init accuracy").
- N (C1's LARS, 8 epochs): never collapsed: the negative cosine < 0.999 at every epoch; else collapsed.
- Otherwise within noise. A C or D finding whose blog run collapsed first judges only the seeds
  that collapse (negative cosine >= 0.999 at some epoch). A finding reproduces when every seed shows
  the blog's outcome; "partly, k of n"; "does not reproduce, 0 of n"; with ", m within noise".
- delta, per family (t1, c1, c2, d1, d2, d3) and quantity (recovered fraction, probe gain, negative
  cosine): the largest |difference of window means| between two independent runs of the same seed
  and settings (another machine, thread count or oneDNN ISA: equal numbers at every shared epoch
  are the same computation twice, not a rerun, and are left out), each judged over the shorter
  run's window, each against its own healthy run where it has one. A family with no such pair
  takes the largest delta of the others, and says so.
"""
import argparse
import csv
import dataclasses
import math
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev

import numpy as np

import common
import harness
import presets
import reuse
from runtime import UsageError

ROOT = Path(__file__).resolve().parent
FINDINGS_CSV = "results/findings.csv"
RERUNS = "results/steps/reruns"   # independent same-seed reruns, for the noise only
COLLAPSE, HELD_COS, FRACTION_MIN, RISE = 0.999, 0.9, 0.5, 5.0
WINDOW, SHARE = 0.2, 0.8
QUANTITY = {"C": "recovered_fraction", "D": "probe_gain", "T": "probe_gain", "N": "neg_cos"}
QUANTITIES = ("recovered_fraction", "probe_gain", "neg_cos")


# ------------------------------------------------------------------------------- reading

def read_runs(paths):
    """{(variant, seed): {epoch: row}} from one or more results CSVs (an experiment split over
    several --out folders). The same run in two CSVs must be the same settings."""
    runs, hashes = defaultdict(dict), {}
    for path in paths:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"variant", "seed", "epoch", "probe_acc", "neg_cos"} <= set(rows[0]):
            raise UsageError(f"{path} is not a results CSV (no variant, seed, epoch, probe_acc, neg_cos columns)")
        for r in rows:
            key = (r["variant"], int(r["seed"]))
            h = hashes.setdefault(key, r.get("cfg_hash", ""))
            if h != r.get("cfg_hash", ""):
                raise UsageError(f"{r['variant']} seed {r['seed']} is in these CSVs under two settings (cfg_hash "
                                 f"{h} and {r.get('cfg_hash')}); pass CSVs with one setting per run")
            runs[key][int(r["epoch"])] = r
    return runs


def num(r, col):
    return float(r[col]) if r is not None and r.get(col) not in (None, "") else None


def points(by_epoch, col):
    return [(e, num(by_epoch[e], col)) for e in sorted(by_epoch) if num(by_epoch[e], col) is not None]


def rel(path):
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def load_findings(path=FINDINGS_CSV):
    """The findings (results/findings.csv), each healthy reference as (csv, variant) or None."""
    with open(ROOT / path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        h = r["healthy"]
        r["healthy"] = None if not h else (h.split(":")[0], h.split(":")[1]) if ":" in h else (r["csv"], h)
        r["collapse"] = r["collapse"] == "yes"
        r["at_epoch"] = int(r["at_epoch"]) if r.get("at_epoch") else None
    return rows


def load_sources(findings, root=None):
    """{csv: dict(label, runs)}: every CSV the findings name (under results/, or with root under
    root in its place) and the reruns (RERUNS, always the committed ones)."""
    sources = {}
    wanted = {f["csv"] for f in findings} | {f["healthy"][0] for f in findings if f["healthy"]}
    wanted |= {rel(p) for p in sorted((ROOT / RERUNS).glob("*.csv"))}
    for src in sorted(wanted):
        path = Path(root) / Path(src).relative_to("results") if root and not src.startswith(RERUNS) else ROOT / src
        if path.is_file():
            sources[src] = dict(label=rel(path), runs=read_runs([path]))
    return sources


# ------------------------------------------------------------------------------ the noise

# every Config field's default; a removed field at the value every run without its cfg_ cell had
DEFAULTS = {**reuse.RETIRED_FIELDS, "loss_form": "cos",
            **{f.name: f.default for f in dataclasses.fields(common.Config)}}
# hooks that only log (TrackedBYOL: a run with it repeats one without, digit for digit) and each
# hook's default, as CSVs name them
SAME_HOOK = {"cfg_model_fn": {"", "byol", "trackedbyol"}, "cfg_groups_fn": {"", "param_groups"}}
IGNORED = {"cfg_hash", "cfg_metrics_fn"}


def _value(v):
    s = str(v).strip()
    try:
        return float(s)
    except ValueError:
        return s.lower()


def settings(label, by_epoch):
    """A run's settings as its cfg_* cells give them, each field it lacks at its preset's value (the
    CSV name's _<preset> part), so that CSVs written by different scripts compare. None where the
    CSV names no preset of presets.py."""
    every = {**presets.APPENDIX_PRESETS, "t1cpu": presets.TABLE1_PRESETS["cpu"]}
    stem = Path(label).stem.split("_")
    preset = "t1cpu" if stem[0] == "table1" and stem[-1] == "cpu" else next((p for p in presets.APPENDIX_PRESETS
                                                                            if p in stem), None)
    if preset is None:
        return None
    row = by_epoch[min(by_epoch)]
    out = {f"cfg_{k}": _value(v) for k, v in {**DEFAULTS, **every[preset]}.items() if k != "epochs"}
    out.update({c: _value(v) for c, v in row.items() if c.startswith("cfg_") and c not in IGNORED})
    for c, same in SAME_HOOK.items():
        if out.get(c, "") in same:
            out[c] = ""
    return dict(out, preset=preset)


def _same_schedule(a, b):
    shared = [e for e in a if e in b and num(a[e], "lr") is not None and num(b[e], "lr") is not None]
    return bool(shared) and all(math.isclose(num(a[e], c), num(b[e], c), rel_tol=1e-9)
                                for e in shared for c in ("lr", "tau") if num(a[e], c) is not None)


def in_window(pts, last_epoch):
    """The (epoch, value) points at epochs > (1 - WINDOW) x last_epoch and <= last_epoch."""
    return [(e, v) for e, v in pts if (1 - WINDOW) * last_epoch < e <= last_epoch]


def fractions(by_epoch, healthy):
    """[(epoch, recovered fraction)] of a run against its healthy run, where the healthy one is above
    the run's untrained encoder."""
    p, h = dict(points(by_epoch, "probe_acc")), dict(points(healthy, "probe_acc"))
    if 0 not in p:
        return []
    return [(e, (v - p[0]) / (h[e] - p[0])) for e, v in p.items() if e > 0 and e in h and h[e] > p[0]]


def gains(by_epoch):
    p = dict(points(by_epoch, "probe_acc"))
    return [(e, v - p[0]) for e, v in p.items() if e > 0] if 0 in p else []


NOISE_COLUMNS = ["kind", "family", "quantity", "csv_a", "variant_a", "last_epoch_a", "csv_b", "variant_b",
                 "last_epoch_b", "seed", "healthy", "window_epochs", "window_mean_a", "window_mean_b",
                 "window_mean_diff", "max_single_diff", "note"]


def healthy_of(runs_pool, run_settings, seed, prefer):
    """A run of the same seed whose settings are the run's with BN in both MLPs: its healthy run."""
    want = dict(run_settings, cfg_proj_norm="bn", cfg_pred_norm="bn")
    found = [(src is prefer, by) for (src, (v, s), by, st) in runs_pool if s == seed and st == want]
    return max(found, key=lambda t: t[0])[1] if found else None


def noise_pairs(sources, findings):
    """Rows of NOISE_COLUMNS: every pair of runs of the same seed, settings and logged lr/tau, one
    of them judged by a finding (its family's); judged over the shorter run's window: the window
    means of each quantity and their difference. A pair equal at every shared epoch is one
    computation twice (a copy, or a rerun on the same machine and thread count): listed (kind
    'same'), not used. Every run is its own: two runs with one cfg_hash are not taken as copies."""
    family = {(f["csv"], f["variant"]): f["family"] for f in findings}   # the runs judged (not their references)
    pool = [(s, key, by, settings(s["label"], by)) for s in sources.values() for key, by in s["runs"].items()]
    by_label = {s["label"]: src for src, s in sources.items()}
    out = []
    for i, (sa, (va, seed), a, cfg_a) in enumerate(pool):
        for sb, (vb, seed_b), b, cfg_b in pool[i + 1:]:
            if seed_b != seed or cfg_a is None or cfg_a != cfg_b or not _same_schedule(a, b):
                continue
            fam = family.get((by_label[sa["label"]], va)) or family.get((by_label[sb["label"]], vb))
            if fam is None:
                continue
            last = min(max(a), max(b))
            base = dict(family=fam, csv_a=sa["label"], variant_a=va, last_epoch_a=max(a), csv_b=sb["label"],
                        variant_b=vb, last_epoch_b=max(b), seed=seed)
            pa, pb = dict(points(a, "probe_acc")), dict(points(b, "probe_acc"))
            same = all(pa[e] == pb[e] for e in pa if e in pb) and all(
                num(a[e], "neg_cos") == num(b[e], "neg_cos") for e in a if e in b and e <= last)
            if same:
                out.append(dict(base, kind="same", note="equal at every shared epoch: the same computation twice, "
                                                       "not an independent rerun (not used)"))
                continue
            ha, hb = (healthy_of(pool, cfg_a, seed, s) for s in (sa, sb))
            own = ha is not None and hb is not None and ha is not hb
            series = {"probe_gain": (gains(a), gains(b)), "neg_cos": (points(a, "neg_cos"), points(b, "neg_cos"))}
            if (ha is not None or hb is not None) and a is not ha:
                series["recovered_fraction"] = (fractions(a, ha or hb), fractions(b, hb or ha))
            for q, (xa, xb) in series.items():
                da, db = dict(in_window(xa, last)), dict(in_window(xb, last))
                shared = sorted(set(da) & set(db))
                if not shared:
                    continue
                ma, mb = mean(da[e] for e in shared), mean(db[e] for e in shared)
                note = ("each against its own healthy run" if own else "both against the same healthy run: its "
                        "noise is not in it") if q == "recovered_fraction" else ""
                out.append(dict(base, kind="pair", quantity=q, healthy="own" if own and q == "recovered_fraction"
                                else "", window_epochs=f"{shared[0]}-{shared[-1]}", window_mean_a=ma, window_mean_b=mb,
                                window_mean_diff=abs(ma - mb), max_single_diff=max(abs(da[e] - db[e]) for e in shared),
                                note=note))
    return out


def noise_delta(pairs, families):
    """({(family, quantity): delta}, delta rows): each family's largest window-mean difference per
    quantity; a family without a pair takes the largest of the others', and says so."""
    delta, rows = {}, []
    for q in QUANTITIES:
        mine = [p for p in pairs if p["kind"] == "pair" and p["quantity"] == q]
        pooled = max(mine, key=lambda p: p["window_mean_diff"], default=None)
        for fam in families:
            best = max((p for p in mine if p["family"] == fam), key=lambda p: p["window_mean_diff"], default=None)
            if best:
                d, note = best["window_mean_diff"], (f"largest of {sum(p['family'] == fam for p in mine)} pair(s): "
                                                    f"{best['csv_a']}:{best['variant_a']} vs {best['csv_b']}:"
                                                    f"{best['variant_b']}, seed {best['seed']}, window "
                                                    f"{best['window_epochs']}")
            elif pooled:
                d, note = pooled["window_mean_diff"], (f"no independent pair in this family: the largest of the "
                                                      f"others ({pooled['family']})")
            else:
                d, note = None, "no independent pair: not measured"
            delta[(fam, q)] = d
            rows.append(dict(kind="delta", family=fam, quantity=q, window_mean_diff=d, note=note))
    return delta, rows


# --------------------------------------------------------------------------- the verdicts

VERDICT_COLUMNS = ["finding", "family", "kind", "variant", "seed", "csv", "healthy", "last_epoch", "collapsed_at",
                   "quantity", "window_epochs", "n_evaluations", "window_mean", "window_min", "window_max",
                   "share_passing", "neg_cos_window_mean", "delta", "delta_cos", "status", "blog", "finding_verdict",
                   "evaluations", "neg_cos_evaluations"]


def judge(kind, window, negs, d, dc):
    """One seed's status from its window: window = [(epoch, the kind's quantity)], negs = [(epoch,
    negative cosine)] at the window's epochs; d, dc: the family's delta and cosine band."""
    vals, c = [v for _, v in window], [v for _, v in negs]
    m, neg = mean(vals), mean(c)
    if kind == "C":
        share = sum(v >= FRACTION_MIN for v in vals) / len(vals)
        status = ("met" if m >= FRACTION_MIN + d and share >= SHARE - 1e-9 else
                  "not met" if m <= FRACTION_MIN - d else "within noise")
    elif kind == "D":
        share = sum(v <= HELD_COS for v in c) / len(c)
        status = ("met" if share >= SHARE - 1e-9 and m >= RISE + d else
                  "not met" if neg > HELD_COS + dc or m <= RISE - d else "within noise")
    else:   # T
        share = None
        status = ("learned" if m >= RISE + d else "collapsed" if neg >= COLLAPSE and m <= RISE - d else
                  "within noise")
    return dict(mean=m, min=min(vals), max=max(vals), share=share, neg_cos_mean=neg, status=status)


def judge_seed(spec, source, healthy_runs, seed, by_epoch, delta):
    """One seed of one finding: a row of VERDICT_COLUMNS (without finding_verdict)."""
    last, negs = max(by_epoch), points(by_epoch, "neg_cos")
    collapsed = next((e for e, c in negs if c >= COLLAPSE), None)
    d, dc = delta.get((spec["family"], QUANTITY[spec["kind"]])), delta.get((spec["family"], "neg_cos"))
    row = dict(finding=spec["finding"], family=spec["family"], kind=spec["kind"], variant=spec["variant"], seed=seed,
               csv=source["label"], healthy="", last_epoch=last, quantity=QUANTITY[spec["kind"]], delta=d,
               delta_cos=dc, collapsed_at="never" if collapsed is None else collapsed, blog=spec["blog"])
    if spec["kind"] == "N":
        return dict(row, status="never collapsed" if collapsed is None else "collapsed",
                    neg_cos_window_mean=max(c for _, c in negs))
    healthy = healthy_runs.get((spec["healthy"][1], seed)) if spec["healthy"] and healthy_runs else None
    row["healthy"] = f"{spec['healthy'][1]} seed {seed}" if healthy else ""
    if spec["collapse"] and collapsed is None:   # first: no healthy run could make it judged
        return dict(row, status="never collapsed: not judged")
    if spec["kind"] == "C" and healthy is None:
        return dict(row, status="no healthy reference: not judged")
    if 0 not in dict(points(by_epoch, "probe_acc")):
        return dict(row, status="no untrained probe (epoch 0): not judged")
    if d is None or dc is None:
        return dict(row, status="no noise measurement: not judged")
    window = in_window(fractions(by_epoch, healthy) if spec["kind"] == "C" else gains(by_epoch), last)
    neg_window = in_window(negs, last)
    if not window or not neg_window:
        return dict(row, status="no evaluation in the last 20%: not judged")
    j = judge(spec["kind"], window, neg_window, d, dc)
    first = min(e for e, _ in window + neg_window)
    return dict(row, window_epochs=f"{first}-{last}", n_evaluations=len(window), window_mean=j["mean"],
                window_min=j["min"], window_max=j["max"], share_passing=j["share"],
                neg_cos_window_mean=j["neg_cos_mean"], status=j["status"],
                evaluations=" ".join(f"{e}:{v:.4g}" for e, v in window),
                neg_cos_evaluations=" ".join(f"{e}:{c:.4f}" for e, c in neg_window))


def finding_verdict(statuses, blog="met"):
    """'reproduces, k of n seeds' / 'partly, k of n' / 'does not reproduce, 0 of n', k the seeds
    whose status is the blog's, with ', m within noise'; seeds not judged are counted after it,
    with their reason (e.g. '1 never collapsed: not judged')."""
    judged = [s for s in statuses if not s.endswith("not judged")]
    other = list(dict.fromkeys(s for s in statuses if s not in judged))
    if judged:
        k, n, m = judged.count(blog), len(judged), judged.count("within noise")
        text = (f"reproduces, {k} of {n} seeds" if k == n else f"partly, {k} of {n}" if k else
                f"does not reproduce, 0 of {n}")
        text += (f", {m} within noise" if m else "") + "".join(f"; {statuses.count(s)} {s}" for s in other)
    else:
        text = "; ".join(f"{statuses.count(s)} of {len(statuses)} {s}" for s in other) or "no runs"
    return text


def verdicts(findings, sources, delta):
    """Rows of VERDICT_COLUMNS: every seed of every finding whose CSV is among sources, each
    finding's verdict in every row of it."""
    rows = []
    for spec in findings:
        source = sources.get(spec["csv"])
        if source is None:
            continue
        healthy = sources.get(spec["healthy"][0]) if spec["healthy"] else None
        end = spec.get("at_epoch")   # optional: specs built in code may leave it out
        mine = sorted((seed, {e: r for e, r in by.items() if end is None or e <= end})
                      for (v, seed), by in source["runs"].items() if v == spec["variant"])
        judged = [judge_seed(spec, source, healthy["runs"] if healthy else None, seed, by, delta) for seed, by in mine]
        text = finding_verdict([r["status"] for r in judged], spec["blog"])
        rows += [dict(r, finding_verdict=text) for r in judged]
    return rows


def report(rows, delta_rows):
    """Markdown: the noise, the per-seed table, each finding's verdict."""
    out = ["Noise (largest |difference of window means| between independent runs of the same seed and settings):"]
    out += [f"- {r['family']}, {r['quantity']}: delta = {r['window_mean_diff']} ({r['note']})" for r in delta_rows]
    out += ["", "| finding | variant | seed | collapsed at | window (epochs) | evaluations | quantity: mean (min-max) | "
            "share passing | neg. cos, window mean | status |", "|---" * 10 + "|"]
    fmt = lambda v, f: "" if v in (None, "") else f"{v:{f}}"   # noqa: E731
    for r in rows:
        stats = (f"{r['quantity']} {fmt(r.get('window_mean'), '.3f')} ({fmt(r.get('window_min'), '.3f')}-"
                 f"{fmt(r.get('window_max'), '.3f')})" if r.get("window_mean") is not None else "")
        out.append(f"| {r['finding']} | {r['variant']} | {r['seed']} | {r['collapsed_at']} | "
                   f"{r.get('window_epochs', '')} | {r.get('n_evaluations', '')} | {stats} | "
                   f"{fmt(r.get('share_passing'), '.0%')} | {fmt(r.get('neg_cos_window_mean'), '.4f')} | {r['status']} |")
    out += ["", "Verdicts (the blog's outcome in k of n seeds):"]
    out += [f"- {f}: {v}" for f, v in dict.fromkeys((r["finding"], r["finding_verdict"]) for r in rows)]
    return "\n".join(out)


def write_csv(path, columns, rows):
    """rows (dicts) under columns, floats to 6 significant digits, atomically."""
    harness.rewrite_rows(Path(path), list(columns), [
        {k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    print(f"wrote {path}")
    return Path(path)


def judge_all(root=None, out_dir=None):
    """The noise and every finding's verdict, printed and written to <out_dir>/noise.csv and
    verdicts.csv. root: a folder standing in for results/ (reproduce.py's)."""
    findings = load_findings()
    sources = load_sources(findings, root)
    pairs = noise_pairs(sources, findings)
    delta, delta_rows = noise_delta(pairs, list(dict.fromkeys(f["family"] for f in findings)))
    rows = verdicts(findings, sources, delta)
    print(report(rows, delta_rows))
    if out_dir is not None:
        write_csv(Path(out_dir) / "noise.csv", NOISE_COLUMNS, pairs + delta_rows)
        write_csv(Path(out_dir) / "verdicts.csv", VERDICT_COLUMNS, rows)
    return rows, pairs, delta


# ------------------------------------------------------- the numbers the figures draw

BLOG_STEPS = presets.BLOG_STEPS   # the blog's schedule: 320 epochs x 410 steps (105k STL-10 images, batch 256)
BLOG_EPOCHS = 320
# The blog's readings (SPEC.md section 3, Appendix C and D), as (blog epoch, value).
# C1's recovered fraction from [fig:accuracy_resnet_batch_norm]'s table, (SGD no-BN-MLP - its epoch 0)
# / (SGD with-BN-MLP - the same epoch 0), the untrained level being the no-BN run's epoch 0, 28.0 (as
# ours: each run's own epoch 0): 0.42 at 20, 0.70 at 30, 0.79 at 100, 0.83 at 319.
BLOG_C1_PROBES = {0: (28.0, 39.4), 10: (30.1, 54.6), 15: (32.5, 58.5), 20: (42.1, 61.5), 30: (54.5, 66.1),
                  50: (63.6, 72.0), 100: (66.9, 77.3), 200: (70.5, 81.0), 319: (72.1, 81.4)}
BLOG_C1_FRACTION = [(e, (a - 28.0) / (b - 28.0)) for e, (a, b) in BLOG_C1_PROBES.items() if e > 0]
# D1 [fig:weight_decay_distance]: negative cosine ~1.0 from epoch 2 to 100, 0.07 at ~140, a
# rebound to 0.62 at ~165, 0.56 at the end
BLOG_D1_NEG_COS = [(2, 1.0), (100, 1.0), (140, 0.07), (165, 0.62), (320, 0.56)]
# D2 [fig:weight_std_distance]: ~1.0 for epochs 0-18, 0.1 at ~20, then peaks and troughs, settling at 0.22
BLOG_D2_NEG_COS = [(0, 1.0), (18, 1.0), (20, 0.1), (32, 0.39), (55, 0.78), (73, 0.87), (93, 0.44), (115, 0.96),
                   (135, 0.96), (160, 0.43), (180, 0.0), (200, 0.22), (320, 0.22)]
# D1's and D2's final probes, 56 and 51 (the text), as fractions of the GN + BN-MLP control's 75.1
# (epoch 319) over the GN runs' untrained 33.8 ([fig:accuracy_resnet_group_norm], epoch 0)
BLOG_GN_UNTRAINED, BLOG_GN_HEALTHY = 33.8, 75.1
BLOG_D_FRACTION = {f: [(320, (p - BLOG_GN_UNTRAINED) / (BLOG_GN_HEALTHY - BLOG_GN_UNTRAINED))]
                   for f, p in (("d1", 56.0), ("d2", 51.0))}   # 0.54, 0.42
BLOG_MARKS = {("c1", "fraction"): BLOG_C1_FRACTION, ("d1", "neg_cos"): BLOG_D1_NEG_COS,
              ("d2", "neg_cos"): BLOG_D2_NEG_COS, ("d1", "fraction"): BLOG_D_FRACTION["d1"],
              ("d2", "fraction"): BLOG_D_FRACTION["d2"]}
FAMILIES = ("c1", "d1", "d2")   # exp_recovery.py's
FRACTION_COLUMNS = ["variant", "seed", "epoch", "step", "blog_schedule_fraction", "probe_acc", "untrained_probe",
                    "healthy_probe", "healthy_seed", "recovered_fraction"]


def read_rows(csv_path, needed=("variant", "seed", "epoch", "loss", "probe_acc", "neg_cos"), what="a results CSV"):
    """The rows of a CSV (a torn last line cut off, with the harness's warning); UsageError where a
    column of `needed` is missing."""
    path = Path(csv_path)
    with open(path, newline="") as f:
        header = f.readline().rstrip("\r\n").split(",")
    missing = [c for c in needed if c not in header]
    if missing:
        raise UsageError(f"{path} is not {what} (no column {', '.join(missing)})")
    return [r for r in harness.read_rows(path, header) if None not in r.values()]


def last_rows(rows):
    """{(variant, seed): the run's last row}."""
    last = {}
    for r in rows:
        key = (r["variant"], r["seed"])
        if key not in last or int(r["epoch"]) > int(last[key]["epoch"]):
            last[key] = r
    return last


def table(rows, columns=("probe_acc", "probe_standardized", "pos_cos", "neg_cos", "z_std")):
    """A markdown table of each variant's last epoch in a CSV's rows, mean ± std over seeds (what
    the README's result tables are pasted from)."""
    last = last_rows(rows)
    cols = [c for c in columns if c in rows[0]]
    out = [f"| variant | epoch | seeds | {' | '.join(cols)} |", "|---" * (len(cols) + 3) + "|"]
    for v in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for (name, _), r in last.items() if name == v]
        cells = []
        for c in cols:
            vals = [float(r[c]) for r in runs if r.get(c) not in (None, "")]
            # probes in points, cosines to 4 places (collapse is 0.9999), anything else (z_std: 5e-5
            # when collapsed) to 2 significant digits, so a small value never prints as 0.0000
            fmt = ".1f" if c.startswith("probe") else ".4f" if c.endswith("cos") else ".2g"
            cells.append("" if not vals else f"{mean(vals):{fmt}}" + (f" ± {stdev(vals):{fmt}}" if len(vals) > 1 else ""))
        epochs = sorted({r["epoch"] for r in runs})
        out.append(f"| {v} | {'/'.join(epochs)} | {len(runs)} | {' | '.join(cells)} |")
    return "\n".join(out)


def recovered_fractions(runs, steps_per_epoch):
    """Rows of FRACTION_COLUMNS: for every run of c1, d1, d2 and their *_all_decay controls, at each
    epoch where it and its healthy reference have a probe, (probe - untrained) / (healthy - untrained)
    with untrained = the run's own epoch-0 probe, healthy = the X_healthy run of the same seed, or
    of seed 0 where that seed has none (healthy_seed says which). Empty where healthy <= untrained."""
    out = []
    for (v, seed), by_epoch in sorted(runs.items()):
        family = v.split("_")[0]
        if family not in FAMILIES or v == f"{family}_healthy":
            continue
        ref_seed = seed if (f"{family}_healthy", seed) in runs else 0
        healthy = runs.get((f"{family}_healthy", ref_seed))
        untrained = num(by_epoch.get(0), "probe_acc")
        if healthy is None or untrained is None:
            continue
        for e in sorted(by_epoch):
            probe, ref = num(by_epoch[e], "probe_acc"), num(healthy.get(e), "probe_acc")
            if e == 0 or probe is None or ref is None:
                continue
            frac = (probe - untrained) / (ref - untrained) if ref > untrained else None
            out.append(dict(variant=v, seed=seed, epoch=e, step=e * steps_per_epoch,
                            blog_schedule_fraction=e * steps_per_epoch / BLOG_STEPS, probe_acc=probe,
                            untrained_probe=untrained, healthy_probe=ref, healthy_seed=ref_seed,
                            recovered_fraction=frac))
    return out



def recovery(csv_path, steps_per_epoch):
    """A markdown table of how far each run was taken and whether it left collapse: steps,
    lr x wd x steps (the decay's clock: wd times the logged lr summed over the steps) and the same
    in e-folds of the decayed weights, lr x wd x steps / (1 - momentum); the epoch it collapsed
    (negative cosine >= 0.999); its lowest negative cosine after that and the first epoch back at
    <= 0.9; and both probes (blog / standardized): untrained, best after collapse, last.
    'probe recovered' = the blog probe after collapse >= RISE points above the untrained encoder,
    with the first epoch it got there; where the blog shows the cosines (D1-D3) a recovery also needs
    the negative cosine back at <= 0.9 (its own column)."""
    rows = read_rows(csv_path)
    runs = defaultdict(list)
    for r in rows:
        runs[(r["variant"], r["seed"])].append(r)
    out = ["| variant | seed | steps | lr x wd x steps | e-folds | collapsed at | lowest neg. cos after | "
           "neg. cos <= 0.9 at | blog probe: untrained / best after / last | std. probe: same | "
           "probe recovered (>= untrained + 5 after collapse) |",
           "|---" * 11 + "|"]
    for (v, seed), rs in runs.items():
        rs.sort(key=lambda r: int(r["epoch"]))
        wd = rs[0].get("cfg_weight_decay") or ""
        beta = float(rs[0].get("cfg_momentum") or 0.9)
        lrs = [float(r["lr"]) for r in rs if r.get("lr") not in ("", None)]
        clock = float(wd) * sum(lrs) * steps_per_epoch if wd else None
        neg = [(int(r["epoch"]), float(r["neg_cos"])) for r in rs if r["neg_cos"] not in ("", None)]
        start = next((e for e, c in neg if c >= 0.999), None)
        after = [(c, e) for e, c in neg if start is not None and e >= start]
        low = min(after) if after else None
        back = next((e for c, e in after if c <= 0.9), None)   # after is in epoch order

        def probe(col):
            pts = [(int(r["epoch"]), float(r[col])) for r in rs if r.get(col) not in ("", None)]
            untrained = pts[0][1] if pts and pts[0][0] == 0 else None
            post = [(e, a) for e, a in pts if start is not None and e >= start]
            best = max((a for _, a in post), default=None)
            return untrained, best, (pts[-1][1] if pts else None), post
        u, best, last, post = probe("probe_acc")
        su, sbest, slast, _ = probe("probe_standardized")
        rec = next((e for e, a in post if u is not None and a >= u + RISE), None)
        fmt = lambda xs: " / ".join("-" if x is None else f"{x:.1f}" for x in xs)   # noqa: E731
        cells = [v, seed, str(int(rs[-1]["epoch"]) * steps_per_epoch),
                 "-" if clock is None else f"{clock:.3f}", "-" if clock is None else f"{clock / (1 - beta):.2f}",
                 str(start) if start is not None else "never",
                 f"{low[0]:.4f} (ep {low[1]})" if low else "-", str(back) if back is not None else "no",
                 fmt((u, best, last)), fmt((su, sbest, slast)), f"yes (ep {rec})" if rec is not None else "no"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)



# exp_escape_law.py: the decay clock of D1's collapsed loss
# Read off the per-epoch training loss (the signal of the blog's D1 figure), from the first epoch
# at which the run is collapsed (negative cosine >= 0.999):
#   rise   the first epoch whose loss is more than ESCAPE_RISE (3) times the lowest loss before it
#   turn   the epoch of that lowest loss: where the decay starts to win
# Steps are counted to the end of the epoch, and decay = wd x the sum of the scheduled lr over
# those steps. The cosines are not used beyond the collapse: a run can burst out of collapse and
# fall back with the negative cosine staying above 0.999. A run with no rise is censored (shown
# with its length, left out of the fit). The fit: least squares of log10(step) on log10(lr x wd)
# over the grid's runs that rise (exp_escape_law.py's controls, named ctl_*, are left out); the
# slope's uncertainty is its standard error. ESCAPE_RISE and the collapse threshold were set
# before the runs, from two exploratory runs, and are not tuned.
ESCAPE_RISE = 3.0
BLOG_ESCAPE = "blog (lr 0.2, wd 1e-5): turn ~24,600 steps (0.049), rise ~41,000 (0.082)"
ESCAPE_NEEDED = ("variant", "seed", "epoch", "loss", "neg_cos", "lr", "cfg_hash", "cfg_lr", "cfg_weight_decay")


def escape(rows):
    """(turn epoch, rise epoch) of one run's rows (sorted by epoch), None where absent."""
    losses = [(int(r["epoch"]), float(r["loss"])) for r in rows if r["loss"] not in ("", None)]
    start = next((int(r["epoch"]) for r in rows if r["neg_cos"] not in ("", None)
                  and float(r["neg_cos"]) >= COLLAPSE), None)
    if start is None:
        return None, None
    low, turn = math.inf, None
    for epoch, loss in losses:
        if epoch < start:
            continue
        if loss > ESCAPE_RISE * low:
            return turn, epoch
        if loss < low:
            low, turn = loss, epoch
    return None, None


def escape_steps_per_epoch(csv_path):
    """The steps an epoch of the preset an escape_law_<preset>.csv was made with (presets.py)."""
    preset = Path(csv_path).stem.removeprefix("escape_law_")
    if preset == "smoke":
        return 512 // harness.SMOKE["batch_size"]
    if preset not in presets.APPENDIX_PRESETS:
        raise UsageError(f"{csv_path}: not an escape_law_<preset>.csv of exp_escape_law.py")
    p = presets.APPENDIX_PRESETS[preset]
    return p["train_subset"] // p["batch_size"]


def decay_at(rows, epoch, steps_per_epoch):
    """wd x the lr summed over the steps to the end of `epoch`: each epoch's logged lr (its last
    step's) x its steps; the cosine moves < 1e-4 of itself within an epoch of the steps preset."""
    wd = float(rows[0]["cfg_weight_decay"])
    return wd * steps_per_epoch * sum(float(r["lr"]) for r in rows if 0 < int(r["epoch"]) <= epoch and r["lr"])


def escape_rows(csv_path):
    """One row per finished run: lr, wd, lr x wd, and its turn and rise (epoch, step, decay)."""
    per_epoch = escape_steps_per_epoch(csv_path)
    rows = read_rows(csv_path, ESCAPE_NEEDED, "a results CSV of exp_escape_law.py")
    runs = {}
    for r in rows:
        runs.setdefault((r["variant"], int(r["seed"]), r["cfg_hash"]), []).append(r)
    out = []
    for (name, seed, _), rs in sorted(runs.items()):
        rs.sort(key=lambda r: int(r["epoch"]))
        lr, wd = float(rs[0]["cfg_lr"]), float(rs[0]["cfg_weight_decay"])
        turn, rise = escape(rs)
        row = dict(variant=name, seed=seed, lr=lr, weight_decay=wd, lr_wd=lr * wd, epochs=int(rs[-1]["epoch"]))
        for key, epoch in (("turn", turn), ("rise", rise)):
            steps = epoch * per_epoch if epoch is not None else None
            row.update({f"{key}_epoch": epoch, f"{key}_step": steps,
                        f"{key}_decay": round(decay_at(rs, epoch, per_epoch), 4) if steps else None})
        out.append(row)
    return out


def is_control(row):
    return str(row.get("variant", "")).startswith("ctl_")   # exp_escape_law.py's CONTROLS


def escape_fit(rows, key):
    """(slope, standard error, n) of log10(step) on log10(lr x wd) over the grid's runs that escaped."""
    pts = [(math.log10(r["lr_wd"]), math.log10(r[f"{key}_step"])) for r in rows
           if r[f"{key}_step"] and not is_control(r)]
    if len({x for x, _ in pts}) < 2:
        return None, None, len(pts)
    x, y = np.array(pts).T
    (slope, _), cov = np.polyfit(x, y, 1, cov=True) if len(pts) > 2 else (np.polyfit(x, y, 1), None)
    return slope, (math.sqrt(cov[0, 0]) if cov is not None else None), len(pts)


def escape_law(csv_path, out_dir, name=None):
    """exp_escape_law.py's table and fit, printed; <out>/<name>_escape.csv, one row per run
    (plot_results.py --escape-law draws them). Returns (rows, {key: (slope, se)})."""
    rows = escape_rows(csv_path)
    if not rows:
        raise UsageError(f"{csv_path}: no runs to analyze")
    print(f"\nescape from collapse (rise: loss > {ESCAPE_RISE:g}x its lowest so far; turn: that lowest epoch), "
          f"{escape_steps_per_epoch(csv_path)} steps an epoch; {BLOG_ESCAPE}")
    print(f"{'variant':<18}{'seed':>5}{'lr x wd':>10}{'turn step':>11}{'decay':>8}{'rise step':>11}{'decay':>8}")
    for r in rows:
        def show(key):
            return (f"{r[key + '_step']:>11}{r[key + '_decay']:>8.3f}" if r[key + "_step"]
                    else f"{'none':>11}{'-':>8}")
        print(f"{r['variant']:<18}{r['seed']:>5}{r['lr_wd']:>10.2g}{show('turn')}{show('rise')}")
    slopes = {}
    for key in ("turn", "rise"):
        slope, se, n = escape_fit(rows, key)
        slopes[key] = (slope, se)
        text = "too few runs escaped to fit" if slope is None else f"{slope:.2f}" + (f" +- {se:.2f}" if se else "")
        print(f"log-log slope of the {key} step against lr x wd ({n} runs): {text}  (decay alone: -1)")
    stem = name or Path(csv_path).stem
    harness.rewrite_rows(Path(out_dir) / f"{stem}_escape.csv", list(rows[0]), rows)
    print(f"wrote {Path(out_dir) / f'{stem}_escape.csv'}")
    return rows, slopes


def main(argv=None):
    p = harness.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", metavar="DIR", help="read the findings' CSVs from DIR in place of results/")
    p.add_argument("--out", default="results/verdicts", help="folder for noise.csv and verdicts.csv")
    args = p.parse_args(argv)
    try:
        if args.root and not Path(args.root).is_dir():
            raise UsageError(f"--root {args.root}: not a folder")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        judge_all(args.root, args.out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
