#!/bin/bash
# Issue 43's card timing: the README card's command, `python exp_table1_norms.py --epochs 10`, on
# idle cores, before (OLD, default c3e5ddd: one run at a time on every core) and after (this
# working tree: --jobs defaults to one run a core). About 1 h 40 min on 2 cores: nothing else may
# run beside it. Usage: bash results/card/card_timing.sh [OUT]   (writes results/card/: the timing log,
# each side's log and CSV)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/card}; OLD=${OLD:-c3e5ddd}; PY=${PY:-python}
unset OMP_NUM_THREADS MKL_NUM_THREADS   # each side picks its own threads, as on a fresh shell
rm -rf "$OUT"; mkdir -p "$OUT"
git worktree add -f --detach "$OUT/old_code" "$OLD" >/dev/null
LOG=results/card/card_timing.log
echo "# $(date -u +%F), $(lscpu | grep 'Model name' | sed 's/  */ /g'), $(nproc) cores, torch $($PY -c 'import torch; print(torch.__version__)')" > $LOG
timed() {   # $1: label, $2: code folder
  local t0=$(date +%s.%N)
  (cd "$2" && $PY exp_table1_norms.py --epochs 10 --out "$OUT/$1") > "$OUT/$1.log" 2>&1
  echo "$1 ($(git -C "$2" rev-parse --short HEAD)): $(echo "$(date +%s.%N) - $t0" | bc) s" >> $LOG
}
timed before "$OUT/old_code"
timed after "$PWD"
tail -n 12 "$OUT/before.log" "$OUT/after.log" >> $LOG
for side in before after; do   # what each made, beside the log
  cp "$OUT/$side.log" results/card/$side.log; cp "$OUT/$side/table1_cpu.csv" results/card/${side}_table1_cpu.csv
done
git worktree remove --force "$OUT/old_code"
cat $LOG
