"""Merges result CSVs of the same experiment (e.g. shards run on several machines with
--variants / --seeds) into one, and prints the summary table.

    python merge_results.py results/table1_cpu.csv machineB/table1_cpu.csv --out results/table1_all.csv

Rows are keyed by (variant, cfg_hash, seed, epoch). A key present in several files must agree on every
metric except wall_s and lib_hash (library code that keeps the numbers, harness.py's docstring);
if it does not, nothing is written and the conflict is named (exit 2).
"""
import argparse
import csv
import sys
from pathlib import Path

import harness


def read_csv(path):
    """(header, rows) of one input. A torn last line (no final newline, or too few cells: a
    crash mid-write) is left out with a warning naming it; a short line elsewhere is refused."""
    text = Path(path).read_text()
    lines = text.splitlines()
    if not lines:
        return None, []
    reader = csv.DictReader(lines)
    rows = list(reader)
    if rows and (not text.endswith("\n") or None in rows[-1].values()):
        print(f"warning: {path}: left out a torn last line: {lines[-1][:60]!r}", file=sys.stderr)
        rows = rows[:-1]
    bad = [i for i, r in enumerate(rows) if None in r.values() or None in r]
    if bad:
        raise harness.UsageError(f"{path}: line {bad[0] + 2} has the wrong number of cells")
    if "variant" not in reader.fieldnames or "epoch" not in reader.fieldnames:
        raise harness.UsageError(f"{path} is not a results CSV (no variant/epoch columns)")
    return reader.fieldnames, rows


UNCOMPARED = ("wall_s", "lib_hash")   # cells of one run that may differ between shards


def merge(paths):
    """(header, rows). The files must share their columns, except that one written before the
    library's later columns (lib_hash, cfg_<hook>: harness.LATER_COLUMNS) may lack them; its rows
    get those cells empty, as harness.read_rows upgrades such a file."""
    read = [(path, *read_csv(path)) for path in paths]
    headers = [fields for _, fields, _ in read if fields is not None]
    header = max(headers, key=len, default=None)
    widest = next((path for path, fields, _ in read if fields == header), None)
    merged = {}
    for path, fields, rows in read:
        if fields is None:
            continue
        if fields != header and fields != [c for c in header if c not in harness.LATER_COLUMNS]:
            raise harness.UsageError(f"{path} has other columns than {widest}")
        for r in rows:
            key = (r["variant"], r.get("cfg_hash", ""), r["seed"], r["epoch"])
            other = merged.setdefault(key, r)
            shared = (set(other) & set(r)) - set(UNCOMPARED)
            if any(other[k] != r[k] for k in shared):
                raise harness.UsageError(f"{path}: variant {key[0]} seed {key[2]} epoch {key[3]} disagrees "
                                        f"with an earlier file")
    if header is None:
        raise harness.UsageError("no rows in any of the given files")
    order = sorted(merged, key=lambda k: (k[0], k[1], int(k[2]), int(k[3])))
    return header, [merged[k] for k in order]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", nargs="+")
    p.add_argument("--out", required=True, help="merged CSV to write")
    args = p.parse_args(argv)
    try:
        missing = [c for c in args.csvs if not Path(c).is_file()]
        if missing:
            raise harness.UsageError(f"not found: {', '.join(missing)}")
        header, rows = merge(args.csvs)
        if Path(args.out).exists():
            raise harness.UsageError(f"{args.out} exists; choose another --out")
        harness.rewrite_rows(Path(args.out), header, rows)
    except (harness.UsageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(rows)} rows to {args.out}")
    harness.print_summary(rows, list(dict.fromkeys(r["variant"] for r in rows)), {})


if __name__ == "__main__":
    main()
