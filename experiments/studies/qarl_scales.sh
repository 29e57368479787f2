#!/bin/bash
# QARL vs RARL vs SAC on adv:cartpole at adversary scales 1, 1.5 and 2, 5 vmapped seeds per
# method (the same seeds 0-4 for every method), each trained, then evaluated (own adversary,
# best response, no adversary, 11 x 11 stress grid), then one table per scale:
#   bash experiments/studies/qarl_scales.sh [runs/qarl_scales] [env steps per seed]
# SCALES="1 1.5" METHODS="qarl" narrow it. A stopped run continues from its checkpoint when
# the script is run again (qarl_compare --resume starts the runs that have no directory yet).
set -e
cd "$(dirname "$0")/../.."
OUT=${1:-runs/qarl_scales}
STEPS=${2:-150000}
PY=${PYTHON:-.venv/bin/python}
SCALES=${SCALES:-1 1.5 2}
METHODS=${METHODS:-qarl rarl sac}
ARGS="--envs adv:cartpole --total-steps $STEPS --num-seeds 5 --br-steps 6000 --hidden 64 --num-layers 2
  --batch-size 128 --buffer-size 100000 --num-envs 8 --num-steps 3 --train-steps 4 --chunk-iterations 250"
for scale in $SCALES; do
  for m in $METHODS; do
    $PY -m experiments.qarl_compare $ARGS --adversary-scales "$scale" --methods "$m" --out "$OUT/scale$scale" --resume
  done
  $PY -m experiments.qarl_compare $ARGS --adversary-scales "$scale" --methods qarl rarl sac --out "$OUT/scale$scale" \
    --report-only
done
