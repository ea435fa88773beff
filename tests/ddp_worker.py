"""Run by tests/test_train.py under torchrun (2 gloo processes) and in a single process:
the same tiny training, writing final weights and metrics for comparison."""
import json
import sys

import torch
from safetensors.torch import save_file

from perseq.config import from_dict
from perseq.data.sequences import leave_one_out
from perseq.data.synthetic import make_synthetic
from perseq.train import fit, init_distributed_from_env


def run(out_prefix: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    distributed = init_distributed_from_env()
    rank = torch.distributed.get_rank() if distributed else 0
    data, _ = make_synthetic(n_users=120, n_items=40, mean_len=12, max_len=40, n_clusters=4, seed=3)
    cfg = from_dict({
        "model": {"name": "sasrec", "d": 16, "dropout": 0.0},
        "data": {"max_len": 20},
        "train": {"epochs": 3, "batch_size": batch_size, "lr": 3e-3, "seed": 7, "device": "cpu"},
        "eval": {"exclude_seen": False},
    })
    r = fit(cfg, leave_one_out(data), progress=False, log=lambda s: None)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in r["model_obj"].state_dict().items()}, out_prefix + ".safetensors")
        json.dump({"test": r["test"], "history": r["history"]}, open(out_prefix + ".json", "w"))
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
