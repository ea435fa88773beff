#!/bin/bash
# PFSR's one tuning sweep on ML-1M (issue 25): configs/ml-1m/pfsr.yaml with one setting changed
# per run (10 configurations with the base), seed 0, a screening budget of 5 passes (240 rounds
# of 64 clients, 2 local epochs; validation every 20 rounds, no early stop). The winner is the
# best *validation* NDCG@10 among them; it then runs at the full budget (944 rounds) on seeds
# 0-2, with the ablations and DP rows built on it (benchmarks/federated_rows.sh). The FedAvg
# reference at the same budget is FedAvg seed 0's validation curve at round 240 (runs are
# deterministic and nothing depends on the total number of rounds).
# Each run resumes (--resume) while its folder exists; a configuration whose result file holds
# seed 0 is not run again (runs/ may not outlive the session: commit the result files).
#
#     bash benchmarks/pfsr_sweep.sh                  # all of them, one after another, 1 thread
#     bash benchmarks/pfsr_sweep.sh dml-0.1 slots-64 # only these
set -e
declare -A RUNS=(
  [base]=""
  [dml-0.1]="federated.dml=0.1"                 # a weaker Dynamic Magnitude Loss
  [dml-10]="federated.dml=10"                   # a stronger one
  [personal-1]="federated.personal_epochs=1"    # FedRep-style: the user's response adapts first, shared weights frozen
  [personal-4]="federated.personal_epochs=4"
  [slots-64]="model.memory_slots=64"            # a larger global associative memory
  [local-lr-1]="federated.local_lr=1.0"
  [server-lr-3e-2]="federated.server_lr=0.03"
  [local-epochs-4]="federated.local_epochs=4 federated.rounds=120"  # same passes, half the rounds
  [dropout-0.1]="model.dropout=0.1"
)
ORDER=(base personal-1 personal-4 dml-0.1 dml-10 slots-64 local-lr-1 server-lr-3e-2 local-epochs-4 dropout-0.1)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
mkdir -p logs
. benchmarks/rows_lib.sh
for n in "${names[@]}"; do
  [ -n "${RUNS[$n]+x}" ] || { echo "unknown run $n; known: ${ORDER[*]}" >&2; exit 2; }
  sets=(--set federated.rounds=240 --set federated.patience=100)
  for kv in ${RUNS[$n]}; do sets+=(--set "$kv"); done
  if recorded "ml-1m_pfsr-sweep-$n" 0 configs/ml-1m/pfsr.yaml "${sets[@]}"; then echo "have $n"; continue; fi
  perseq federated simulate --config configs/ml-1m/pfsr.yaml "${sets[@]}" --set train.threads=1 --seeds 0 \
    --name "ml-1m-pfsr-sweep-$n" --resume --no-progress --bench-name "ml-1m_pfsr-sweep-$n" \
    > "logs/ml-1m-pfsr-sweep-$n-s0.log" 2>&1
  echo "done $n"
done
