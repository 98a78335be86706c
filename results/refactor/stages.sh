#!/bin/bash
# Issue 42 (the stages refactor): old code (OLD, default c3e5ddd, main before it) against the new
# (this working tree), bitwise, both on one thread on this machine; and the new c1 against the
# committed 41k-step run. Compared with cmp.py: every column as written but wall_s and the
# hash/hook-name columns. Usage: bash results/refactor/stages.sh [OUT]   (about 10 minutes)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/stages}; OLD=${OLD:-c3e5ddd}; PY=${PY:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
rm -rf "$OUT"; mkdir -p "$OUT"
git worktree add -f --detach "$OUT/old_code" "$OLD" >/dev/null
runs() {   # $1: code folder, $2: output folder
  (cd "$1" && $PY exp_table1_norms.py --preset cpu --variants byol,contrastive --epochs 2 --out "$2/t1" \
     && $PY exp_recovery.py --preset steps --variants c1 --epochs 10 --out "$2/c1" \
     && $PY exp_mechanism.py --preset steps --variants c1_exp_lr --epochs 3 --out "$2/m3" \
     && $PY exp_mechanism.py --preset steps --variants c1_norm_held --epochs 6 --out "$2/m6") > "$2.log" 2>&1
}
runs "$PWD" "$OUT/new" & runs "$OUT/old_code" "$OUT/old"; wait
echo "# $(date -u +%F), $(lscpu | grep 'Model name' | sed 's/  */ /g'), torch $($PY -c 'import torch; print(torch.__version__)'), one thread; old code = $OLD"
for v in byol contrastive; do $PY results/refactor/cmp.py "$OUT/new/t1/table1_cpu.csv" "$OUT/old/t1/table1_cpu.csv" $v 0 2; done
$PY results/refactor/cmp.py "$OUT/new/c1/recovery_steps.csv" "$OUT/old/c1/recovery_steps.csv" c1 0 10
echo "# the new c1 against the committed 41k-step run (results/steps/recovery/recovery_steps.csv):"
$PY results/refactor/cmp.py "$OUT/new/c1/recovery_steps.csv" results/steps/recovery/recovery_steps.csv c1 0 10
$PY results/refactor/cmp.py "$OUT/new/m3/mechanism_steps.csv" "$OUT/old/m3/mechanism_steps.csv" c1_exp_lr 0 3
$PY results/refactor/cmp.py "$OUT/new/m6/mechanism_steps.csv" "$OUT/old/m6/mechanism_steps.csv" c1_norm_held 0 6
git worktree remove --force "$OUT/old_code"
