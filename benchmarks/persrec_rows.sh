#!/bin/bash
# Every PerSRec row of BENCHMARKS.md (issue 26), one run after another on one thread; each run
# resumes (--resume), so the script can be stopped and started again.
#
#     bash benchmarks/persrec_rows.sh                  # all groups
#     bash benchmarks/persrec_rows.sh ml1m-sasrec      # one group: ml1m-sasrec, ml1m-hstu, ml1m-sizes, synthetic
#
# ML-1M: each backbone as PerSRec (P 384 + K 4 + R 128), full history (1,024 events) and recent
# only (128), 3 seeds, then `perseq bench long` on all users and on the users with more than
# P + R = 512 known events. Sizes (SASRec, seed 0): K 1 and 16; P 128 and 896 (max_len 256, 1024).
set -e
groups=("$@"); [ ${#groups[@]} -eq 0 ] && groups=(ml1m-sasrec ml1m-hstu ml1m-sizes synthetic)
mkdir -p logs
t() {  # config seed name [--set ...]
  local config=$1 seed=$2 name=$3; shift 3
  perseq train --config "$config" --seeds "$seed" --name "$name" --set train.threads=1 --resume --no-progress "$@" \
    > "logs/$name-s$seed.log" 2>&1
  echo "done $name s$seed"
}
collect() {  # bench-name run-name seeds...
  local bench=$1 name=$2; shift 2
  perseq bench collect --name "$bench" $(for s in "$@"; do echo "runs/$name-s$s"; done)
}
runs() { local name=$1; echo "runs/$name-s0,runs/$name-s1,runs/$name-s2"; }
trio() {  # backbone dataset-prefix
  local b=$1
  for s in 0 1 2; do
    t configs/ml-1m/$b+persrec.yaml $s ml-1m-$b+persrec
    t configs/ml-1m/$b-recent128.yaml $s ml-1m-$b-recent128
    t configs/ml-1m/$b-full1024.yaml $s ml-1m-$b-full1024
  done
  for v in +persrec -recent128 -full1024; do collect ml-1m_$b$v ml-1m-$b$v 0 1 2; done
  perseq bench long --variant full1024=$(runs ml-1m-$b-full1024) --variant persrec=$(runs ml-1m-$b+persrec) \
    --variant recent128=$(runs ml-1m-$b-recent128) --min-history 512 --name ml-1m_${b}_long
  perseq bench drift runs/ml-1m-$b+persrec-s0 --name ml-1m_${b}+persrec_drift
}
for g in "${groups[@]}"; do
  case $g in
    ml1m-sasrec) trio sasrec ;;
    ml1m-hstu) trio hstu ;;
    ml1m-sizes)
      for k in 1 16; do
        t configs/ml-1m/sasrec+persrec.yaml 0 ml-1m-sasrec+persrec-k$k --set model.tokens=$k
        collect ml-1m_sasrec+persrec-k$k ml-1m-sasrec+persrec-k$k 0
      done
      for ml in 256 1024; do  # P = max_len - 128
        t configs/ml-1m/sasrec+persrec.yaml 0 ml-1m-sasrec+persrec-len$ml --set data.max_len=$ml
        collect ml-1m_sasrec+persrec-len$ml ml-1m-sasrec+persrec-len$ml 0
      done ;;
    synthetic)
      for v in +persrec -recent128 -full4096; do
        t configs/synthetic/long-sasrec$v.yaml 0 synthetic-long-sasrec$v
        collect synthetic-long_sasrec$v synthetic-long-sasrec$v 0
      done ;;
    *) echo "unknown group $g; known: ml1m-sasrec ml1m-hstu ml1m-sizes synthetic" >&2; exit 2 ;;
  esac
done
