#!/bin/bash
# Every federated row of BENCHMARKS.md (issue 25), one run after another on one thread; each
# run resumes (--resume), so the script can be stopped and started again. Same budget for
# every row: configs/ml-1m/pfsr.yaml's 20 passes (944 rounds, 2 local epochs, 64 clients).
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
f() {  # config seed name [--set ...]
  local config=$1 seed=$2 name=$3; shift 3
  perseq federated simulate --config "$config" --seeds "$seed" --name "$name" --set train.threads=1 --resume \
    --no-progress "$@" > "logs/$name-s$seed.log" 2>&1
  echo "done $name s$seed"
}
collect() {  # bench-name run-name seeds...
  local bench=$1 name=$2; shift 2
  perseq bench collect --name "$bench" $(for s in "$@"; do echo "runs/$name-s$s"; done)
}
for g in "${groups[@]}"; do
  case $g in
    ml1m-seeds)
      for s in 0 1 2; do
        f configs/ml-1m/mamba4rec-fedavg.yaml $s ml-1m-mamba4rec-fedavg
        f configs/ml-1m/pfsr.yaml $s ml-1m-pfsr
      done
      collect ml-1m_mamba4rec+fedavg ml-1m-mamba4rec-fedavg 0 1 2
      collect ml-1m_pfsr ml-1m-pfsr 0 1 2 ;;
    ml1m-ablations)
      f configs/ml-1m/pfsr.yaml 0 ml-1m-pfsr-no-amb --set model.amb=false && collect ml-1m_pfsr-no-amb ml-1m-pfsr-no-amb 0
      f configs/ml-1m/pfsr.yaml 0 ml-1m-pfsr-no-vrm --set model.vrm=false && collect ml-1m_pfsr-no-vrm ml-1m-pfsr-no-vrm 0
      f configs/ml-1m/pfsr.yaml 0 ml-1m-pfsr-no-dml --set federated.dml=0 && collect ml-1m_pfsr-no-dml ml-1m-pfsr-no-dml 0 ;;
    ml1m-dp)
      for e in "8 0.651" "2 1.111" "32 0.417"; do
        set -- $e
        f configs/ml-1m/pfsr.yaml 0 ml-1m-pfsr-dp-eps$1 --set federated.dp_clip=1.0 --set federated.dp_noise=$2
        collect ml-1m_pfsr+dp-eps$1 ml-1m-pfsr-dp-eps$1 0
      done ;;
    beauty)
      f configs/amazon-beauty/mamba4rec-fedavg.yaml 0 amazon-beauty-mamba4rec-fedavg
      collect amazon-beauty_mamba4rec+fedavg amazon-beauty-mamba4rec-fedavg 0
      f configs/amazon-beauty/pfsr.yaml 0 amazon-beauty-pfsr
      collect amazon-beauty_pfsr amazon-beauty-pfsr 0 ;;
    compression)  # 8-bit uploads' quality cost, at the tuning sweep's screening budget (against its base run)
      f configs/ml-1m/pfsr.yaml 0 ml-1m-pfsr-bits-8 --set federated.rounds=240 --set federated.patience=100 \
        --set federated.update_bits=8
      collect ml-1m_pfsr-bits-8 ml-1m-pfsr-bits-8 0 ;;
    *) echo "unknown group $g; known: ml1m-seeds ml1m-ablations ml1m-dp beauty compression" >&2; exit 2 ;;
  esac
done
