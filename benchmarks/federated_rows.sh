#!/bin/bash
# Every federated row of BENCHMARKS.md (issue 25), one run after another on one thread. Same
# budget for every row: configs/ml-1m/pfsr.yaml's 20 passes (944 rounds, 2 local epochs, 64 clients).
# Each finished seed is added to its result file at once (`bench collect --earlier`), to be
# committed: runs/ may not outlive the session. A seed already in its result file is not run
# again; an unfinished run resumes (--resume) while its folder exists.
#
#     bash benchmarks/federated_rows.sh                 # all rows
#     bash benchmarks/federated_rows.sh ml1m-ablations  # one group: ml1m-seeds, ml1m-ablations, ml1m-dp, beauty, compression
#
# DP rows: clipping at 1.0 (two local SGD steps of 0.5 on gradients clipped to norm 1 give
# updates of norm <= 1 already) and the noise multiplier that spends ε over 944 rounds at
# q = 64 / 6,040 with δ = 1e-6 (perseq.federated.privacy.noise_for_epsilon, dp-accounting's
# RDP accountant): ε 2 -> 1.111, ε 8 -> 0.651, ε 32 -> 0.417.
set -e
groups=("$@"); [ ${#groups[@]} -eq 0 ] && groups=(ml1m-seeds ml1m-ablations ml1m-dp beauty compression)
mkdir -p logs
. benchmarks/rows_lib.sh
f() {  # config seed run-name result-name [--set ...]
  local config=$1 seed=$2 name=$3 bench=$4; shift 4
  if recorded "$bench" "$seed" "$config" "$@"; then echo "have $bench s$seed"; return; fi
  perseq federated simulate --config "$config" --seeds "$seed" --name "$name" --set train.threads=1 --resume \
    --no-progress "$@" > "logs/$name-s$seed.log" 2>&1
  add_seed "$bench" "runs/$name-s$seed"
  echo "done $name s$seed"
}
for g in "${groups[@]}"; do
  case $g in
    ml1m-seeds)
      for s in 0 1 2; do
        f configs/ml-1m/mamba4rec-fedavg.yaml $s ml-1m-mamba4rec-fedavg ml-1m_mamba4rec+fedavg
        f configs/ml-1m/pfsr.yaml $s ml-1m-pfsr ml-1m_pfsr
      done ;;
    ml1m-ablations)
      f configs/ml-1m/pfsr.yaml 0 ml-1m-pfsr-no-amb ml-1m_pfsr-no-amb --set model.amb=false
      f configs/ml-1m/pfsr.yaml 0 ml-1m-pfsr-no-vrm ml-1m_pfsr-no-vrm --set model.vrm=false
      f configs/ml-1m/pfsr.yaml 0 ml-1m-pfsr-no-dml ml-1m_pfsr-no-dml --set federated.dml=0 ;;
    ml1m-dp)
      for e in "8 0.651" "2 1.111" "32 0.417"; do
        set -- $e
        f configs/ml-1m/pfsr.yaml 0 ml-1m-pfsr-dp-eps$1 ml-1m_pfsr+dp-eps$1 --set federated.dp_clip=1.0 --set federated.dp_noise=$2
      done ;;
    beauty)
      f configs/amazon-beauty/mamba4rec-fedavg.yaml 0 amazon-beauty-mamba4rec-fedavg amazon-beauty_mamba4rec+fedavg
      f configs/amazon-beauty/pfsr.yaml 0 amazon-beauty-pfsr amazon-beauty_pfsr ;;
    compression)  # 8-bit uploads' quality cost, at the tuning sweep's screening budget (against its base run)
      f configs/ml-1m/pfsr.yaml 0 ml-1m-pfsr-bits-8 ml-1m_pfsr-bits-8 --set federated.rounds=240 --set federated.patience=100 \
        --set federated.update_bits=8 ;;
    *) echo "unknown group $g; known: ml1m-seeds ml1m-ablations ml1m-dp beauty compression" >&2; exit 2 ;;
  esac
done
