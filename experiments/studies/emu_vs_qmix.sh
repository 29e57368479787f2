#!/bin/bash
# EMU vs its QMIX backbone on smax:2s3z (300k env steps per seed), smax:3s_vs_5z and
# smax:5m_vs_6m (100k), 3 vmapped seeds per run, then curves and tables:
#   bash experiments/studies/emu_vs_qmix.sh [runs/emu_study]
# Stopped runs continue from their last checkpoint when the script is run again.
set -e
cd "$(dirname "$0")/../.."
OUT=${1:-runs/emu_study}
PY=${PYTHON:-.venv/bin/python}
for spec in 2s3z:300000 3s_vs_5z:100000 5m_vs_6m:100000; do
  map=${spec%%:*}; steps=${spec##*:}
  for algo in qmix emu; do
    extra=""; [ "$algo" = emu ] && extra="--delta 0.01"
    $PY -m experiments.train --algo $algo --env smax:$map --num-seeds 3 --total-steps $steps --train-steps 4 $extra \
      --runs-dir "$OUT" --run-name ${map}_${algo} --no-progress --chunk-iterations 20 --resume
  done
done
$PY -m experiments.report "$OUT" --out "$OUT/report"
