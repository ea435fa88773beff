"""Plain training functions: ``train_step`` (the one step everything reuses: CLI, early
stopping, PCRec-simple, the federated client) and ``fit``."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from safetensors import safe_open
from .checkpoint import (RunFolderError, holds_run, load_train_state, load_weights, read_json, read_run_file, recover,
                         remove_run, save_train_state, saved_model_config, write_results, write_run_files, write_run_meta)
from .config import RunConfig
from .data.batching import Batch, TrainWindows
from .data.sequences import Split, check_split
from .evaluate import ScoresNaN, evaluate, train_item_counts
from .losses import get_loss
from .models import build_model
from .progress import progress as progress_bar
from .report import hardware_name
from .runtime import tune_malloc_for_training


def select_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_distributed_from_env() -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU,
    nccl on CUDA. Returns whether training is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _core(model):
    return model.module if hasattr(model, "module") else model


def forward_targets(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's training forward on ``batch``: (hidden (B, T, D), targets (B, T), 0 =
    no target). A pure function of the parameters, so ``torch.func.functional_call`` can run
    it with other ones: ``train_step`` and per-user adaptation (``perseq.personalize``)
    share it, and with it the objective (Cloze masking, query times)."""
    core = _core(model)
    inputs, targets = batch.inputs, batch.targets
    if core.objective == "cloze":
        inputs, targets = core.cloze_mask(inputs)
    # models that time each query (HSTU, time_query="next") get the targets' timestamps
    return model(inputs, batch.times, batch.target_times if core.query_time_input else None), targets


def train_step(model, batch: Batch, loss_fn, optimizer=None, *, grad_clip: float | None = None,
               regularizer=None) -> tuple[float, int]:
    """One optimization step on ``batch``; returns (summed loss, number of targets).

    The loss is the sum over this rank's target positions divided by the target count of
    the whole (global) batch, and gradients are summed over ranks, so data-parallel
    training on N processes equals one process on the same global batch.
    ``regularizer``: a function of nothing returning a scalar added to that mean loss
    before the backward (a federated client's proximal or drift term; not with torchrun).
    """
    core = _core(model)
    model.train()
    h, targets = forward_targets(model, batch)  # (B, T, D), (B, T)
    sel = targets > 0
    n_local = sel.sum()
    rank, world = _distributed()
    n_total = n_local.clone().float()
    if world > 1:
        dist.all_reduce(n_total)
    loss_sum = loss_fn(h[sel], targets[sel], core.output_embeddings())
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=False)
        loss = loss_sum / n_total.clamp_min(1)
        if regularizer is not None:
            loss = loss + regularizer()
        loss.backward()
        if world > 1:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)  # sum: each rank's loss is already scaled by the global count
            off = 0
            for g in grads:
                g.copy_(flat[off : off + g.numel()].view_as(g))
                off += g.numel()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return float(loss_sum.detach()), int(n_local)


# settings that may differ between an interrupted run and its resumption
# (refit only adds a phase after early stopping, so it can be switched on for a finished run;
# monitoring the test only adds records to the history)
RESUMABLE_CHANGES = {("train", "threads"), ("train", "device"), ("train", "epochs"), ("train", "patience"), ("train", "refit"),
                     ("train", "checkpoint_minutes"), ("eval", "monitor_test"), ("data", "download"),
                     ("federated", "rounds"), ("federated", "patience")}


class RunExistsError(ValueError):
    """``fit`` was asked to train into a folder that already holds a run."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training at a batch boundary, after a resumable checkpoint."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum, self.where = signum, where


def _agreed_stop(stopper, world: int) -> int:
    """The signal that stops training at this epoch end (0 = none); under torchrun the ranks
    agree (any rank's signal stops all, so none waits in a collective for the others)."""
    mine = stopper.signum if stopper.noticed() else 0
    if world == 1:
        return mine
    flag = torch.tensor([float(mine)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class _StopOnSignal:
    """While training, SIGINT (Ctrl-C) and SIGTERM (kill, a scheduler's preemption) ask the
    loop to stop at the next batch boundary; ``fit`` then saves a resumable checkpoint and
    raises :class:`TrainingInterrupted`. A second signal stops at once (KeyboardInterrupt);
    the last checkpoint still stands. Only the main thread can take signals; elsewhere
    (a thread pool, a notebook worker) this does nothing."""

    def __init__(self, log):
        self.signum, self.log, self._old, self._said = None, log, {}, False

    def _handle(self, signum, frame):
        # only a flag here: printing from a handler can interrupt a print in progress
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def noticed(self) -> bool:
        """Whether a signal came; the first time it is seen, say what happens next."""
        if self.signum is not None and not self._said:
            self._said = True
            self.log(f"{signal.Signals(self.signum).name}: stopping at the next batch with a resumable checkpoint "
                     "(send it again to stop at once)")
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def prepare_run_folder(out: Path, resume: bool, overwrite: bool, log=print, dry_run: bool = False) -> None:
    """Never lose a run silently: a folder that holds one is continued (``resume``),
    replaced (``overwrite``: removed here, unless ``dry_run``, which only checks), or
    refused with both options named. A folder holding anything else is never removed."""
    out = Path(out)
    if not out.exists() or resume or not any(out.iterdir()):
        return
    if not holds_run(out):
        raise RunExistsError(f"{out} exists and is not a perseq run folder; choose another --out (or --name)")
    if not overwrite:
        what = "a finished run" if (out / "results.json").exists() else "an unfinished run"
        raise RunExistsError(f"{out} already holds {what}; pass --resume to continue it or --overwrite to replace it")
    if not dry_run:
        log(f"--overwrite: removing the run in {out}")
        remove_run(out)


def _metrics_only(result: dict) -> dict:
    """An ``evaluate`` result's float metrics, as an epoch's history record keeps them."""
    return {k: v for k, v in result.items() if isinstance(v, float)}


def _json(x):
    return json.loads(json.dumps(x))  # tuples -> lists, as a config.json holds them


def _resolved_data(saved: dict) -> dict:
    """A saved data section as ``resolve_data_config`` makes it today (absolute paths, the
    guessed format); as saved when it no longer resolves (the data moved: named later)."""
    from .config import DataConfig
    from .data.loading import resolve_data_config

    try:
        dc = resolve_data_config(DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}))
    except (TypeError, ValueError, FileNotFoundError):
        return saved
    return _json(dataclasses.asdict(dc))


def run_model(cfg: RunConfig, n_items: int, device="cpu") -> torch.nn.Module:
    """The run's model, freshly initialized from the torch seed (its window defaults to
    data.max_len): centralized and federated training build it the same way."""
    params = {k: v for k, v in cfg.model.items() if k != "name"}
    params.setdefault("max_len", cfg.data.max_len)
    return build_model(cfg.model["name"], n_items, **params).to(device)


def check_same_run(out: Path, cfg: RunConfig, model, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to resume a folder trained under another configuration: continuing someone
    else's weights under new settings would silently mix two experiments. The model is
    compared by its full effective config (saved in config.json; keys it gained since get
    the values that reproduce the saved run, ``saved_model_config``); the other sections
    key by key, a key missing from an older folder counting as its default; sections in
    ``ignore`` are not read by this kind of run (centralized training and ``federated``)."""
    meta = read_json(out, "config.json")
    saved, now = meta["run"], json.loads(cfg.to_json())
    diffs = []
    if saved["model"]["name"] != now["model"]["name"]:
        diffs.append(f"model.name: {saved['model']['name']!r} -> {now['model']['name']!r}")
    else:
        old, new = _json(saved_model_config(meta)), _json(dataclasses.asdict(_core(model).cfg))
        diffs += [f"model.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    for sec, vals in now.items():
        if sec == "model" or sec in ignore or not isinstance(vals, dict):
            continue
        default = _json(dataclasses.asdict(getattr(RunConfig(), sec)))
        old = saved.get(sec, {})
        if sec == "data":  # folders from before data paths were stored resolved: compare them resolved
            old = _resolved_data(old)
        for k in sorted(set(vals) | set(old)):
            a, b = old.get(k, default.get(k)), vals.get(k, default.get(k))
            if (sec, k) not in RESUMABLE_CHANGES and a != b:
                diffs.append(f"{sec}.{k}: {a!r} -> {b!r}")
    if diffs:
        raise ValueError(f"cannot resume {out}: it was trained with a different config ({'; '.join(diffs)}); "
                         "give this run its own folder with --name (or --out), or drop --resume")


def _check_resumable(out: Path) -> None:
    """A folder with training output must still have the files that describe it: starting
    over silently beside old weights would mix two runs. (A folder killed before its first
    epoch ended has only config.json and the vocabulary, and starts over.)"""
    trained = [f for f in ("model.safetensors", "last.safetensors", "optimizer.safetensors", "trainer_state.json")
               if (out / f).exists()]
    for f in ("config.json", "trainer_state.json"):
        if trained and not (out / f).exists():
            read_json(out, f)  # raises the one-line "missing; what to do" error


def _saved_state(out: Path) -> dict:
    """A resumed folder's trainer_state.json ({} when training never saved one)."""
    return read_json(out, "trainer_state.json") if (out / "trainer_state.json").exists() else {}


def _check_folder_files(out: Path, data, state: dict) -> None:
    """Before resuming, read what the run will need later: the best weights (read again at
    the end) and the vocabulary, which must be the data's (else the data changed), so a
    damaged file is named now instead of after hours of training. ``state``: the folder's
    trainer state (``_saved_state``)."""
    if (out / "model.safetensors").exists() or state.get("best_epoch", -1) >= 1:
        read_run_file(out, "model.safetensors", lambda p: safe_open(str(p), "pt").keys())
    items = read_run_file(out, "vocab/items.parquet", lambda p: pl.read_parquet(p)["item_id"].to_list())
    if items != data.item_ids.astype(str).tolist():
        raise ValueError(f"cannot resume {out}: the data's item vocabulary differs from the run's (vocab/items.parquet); "
                         "the data changed since training, so use another --out or --overwrite")


def fit(
    cfg: RunConfig,
    split: Split,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    log=print,
    overwrite: bool = False,
    extra_meta: dict | None = None,
) -> dict:
    """Train with AdamW, early stopping on the validation metric, then evaluate the test
    split once with the best weights. With ``out_dir``, every epoch (and, within a long
    epoch, every ``train.checkpoint_minutes``) leaves a resumable state and the best
    weights; ``resume=True`` continues an interrupted run, ending with the same weights and
    metrics as an uninterrupted one (batch order is a function of seed and epoch; RNG and
    optimizer state are restored, and a mid-epoch checkpoint skips the batches already
    done). A folder that already holds a run is refused unless ``resume`` or ``overwrite``.
    SIGINT/SIGTERM stop at the next batch with a checkpoint (:class:`TrainingInterrupted`).
    ``extra_meta`` adds keys to config.json (the CLI's data fingerprint)."""
    tc = cfg.train
    tune_malloc_for_training()  # reuse freed memory instead of faulting in fresh pages every step
    if tc.refit_epochs is not None and (not tc.refit or tc.refit_epochs < 1):
        raise ValueError(f"train.refit_epochs={tc.refit_epochs!r}: it is the epoch count of a refit without an "
                         "early-stopping phase, so it needs train.refit: true and at least 1 epoch")
    check_split(split)  # degenerate data (no targets, nothing to evaluate, one item) is refused up front
    if out_dir is not None and extra_meta is None:
        # what the CLI records, for Python callers too: data paths absolute, and what the data was
        from .data.loading import data_fingerprint, resolve_data_config

        cfg = dataclasses.replace(cfg, data=resolve_data_config(cfg.data))
        extra_meta = {"data_fingerprint": data_fingerprint(cfg.data)}
    if tc.refit:
        refit_split(split)  # a split refit cannot use fails now, not after hours of training
    rank, world = _distributed()
    if out_dir is not None and rank == 0:
        prepare_run_folder(Path(out_dir), resume, overwrite, log)
    if tc.refit_epochs:
        return _refit_only(cfg, split, out_dir, resume, progress, log, extra_meta)
    out = Path(out_dir) if out_dir is not None else None
    saved_state = {}
    if resume and out is not None and out.exists():
        if rank == 0:  # one writer repairs an interrupted commit; the other ranks wait for it
            recover(out)
        if world > 1:
            dist.barrier()
        _check_resumable(out)
        saved_state = _saved_state(out)
    from .runtime import use_threads  # train.threads, PERSEQ_THREADS, or the cores not busy now
    # an automatic count is kept for the run's life: thread counts change results in the last
    # bits, and a resumed run must end as the uninterrupted one would
    threads = use_threads(tc.threads or saved_state.get("threads"), log=log).n
    device = select_device(tc.device)
    seed_everything(tc.seed)
    data = split.data
    model = run_model(cfg, data.n_items, device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    windows = TrainWindows(split, model.max_len if model.objective == "causal" else model.max_len - 1, cfg.data.windows, cloze=model.objective == "cloze")
    loss_fn = get_loss(cfg.loss, train_item_counts(split))
    hardware = hardware_name(device)
    saved_cfg = earlier_hardware = None  # what a resumed folder says it was trained with, and on
    if resume and out is not None and (out / "config.json").exists():
        check_same_run(out, cfg, model, ignore=("federated",))  # centralized training reads no federated setting
        saved_cfg = read_json(out, "config.json")["run"]
        _check_folder_files(out, data, saved_state)
        try:  # only its hardware name is read back: a damaged results.json is rewritten at the end
            earlier_hardware = read_json(out, "results.json").get("hardware") if (out / "results.json").exists() else None
        except RunFolderError as e:
            log(f"note: {e}")

    state = {"epoch": 0, "best": -math.inf, "best_epoch": -1, "bad": 0, "history": [], "train_seconds": 0.0,
             "threads": threads}
    if resume and out is not None:
        loaded = load_train_state(out, model, opt)
        if loaded is not None:
            state = loaded
            at = f", batch {state['batch']}" if state.get("batch") else ""
            log(f"resumed from {out} at epoch {state['epoch']}{at}")
    if out is not None and rank == 0:
        finished = state["epoch"] >= tc.epochs or state["bad"] >= tc.patience
        write_run_files(out, _as_trained(cfg, saved_cfg) if finished and saved_cfg else cfg, model, data, extra_meta)
    best_state = None
    if out is None:
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    metric = cfg.eval.metric
    # mid-epoch checkpoints: rank 0 alone would decide them by its own clock, so under
    # torchrun checkpoints (and signal stops) stay at epoch ends
    every = tc.checkpoint_minutes * 60 if out is not None and world == 1 and tc.checkpoint_minutes else None
    stopper = _StopOnSignal(log)
    saved_in = f"; checkpoint in {out}" if out is not None else ""

    with stopper:
        for epoch in range(state["epoch"], tc.epochs):
            if state["bad"] >= tc.patience:
                break
            t0 = time.perf_counter()
            order = windows.batch_order(tc.batch_size * world, seed=tc.seed * 1_000_003 + epoch)
            # a mid-epoch checkpoint carries how far the epoch got; the rest of it runs now
            start = state.pop("batch", 0)
            tot_loss, tot_n, before = state.pop("epoch_loss", 0.0), state.pop("epoch_targets", 0), state.pop("epoch_seconds", 0.0)
            bar = progress_bar(order[start:], f"epoch {epoch + 1}", total=len(order) - start, enabled=progress)
            last_save = time.perf_counter()
            for i, idx in enumerate(bar, start + 1):
                batch = windows.make_batch(idx[rank::world]).to(device)
                loss, n = train_step(model, batch, loss_fn, opt, grad_clip=tc.grad_clip)
                tot_loss += loss
                tot_n += n
                if tot_n:
                    bar.set_postfix(loss=f"{tot_loss / tot_n:.4f}", refresh=False)
                now = time.perf_counter()
                due = every is not None and now - last_save >= every
                # under torchrun the ranks would see a signal at different batches: they stop together at the epoch end
                stop = world == 1 and stopper.noticed()
                if (due or stop) and i < len(order):  # the last batch saves with its epoch
                    if out is not None and rank == 0:
                        partial = {**state, "batch": i, "epoch_loss": tot_loss, "epoch_targets": tot_n,
                                   "epoch_seconds": before + now - t0}
                        save_train_state(out, model, opt, partial)
                    last_save = now
                    if stop:
                        where = f"at epoch {epoch + 1}, batch {i} of {len(order)}"
                        raise TrainingInterrupted(stopper.signum, where + saved_in)
            secs = before + time.perf_counter() - t0
            if world > 1:  # report the loss of the whole global batch, not of this rank's shard
                agg = torch.tensor([tot_loss, float(tot_n)], dtype=torch.float64)
                dist.all_reduce(agg)
                tot_loss, tot_n = agg[0].item(), int(agg[1].item())
            state["train_seconds"] += secs
            rec = {"epoch": epoch + 1, "loss": tot_loss / max(tot_n, 1), "seconds": secs, "hardware": hardware}
            diverged = False
            if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
                try:
                    val = evaluate(model, split, "valid", cfg.eval, device)
                except ScoresNaN:
                    val, diverged = None, True
                if diverged:
                    # this epoch's weights are lost, not the run: it stops with the best epoch's
                    # (a run that diverges before any good epoch fails after the loop)
                    state["diverged_at"] = epoch + 1
                    improved = False
                    log(f"epoch {epoch + 1}: training diverged (the model scored NaN); stopping with the best epoch's weights")
                elif (improved := val[metric] > state["best"] or state["best_epoch"] < 0):
                    state.update(best=val[metric], best_epoch=epoch + 1, bad=0)
                    if out is None:
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    state["bad"] += 1
                if not diverged:
                    rec["valid"] = _metrics_only(val)
                    log(f"epoch {epoch + 1}: loss {rec['loss']:.4f}  valid {metric} {val[metric]:.4f}  "
                        f"best {state['best']:.4f}@{state['best_epoch']}  {secs:.1f}s")
            else:
                log(f"epoch {epoch + 1}: loss {rec['loss']:.4f}  {secs:.1f}s")
            if cfg.eval.monitor_test and not diverged:
                peek = evaluate(model, split, "test", cfg.eval, device)
                rec["test_monitor"] = _metrics_only(peek)
                log(f"epoch {epoch + 1}: test (monitored, never selected on) {metric} {peek[metric]:.4f}")
            state["history"].append(rec)
            state["epoch"] = epoch + 1
            if out is not None and rank == 0:  # the best weights go in the same set as the state that names them
                save_train_state(out, model, opt, state, best_model=model if rec.get("valid") and improved else None)
            signum = _agreed_stop(stopper, world)
            if signum and not diverged and epoch + 1 < tc.epochs and state["bad"] < tc.patience:
                raise TrainingInterrupted(signum, f"after epoch {epoch + 1}" + saved_in)
            if diverged:
                break

    if state["best_epoch"] < 1 and state.get("diverged_at"):
        raise ValueError(f"training diverged at epoch {state['diverged_at']} before any epoch was kept "
                         "(the model scored NaN): try a lower train.lr or a grad_clip")
    if out is not None:
        if world > 1:
            dist.barrier()
        load_weights(model, out / "model.safetensors")
    else:
        model.load_state_dict(best_state)
    test = evaluate(model, split, "test", cfg.eval, device, breakdown=True)
    valid = evaluate(model, split, "valid", cfg.eval, device)
    epochs_run = len(state["history"])
    result = {
        "model": cfg.model["name"],
        "dataset": data.name,
        "seed": tc.seed,
        "best_epoch": state["best_epoch"],
        "epochs": state["epoch"],
        "valid": valid,
        "test": test,
        "epoch_seconds": state["train_seconds"] / max(epochs_run, 1) if epochs_run else None,
        "n_train_targets": windows.n_targets,
        "hardware": _trained_on(state["history"], earlier_hardware, hardware),
        "world_size": world,
        "history": state["history"],
    }
    if tc.refit and state["best_epoch"] <= 0:
        log("refit skipped: no epoch was evaluated, so there is no epoch count to refit for")
    elif tc.refit:
        refit = _refit(cfg, split, state["best_epoch"], None if out is None else out / "refit", resume, progress, log, extra_meta)
        result["refit"] = {"epochs": state["best_epoch"], "test": refit["test"], "epoch_seconds": refit["epoch_seconds"]}
        model = refit["model_obj"]
    _write_results(out, result)
    result["model_obj"] = model
    return result


def _as_trained(cfg: RunConfig, saved: dict) -> RunConfig:
    """The config to record when a resumed run trains no further epoch (it was finished, and
    is only re-evaluated or refitted): today's, but with the threads and device it was
    trained with, which a re-collection at other settings must not overwrite."""
    keep = {k: saved["train"][k] for k in ("threads", "device") if k in saved.get("train", {})}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **keep))


def _trained_on(history: list[dict], earlier: str | None, now: str) -> str:
    """Where a run's epochs were trained, every machine/thread setting in order of first use
    ("A + B" for a run resumed elsewhere). Epochs recorded before records carried their
    hardware count as the folder's earlier results.json says; no epoch at all, as ``now``."""
    names = [r.get("hardware") or earlier or now for r in history] or [now]
    return " + ".join(dict.fromkeys(names))


def _write_results(out: Path | None, result: dict) -> None:
    """A run folder's results.json (written by rank 0; the model object stays out)."""
    if out is not None and _distributed()[0] == 0:
        write_results(out, {k: v for k, v in result.items() if k != "model_obj"})


def refit_split(split: Split) -> Split:
    """The leave-one-out split with every validation event moved into training: inputs and
    targets up to, not including, the test event. Its validation positions are training
    data now, so metrics on them mean nothing."""
    if split.kind != "leave_one_out":
        raise ValueError(f"refit needs the leave_one_out split (got {split.kind!r}): only there does "
                         "'training + validation' have one meaning per user")
    train_len = np.where(split.valid_pos >= 0, split.valid_pos + 1, split.train_len)
    return dataclasses.replace(split, train_len=train_len, kind="leave_one_out+refit")


def _refit(cfg: RunConfig, split: Split, epochs: int, out: Path | None, resume: bool, progress, log,
           extra_meta: dict | None = None) -> dict:
    """Retrain from scratch, same seed and settings, on training + validation events for the
    epoch count that early stopping chose, with no selection on the (now seen) validation
    events, and test once. Why: the validation event is every user's most recent known
    behaviour; leaving it out of training costs the test on short-history data (Amazon),
    and the production model would be trained on it anyway. The epoch count is the only
    thing carried over, so the test event still influences nothing."""
    log(f"refit: training on training + validation events for {epochs} epochs")
    tc = dataclasses.replace(cfg.train, epochs=epochs, eval_every=epochs, patience=epochs + 1, refit=False, refit_epochs=None)
    overwrite = False
    if resume and out is not None and (out / "config.json").exists():
        done_for = read_json(out, "config.json")["run"]["train"]["epochs"]
        if done_for != epochs:  # the main phase went on and chose another epoch count
            log(f"refit: {out} was refitted for {done_for} epochs; starting over for {epochs}")
            resume, overwrite = False, True
    return fit(dataclasses.replace(cfg, train=tc), refit_split(split), out, resume=resume, progress=progress,
               log=lambda s: log("  refit " + s.replace("valid ", "valid (trained on) ")), overwrite=overwrite, extra_meta=extra_meta)


def _refit_only(cfg: RunConfig, split: Split, out_dir, resume: bool, progress, log, extra_meta: dict | None = None) -> dict:
    """``train.refit_epochs``: no early-stopping phase. Train on every event but the test one
    for a fixed epoch count and test once: the protocol of the published HSTU numbers
    (generative-recommenders trains ML-1M on each sequence minus its last event for 101
    epochs). Nothing is selected on validation, whose events are training data here, so the
    epoch count has to come from outside this run (a paper, or an earlier early-stopped run).
    The result has the refit's metrics as both ``test`` and ``refit.test`` (``refit.only``
    says there was no other phase) and no validation metrics."""
    epochs = cfg.train.refit_epochs
    out = None if out_dir is None else Path(out_dir)
    if resume and out is not None and (out / "config.json").exists():
        saved = read_json(out, "config.json")["run"]["train"]
        if (saved.get("epochs"), saved.get("eval_every"), saved.get("refit")) != (epochs, epochs, False):
            raise ValueError(f"cannot resume {out} as a refit-only run of {epochs} epochs: it holds another kind of run "
                             "(an early-stopping phase, or another epoch count); use another --out or drop --resume")
    r = _refit(cfg, split, epochs, out, resume, progress, log, extra_meta)
    r["refit"] = {"epochs": epochs, "test": r["test"], "epoch_seconds": r["epoch_seconds"], "only": True}
    r["valid"] = None  # its events were trained on
    _write_results(out, r)  # again: the refit's own file lacks the refit-only marks
    if out is not None:
        # config.json's "run" is what the single phase trained under (refit split, refit off):
        # resuming compares against it. "requested" keeps the config as given, the one that
        # reproduces this folder (`perseq train` with it trains the same run again)
        meta = read_json(out, "config.json")
        meta["requested"] = json.loads(cfg.to_json())
        write_run_meta(out, meta)
    return r
