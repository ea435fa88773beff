"""Run folders a user can trust: never overwritten silently, written as sets that no kill
can tear, stopped cleanly by signals, and damaged files named in one line."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perseq import checkpoint
from perseq.cli import main
from perseq.config import from_dict
from perseq.data.sequences import leave_one_out
from perseq.data.synthetic import make_synthetic
from perseq.train import TrainingInterrupted, fit

# a run that takes a second or two: tiny synthetic data, a small SASRec, one thread
SYN = ["--set", "data.synthetic={n_users: 150, n_items: 60, n_clusters: 6, mean_len: 15, max_len: 40, seed: 3}",
       "--set", "model.d=16", "--set", "data.max_len=20", "--set", "train.batch_size=32",
       "--set", "train.threads=1", "--set", "eval.exclude_seen=false"]


def _train(out, *extra):
    return main(["train", *SYN, "--set", "train.epochs=2", "--out", str(out), "--no-progress", *extra])


def _tensors(path: Path) -> dict:
    return load_file(str(path))


def _same_weights(a: Path, b: Path) -> bool:
    x, y = _tensors(a), _tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------ no silent overwrite
def test_a_run_folder_is_never_overwritten_without_overwrite(tmp_path, capsys):
    assert _train(tmp_path) == 0
    [run] = list(tmp_path.iterdir())
    assert run.name == "synthetic-sasrec-" + run.name.split("-")[2] + "-s0"  # --set changed the config: hashed
    stamp = (run / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert _train(tmp_path) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "--resume" in err and "--overwrite" in err
    assert (run / "model.safetensors").stat().st_mtime_ns == stamp  # untouched
    # settings --resume may change keep the name, so they hit the same folder (refused too)
    assert main(["train", *SYN, "--set", "train.epochs=3", "--set", "train.patience=4", "--out", str(tmp_path),
                 "--no-progress"]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    # --overwrite replaces it
    assert _train(tmp_path, "--overwrite") == 0
    assert (run / "model.safetensors").stat().st_mtime_ns != stamp
    assert [p.name for p in tmp_path.iterdir()] == [run.name]


def test_runs_that_differ_in_config_get_different_folders(tmp_path):
    assert _train(tmp_path) == 0
    assert _train(tmp_path, "--set", "train.lr=0.003") == 0
    assert _train(tmp_path, "--name", "mine") == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and "mine-s0" in names
    a, b = [n for n in names if n != "mine-s0"]
    assert a.rsplit("-", 2)[0] == b.rsplit("-", 2)[0] == "synthetic-sasrec" and a != b


def test_a_config_file_names_its_runs_and_resume_settings_do_not(tmp_path):
    from perseq.cli import run_folder_base
    from perseq.config import load_config

    path = "configs/ml-1m/sasrec.yaml"
    base = load_config(path)
    for free in ([], ["train.threads=1"], ["train.epochs=5", "train.patience=2", "train.seed=4"], ["data.download=true"]):
        assert run_folder_base(load_config(path, free), base, path, "ml-1m") == "ml-1m-sasrec"
    other = run_folder_base(load_config(path, ["train.lr=1e-4"]), base, path, "ml-1m")
    assert other.startswith("ml-1m-sasrec-") and len(other) == len("ml-1m-sasrec-") + 6
    assert run_folder_base(load_config(path, ["name=x"]), base, path, "ml-1m") == "x"


def test_a_folder_that_is_not_a_run_is_never_removed(tmp_path, capsys):
    run = tmp_path / "mine-s0"
    run.mkdir()
    (run / "notes.txt").write_text("my notes")
    assert _train(tmp_path, "--name", "mine", "--overwrite") == 2
    assert "not a perseq run folder" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "my notes"


# ------------------------------------------------------------------ atomic sets, crash injection
@pytest.fixture(scope="module")
def tiny():
    data, _ = make_synthetic(n_users=150, n_items=60, n_clusters=6, mean_len=15, max_len=40, seed=3)
    return leave_one_out(data)


def _cfg(**train):
    return from_dict({"model": {"name": "sasrec", "d": 16}, "data": {"max_len": 20},
                      "train": {"epochs": 3, "batch_size": 32, "lr": 3e-3, "threads": 1, **train},
                      "eval": {"exclude_seen": False}})


class Crash(Exception):
    pass


def _quiet(s):
    pass


def test_a_crash_after_any_write_or_rename_of_a_checkpoint_resumes_bit_identical(tiny, tmp_path, monkeypatch):
    """Every single write and rename of an epoch's save (best weights, last weights,
    optimizer, state, the journal) is a crash point; after each, resuming must end with
    the weights and metrics of the uninterrupted run."""
    ops = []
    monkeypatch.setattr(checkpoint, "crash_hook", ops.append)
    ref = fit(_cfg(), tiny, out_dir=tmp_path / "ref", progress=False, log=_quiet)
    monkeypatch.setattr(checkpoint, "crash_hook", None)
    # the saves, split at their "done" marks; the second epoch-end save is the one to break
    ends = [i for i, op in enumerate(ops) if op == "done"]
    saves = [(a + 1, b + 1) for a, b in zip([-1, *ends], ends)]
    state_saves = [(a, b) for a, b in saves if "write trainer_state.json" in ops[a:b]]  # one per epoch
    epoch, (a, b) = next((e, s) for e, s in enumerate(state_saves, 1) if e > 1 and "write model.safetensors" in ops[s[0]:s[1]])
    assert {"write model.safetensors", "write last.safetensors", "write optimizer.safetensors",
            "write trainer_state.json", "journal", "rename model.safetensors", "rename trainer_state.json"} <= set(ops[a:b])
    for k in range(a, b):
        out = tmp_path / f"crash{k}"
        count = iter(range(10**6))

        def hook(op, k=k):
            if next(count) == k:
                raise Crash(op)

        monkeypatch.setattr(checkpoint, "crash_hook", hook)
        with pytest.raises(Crash):
            fit(_cfg(), tiny, out_dir=out, progress=False, log=_quiet)
        monkeypatch.setattr(checkpoint, "crash_hook", None)
        # what a reader sees right after the crash is one consistent set: the old or the new
        checkpoint.recover(out)
        state = json.loads((out / "trainer_state.json").read_text())
        committed = ops[k] == "journal" or ops[k].startswith("rename") or ops[k] == "done"
        assert state["epoch"] == (epoch if committed else epoch - 1), ops[k]
        logs = []
        r = fit(_cfg(), tiny, out_dir=out, resume=True, progress=False, log=logs.append)
        assert f"resumed from {out} at epoch {epoch if committed else epoch - 1}" in logs, (ops[k], logs)
        assert len(r["history"]) == len(ref["history"]) and r["test"] == ref["test"], ops[k]
        assert _same_weights(out / "model.safetensors", tmp_path / "ref" / "model.safetensors"), ops[k]
        assert _same_weights(out / "last.safetensors", tmp_path / "ref" / "last.safetensors"), ops[k]
        assert not list(out.glob("*.tmp")) and not (out / ".commit.json").exists()


def test_mid_epoch_checkpoints_resume_bit_identical(tiny, tmp_path, monkeypatch):
    """checkpoint_minutes: a checkpoint within the epoch records the batch reached; a crash
    after it resumes from that batch (skipping the ones done) to the uninterrupted result."""
    ref = fit(_cfg(checkpoint_minutes=1e-9), tiny, out_dir=tmp_path / "ref", progress=False, log=_quiet)
    seen = []

    def hook(op):
        if op == "done" and (tmp_path / "cut" / "trainer_state.json").exists():
            st = json.loads((tmp_path / "cut" / "trainer_state.json").read_text())
            seen.append((st["epoch"], st.get("batch", 0)))
            if st["epoch"] == 1 and st.get("batch") == 2:
                raise Crash

    monkeypatch.setattr(checkpoint, "crash_hook", hook)
    with pytest.raises(Crash):
        fit(_cfg(checkpoint_minutes=1e-9), tiny, out_dir=tmp_path / "cut", progress=False, log=_quiet)
    monkeypatch.setattr(checkpoint, "crash_hook", None)
    n = max(b for e, b in seen if e == 0) + 1  # batches in epoch 1
    # a save after every batch, the last batch's with the epoch end
    assert seen == [(0, b) for b in range(1, n)] + [(1, 0), (1, 1), (1, 2)]
    logs = []
    r = fit(_cfg(checkpoint_minutes=1e-9), tiny, out_dir=tmp_path / "cut", resume=True, progress=False, log=logs.append)
    assert any(line.startswith("resumed from") and line.endswith("at epoch 1, batch 2") for line in logs), logs
    assert r["test"] == ref["test"]
    assert _same_weights(tmp_path / "cut" / "last.safetensors", tmp_path / "ref" / "last.safetensors")


# ------------------------------------------------------------------ kill -9 and signals
def _cli(out, *extra, epochs=6):
    return [sys.executable, "-m", "perseq.cli", "train", *SYN, "--set", f"train.epochs={epochs}", "--set", "train.patience=100",
            "--set", "train.checkpoint_minutes=0.00001", "--out", str(out), "--name", "k", "--no-progress", *extra]


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_twenty_kill_9_at_random_times_then_resume_is_bit_identical(tmp_path):
    # ~15 s of training (0.1 s an epoch) with a checkpoint after every batch; a process
    # starts in ~1.2 s, so a kill 1.2-2.4 s in lands anywhere from start-up to a save
    subprocess.run(_cli(tmp_path / "ref", epochs=150), check=True, env=_env(), capture_output=True)
    # each process is killed at a random moment (0-0.5 s) after it has saved a checkpoint of
    # its own, so every kill lands in training, between or inside saves, however slow start-up is
    rng = random.Random(0)
    state = tmp_path / "cut" / "k-s0" / "trainer_state.json"

    def position():
        try:
            st = json.loads(state.read_text())
            return st["epoch"], st.get("batch", 0)
        except (OSError, ValueError):  # not written yet
            return (0, 0)

    kills, reached = 0, [position()]
    while True:
        p = subprocess.Popen(_cli(tmp_path / "cut", "--resume", epochs=150), env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        if kills >= 20:
            out, _ = p.communicate(timeout=600)
            assert p.returncode == 0, out[-2000:]
            break
        start = position()
        while p.poll() is None and position() == start:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if p.poll() is not None:
            assert p.returncode == 0, p.stdout.read()[-2000:]
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        reached.append(position())
    assert kills >= 20
    assert reached == sorted(reached) and len(set(reached)) >= 20  # every run moved training on, none lost it
    assert "resumed from" in out and f"at epoch {reached[-1][0]}" in out
    ref, cut = tmp_path / "ref" / "k-s0", tmp_path / "cut" / "k-s0"
    assert _same_weights(cut / "model.safetensors", ref / "model.safetensors")
    assert _same_weights(cut / "last.safetensors", ref / "last.safetensors")
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, cut))
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_next_batch_with_a_resumable_checkpoint(tmp_path, sig):
    # batches of 8: 19 to an epoch; a progress line after every batch says where training is
    small = ["--set", "train.batch_size=8", "--set", "train.checkpoint_minutes=0"]
    subprocess.run(_cli(tmp_path / "ref", *small, epochs=3), check=True, env=_env(), capture_output=True)
    cmd = [c for c in _cli(tmp_path / "cut", *small, epochs=3) if c != "--no-progress"]
    p = subprocess.Popen(cmd, env={**_env(), "PERSEQ_PROGRESS_SECONDS": "0"}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if line.startswith("epoch 2: 1/"):  # the second epoch's first batch is done
            break
    p.send_signal(sig)
    err = p.stderr.read()
    p.wait(timeout=120)
    assert p.returncode == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name} at epoch 2, batch " in err and "--resume" in err, err
    state = json.loads((tmp_path / "cut" / "k-s0" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and 1 <= state["batch"] < 19  # the checkpoint is inside epoch 2
    done = subprocess.run(cmd + ["--resume"], check=True, env=_env(), capture_output=True, text=True)
    assert f"resumed from {tmp_path / 'cut' / 'k-s0'} at epoch 1, batch {state['batch']}" in done.stdout
    assert _same_weights(tmp_path / "cut" / "k-s0" / "model.safetensors", tmp_path / "ref" / "k-s0" / "model.safetensors")


# ------------------------------------------------------------------ damaged files
FILES = ["model.safetensors", "last.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json",
         "vocab/items.parquet"]
READ_BY = {"evaluate": {"model.safetensors", "config.json", "vocab/items.parquet"},
           "predict": {"model.safetensors", "config.json", "vocab/items.parquet"},
           "resume": set(FILES)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert _train(root, "--name", "r") == 0
    return root / "r-s0"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(random.Random(1).randbytes(len(data)))
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "missing"])
@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("command", ["evaluate", "predict", "resume"])
def test_a_damaged_file_is_named_in_one_line(finished_run, tmp_path, capsys, command, name, how):
    run = tmp_path / "r-s0"
    shutil.copytree(finished_run, run)
    _damage(run / name, how)
    capsys.readouterr()
    if command == "evaluate":
        rc = main(["evaluate", str(run)])
    elif command == "predict":
        rc = main(["predict", str(run), "--out", str(tmp_path / "top.csv")])
    else:
        rc = _train(tmp_path, "--name", "r", "--resume")
    err = capsys.readouterr().err
    if name not in READ_BY[command]:
        assert rc == 0, err  # e.g. the best weights evaluate fine with a damaged optimizer state
        return
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(run / name) in lines[0]
    assert ("missing" if how == "missing" else "empty" if how == "empty" else "damaged") in lines[0]
    assert "restore" in lines[0] or "--resume" in lines[0] or "--overwrite" in lines[0]


def test_a_non_run_folder_and_a_missing_folder_are_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a perseq run folder" in capsys.readouterr().err


# ------------------------------------------------------------------ progress without a terminal
def test_training_without_a_terminal_prints_timed_progress_lines(tiny, monkeypatch, capsys):
    monkeypatch.setenv("PERSEQ_PROGRESS_SECONDS", "0")
    fit(_cfg(epochs=1), tiny, progress=None, log=_quiet)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("epoch 1:")]
    n = len(lines)
    assert n >= 2 and lines[0].startswith("epoch 1: 1/") and "batches" in lines[0] and "/s" in lines[0]
    assert "ETA" in lines[0] and "loss=" in lines[0]


def test_argument_errors_come_before_the_data_loads(tmp_path, capsys, monkeypatch):
    import perseq.data.loading as loading

    def boom(*a, **k):
        raise AssertionError("data loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_data", boom)
    assert main(["train", "--set", "model.name=sasrecc", "--out", str(tmp_path)]) == 2
    assert "unknown model 'sasrecc'" in capsys.readouterr().err
    assert main(["train", "--seeds", "a", "--out", str(tmp_path)]) == 2
    assert "--seeds expects comma-separated integers" in capsys.readouterr().err
    assert main(["train", "--set", "model.dd=3", "--out", str(tmp_path)]) == 2
    assert "unknown parameter(s) ['dd']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path), "--out", "x.csv", "--k", "-1"])
    assert "expected a positive integer, got -1" in capsys.readouterr().err


# ------------------------------------------------------------------ data paths
def test_a_run_on_a_relative_data_file_evaluates_from_anywhere_and_names_a_moved_file(tmp_path, monkeypatch, capsys):
    """data.dataset=<a relative file> is stored absolute with its fingerprint: evaluate
    works from another directory, and says so when the file moved or changed."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    rows = [f"u{u},i{(u * 7 + k) % 30},{1000 + k}\n" for u in range(60) for k in range(10)]
    (work / "events.csv").write_text("user,item,time\n" + "".join(rows))
    monkeypatch.chdir(work)
    assert main(["train", "--set", "data.dataset=events.csv", "--set", "model.d=16", "--set", "data.max_len=10",
                 "--set", "train.epochs=1", "--set", "eval.exclude_seen=false", "--name", "ev", "--no-progress"]) == 0
    meta = json.loads((work / "runs" / "ev-s0" / "config.json").read_text())
    assert meta["run"]["data"]["path"] == str(work / "events.csv")
    [f] = meta["data_fingerprint"]["files"]
    assert f["size"] == (work / "events.csv").stat().st_size and len(f["sha256"]) == 64
    monkeypatch.chdir(elsewhere)
    run = str(work / "runs" / "ev-s0")
    capsys.readouterr()
    assert main(["evaluate", run]) == 0
    assert json.loads(capsys.readouterr().out)["n_users"] == 60
    (work / "events.csv").rename(work / "moved.csv")
    assert main(["evaluate", run]) == 2
    err = capsys.readouterr().err
    assert str(work / "events.csv") in err and "moved" in err
    (work / "moved.csv").write_text("user,item,time\n" + "".join(rows[:-1]))
    (work / "moved.csv").rename(work / "events.csv")
    assert main(["predict", run, "--out", "x.csv"]) == 2
    assert "changed" in capsys.readouterr().err


def test_readers_never_delete_or_rename(tiny, tmp_path):
    """evaluate/predict may read a run while it trains: a reader must not touch a writer's
    temp files or journal (only writers recover)."""
    out = tmp_path / "run"
    fit(_cfg(epochs=1), tiny, out_dir=out, progress=False, log=_quiet)
    (out / "last.safetensors.tmp").write_bytes(b"a writer's file")
    (out / ".commit.json").write_text('["last.safetensors"]')
    checkpoint.load_model(out)
    assert (out / "last.safetensors.tmp").read_bytes() == b"a writer's file" and (out / ".commit.json").exists()


def test_a_diverged_epoch_stops_the_run_with_the_best_weights(tiny, tmp_path, monkeypatch):
    import perseq.train as train
    from perseq.evaluate import ScoresNaN, evaluate

    calls = []

    def nan_at_third_validation(model, split, stage, *a, **k):
        if stage == "valid":
            calls.append(1)
            if len(calls) == 3:
                raise ScoresNaN("the model scored NaN")
        return evaluate(model, split, stage, *a, **k)

    monkeypatch.setattr(train, "evaluate", nan_at_third_validation)
    r = fit(_cfg(epochs=6), tiny, out_dir=tmp_path / "run", progress=False, log=_quiet)
    saved = (tmp_path / "run" / "results.json").read_text()
    assert r["epochs"] == 3 and r["best_epoch"] in (1, 2) and "valid" not in r["history"][2]
    assert "NaN" not in saved and "Infinity" not in saved
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["diverged_at"] == 3


def test_an_automatic_thread_count_is_kept_when_the_run_resumes(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSEQ_THREADS", "1")
    hits = []

    def stop_after_epoch_one(op):
        if op == "done" and (tmp_path / "run" / "trainer_state.json").exists():
            hits.append(op)
            raise Crash

    cfg = _cfg(threads=None)
    monkeypatch.setattr(checkpoint, "crash_hook", stop_after_epoch_one)
    with pytest.raises(Crash):
        fit(cfg, tiny, out_dir=tmp_path / "run", progress=False, log=_quiet)
    monkeypatch.setattr(checkpoint, "crash_hook", None)
    monkeypatch.setenv("PERSEQ_THREADS", "2")
    logs, before = [], torch.get_num_threads()
    try:
        fit(cfg, tiny, out_dir=tmp_path / "run", resume=True, progress=False, log=logs.append)
        assert "threads: 1 (as requested)" in logs and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_overwrite_deletes_the_run_and_keeps_the_users_own_files(tmp_path, capsys):
    assert _train(tmp_path, "--name", "r") == 0
    (tmp_path / "r-s0" / "notes.txt").write_text("mine")
    assert _train(tmp_path, "--name", "r", "--overwrite") == 0
    assert (tmp_path / "r-s0" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "r-s0" / "model.safetensors").exists()


def test_a_damaged_results_file_does_not_block_resuming(finished_run, tmp_path, capsys):
    run = tmp_path / "r-s0"
    shutil.copytree(finished_run, run)
    (run / "results.json").write_text("{")
    assert _train(tmp_path, "--name", "r", "--resume") == 0
    assert json.loads((run / "results.json").read_text())["test"]


def test_evaluating_a_run_before_its_first_epoch_ends_says_to_resume(tiny, tmp_path, monkeypatch):
    def crash_at_first_state(op):
        if op == "done" and (tmp_path / "run" / "trainer_state.json").exists():
            raise Crash

    monkeypatch.setattr(checkpoint, "crash_hook", crash_at_first_state)
    with pytest.raises(Crash):
        fit(_cfg(checkpoint_minutes=1e-9), tiny, out_dir=tmp_path / "run", progress=False, log=_quiet)
    monkeypatch.setattr(checkpoint, "crash_hook", None)
    with pytest.raises(checkpoint.RunFolderError, match="no epoch of this run has finished.*--resume"):
        checkpoint.load_model(tmp_path / "run")
