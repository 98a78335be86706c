"""Names the MLP that decayed in the seed-0 rows of c1_conv_pred and c1_conv_proj (empty cfg_groups_fn):
the 3-epoch reruns in groups_fn_seed0_rerun.log must equal their own variant's committed rows and
differ from the other's; then cfg_groups_fn takes the label of the same variant's seed-1 rows.
Run from the repo root: python results/steps/mechanism/fill_groups_fn.py (idempotent)."""
import csv
import re
import sys
from pathlib import Path

sys.path.insert(0, ".")
import harness  # noqa: E402

LOG = Path("results/steps/mechanism/groups_fn_seed0_rerun.log")
CSV = Path("results/steps/mechanism/mechanism_steps.csv")
rows = list(csv.DictReader(open(CSV)))
logged, variant = {}, None   # (variant, epoch) -> {column: value} from the rerun's epoch lines
for line in open(LOG):
    if m := re.match(r"\[(\S+) seed 0\]", line):
        variant = m.group(1)
    if (m := re.match(r"\s+epoch\s+(\d+)\s+(.*?)\s+\d+s$", line)) and variant:
        t = m.group(2).split()
        logged[(variant, m.group(1))] = dict(zip(t[::2], t[1::2]))
label = {v: next(r["cfg_groups_fn"] for r in rows if r["variant"] == v and r["seed"] == "1")
         for v in ("c1_conv_pred", "c1_conv_proj")}
for (v, e), vals in sorted(logged.items()):
    for other in label:
        r = next(r for r in rows if r["variant"] == other and r["seed"] == "0" and r["epoch"] == e)
        pairs = [(x, r["probe_acc" if k == "probe" else k]) for k, x in vals.items() if x != "-"]
        same = all(abs(float(x) - float(c)) <= 5e-6 * abs(float(c)) for x, c in pairs)
        print(f"rerun {v} epoch {e} vs committed {other} seed 0: {len(pairs)} logged values, "
              f"{'all equal to 6 digits' if same else 'differ'}")
        if e != "0" and same != (v == other):
            sys.exit(f"error: rerun {v} epoch {e} {'matches' if same else 'differs from'} committed {other}: not filled")
for r in rows:
    if r["variant"] in label and r["seed"] == "0" and not r["cfg_groups_fn"]:
        r["cfg_groups_fn"] = label[r["variant"]]
harness.rewrite_rows(CSV, list(rows[0]), rows)
print("filled cfg_groups_fn of the seed-0 rows:", label)
