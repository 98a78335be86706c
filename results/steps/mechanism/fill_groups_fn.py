"""Names the MLP that decayed in the seed-0 rows of c1_conv_pred and c1_conv_proj (empty cfg_groups_fn):
the 3-epoch reruns in groups_fn_seed0_rerun.log must equal their own variant's committed rows and
differ from the other's; then cfg_groups_fn takes the label of the same variant's seed-1 rows.
Run from the repo root: python results/steps/mechanism/fill_groups_fn.py (idempotent)."""
import csv
import re
L = "results/steps/mechanism/groups_fn_seed0_rerun.log"; P = "results/steps/mechanism/mechanism_steps.csv"
rows = list(csv.DictReader(open(P))); cols = list(rows[0].keys())
logged, v = {}, None
for line in open(L):
    m = re.match(r"\[(\S+) seed 0\]", line)
    if m: v = m.group(1)
    m = re.match(r"\s+epoch\s+(\d+)\s+(.*?)\s+\d+s$", line)
    if m and v:
        t = m.group(2).split()
        logged[(v, m.group(1))] = dict(zip(t[::2], t[1::2]))
label = {v: next(r["cfg_groups_fn"] for r in rows if r["variant"] == v and r["seed"] == "1") for v in ("c1_conv_pred", "c1_conv_proj")}
for (v, e), vals in sorted(logged.items()):
    for other in label:
        r = next(r for r in rows if r["variant"] == other and r["seed"] == "0" and r["epoch"] == e)
        cmp = [(k, x, r[k if k != "probe" else "probe_acc"]) for k, x in vals.items() if x != "-"]
        same = all(abs(float(x) - float(c)) <= 5e-6 * abs(float(c)) for _, x, c in cmp)
        print(f"rerun {v} epoch {e} vs committed {other} seed 0: {len(cmp)} logged values, {'all equal to 6 digits' if same else 'differ'}")
        if e != "0": assert same == (v == other), (v, other, e)
for r in rows:
    if r["variant"] in label and r["seed"] == "0" and not r["cfg_groups_fn"]:
        r["cfg_groups_fn"] = label[r["variant"]]
w = csv.DictWriter(open(P, "w", newline=""), cols); w.writeheader(); w.writerows(rows)
print("filled cfg_groups_fn of the seed-0 rows:", label)
