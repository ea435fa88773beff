#!/usr/bin/env bash
# Run benchmarks/campaign.py on a lent GPU machine (the `device` tool), as session 12 did for
# configs/ml-1m/hstu-large-101-refinit.yaml. That machine has PyTorch, numba, pyarrow ... but
# not polars, and no ../shared, so before the call, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl polars==2.1.0 polars-runtime-32==2.1.0
#   mkdir -p .gpu/shared/datasets/ml-1m && cp ../shared/datasets/ml-1m/ml-1m_seq.txt .gpu/shared/datasets/ml-1m/ \
#     && cp ../shared/datasets/SHA256SUMS .gpu/shared/datasets/
# (never commit either: the datasets' licences forbid it). Then run, carrying .whl and .gpu:
#   JOBS=3 BUDGET=540 CONFIGS="configs/ml-1m/hstu-large-101-refinit.yaml" bash benchmarks/device_campaign.sh
# Three HSTU-large ML-1M runs share one H100 at ~4.2 s per epoch each (101 epochs: 7.4 min);
# nine at once slow to 12 s each. What comes back ($OUT): results.tgz (logs, collected result,
# each seed's results.json + config.json; unpack and copy into benchmarks/results/) and
# runs.tgz (the run folders, to carry back in .gpu/runs and resume if the limit cut them).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PERSEQ_SHARED_DIR=$PWD/.gpu/shared PYTHONUNBUFFERED=1
nvidia-smi -L
mkdir -p runs/gpu logs/gpu
if [ -d .gpu/runs ]; then cp -r .gpu/runs/* runs/gpu/ 2>/dev/null; fi
# --keep on the machine: the kept seed files under benchmarks/results/seeds would otherwise be
# restored instead of trained
timeout "${BUDGET:-330}" python3 benchmarks/campaign.py --jobs "${JOBS:-3}" --threads 2 --seeds "${SEEDS:-0,1,2}" \
  --out runs/gpu --logs logs/gpu --results /tmp/results --keep /tmp/keep ${CONFIGS}
tail -n 3 logs/gpu/*.log
tar czf "$OUT/results.tgz" logs/gpu /tmp/results /tmp/keep 2>/dev/null
tar czf "$OUT/runs.tgz" runs/gpu 2>/dev/null
ls -la "$OUT"
