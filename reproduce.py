"""Reruns every CPU finding of the README's table into runs/reproduce/ (or --only a few), then
redraws the figures and recomputes the verdicts from the new CSVs and counts how many agree with
the committed ones.

The plan is read off the committed CSVs: for each finding, the runs its CSVs under results/ hold
(variant, seed, last epoch), one command a CSV and run length, into the same path under --out
(results/steps/c1/lars_steps.csv -> runs/reproduce/steps/c1/lars_steps.csv). Before anything runs
it prints the plan: each command, the runs, the CPU-hours they took when committed (their last
wall_s: most ran on one thread beside another run, what --jobs 2 gives), and the ETA at --jobs.
The commands run one after another, each with --jobs (executor.py); rerunning this continues
where it stopped (finished runs are reused, a cut one resumes from its checkpoint).

    python reproduce.py --dry-run                # the plan: about 69 CPU-hours, 34 hours at --jobs 2
    python reproduce.py --only t1,c1 --jobs 2
    python reproduce.py                          # everything, then the verdicts against results/

Afterwards: runs/reproduce/plots/ (the figures), runs/reproduce/verdicts/ (noise.csv, verdicts.csv,
as verdicts.py --root writes them) and the agreement, seed by seed and finding by finding, with
results/verdicts/verdicts.csv. (The noise is measured with the committed reruns under
results/steps/reruns/ as well: they are independent of any rerun made here.)
"""
import argparse
import csv
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import executor
from harness import OneLineParser, UsageError

ROOT = Path(__file__).resolve().parent
SCRIPTS = {"table1": "exp_table1_norms.py", "lars": "exp_lars.py", "encoder_gn": "exp_encoder_gn.py",
           "weight_decay": "exp_weight_decay.py", "recovery": "exp_recovery.py", "mechanism": "exp_mechanism.py",
           "collapse_depth": "exp_collapse_depth.py", "escape_law": "exp_escape_law.py", "bn_anatomy": "exp_bn_anatomy.py"}
RECOVERY = "steps/recovery/recovery_steps.csv"
# the README's findings: the committed CSVs (under results/) each rests on; (csv, prefix): only
# that CSV's variants named so (recovery_steps.csv holds C1, D1 and D2)
FINDINGS = {
    "t1": ["table1_cpu.csv"],
    "c1": ["lars_cpu.csv", (RECOVERY, "c1"), "steps/c1/lars_steps.csv"],
    "c2": ["steps/c2/encoder_gn_steps.csv", "steps/c2_shallow/encoder_gn_steps.csv", "steps/c2_41k/encoder_gn_steps.csv",
           "steps/c2_gnws/encoder_gn_steps.csv", "steps/c2_gnws/healthy/encoder_gn_steps.csv",
           "steps/c2_every_41k/encoder_gn_steps.csv"],
    "d1": [(RECOVERY, "d1"), "steps/d1/weight_decay_steps.csv", "steps/d1_shallow/weight_decay_steps.csv"],
    "d2": [(RECOVERY, "d2"), "steps/d2_shallow/encoder_gn_steps.csv"],
    "d3": ["steps/d3_shallow/lars_steps.csv", "steps/d3_shallow/long/lars_steps.csv", "steps/d3_blog_lr/lars_steps.csv"],
    "beyond": ["steps/depth/collapse_depth_steps.csv", "steps/law/escape_law_steps.csv",
               "steps/mechanism/mechanism_steps.csv", "bn_anatomy_cpu.csv"],
}


def plan(only, out):
    """[(finding, command, runs, cpu_hours)]: one command per committed CSV and run length."""
    steps = []
    for key in only:
        for entry in FINDINGS[key]:
            rel, prefix = entry if isinstance(entry, tuple) else (entry, "")
            rows = [r for r in csv.DictReader(open(ROOT / "results" / rel)) if r["variant"].startswith(prefix)]
            last, wall = {}, {}
            for r in rows:
                k = (r["variant"], int(r["seed"]))
                if int(r["epoch"]) >= last.get(k, -1):
                    last[k], wall[k] = int(r["epoch"]), float(r["wall_s"] or 0)
            groups = defaultdict(lambda: defaultdict(list))   # epochs -> seed -> variants
            for (variant, seed), epochs in last.items():
                groups[epochs][seed].append(variant)
            preset = Path(rel).stem.rsplit("_", 1)[1]
            for epochs, by_seed in sorted(groups.items()):
                for seeds in _same_variants(by_seed):
                    variants = by_seed[seeds[0]]
                    cmd = [sys.executable, SCRIPTS[rows[0]["exp"]], "--preset", preset, "--epochs", str(epochs),
                           "--variants", ",".join(variants), "--seeds", ",".join(map(str, seeds)) + ",",
                           "--out", str(Path(out) / Path(rel).parent)]
                    hours = sum(wall[(v, s)] for v in variants for s in seeds) / 3600
                    steps.append((key, cmd, len(variants) * len(seeds), hours))
    return steps


def _same_variants(by_seed):
    """The seeds grouped by the variants they ran: [[seeds], ...]."""
    groups = defaultdict(list)
    for seed, variants in sorted(by_seed.items()):
        variants.sort()
        groups[tuple(variants)].append(seed)
    return list(groups.values())


def agreement(new_csv, committed_csv):
    """(seed statuses equal, compared; finding verdicts equal, compared; the differences)."""
    def read(path):
        rows = list(csv.DictReader(open(path)))
        return ({(r["finding"], r["variant"], r["seed"]): r["status"] for r in rows},
                {r["finding"]: r["finding_verdict"] for r in rows})
    (new_s, new_f), (old_s, old_f) = read(new_csv), read(committed_csv)
    seeds = [k for k in new_s if k in old_s]
    findings = [k for k in new_f if k in old_f]
    diffs = [f"{k[0]} ({k[1]} seed {k[2]}): {old_s[k]} -> {new_s[k]}" for k in seeds if new_s[k] != old_s[k]]
    diffs += [f"{k}: {old_f[k]} -> {new_f[k]}" for k in findings if new_f[k] != old_f[k]]
    return (sum(new_s[k] == old_s[k] for k in seeds), len(seeds), sum(new_f[k] == old_f[k] for k in findings),
            len(findings), diffs)


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma list of findings: {', '.join(FINDINGS)} (default: all)")
    p.add_argument("--jobs", type=int, default=executor.cores(), help="runs at once (default: one a core)")
    p.add_argument("--out", default="runs/reproduce", help="where the CSVs go, as under results/")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    args = p.parse_args(argv)
    try:
        only = [k for k in args.only.split(",") if k] or list(FINDINGS)
        unknown = [k for k in only if k not in FINDINGS]
        if unknown:
            raise UsageError(f"--only: unknown finding(s) {', '.join(unknown)}; choose from {', '.join(FINDINGS)}")
        if args.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
        steps = plan(only, args.out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    runs, hours = sum(s[2] for s in steps), sum(s[3] for s in steps)
    print(f"plan: {len(steps)} commands, {runs} runs, {hours:.1f} CPU-hours as committed; "
          f"ETA at --jobs {args.jobs}: {executor.eta(hours * 3600 / args.jobs)}")
    for key, cmd, n, h in steps:
        print(f"  [{key}] {n} run(s), {h:.1f} h: {' '.join(cmd[1:])}")
    if args.dry_run:
        return
    start = time.time()
    for i, (key, cmd, n, h) in enumerate(steps):
        print(f"\n[reproduce] {i + 1}/{len(steps)} [{key}] {' '.join(cmd[1:])}", flush=True)
        code = subprocess.call(cmd + ["--jobs", str(args.jobs)], cwd=ROOT)
        if code:
            print(f"error: {' '.join(cmd[1:])} exited {code}; rerun reproduce.py to continue", file=sys.stderr)
            sys.exit(code)
    print(f"\n[reproduce] {runs} runs in {executor.eta(time.time() - start)}; figures and verdicts:", flush=True)
    out = Path(args.out).resolve()
    new = sorted(str(p) for p in out.rglob("*.csv") if p.parent.name not in ("plots", "verdicts"))
    subprocess.call([sys.executable, "plot_results.py", *new, "--out", str(out / "plots")], cwd=ROOT)
    if (out / RECOVERY).is_file():
        subprocess.call([sys.executable, "plot_results.py", "--recovery", str(out / RECOVERY), "--out",
                         str(out / "plots")], cwd=ROOT)
    subprocess.call([sys.executable, "verdicts.py", "--root", str(out), "--out", str(out / "verdicts")], cwd=ROOT)
    s_ok, s_n, f_ok, f_n, diffs = agreement(out / "verdicts" / "verdicts.csv", ROOT / "results" / "verdicts" / "verdicts.csv")
    print(f"verdicts: {s_ok} of {s_n} seeds' statuses and {f_ok} of {f_n} findings' verdicts agree with the committed "
          f"ones (results/verdicts/verdicts.csv)" + "".join(f"\n  differs: {d}" for d in diffs))


if __name__ == "__main__":
    main()
