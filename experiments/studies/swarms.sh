#!/bin/bash
# Dec-POMFC vs IPPO vs MAPPO on the three swarm tasks at N = 100 (3 vmapped seeds x 80k
# swarm steps per run), a Dec-POMFC run at N = 10, then the N-transfer table (policies
# trained at one N, evaluated at N = 10 ... 10,000) and the curves and tables:
#   bash experiments/studies/swarms.sh [runs/swarm_study]
set -e
cd "$(dirname "$0")/../.."
S=${1:-runs/swarm_study}
PY=${PYTHON:-.venv/bin/python}
COMMON="--num-seeds 3 --total-steps 80000 --num-envs 8 --num-steps 50 --update-epochs 4 --lr 1e-3 --no-progress --chunk-iterations 20 --resume"
AGG='"max_steps": 50, "radius": 0.25, "max_speed": 1.0, "noise": 0.05'
for task in aggregation kuramoto vicsek; do
  KW='{"num_agents": 100, "max_steps": 50}'
  [ "$task" = aggregation ] && KW="{\"num_agents\": 100, $AGG}"
  $PY -m experiments.train --algo dec_pomfc --env swarm:$task --env-kwargs "$KW" $COMMON --runs-dir $S --run-name ${task}_dec_pomfc
  for algo in ippo mappo; do
    $PY -m experiments.train --algo $algo --env swarm:$task --env-kwargs "$KW" $COMMON --runs-dir $S --run-name ${task}_${algo} \
      --no-agent-ids --no-recurrent --hidden 64 --clip-eps 0.2
  done
done
$PY -m experiments.train --algo dec_pomfc --env swarm:aggregation --env-kwargs "{\"num_agents\": 10, $AGG}" $COMMON \
  --runs-dir $S --run-name aggregation_dec_pomfc_n10
$PY -m experiments.report $S/*_dec_pomfc $S/*_ippo $S/*_mappo --out "$S/report"
$PY -m experiments.swarm_transfer $S/aggregation_dec_pomfc $S/aggregation_dec_pomfc_n10 \
  $S/aggregation_ippo $S/aggregation_mappo $S/kuramoto_dec_pomfc $S/kuramoto_ippo $S/vicsek_dec_pomfc $S/vicsek_ippo \
  --num-agents 10 100 1000 10000 --episodes 8 --large-env-kwargs '{"cell_capacity": 64}' --out "$S/transfer"
