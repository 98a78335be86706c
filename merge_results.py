"""Merges result CSVs of the same experiment (e.g. shards run on several machines with
--variants / --seeds) into one, and prints the summary table.

    python merge_results.py results/table1_cpu.csv machineB/table1_cpu.csv --out results/table1_all.csv

Rows are keyed by (variant, seed, epoch). A key present in several files must agree on every
metric except wall_s; if it does not, nothing is written and the conflict is named (exit 2).
"""
import argparse
import csv
import sys
from pathlib import Path

import common


def merge(paths):
    header, merged = None, {}
    for path in paths:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            fields = list(rows[0]) if rows else None
        if fields is None:
            continue
        if header is None:
            header = fields
        elif fields != header:
            raise common.UsageError(f"{path} has other columns than {paths[0]}")
        for r in rows:
            key = (r["variant"], r["seed"], r["epoch"])
            other = merged.setdefault(key, r)
            if {k: v for k, v in other.items() if k != "wall_s"} != {k: v for k, v in r.items() if k != "wall_s"}:
                raise common.UsageError(f"{path}: variant {key[0]} seed {key[1]} epoch {key[2]} disagrees "
                                        f"with an earlier file")
    if header is None:
        raise common.UsageError("no rows in any of the given files")
    order = sorted(merged, key=lambda k: (k[0], int(k[1]), int(k[2])))
    return header, [merged[k] for k in order]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", nargs="+")
    p.add_argument("--out", required=True, help="merged CSV to write")
    args = p.parse_args(argv)
    try:
        missing = [c for c in args.csvs if not Path(c).is_file()]
        if missing:
            raise common.UsageError(f"not found: {', '.join(missing)}")
        header, rows = merge(args.csvs)
        if Path(args.out).exists():
            raise common.UsageError(f"{args.out} exists; choose another --out")
        common.write_rows(Path(args.out), header, rows, mode="w")
    except common.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(rows)} rows to {args.out}")
    common.print_summary(rows, list(dict.fromkeys(r["variant"] for r in rows)), {})


if __name__ == "__main__":
    main()
