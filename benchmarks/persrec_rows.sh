#!/bin/bash
# Every PerSRec row of BENCHMARKS.md (issue 26), one run after another on one thread.
#
#     bash benchmarks/persrec_rows.sh                  # all groups
#     bash benchmarks/persrec_rows.sh ml1m-sasrec      # one group: ml1m-sasrec, ml1m-hstu, ml1m-sizes, synthetic
#
# ML-1M: each backbone as PerSRec (P 384 + K 4 + R 128), full history (1,024 events) and recent
# only (128), 3 seeds, then `perseq bench long` on all users and on the users with more than
# P + R = 512 known events. Sizes (SASRec, seed 0): K 1 and 16; P 128 and 896 (max_len 256, 1024).
#
# The whole set takes longer than a machine may keep its scratch space (runs/ and logs/ can be
# wiped between sessions), so everything a later step needs is written under benchmarks/results
# as soon as a run finishes, to be committed: each seed is added to its result file
# (`bench collect --earlier`), its per-user test metrics go to benchmarks/results/per_user
# (`bench long --export`), and PerSRec's drift is measured right after its seed 0. A seed already
# in its result file, with its per-user file, is not trained again; an unfinished run resumes
# (--resume) while its folder exists.
set -e
groups=("$@"); [ ${#groups[@]} -eq 0 ] && groups=(ml1m-sasrec ml1m-hstu ml1m-sizes synthetic)
mkdir -p logs
. benchmarks/rows_lib.sh
t() {  # config seed run-name bench-name [--set ...]: train one seed, add it to the result file, export per user
  local config=$1 seed=$2 name=$3 bench=$4; shift 4
  if recorded "$bench" "$seed" "$config" "$@"; then
    [ -f "$R/per_user/$name-s$seed.npz" ] || perseq bench long --export "runs/$name-s$seed" \
      || { echo "$bench has seed $seed but neither its per-user file nor its run folder" >&2; exit 1; }
    echo "have $bench s$seed"; return
  fi
  perseq train --config "$config" --seeds "$seed" --name "$name" --set train.threads=1 --resume --no-progress "$@" \
    > "logs/$name-s$seed.log" 2>&1
  add_seed "$bench" "runs/$name-s$seed"
  perseq bench long --export "runs/$name-s$seed"
  echo "done $name s$seed"
}
runs() { local name=$1; echo "runs/$name-s0,runs/$name-s1,runs/$name-s2"; }
trio() {  # backbone
  local b=$1
  for s in 0 1 2; do
    t configs/ml-1m/$b+persrec.yaml $s ml-1m-$b+persrec ml-1m_$b+persrec
    if [ $s = 0 ] && [ ! -f "$R/ml-1m_${b}+persrec_drift.json" ]; then
      perseq bench drift runs/ml-1m-$b+persrec-s0 --name ml-1m_${b}+persrec_drift
    fi
    t configs/ml-1m/$b-recent128.yaml $s ml-1m-$b-recent128 ml-1m_$b-recent128
    t configs/ml-1m/$b-full1024.yaml $s ml-1m-$b-full1024 ml-1m_$b-full1024
  done
  perseq bench long --variant full1024=$(runs ml-1m-$b-full1024) --variant persrec=$(runs ml-1m-$b+persrec) \
    --variant recent128=$(runs ml-1m-$b-recent128) --min-history 512 --name ml-1m_${b}_long
}
for g in "${groups[@]}"; do
  case $g in
    ml1m-sasrec) trio sasrec ;;
    ml1m-hstu) trio hstu ;;
    ml1m-sizes)
      for k in 1 16; do
        t configs/ml-1m/sasrec+persrec.yaml 0 ml-1m-sasrec+persrec-k$k ml-1m_sasrec+persrec-k$k --set model.tokens=$k
      done
      for ml in 256 1024; do  # P = max_len - 128
        t configs/ml-1m/sasrec+persrec.yaml 0 ml-1m-sasrec+persrec-len$ml ml-1m_sasrec+persrec-len$ml --set data.max_len=$ml
      done ;;
    synthetic)
      for v in +persrec -recent128 -full4096; do
        t configs/synthetic/long-sasrec$v.yaml 0 synthetic-long-sasrec$v synthetic-long_sasrec$v
      done ;;
    *) echo "unknown group $g; known: ml1m-sasrec ml1m-hstu ml1m-sizes synthetic" >&2; exit 2 ;;
  esac
done
