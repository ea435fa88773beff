#!/bin/bash
# PCRec's ablations and its one tuning sweep on ML-1M (issue 24): configs/ml-1m/pcrec.yaml
# (f softplus, alpha 1e-3, learned gamma from bias -3, a module on both blocks) with one
# setting changed per run (10 configurations), seed 0, the same data, budget and selection rule; the winner is
# the best *validation* NDCG@10 among these and the base row, then confirmed on seeds 0-2.
# Each run resumes (--resume) while its folder exists; a seed already in the configuration's
# result file is not trained again (runs/ may not outlive the session: commit the result files).
#
#     bash benchmarks/pcrec_sweep.sh                 # all of them, one after another, 1 thread
#     bash benchmarks/pcrec_sweep.sh f-tanh alpha-0  # only these
#     SEEDS=1,2 bash benchmarks/pcrec_sweep.sh f-sigmoid  # the winner's confirmation seeds, added to
#                                                         # its result file ml-1m_pcrec-<name>
set -e
SEEDS=${SEEDS:-0}
declare -A RUNS=(
  [f-sigmoid]="model.f=sigmoid"          # the f-ablation: the five nonlinearities
  [f-tanh]="model.f=tanh"
  [f-relu]="model.f=relu"
  [f-identity]="model.f=identity"
  [alpha-0]="model.alpha=0"              # no fast weights
  [alpha-1e-2]="model.alpha=0.01"        # ten times the base rate
  [gamma-fixed-0.1]="model.gamma=0.1"    # a fixed gamma instead of the learned gate
  [gamma-init-1]="model.gamma_bias_init=-1"  # the learned gate starting at 0.27, not 0.05
  [pc-blocks-1]="model.pc_blocks=1"      # a module on the first block only
  [dropout-0.3]="model.dropout=0.3"      # PCRec fits sooner and overfits sooner than HSTU (best epoch 45 vs 69-104)
)
ORDER=(f-sigmoid f-tanh f-relu f-identity dropout-0.3 alpha-0 alpha-1e-2 gamma-fixed-0.1 gamma-init-1 pc-blocks-1)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
mkdir -p logs
. benchmarks/rows_lib.sh
for n in "${names[@]}"; do
  [ -n "${RUNS[$n]}" ] || { echo "unknown run $n; known: ${ORDER[*]}" >&2; exit 2; }
  for s in ${SEEDS//,/ }; do  # each seed joins the result file ml-1m_pcrec-<name> as it finishes
    if recorded "ml-1m_pcrec-$n" "$s" configs/ml-1m/pcrec.yaml --set "${RUNS[$n]}"; then echo "have $n s$s"; continue; fi
    perseq train --config configs/ml-1m/pcrec.yaml --set "${RUNS[$n]}" --set train.threads=1 --seeds "$s" \
      --name "ml-1m-pcrec-$n" --resume --no-progress > "logs/ml-1m-pcrec-$n-s$s.log" 2>&1
    add_seed "ml-1m_pcrec-$n" "runs/ml-1m-pcrec-$n-s$s"
    echo "done $n s$s"
  done
done
