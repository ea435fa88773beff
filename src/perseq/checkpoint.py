"""Checkpoints: safetensors weights + JSON config + vocabulary. The only way models are
loaded (no pickle anywhere, so a checkpoint from someone else cannot run code).

A run directory holds:
  config.json          the RunConfig plus n_items and the model's resolved config; a
                       refit-only run (train.refit_epochs) keeps its single phase's config
                       under "run" and the config as given under "requested"
  model.safetensors    best weights (what evaluate / predict / serve load)
  vocab/items.parquet  raw item ids by internal id (row 0 = padding)
  vocab/users.parquet  raw user ids by internal id
  last.safetensors, optimizer.safetensors, trainer_state.json   resumable training state
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from .models import build_model
from .models.registry import model_class


def save_weights(model: torch.nn.Module, path: Path) -> None:
    # clone: safetensors refuses tensors that share storage (tied embeddings would)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)  # atomic: an interrupted save never leaves a torn checkpoint


def load_weights(model: torch.nn.Module, path: Path) -> None:
    model.load_state_dict(load_file(str(path)))


def write_run_files(out: Path, cfg, model, data) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = dataclasses.asdict(model.cfg)
    write_run_meta(out, {"run": cfg.to_dict(), "n_items": data.n_items, "model_config": model_cfg, "perseq_format": 1})
    (out / "vocab").mkdir(exist_ok=True)
    pl.DataFrame({"item_id": data.item_ids.astype(str)}).write_parquet(out / "vocab" / "items.parquet")
    pl.DataFrame({"user_id": data.user_ids.astype(str)}).write_parquet(out / "vocab" / "users.parquet")


def write_run_meta(out: Path, meta: dict) -> None:
    """config.json of a run folder (``write_run_files`` makes it; ``train`` adds to it)."""
    (out / "config.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def saved_model_config(meta: dict) -> dict:
    """The model config a run folder's config.json records (n_items included). Keys the
    model's Config gained after the folder was written get the value that reproduces what
    the run did: ``Config.LEGACY`` where today's default would change the model (e.g.
    HSTU's ``abs_pos: False``), otherwise the default (a new option that is off by default,
    like BERT4Rec's ``last_only_prob``), which is what building the model would use anyway."""
    mc = dict(meta["model_config"])
    cls = model_class(meta["run"]["model"]["name"]).Config
    legacy = getattr(cls, "LEGACY", {})
    for f in dataclasses.fields(cls):
        if f.name in mc:
            continue
        if f.name in legacy:
            mc[f.name] = legacy[f.name]
        elif f.default is not dataclasses.MISSING:
            mc[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            mc[f.name] = f.default_factory()
    return mc


def load_model(run_dir: str | Path, weights: str = "model.safetensors", device="cpu"):
    """-> (model in eval mode, config dict, raw item ids array)."""
    d = Path(run_dir)
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{d} is not a perseq run directory (no config.json)")
    meta = json.loads(cfg_path.read_text())
    mc = saved_model_config(meta)
    name = meta["run"]["model"]["name"]
    n_items = mc.pop("n_items")
    model = build_model(name, n_items, **mc)
    load_weights(model, d / weights)
    model.to(device).eval()
    items = pl.read_parquet(d / "vocab" / "items.parquet")["item_id"].to_numpy().astype(object)
    return model, meta, items


# ---------------------------------------------------------------- resumable training state
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(out: Path, model, opt, state: dict) -> None:
    save_weights(model, out / "last.safetensors")
    tensors, meta = _flatten_optimizer(opt)
    tensors["__rng_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["__rng_cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(out / "optimizer.safetensors.tmp"))
    (out / "optimizer.safetensors.tmp").replace(out / "optimizer.safetensors")
    tmp = out / "trainer_state.json.tmp"
    tmp.write_text(json.dumps({**state, "optimizer": meta, "np_rng": None}, indent=1))
    tmp.replace(out / "trainer_state.json")


def load_train_state(out: Path, model, opt) -> dict | None:
    if not (out / "trainer_state.json").exists():
        return None
    state = json.loads((out / "trainer_state.json").read_text())
    load_weights(model, out / "last.safetensors")
    tensors = load_file(str(out / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("__rng_cpu"))
    cuda_rng = tensors.pop("__rng_cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    opt.load_state_dict(_unflatten_optimizer(tensors, state.pop("optimizer")))
    state.pop("np_rng", None)
    return state


def item_ids_to_raw(items: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    return vocab[items]
