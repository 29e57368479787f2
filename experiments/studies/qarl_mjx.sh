#!/bin/bash
# QARL vs RARL vs SAC on the MJX task adv:hopper (adversary scale 1), at the budget a 2-core CPU
# allows: MJX steps run at about 200 env steps/s with 64 envs on this machine (adv:cartpole: about
# 700k), so 3 vmapped seeds per method (the same seeds 0-2 for every method), 8 envs each, a 5 x 5
# stress grid (torso mass x friction), 4 evaluation episodes and a 3k-step best response:
#   bash experiments/studies/qarl_mjx.sh [runs/qarl_mjx] [env steps per seed]
# A stopped run continues from its checkpoint when the script is run again.
set -e
cd "$(dirname "$0")/../.."
OUT=${1:-runs/qarl_mjx}
STEPS=${2:-24000}
PY=${PYTHON:-.venv/bin/python}
METHODS=${METHODS:-qarl rarl sac}
ARGS="--envs adv:hopper --adversary-scales 1 --total-steps $STEPS --num-seeds 3 --br-steps 3000 --grid 5
  --eval-episodes 4 --hidden 64 --num-layers 2 --batch-size 128 --buffer-size 100000 --num-envs 8
  --num-steps 3 --train-steps 4 --chunk-iterations 100"
for m in $METHODS; do
  $PY -m experiments.qarl_compare $ARGS --methods "$m" --out "$OUT" --resume
done
$PY -m experiments.qarl_compare $ARGS --methods qarl rarl sac --out "$OUT" --report-only
