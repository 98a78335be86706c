"""fp32 against bf16 autocast on one collapsed appendix run, epoch by epoch (results/README.md,
'Precision in collapse'). The two runs of gn_lars_lr0.1 seed 0 sit in one CSV under two cfg_hash
values; the logs beside it print which hash is which precision.

    python results/precision/compare.py results/precision/lars_cpu.csv FP32_HASH BF16_HASH
"""
import csv
import sys

path, h32, h16 = sys.argv[1:4]
rows = [r for r in csv.DictReader(open(path)) if r["variant"] == "gn_lars_lr0.1" and r["seed"] == "0"]
fp32 = {int(r["epoch"]): r for r in rows if r["cfg_hash"] == h32}
bf16 = {int(r["epoch"]): r for r in rows if r["cfg_hash"] == h16}
cols = ["loss", "pos_cos", "neg_cos", "lars_lr:encoder.layer1", "probe_acc"]
print("| epoch | " + " | ".join(f"{c}: fp32 / bf16" for c in cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for e in sorted(set(fp32) & set(bf16)):
    print(f"| {e} | " + " | ".join(f"{fp32[e][c]} / {bf16[e][c]}" if fp32[e][c] or bf16[e][c] else ""
                                   for c in cols) + " |")
