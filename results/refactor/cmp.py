import csv, sys
new_p, old_p, variant, seed, maxep = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
def rows(p):
    return {int(r["epoch"]): r for r in csv.DictReader(open(p)) if r["variant"] == variant and r["seed"] == seed and int(r["epoch"]) <= maxep}
new, old = rows(new_p), rows(old_p)
skip = {"wall_s", "cfg_hash", "lib_hash", "exp"}
cols = [c for c in csv.DictReader(open(new_p)).fieldnames if c not in skip and not c.startswith("cfg_")]
diff = [(e, c, new[e][c], old[e].get(c)) for e in sorted(new) for c in cols if c in old[e] and new[e][c] != old[e][c]]
print(f"{variant} seed {seed}, epochs {min(new)}-{max(new)}: {len(new)} rows x {len(cols)} columns compared as written "
      f"(all but wall_s and the hash/hook-name columns): {len(diff)} differ")
for d in diff[:10]:
    print("  ", d)
