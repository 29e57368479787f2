#!/bin/bash
# EMU vs its QMIX backbone on smax:2s3z, 3 vmapped seeds per run (the same seeds), then the
# memory-behaviour table, the overall win rates and curves:
#   bash experiments/studies/emu_vs_qmix.sh [runs/emu_study] [total env steps per seed]
# Stopped runs continue from their last checkpoint when the script is run again; the
# comparison uses the iterations both runs have finished.
# EMU: official settings except where stated in results/emu_study/README.md: desirability can
# rise on SMAX's jittered states (init_desirability, a write-time neighbourhood WRITE_DELTA
# measured with experiments/studies/emu_key_spacing.py, the running top-decile rule), lookups
# at the same radius, the dCAE trains once the memory holds 20,480 entries. Both arms keep 1000
# episodes (full at about 60k steps, then the oldest are dropped; 5000 x 3 seeds does not fit
# in this machine's memory next to other work), so EMU's default capacity is 100k entries.
# results/emu_study was made with 200000 steps per seed (the default).
set -e
cd "$(dirname "$0")/../.."
OUT=${1:-runs/emu_study}
STEPS=${2:-200000}
PY=${PYTHON:-.venv/bin/python}
WRITE_DELTA=${WRITE_DELTA:-0.07}
common="--env smax:2s3z --num-seeds 3 --total-steps $STEPS --train-steps 4 --buffer-size 1000 --runs-dir $OUT
  --no-progress --chunk-iterations 5 --checkpoint-every 2 --resume-or-start --eval-episodes 0"
$PY -m experiments.train --algo qmix $common --run-name 2s3z_qmix &
$PY -m experiments.train --algo emu --mixer qmix $common --run-name 2s3z_emu \
  --delta "$WRITE_DELTA" --write-delta "$WRITE_DELTA" --init-desirability --desirable-quantile 0.9 \
  --embed-min-entries 20480 &
wait
$PY -m experiments.studies.emu_engagement "$OUT/2s3z_emu" "$OUT/2s3z_qmix" --out results/emu_study
$PY -m experiments.report "$OUT" --out results/emu_study/report
