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
  results.json         the finished run's metrics

Every write goes through :func:`commit`, which replaces a *set* of files so that a kill at
any moment leaves either the whole old set or the whole new one: each new file is written
to ``<name>.tmp`` and fsynced, then a journal (``.commit.json``, itself written to a temp
name and renamed, so it exists only complete) lists the set, then the renames happen and
the journal goes. :func:`recover`, which a writer calls before it reads or writes a folder
(``commit`` itself, and ``fit`` when it resumes), finishes the renames of a journalled set
(roll forward) and deletes the temp files of a set whose journal never appeared (roll
back). So epoch N+1's weights can never be paired with epoch N's optimizer or trainer
state, which replacing the files one after another allowed. Writers hold an exclusive
``fcntl`` lock on ``<run>/.lock`` while they commit or recover, so two of them cannot
interleave. Readers (``evaluate``, ``predict``, ``bench curves`` on a run still training)
never rename or delete anything: each file is replaced by one atomic rename, so a reader
sees the old or the new version of every file it reads.

A file that is missing or cannot be parsed raises :class:`RunFolderError`: one line naming
the file and what to do.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from .models import build_model
from .models.registry import model_class

RUN_FILES = ("config.json", "trainer_state.json", "model.safetensors", "results.json")
_JOURNAL = ".commit.json"

#: Tests set this to a callable that receives a label after every single write and rename
#: of a commit ("write last.safetensors", "journal", "rename trainer_state.json", ...) and
#: may raise there, which is how a kill at that exact point is simulated.
crash_hook: Callable[[str], None] | None = None


class RunFolderError(ValueError):
    """A run folder's file is missing or damaged (the message names it and what to do)."""


def _after(op: str) -> None:
    if crash_hook is not None:
        crash_hook(op)


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename never lands before the data
    it names. Folders cannot be opened for this on some systems; there it is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _writer_lock(out: Path):
    """An exclusive lock on ``out/.lock`` for the duration of a commit or recovery (a no-op
    where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(out / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _apply(out: Path, names: list[str], *, replay: bool) -> None:
    for name in names:
        tmp = out / (name + ".tmp")
        if tmp.exists():
            tmp.replace(out / name)
            _after(f"rename {name}")
        elif not replay:  # in a live commit every temp file exists: someone removed one
            raise RunFolderError(f"{tmp} vanished while committing {out}; is another process writing this run?")
    _fsync(out)


def recover(out: Path) -> None:
    """Finish or undo an interrupted :func:`commit` in ``out`` (idempotent; cheap when there
    is nothing to do). Stray temp files of an uncommitted set are removed. For writers only
    (see the module docs)."""
    out = Path(out)
    if not out.is_dir():
        return
    with _writer_lock(out):
        _recover(out)


def _recover(out: Path) -> None:
    journal = out / _JOURNAL
    if journal.exists():
        _apply(out, json.loads(journal.read_text()), replay=True)  # complete: it appears by rename only
        journal.unlink(missing_ok=True)
    for stray in [*out.glob("*.tmp"), *out.glob("vocab/*.tmp")]:
        stray.unlink(missing_ok=True)


def commit(out: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Replace the files ``writers`` names (paths relative to ``out``) as one set: each
    writer writes its file's new content to the path it is given. See the module docs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _writer_lock(out):
        _recover(out)
        _commit(out, writers)


def _commit(out: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    names = list(writers)
    for name in names:
        tmp = out / (name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        writers[name](tmp)
        _fsync(tmp)
        _after(f"write {name}")
    tmp = out / (_JOURNAL + ".tmp")
    tmp.write_text(json.dumps(names))
    _fsync(tmp)
    _after("write journal")
    tmp.replace(out / _JOURNAL)
    _fsync(out)
    _after("journal")
    _apply(out, names, replay=False)
    (out / _JOURNAL).unlink()
    _after("done")


def json_writer(obj) -> Callable[[Path], None]:
    """A ``commit`` writer of ``obj`` as JSON, serialized now (later changes do not leak in)."""
    text = json.dumps(obj, indent=1, sort_keys=True)
    return lambda p: p.write_text(text)


def tensors_writer(tensors: dict[str, torch.Tensor]) -> Callable[[Path], None]:
    """A ``commit`` writer of ``tensors`` as safetensors, copied now (later in-place changes
    do not leak in; safetensors refuses tensors that share storage, as tied embeddings would)."""
    frozen = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return lambda p: save_file(frozen, str(p))


def _weights_writer(model: torch.nn.Module) -> Callable[[Path], None]:
    return tensors_writer(model.state_dict())


# what to do about a damaged or missing file, by file
_TODO_WEIGHTS = "restore it from a copy, or train the run again with 'perseq train ... --overwrite'"
_TODO_STATE = ("restore it from a copy, or start the run over with 'perseq train ... --overwrite' "
               "(model.safetensors, the best weights so far, can still be evaluated)")
_TODO = {
    "config.json": "restore it from a copy; without it the folder cannot be used (or retrain with --overwrite)",
    "model.safetensors": _TODO_WEIGHTS,
    "last.safetensors": _TODO_STATE,
    "optimizer.safetensors": _TODO_STATE,
    "trainer_state.json": _TODO_STATE,
    "results.json": "delete it and run 'perseq train ... --resume' to evaluate the run again and rewrite it",
    "vocab/items.parquet": "restore it from a copy (it maps internal ids to your raw ids), or retrain with --overwrite",
    "vocab/users.parquet": "restore it from a copy (it maps internal ids to your raw ids), or retrain with --overwrite",
}


def read_run_file(out: Path, name: str, reader: Callable[[Path], object]):
    """``reader(out / name)``, with a missing or unreadable file turned into one
    :class:`RunFolderError` line that names the file and what to do."""
    path = Path(out) / name
    todo = _TODO.get(name, "restore it from a copy")
    if not path.exists():
        raise RunFolderError(f"{path} is missing; {todo}")
    try:
        return reader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means the same thing here
        why = " ".join(str(e).split())[:200] or type(e).__name__
        kind = "empty" if path.stat().st_size == 0 else "damaged or truncated"
        raise RunFolderError(f"{path} is {kind} ({type(e).__name__}: {why}); {todo}") from e


def read_json(out: Path, name: str) -> dict:
    return read_run_file(out, name, lambda p: json.loads(p.read_text()))


#: everything a run folder may hold; ``remove_run`` deletes these and nothing else
RUN_ENTRIES = (*RUN_FILES, "last.safetensors", "optimizer.safetensors", "server_state.safetensors", "personal.safetensors", "vocab", "refit", "adapt.json", "curve.png", _JOURNAL, ".lock")


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds (part of) a perseq run: a config.json that perseq wrote, or the
    weights and state files only perseq writes (a run killed mid-commit)."""
    out = Path(out)
    if (out / "config.json").exists():
        try:
            meta = json.loads((out / "config.json").read_text())
            return isinstance(meta, dict) and "perseq_format" in meta and "run" in meta
        except (OSError, ValueError):
            pass
    return any((out / f).exists() for f in ("trainer_state.json", "last.safetensors", "optimizer.safetensors", _JOURNAL))


def remove_run(out: Path) -> None:
    """Delete a run folder's perseq entries (RUN_ENTRIES and temp files), then the folder if
    that left it empty: a file of the user's own in it survives."""
    out = Path(out)
    for name in RUN_ENTRIES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for stray in out.glob("*.tmp"):
        stray.unlink()
    if not any(out.iterdir()):
        out.rmdir()


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """One weights file, replaced atomically (a run folder's sets go through ``commit``)."""
    path = Path(path)
    commit(path.parent, {path.name: _weights_writer(model)})


def load_weights(model: torch.nn.Module, path: Path) -> None:
    path = Path(path)
    read_run_file(path.parent, path.name, lambda p: model.load_state_dict(load_file(str(p))))


def write_run_files(out: Path, cfg, model, data, extra: dict | None = None) -> None:
    """config.json and the vocabulary, as one set. ``extra`` adds keys to config.json (the
    data fingerprint)."""
    model_cfg = dataclasses.asdict(model.cfg)
    meta = {"run": cfg.to_dict(), "n_items": data.n_items, "model_config": model_cfg, "perseq_format": 1, **(extra or {})}
    items = pl.DataFrame({"item_id": data.item_ids.astype(str)})
    users = pl.DataFrame({"user_id": data.user_ids.astype(str)})
    commit(Path(out), {"config.json": json_writer(meta),
                       "vocab/items.parquet": lambda p: items.write_parquet(p),
                       "vocab/users.parquet": lambda p: users.write_parquet(p)})


def write_run_meta(out: Path, meta: dict) -> None:
    """config.json of a run folder (``write_run_files`` makes it; ``train`` adds to it)."""
    commit(Path(out), {"config.json": json_writer(meta)})


def write_results(out: Path, result: dict) -> None:
    commit(Path(out), {"results.json": lambda p: p.write_text(json.dumps(result, indent=1))})


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


def _no_epoch_finished(d: Path) -> bool:
    """A run folder with training state but no evaluated epoch yet (a mid-epoch checkpoint)."""
    try:
        return json.loads((d / "trainer_state.json").read_text()).get("best_epoch", -1) < 1
    except (OSError, ValueError, AttributeError):
        return False


def load_model(run_dir: str | Path, weights: str = "model.safetensors", device="cpu"):
    """-> (model in eval mode, config dict, raw item ids array)."""
    d = Path(run_dir)
    if not d.is_dir():
        raise RunFolderError(f"{d}: no such run folder (give the folder 'perseq train' printed, e.g. runs/ml-1m-sasrec-s0)")
    if not holds_run(d):
        raise RunFolderError(f"{d} is not a perseq run folder (no config.json, model.safetensors or training state)")
    meta = read_json(d, "config.json")
    try:
        mc = saved_model_config(meta)
        name = meta["run"]["model"]["name"]
        n_items = mc.pop("n_items")
        model = build_model(name, n_items, **mc)
    except (KeyError, TypeError, ValueError) as e:
        raise RunFolderError(f"{d / 'config.json'} does not describe a model ({type(e).__name__}: {e}); {_TODO['config.json']}") from e
    if weights == "model.safetensors" and not (d / weights).exists() and _no_epoch_finished(d):
        raise RunFolderError(f"{d / weights} does not exist yet: no epoch of this run has finished; "
                             "continue training with 'perseq train ... --resume'")
    load_weights(model, d / weights)
    model.to(device).eval()
    items = read_run_file(d, "vocab/items.parquet", lambda p: pl.read_parquet(p)["item_id"].to_numpy().astype(object))
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


def save_train_state(out: Path, model, opt, state: dict, best_model: torch.nn.Module | None = None) -> None:
    """The resumable state (last weights, optimizer + RNG, trainer state) as one set, with
    the best weights in the same set when ``best_model`` is given (an improved epoch)."""
    tensors, meta = _flatten_optimizer(opt)
    tensors["__rng_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["__rng_cuda"] = torch.cuda.get_rng_state()
    last = _weights_writer(model)
    writers = {"last.safetensors": last,
               "optimizer.safetensors": lambda p: save_file(tensors, str(p)),
               "trainer_state.json": lambda p: p.write_text(json.dumps({**state, "optimizer": meta, "np_rng": None}, indent=1))}
    if best_model is not None:  # an improved epoch: the best weights are the last (one copy of them)
        writers["model.safetensors"] = last if best_model is model else _weights_writer(best_model)
    commit(Path(out), writers)


def load_train_state(out: Path, model, opt) -> dict | None:
    """The resumable state of ``out`` into ``model`` and ``opt`` (``recover`` first: the
    caller, as a writer, does that)."""
    if not (out / "trainer_state.json").exists():
        return None
    state = read_json(out, "trainer_state.json")
    load_weights(model, out / "last.safetensors")
    tensors = read_run_file(out, "optimizer.safetensors", lambda p: load_file(str(p)))
    try:
        opt.load_state_dict(_unflatten_optimizer({k: v for k, v in tensors.items() if not k.startswith("__")}, state["optimizer"]))
        rng = tensors["__rng_cpu"]
    except (KeyError, ValueError, RuntimeError) as e:
        raise RunFolderError(f"{out / 'optimizer.safetensors'} does not match {out / 'trainer_state.json'} "
                             f"({type(e).__name__}: {e}); {_TODO_STATE}") from e
    torch.set_rng_state(rng)
    cuda_rng = tensors.get("__rng_cuda")
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    state.pop("optimizer")
    state.pop("np_rng", None)
    return state


def item_ids_to_raw(items: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    return vocab[items]
