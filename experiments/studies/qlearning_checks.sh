#!/bin/bash
# The Q-learning backbones' learning checks on SMAX with the bounded world state: QMIX and
# QPLEX on smax:3m at the budget of the QMIX learning test (1M env steps, 4 gradient steps
# per 512 env steps, default settings otherwise), greedy evaluation of 64 episodes per seed
# at the end, then curves:
#   bash experiments/studies/qlearning_checks.sh [runs/qlearning_checks]
# SEEDS (default 1), STEPS (default 1000000) and ALGOS (default "qmix qplex") choose the runs.
# Stopped runs continue from their last checkpoint when the script is run again.
set -e
cd "$(dirname "$0")/../.."
OUT=${1:-runs/qlearning_checks}
PY=${PYTHON:-.venv/bin/python}
for algo in ${ALGOS:-qmix qplex}; do
  $PY -m experiments.train --algo "$algo" --env smax:3m --train-steps 4 --total-steps "${STEPS:-1000000}" \
    --num-seeds "${SEEDS:-1}" --runs-dir "$OUT" --run-name "3m_$algo" --eval-episodes 64 --no-progress \
    --chunk-iterations 50 --checkpoint-every 2 --resume-or-start
done
$PY -m experiments.report "$OUT" --out "$OUT/report" --metric win_rate
