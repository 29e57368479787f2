#!/bin/bash
# TRAMA vs its QPLEX backbone on two multi-task SMAX sets (surComb3, surComb4), 3 vmapped
# seeds per run (the same seeds for both methods), episode limit 100 and a 1,000-episode
# buffer (memory: about 0.7 GB per seed), then curves (return, cluster_ari,
# class_accuracy, class_majority_rate, codes_in_use) and tables:
#   bash experiments/studies/trama_vs_qplex.sh [runs/trama_study]
# STEPS: env steps per seed (default 200000). TRAMA_ARGS: extra TRAMA flags, e.g. an earlier
# first clustering for short budgets:
#   STEPS=30000 TRAMA_ARGS="--cluster-start 10000 --cluster-interval 5000 --min-cluster-episodes 200" bash ...
# Stopped runs continue from their last checkpoint when the script is run again. SETS and
# ALGOS pick the runs, so they can run side by side: SETS=surComb3 ALGOS=trama bash ... &
set -e
cd "$(dirname "$0")/../.."
OUT=${1:-runs/trama_study}
STEPS=${STEPS:-200000}
PY=${PYTHON:-.venv/bin/python}
for set in ${SETS:-surComb3 surComb4}; do
  for algo in ${ALGOS:-qplex trama}; do
    extra=""
    if [ "$algo" = trama ]; then extra=${TRAMA_ARGS:-}; fi
    # shellcheck disable=SC2086
    $PY -m experiments.train --algo $algo --env smax-mt:$set --env-kwargs '{"max_steps": 100}' --num-seeds 3 \
      --total-steps $STEPS --train-steps 4 --buffer-size 1000 --runs-dir "$OUT" --run-name ${set}_${algo} \
      --no-progress --chunk-iterations ${CHUNK:-20} --checkpoint-every 2 --resume-or-start $extra
  done
done
if [ -z "${NO_REPORT:-}" ]; then
  $PY -m experiments.report "$OUT" --out "$OUT/report" --metric return \
    --panels cluster_ari class_accuracy class_majority_rate codes_in_use
fi
