"""Is this seed already in this result file, under this configuration? For the row scripts
(persrec_rows.sh, federated_rows.sh), which add seeds to result files one at a time.

    python benchmarks/has_seed.py benchmarks/results/ml-1m_pfsr.json 1 --config configs/ml-1m/pfsr.yaml --set k=v ...

Exit status 0: recorded (skip the run); 1: not recorded, or no file yet (run it); 2: the file
holds another configuration (say so and stop: its seeds cannot be merged with this one's).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from perseq.bench.collect import comparable_config
from perseq.config import load_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result")
    ap.add_argument("seed", type=int)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args(argv)
    path = Path(a.result)
    if not path.exists():
        return 1
    f = json.loads(path.read_text())
    want, have = comparable_config(json.loads(load_config(a.config, a.set).to_json())), comparable_config(f["config"])
    if "federated" not in f["protocol"]:  # centralized rows: collect ignores the federated section
        want.pop("federated"), have.pop("federated")
    want.pop("name", None), have.pop("name", None)
    if want != have:
        diff = {s: {k: (have[s].get(k), v) for k, v in want[s].items() if have[s].get(k) != v}
                for s in want if isinstance(want[s], dict) and want[s] != have.get(s)}
        print(f"error: {path} holds another configuration (file, now): {diff}; move it away to start this row again",
              file=sys.stderr)
        return 2
    return 0 if a.seed in f["seeds"] else 1


if __name__ == "__main__":
    sys.exit(main())
