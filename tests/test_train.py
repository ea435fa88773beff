import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from perseq.checkpoint import load_model
from perseq.config import from_dict
from perseq.losses import LossConfig
from perseq.data.sequences import leave_one_out
from perseq.data.synthetic import make_synthetic
from perseq.evaluate import EvalConfig, evaluate
from perseq.train import fit

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def small():
    data, gen = make_synthetic(n_users=400, n_items=80, n_clusters=8, mean_len=25, max_len=80, seed=1)
    return data, gen, leave_one_out(data)


def _cfg(**train):
    return from_dict({
        "model": {"name": "sasrec", "d": 32},
        "data": {"max_len": 30},
        "train": {"epochs": 4, "batch_size": 64, "lr": 3e-3, "seed": 0, **train},
        "eval": {"exclude_seen": False},
    })


def _model_cfg(epochs, **model):
    """_cfg with ``model`` (a name and its settings) in place of the SASRec default."""
    c = _cfg(epochs=epochs)
    c.model.clear()
    c.model.update(model)
    return c


def test_sasrec_learns_the_synthetic_pattern(small):
    """A small SASRec must recover at least half of the Bayes-optimal NDCG@10 and beat a
    popularity ranker by a wide margin."""
    data, gen, split = small
    r = fit(_cfg(epochs=25, patience=5), split, progress=False, log=lambda s: None)
    ceiling = gen.bayes_ceiling(data, split.test_pos)
    counts = torch.zeros(data.n_items + 1)
    counts.index_add_(0, torch.from_numpy(data.items.astype("int64")), torch.ones(len(data.items)))

    class Pop(torch.nn.Module):
        max_input_len = 30

        def scores(self, items, lengths, times=None, target_time=None):
            s = counts.expand(len(items), -1).clone()
            s[:, 0] = float("-inf")
            return s

    pop = evaluate(Pop(), split, "test", EvalConfig(exclude_seen=False))
    assert r["test"]["ndcg@10"] >= 0.5 * ceiling["ndcg@10"], (r["test"], ceiling)
    assert r["test"]["ndcg@10"] >= 2 * pop["ndcg@10"], (r["test"], pop)


def test_resumed_run_ends_with_the_same_metrics(small, tmp_path):
    _, _, split = small
    full = fit(_cfg(), split, out_dir=tmp_path / "full", progress=False, log=lambda s: None)

    class Interrupt(Exception):
        pass

    def stop_after_two(msg):
        if msg.startswith("epoch 2:"):
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(_cfg(), split, out_dir=tmp_path / "cut", progress=False, log=stop_after_two)
    resumed = fit(_cfg(), split, out_dir=tmp_path / "cut", resume=True, progress=False, log=lambda s: None)
    assert resumed["test"] == full["test"]
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]


def test_results_name_the_threads_each_epoch_trained_with_and_recollection_keeps_them(small, tmp_path):
    """A run resumed at another thread count names both settings; re-evaluating a finished
    run at another setting (what benchmarks/campaign.py does to a seed restored into runs/)
    changes neither its config.json's threads nor its results' hardware."""
    from perseq.report import hardware_name

    _, _, split = small
    before = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        torch.set_num_threads(1)
        hw1 = hardware_name()
        torch.set_num_threads(2)
        hw2 = hardware_name()
        fit(_cfg(epochs=1, threads=1), split, out_dir=out, progress=False, log=lambda s: None)
        r = fit(_cfg(epochs=2, threads=2), split, out_dir=out, resume=True, progress=False, log=lambda s: None)
        assert [h["hardware"] for h in r["history"]] == [hw1, hw2]
        assert r["hardware"] == f"{hw1} + {hw2}"

        again = fit(_cfg(epochs=2, threads=1), split, out_dir=out, resume=True, progress=False, log=lambda s: None)
        assert again["test"] == r["test"] and again["hardware"] == r["hardware"]
        assert json.loads((out / "config.json").read_text())["run"]["train"]["threads"] == 2
        assert json.loads((out / "results.json").read_text())["hardware"] == r["hardware"]

        # a folder from before epochs carried their hardware: its results.json's name stands
        st = json.loads((out / "trainer_state.json").read_text())
        for h in st["history"]:
            del h["hardware"]
        (out / "trainer_state.json").write_text(json.dumps(st))
        res = json.loads((out / "results.json").read_text())
        (out / "results.json").write_text(json.dumps({**res, "hardware": "CPU: an older machine"}))
        old = fit(_cfg(epochs=2, threads=1), split, out_dir=out, resume=True, progress=False, log=lambda s: None)
        assert old["hardware"] == "CPU: an older machine"
    finally:
        torch.set_num_threads(before)


def test_checkpoint_loads_and_scores_identically(small, tmp_path):
    _, _, split = small
    r = fit(_cfg(epochs=2), split, out_dir=tmp_path / "run", progress=False, log=lambda s: None)
    model, meta, items = load_model(tmp_path / "run")
    assert meta["run"]["model"]["name"] == "sasrec" and items[0] == "[PAD]"
    again = evaluate(model, split, "test", _cfg().eval)
    assert again["ndcg@10"] == r["test"]["ndcg@10"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_equals_one_process(tmp_path):
    """torchrun with 2 CPU processes and per-rank batch 16 == 1 process with batch 32."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(HERE / "ddp_worker.py"), str(tmp_path / "ddp"), "16"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    p1 = subprocess.run([sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path / "one"), "32"], capture_output=True, text=True, timeout=300)
    assert p1.returncode == 0, p1.stderr[-3000:]
    a, b = load_file(str(tmp_path / "ddp.safetensors")), load_file(str(tmp_path / "one.safetensors"))
    for k in a:
        # summation order differs between 1 and 2 processes (float32 rounding, ~1e-7), which
        # Adam's normalization can amplify in weights with tiny gradients over 3 epochs
        assert torch.allclose(a[k], b[k], atol=2e-4), (k, (a[k] - b[k]).abs().max())
    ja, jb = json.load(open(tmp_path / "ddp.json")), json.load(open(tmp_path / "one.json"))
    for x, y in zip(ja["history"], jb["history"]):
        assert abs(x["loss"] - y["loss"]) < 1e-5
    assert abs(ja["test"]["ndcg@10"] - jb["test"]["ndcg@10"]) < 1e-6


def test_resume_refuses_a_folder_trained_with_another_config(small, tmp_path):
    _, _, split = small
    fit(_cfg(epochs=1), split, out_dir=tmp_path / "run", progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="train.lr"):
        fit(_cfg(epochs=2, lr=1e-2), split, out_dir=tmp_path / "run", resume=True, progress=False, log=lambda s: None)
    # more epochs is a legitimate continuation
    r = fit(_cfg(epochs=2), split, out_dir=tmp_path / "run", resume=True, progress=False, log=lambda s: None)
    assert r["epochs"] == 2


def test_resume_compares_keys_missing_from_an_older_run_at_their_defaults(small, tmp_path):
    """A run folder written before a key existed (here loss.negatives, and the tuple-valued
    train.betas) resumes when the current value is the default, and refuses when it is not;
    a model key written out at its default is the same model."""
    _, _, split = small
    out = tmp_path / "run"
    fit(_cfg(epochs=1), split, out_dir=out, progress=False, log=lambda s: None)
    meta = json.loads((out / "config.json").read_text())
    del meta["run"]["loss"]["negatives"]  # as saved by an older perseq
    del meta["run"]["train"]["betas"]
    (out / "config.json").write_text(json.dumps(meta))
    cfg = _cfg(epochs=2)
    cfg.model["dropout"] = 0.2  # SASRec's default, now written out explicitly
    assert fit(cfg, split, out_dir=out, resume=True, progress=False, log=lambda s: None)["epochs"] == 2
    cfg = dataclasses.replace(_cfg(epochs=3), loss=LossConfig(negatives="per_row"))
    with pytest.raises(ValueError, match="loss.negatives: 'shared' -> 'per_row'"):
        fit(cfg, split, out_dir=out, resume=True, progress=False, log=lambda s: None)


def test_hstu_folder_saved_before_abs_pos_loads_and_resumes_as_it_was_trained(small, tmp_path):
    """HSTU gained a position table (abs_pos, default on) after runs were saved without the
    key: such a folder must load and resume as the model it trained (no table)."""
    _, _, split = small
    out = tmp_path / "run"

    def cfg(epochs, **model):
        return _model_cfg(epochs, name="hstu", d=16, time_bias=False, **model)

    fit(cfg(1, abs_pos=False), split, out_dir=out, progress=False, log=lambda s: None)
    meta = json.loads((out / "config.json").read_text())
    del meta["model_config"]["abs_pos"], meta["run"]["model"]["abs_pos"]  # as written before the key existed
    (out / "config.json").write_text(json.dumps(meta))
    model, _, _ = load_model(out)
    assert model.pos_emb is None
    assert fit(cfg(2, abs_pos=False), split, out_dir=out, resume=True, progress=False, log=lambda s: None)["epochs"] == 2
    with pytest.raises(ValueError, match="model.abs_pos: False -> True"):
        fit(cfg(3), split, out_dir=out, resume=True, progress=False, log=lambda s: None)


def test_refit_split_moves_validation_into_training_and_never_the_test(small):
    from perseq.data.batching import TrainWindows
    from perseq.train import refit_split

    data, _, split = small
    r = refit_split(split)
    ev = split.valid_pos >= 0
    assert (r.train_len[ev] == split.test_pos[ev]).all()
    assert (r.train_len[~ev] == split.train_len[~ev]).all()
    assert (r.test_pos == split.test_pos).all()
    # the targets of the refit windows: the old training targets plus every validation event
    # (target counts per item), and none of the test events
    def target_counts(s):
        w = TrainWindows(s, 30)
        b = w.make_batch(np.arange(len(w)))
        t = b.targets[b.targets > 0]
        return torch.bincount(t, minlength=data.n_items + 1)
    start = data.offsets[:-1]
    valid_items = torch.from_numpy(data.items[(start + split.valid_pos)[ev]].astype("int64"))
    expected = target_counts(split) + torch.bincount(valid_items, minlength=data.n_items + 1)
    assert torch.equal(target_counts(r), expected)


def test_refit_retrains_for_the_best_epoch_count_and_can_be_added_to_a_finished_run(small, tmp_path):
    _, _, split = small
    first = fit(_cfg(epochs=3), split, out_dir=tmp_path / "run", progress=False, log=lambda s: None)
    assert "refit" not in first
    again = fit(_cfg(epochs=3, refit=True), split, out_dir=tmp_path / "run", resume=True, progress=False, log=lambda s: None)
    # the early-stopped phase is not retrained: same history and test metrics
    assert again["history"] == first["history"] and again["test"] == first["test"]
    refit = json.loads((tmp_path / "run" / "refit" / "results.json").read_text())
    assert again["refit"]["epochs"] == first["best_epoch"] == len(refit["history"])
    assert again["refit"]["test"] == refit["test"]
    assert refit["n_train_targets"] == first["n_train_targets"] + int((split.valid_pos >= 0).sum())


def test_refit_refuses_a_temporal_split_before_training(small):
    from perseq.data.sequences import Split
    from perseq.train import refit_split

    _, _, split = small
    temporal = Split(split.data, split.train_len, split.valid_pos, split.test_pos, kind="temporal")
    with pytest.raises(ValueError, match="leave_one_out"):
        refit_split(temporal)
    logged = []
    with pytest.raises(ValueError, match="leave_one_out"):
        fit(_cfg(epochs=2, refit=True), temporal, progress=False, log=logged.append)
    assert logged == []  # refused up front: not one epoch trained


def test_refit_starts_over_when_the_best_epoch_moves(small, tmp_path):
    _, _, split = small
    first = fit(_cfg(epochs=1, refit=True), split, out_dir=tmp_path / "run", progress=False, log=lambda s: None)
    assert first["refit"]["epochs"] == 1
    # more epochs for the main phase: a later epoch wins, and the refit follows it
    more = fit(_cfg(epochs=4, refit=True), split, out_dir=tmp_path / "run", resume=True, progress=False, log=lambda s: None)
    assert more["best_epoch"] > 1
    refit = json.loads((tmp_path / "run" / "refit" / "results.json").read_text())
    assert more["refit"]["epochs"] == more["best_epoch"] == len(refit["history"])


def test_refit_only_trains_every_event_but_the_test_for_a_fixed_epoch_count(small, tmp_path):
    from perseq.report import write_benchmark_json
    from perseq.train import refit_split

    _, _, split = small
    quiet = dict(progress=False, log=lambda s: None)
    cfg = _cfg(epochs=50, refit=True, refit_epochs=2)
    only = fit(cfg, split, out_dir=tmp_path / "only", **quiet)
    # exactly the model that trains on the refit split for 2 epochs with nothing selected
    direct = fit(_cfg(epochs=2, eval_every=2, patience=3), refit_split(split), **quiet)
    assert only["test"] == direct["test"] and len(only["history"]) == 2
    saved = json.loads((tmp_path / "only" / "results.json").read_text())
    assert saved["refit"] == {"epochs": 2, "test": only["test"], "epoch_seconds": only["epoch_seconds"], "only": True}
    assert saved["valid"] is None  # the validation events were training data
    # config.json: the phase's config under "run" (what resuming checks), the config as given
    # under "requested", and the latter trains the same run again
    meta = json.loads((tmp_path / "only" / "config.json").read_text())
    assert meta["run"]["train"]["refit"] is False and meta["run"]["train"]["epochs"] == 2
    assert meta["requested"] == json.loads(cfg.to_json())
    from perseq.config import from_dict

    assert fit(from_dict(meta["requested"]), split, **quiet)["test"] == only["test"]
    # resuming a finished refit-only run trains nothing more
    again = fit(cfg, split, out_dir=tmp_path / "only", resume=True, **quiet)
    assert again["test"] == only["test"] and again["history"] == only["history"]
    # its result file has one protocol: no early-stopped metrics, the fixed epoch count named
    bench = json.loads(write_benchmark_json("syn-only", cfg, [only], out_dir=tmp_path).read_text())
    assert bench["protocol"]["refit_epochs"] == 2 and "metrics_before_refit" not in bench
    assert bench["metrics"]["ndcg@10"]["values"] == [only["test"]["ndcg@10"]]
    # and so has the one `perseq bench collect` writes from the run folder, whose config.json
    # holds the single phase's config (refit off)
    from perseq.bench import collect

    collect.main(["--name", "syn-only-collected", "--out-dir", str(tmp_path), str(tmp_path / "only")])
    collected = json.loads((tmp_path / "syn-only-collected.json").read_text())
    assert collected["protocol"]["refit"] is True and collected["protocol"]["refit_epochs"] == 2
    assert collected["metrics"]["ndcg@10"]["values"] == [only["test"]["ndcg@10"]]
    normal = fit(_cfg(epochs=1, refit=True), split, out_dir=tmp_path / "normal", **quiet)
    with pytest.raises(ValueError, match="two protocols"):
        write_benchmark_json("mixed", cfg, [only, normal], out_dir=tmp_path)
    # a folder with an early-stopping phase is never overwritten by a refit-only resume
    with pytest.raises(ValueError, match="refit-only run of 2 epochs"):
        fit(cfg, split, out_dir=tmp_path / "normal", resume=True, **quiet)
    with pytest.raises(ValueError, match="needs train.refit: true"):
        fit(_cfg(refit_epochs=2), split, **quiet)


def test_folder_saved_before_an_off_by_default_option_resumes(small, tmp_path):
    """BERT4Rec gained last_only_prob (default 0 = the old training) after runs were saved
    without it: such a folder resumes under today's config, and only a real change refuses."""
    _, _, split = small
    out = tmp_path / "run"

    def cfg(epochs, **model):
        return _model_cfg(epochs, name="bert4rec", d=16, n_heads=1, **model)

    fit(cfg(1), split, out_dir=out, progress=False, log=lambda s: None)
    meta = json.loads((out / "config.json").read_text())
    del meta["model_config"]["last_only_prob"]  # as written before the key existed
    meta["run"]["model"].pop("last_only_prob", None)
    (out / "config.json").write_text(json.dumps(meta))
    assert fit(cfg(2), split, out_dir=out, resume=True, progress=False, log=lambda s: None)["epochs"] == 2
    with pytest.raises(ValueError, match="model.last_only_prob: 0.0 -> 0.1"):
        fit(cfg(3, last_only_prob=0.1), split, out_dir=out, resume=True, progress=False, log=lambda s: None)


def test_monitor_test_records_every_epoch_and_changes_nothing_it_must_not(small, tmp_path):
    _, _, split = small
    quiet = dict(progress=False, log=lambda s: None)
    plain = fit(_cfg(epochs=3), split, **quiet)
    mon_cfg = dataclasses.replace(_cfg(epochs=3), eval=dataclasses.replace(_cfg().eval, monitor_test=True))
    watched = fit(mon_cfg, split, **quiet)
    # the same training, selection and reported test: monitoring draws no randomness and
    # nothing reads it back
    assert watched["test"] == plain["test"] and watched["best_epoch"] == plain["best_epoch"]
    assert [r["loss"] for r in watched["history"]] == [r["loss"] for r in plain["history"]]
    assert all("test_monitor" not in r for r in plain["history"])
    peeks = [r["test_monitor"]["ndcg@10"] for r in watched["history"]]
    assert len(peeks) == 3
    # the record at the selected epoch is the test of the weights that were kept
    assert peeks[watched["best_epoch"] - 1] == pytest.approx(watched["test"]["ndcg@10"], abs=1e-12)
    # a refit-only run monitors each of its epochs too, and its last record is its test
    only = fit(dataclasses.replace(mon_cfg, train=dataclasses.replace(mon_cfg.train, refit=True, refit_epochs=2)), split,
               out_dir=tmp_path / "only", **quiet)
    assert len(only["history"]) == 2 and only["history"][-1]["test_monitor"]["ndcg@10"] == pytest.approx(
        only["test"]["ndcg@10"], abs=1e-12)
    # switching the monitor off (or on) for a resumption is allowed: it only adds records
    again = fit(dataclasses.replace(_cfg(epochs=3), train=dataclasses.replace(_cfg().train, refit=True, refit_epochs=2)),
                split, out_dir=tmp_path / "only", resume=True, **quiet)
    assert again["test"] == only["test"] and again["history"] == only["history"]
