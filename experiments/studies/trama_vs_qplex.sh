#!/bin/bash
# TRAMA vs its QPLEX backbone on two multi-task SMAX sets (surComb3, surComb4), 3 vmapped
# seeds per run, episode limit 100 and a 1,000-episode buffer (memory: about 0.7 GB per
# seed), then curves (return, cluster_ari, class_accuracy) and tables:
#   bash experiments/studies/trama_vs_qplex.sh [runs/trama_study]
# Stopped runs continue from their last checkpoint when the script is run again. SETS picks the
# task sets, so the two can run side by side: SETS=surComb3 bash ... & SETS=surComb4 bash ...
set -e
cd "$(dirname "$0")/../.."
OUT=${1:-runs/trama_study}
STEPS=${STEPS:-200000}
PY=${PYTHON:-.venv/bin/python}
for set in ${SETS:-surComb3 surComb4}; do
  for algo in qplex trama; do
    $PY -m experiments.train --algo $algo --env smax-mt:$set --env-kwargs '{"max_steps": 100}' --num-seeds 3 \
      --total-steps $STEPS --train-steps 4 --buffer-size 1000 --runs-dir "$OUT" --run-name ${set}_${algo} \
      --no-progress --chunk-iterations 20 --checkpoint-every 2 --resume
  done
done
$PY -m experiments.report "$OUT" --out "$OUT/report" --metric return --panels cluster_ari class_accuracy
