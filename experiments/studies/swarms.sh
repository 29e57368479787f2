#!/bin/bash
# Swarm study: Dec-POMFC on the adapted Kuramoto, Vicsek (own heading observed), hard
# Vicsek (relative headings only, T = 200) and Aggregation tasks at N = 100, 3 vmapped
# seeds per run; ablations (histogram mean field, correlated upper-level noise); IPPO /
# MAPPO baselines; hand-coded reference policies; curves and tables with the references
# as lines; the N-transfer table of the trained policies.
#   bash experiments/studies/swarms.sh [runs/swarm_study] [stage ...]
# Stages (default: all, in this order; each run resumes from its checkpoint):
#   vicsek       Dec-POMFC, Vicsek, 80k steps
#   kuramoto     Dec-POMFC, Kuramoto, 320k steps
#   hard         Dec-POMFC, hard Vicsek, 400k steps, 32 envs
#   aggregation  Dec-POMFC, Aggregation, 320k steps
#   ablations    = histogram noise_ar noise_episode: Dec-POMFC with a histogram mean field (Kuramoto,
#                320k steps, as the kernel run); Vicsek at 80k steps with upper-level noise AR(1) 0.9
#                and with one noise draw per episode
#   kuramoto_noise_ar  Dec-POMFC, Kuramoto, 320k steps, upper-level noise AR(1) 0.9
#   kuramoto_probe  Dec-POMFC, Kuramoto, 320k steps: what limits the rule (32 envs per update; a 9 x 9
#                rule grid; the 9 x 9 grid with AR(1) 0.9 upper-level noise), greedy evaluation
#   hard_long    Dec-POMFC, hard Vicsek, 1.2M steps, 32 envs, greedy evaluation
#   vicsek_long  Dec-POMFC, Vicsek, 320k steps (the baselines' budget), greedy evaluation
#   baselines    IPPO and MAPPO on Vicsek, Kuramoto and Aggregation, $BASE_STEPS steps (default 320k)
#   report       reference policies, curves and tables, N transfer
set -e
cd "$(dirname "$0")/../.."
S=${1:-runs/swarm_study}
shift || true
STAGES=${*:-vicsek kuramoto hard aggregation ablations baselines report}
STAGES=${STAGES//ablations/histogram noise_ar noise_episode}
PY=${PYTHON:-.venv/bin/python}
BASE_STEPS=${BASE_STEPS:-320000}
COMMON="--num-seeds 3 --num-envs 8 --num-steps 50 --update-epochs 4 --lr 1e-3 --no-progress --chunk-iterations 20 --resume-or-start"
N100='{"num_agents": 100, "max_steps": 50}'
HARD='{"num_agents": 100}'  # swarm:vicsek_hard defaults: T = 200, relative headings only
AGG='"max_steps": 50, "radius": 0.25, "max_speed": 1.0, "noise": 0.05'
AGG100="{\"num_agents\": 100, $AGG}"
PPO_FLAGS="--no-agent-ids --no-recurrent --hidden 64 --clip-eps 0.2 --eval-episodes 32"
train() { $PY -m experiments.train --runs-dir "$S" "$@"; }

for stage in $STAGES; do
  case $stage in
    vicsek)
      train --algo dec_pomfc --env swarm:vicsek --env-kwargs "$N100" $COMMON --total-steps 80000 --run-name vicsek_dec_pomfc ;;
    kuramoto)
      train --algo dec_pomfc --env swarm:kuramoto --env-kwargs "$N100" $COMMON --total-steps 320000 \
        --run-name kuramoto_dec_pomfc ;;
    hard)
      train --algo dec_pomfc --env swarm:vicsek_hard --env-kwargs "$HARD" $COMMON --num-envs 32 --total-steps 400000 \
        --run-name vicsek_hard_dec_pomfc ;;
    aggregation)
      train --algo dec_pomfc --env swarm:aggregation --env-kwargs "$AGG100" $COMMON --total-steps 320000 \
        --run-name aggregation_dec_pomfc ;;
    histogram)
      train --algo dec_pomfc --env swarm:kuramoto --env-kwargs "$N100" $COMMON --total-steps 320000 \
        --runs-dir "$S/ablations" --run-name kuramoto_histogram --representation histogram ;;
    noise_ar)
      train --algo dec_pomfc --env swarm:vicsek --env-kwargs "$N100" $COMMON --total-steps 80000 \
        --runs-dir "$S/ablations" --run-name vicsek_noise_ar09 --upper-noise-corr 0.9 ;;
    kuramoto_noise_ar)
      train --algo dec_pomfc --env swarm:kuramoto --env-kwargs "$N100" $COMMON --total-steps 320000 \
        --runs-dir "$S/ablations" --run-name kuramoto_noise_ar09 --upper-noise-corr 0.9 ;;
    noise_episode)
      train --algo dec_pomfc --env swarm:vicsek --env-kwargs "$N100" $COMMON --total-steps 80000 \
        --runs-dir "$S/ablations" --run-name vicsek_noise_episode --upper-noise-corr 1.0 ;;
    kuramoto_probe)
      P="--runs-dir $S/kuramoto_probe --eval-episodes 32"
      train --algo dec_pomfc --env swarm:kuramoto --env-kwargs "$N100" $COMMON --total-steps 320000 $P \
        --num-envs 32 --run-name kuramoto_envs32
      train --algo dec_pomfc --env swarm:kuramoto --env-kwargs "$N100" $COMMON --total-steps 320000 $P \
        --rule-bins 9 --run-name kuramoto_rule9
      train --algo dec_pomfc --env swarm:kuramoto --env-kwargs "$N100" $COMMON --total-steps 320000 $P \
        --rule-bins 9 --upper-noise-corr 0.9 --run-name kuramoto_rule9_ar09 ;;
    hard_long)
      train --algo dec_pomfc --env swarm:vicsek_hard --env-kwargs "$HARD" $COMMON --num-envs 32 --total-steps 1200000 \
        --runs-dir "$S/hard_probe" --eval-episodes 32 --run-name vicsek_hard_1200k ;;
    vicsek_long)
      train --algo dec_pomfc --env swarm:vicsek --env-kwargs "$N100" $COMMON --total-steps 320000 --eval-episodes 32 \
        --run-name vicsek_dec_pomfc_320k ;;
    baselines)
      for algo in ippo mappo; do
        train --algo $algo --env swarm:vicsek --env-kwargs "$N100" $COMMON --total-steps $BASE_STEPS --run-name vicsek_$algo $PPO_FLAGS
        train --algo $algo --env swarm:kuramoto --env-kwargs "$N100" $COMMON --total-steps $BASE_STEPS --run-name kuramoto_$algo $PPO_FLAGS
        train --algo $algo --env swarm:aggregation --env-kwargs "$AGG100" $COMMON --total-steps $BASE_STEPS \
          --run-name aggregation_$algo $PPO_FLAGS
      done ;;
    report)
      $PY -m experiments.swarm_references --out "$S/references" \
        --envs "swarm:vicsek=$N100" "swarm:kuramoto=$N100" "swarm:vicsek_hard=$HARD" "swarm:aggregation=$AGG100"
      runs=$(ls -d "$S"/*_dec_pomfc "$S"/*_ippo "$S"/*_mappo 2>/dev/null || true)
      $PY -m experiments.report $runs --out "$S/report" --references "$S/references/references.json"
      [ -d "$S/ablations" ] && $PY -m experiments.report "$S/vicsek_dec_pomfc" "$S/kuramoto_dec_pomfc" "$S"/ablations/* --group-by run \
        --out "$S/ablations_report" --references "$S/references/references.json"
      base=$(ls -d "$S"/*_ippo "$S"/*_mappo 2>/dev/null || true)
      [ -n "$base" ] && $PY -m experiments.report $base --out "$S/baselines_report" --references "$S/references/references.json"
      [ -d "$S/vicsek_dec_pomfc_320k" ] && $PY -m experiments.report "$S/vicsek_dec_pomfc_320k" --out "$S/vicsek_long_report" \
        --references "$S/references/references.json"
      [ -d "$S/kuramoto_probe" ] && $PY -m experiments.report "$S"/kuramoto_probe/* --group-by run \
        --out "$S/kuramoto_probe_report" --references "$S/references/references.json"
      [ -d "$S/hard_probe" ] && $PY -m experiments.report "$S"/hard_probe/* --group-by run \
        --out "$S/hard_long_report" --references "$S/references/references.json"
      $PY -m experiments.swarm_transfer $(ls -d "$S"/*_dec_pomfc) --num-agents 10 100 1000 10000 --episodes 8 \
        --large-env-kwargs '{"cell_capacity": 64}' --references --out "$S/transfer" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
