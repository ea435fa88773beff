"""PCRec-simple (perseq.personalize): per-user adaptation at inference, checked in numbers."""
import pytest
import torch

from perseq.losses import softmax_ce
from perseq.models import build_model
from perseq.models.registry import MODELS
from perseq.ops import reference_ops
from perseq.personalize import AdaptConfig, PCRecSimple, Personalized
from perseq.personalize.scope import selected
from perseq.personalize.simple import adaptation_loss, next_item_targets

CAUSAL = sorted(n for n, cls in MODELS.items() if cls.objective == "causal")


def _users(n_items=40, B=6, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_items + 1, (B, T), generator=g)
    lengths = torch.tensor([T, 9, 1, 2, 13, 5][:B])
    for b in range(B):
        items[b, lengths[b]:] = 0
    return items, lengths


def _model(name, n_items=40, T=16, seed=0):
    torch.manual_seed(seed)
    return build_model(name, n_items, max_len=T).eval()


def _base_scores(model, items, lengths):
    with torch.no_grad():
        return model.scores(items, lengths)


def _close(a, b, tol):
    fin = torch.isfinite(a)
    assert torch.equal(fin, torch.isfinite(b))
    return (a[fin] - b[fin]).abs().max().item() <= tol


def test_next_item_targets_are_the_following_known_items():
    items = torch.tensor([[5, 6, 7, 0], [3, 0, 0, 0], [1, 2, 0, 0]])
    got = next_item_targets(items, torch.tensor([3, 1, 2]))
    assert got.tolist() == [[6, 7, 0, 0], [0, 0, 0, 0], [2, 0, 0, 0]]


def test_the_ce_objective_is_the_training_loss_on_one_user():
    torch.manual_seed(0)
    h, emb = torch.randn(7, 8), torch.randn(21, 8)
    y = torch.tensor([3, 0, 20, 1, 0, 7, 0])
    sel = y > 0
    want = softmax_ce(h[sel], y[sel], emb, temperature=0.5).item() / sel.sum().item()
    got = adaptation_loss(h, y, emb, AdaptConfig(temperature=0.5)).item()
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
@pytest.mark.parametrize("off", [AdaptConfig(steps=0, lr=0.1), AdaptConfig(steps=3, lr=0.0)])
def test_no_steps_or_a_zero_rate_is_no_adaptation(name, off, monkeypatch):
    m = _model(name)
    items, lengths = _users()
    base = _base_scores(m, items, lengths)
    assert not off.active  # the shortcut: the plain forward
    assert _close(Personalized(m, off).scores(items, lengths), base, 1e-5)
    # and through the adaptation loop itself (the per-user copies, the batched step, the
    # optimizer), with the shortcut switched off
    monkeypatch.setattr(AdaptConfig, "active", property(lambda self: True))
    assert _close(Personalized(m, off).scores(items, lengths), base, 1e-5)


@pytest.mark.parametrize("scope", ["all", "last_block", "bias", "lora:2"])
def test_adaptation_never_changes_the_trained_weights(scope):
    m = _model("sasrec")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    items, lengths = _users()
    Personalized(m, AdaptConfig(steps=2, lr=0.5, optimizer="adam", scope=scope)).scores(items, lengths)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not m.training


@pytest.mark.parametrize("name,cfg", [("sasrec", AdaptConfig(steps=2, lr=0.3)),
                                      ("hstu", AdaptConfig(steps=3, lr=0.05, optimizer="adam")),
                                      ("llama", AdaptConfig(steps=2, lr=0.3, scope="lora:4")),
                                      ("sasrec", AdaptConfig(steps=2, lr=0.3, objective="kl", scope="last_block"))])
def test_a_batch_of_users_adapts_as_each_user_alone(name, cfg):
    m = _model(name)
    items, lengths = _users()
    together = Personalized(m, cfg).scores(items, lengths)
    alone = torch.cat([Personalized(m, cfg).scores(items[u : u + 1], lengths[u : u + 1]) for u in range(len(items))])
    assert _close(together, alone, 1e-5)
    # and in another order, in other groupings
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    small = Personalized(m, AdaptConfig(**{**cfg.to_dict(), "users_per_batch": 4})).scores(items[perm], lengths[perm])
    assert _close(small, together[perm], 1e-5)


@pytest.mark.parametrize("name", CAUSAL)
def test_every_causal_model_adapts_and_lowers_each_users_own_loss(name):
    """One small SGD step goes down each user's own next-item loss (the gradient is right
    for every backbone), and the scores move only for users with something to learn from."""
    m = _model(name)
    items, lengths = _users()
    cfg = AdaptConfig(steps=1, lr=0.05)
    ad = PCRecSimple(m, cfg)
    targets = next_item_targets(items, lengths)
    with reference_ops():  # torch.func traces plain torch ops only
        before, after, expected = _losses_around_one_step(ad, cfg, items, lengths, targets)
    for u in range(len(items)):
        if lengths[u] >= 2:
            assert after[u] < before[u], (name, u, before[u], after[u])
        else:
            assert before[u] == after[u] == 0.0  # one event: no target, nothing to adapt to
    adapted = Personalized(m, cfg).scores(items, lengths)
    # the library's batched step (one backward through Σ_u L_u, its optimizer) lands where
    # θ0 - lr ∇L_u(θ0), taken user by user above, does: same scores
    assert _close(adapted[:, 1:], expected[:, 1:], 1e-5), name
    base = _base_scores(m, items, lengths)
    one_event = lengths == 1
    assert _close(adapted[one_event], base[one_event], 1e-5)
    assert not _close(adapted[~one_event], base[~one_event], 1e-3)


def _losses_around_one_step(ad, cfg, items, lengths, targets):
    """Each user's loss before and after one SGD step on that user's loss alone, and the
    scores (U, I + 1) that user's stepped parameters give."""
    before, after, scores = [], [], []
    for u in range(len(items)):
        args = (items[u], lengths[u], targets[u], None, None)
        g = torch.func.grad(ad._loss)(ad.theta0, *args)
        theta = {n: ad.theta0[n] - cfg.lr * g[n] for n in g}
        before.append(ad._loss(ad.theta0, *args).item())
        after.append(ad._loss(theta, *args).item())
        with torch.no_grad():
            scores.append(ad._table(theta) @ ad._last(theta, items[u], lengths[u], None, None))
    return before, after, torch.stack(scores)


def test_scopes_select_what_they_say():
    m = _model("sasrec")
    assert selected(m, "last_block") and all(n.startswith("blocks.1.") for n in selected(m, "last_block"))
    assert all(n.endswith("bias") for n in selected(m, "bias"))
    assert set(selected(m, "norms")) == {f"blocks.{b}.{ln}.{w}" for b in (0, 1) for ln in ("ln1", "ln2") for w in ("weight", "bias")} | (
        {"ln_f.weight", "ln_f.bias"} if "ln_f.weight" in dict(m.named_parameters()) else set())
    with pytest.raises(ValueError, match="selects no parameter of HSTU"):
        PCRecSimple(_model("hstu"), AdaptConfig(scope="norms"))
    with pytest.raises(ValueError, match="unknown adaptation scope"):
        AdaptConfig(scope="everything")


def test_a_cloze_model_is_refused():
    with pytest.raises(ValueError, match="causal models"):
        PCRecSimple(build_model("bert4rec", 40, max_len=16), AdaptConfig())


def test_adapt_chooses_on_validation_and_evaluate_predict_use_the_choice(tmp_path, capsys):
    import json

    from perseq.cli import main

    syn = ["--set", "data.synthetic={n_users: 120, n_items: 40, n_clusters: 4, mean_len: 14, max_len: 40, seed: 2}",
           "--set", "model.d=16", "--set", "data.max_len=20", "--set", "train.epochs=2", "--set", "eval.exclude_seen=false"]
    assert main(["train", *syn, "--out", str(tmp_path), "--name", "r", "--no-progress"]) == 0
    run = str(tmp_path / "r-s0")
    capsys.readouterr()
    assert main(["evaluate", run, "--adapt"]) == 2  # nothing stored yet, and no flags
    assert "perseq adapt" in capsys.readouterr().err
    assert main(["adapt", run, "--steps", "1,2", "--lr", "0.05", "--scope", "all,last_block"]) == 0
    stored = json.loads((tmp_path / "r-s0" / "adapt.json").read_text())
    rows = stored["rows"]
    assert len(rows) == 5 and rows[0]["adapt"] is None and stored["stage"] == "valid"
    best = max(rows, key=lambda r: r["ndcg@10"])
    assert stored["choice"]["steps"] == (best["adapt"]["steps"] if best["adapt"] else 0)
    if best["adapt"]:  # the whole grid point, not only its step count
        assert {k: stored["choice"][k] for k in best["adapt"]} == best["adapt"]
    # the stored choice is what --adapt uses: the same metrics as giving it by hand
    capsys.readouterr()
    assert main(["evaluate", run, "--adapt", "--stage", "valid"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ndcg@10"] == pytest.approx(best["ndcg@10"], abs=1e-6)
    c = stored["choice"]
    assert main(["evaluate", run, "--stage", "valid", "--adapt-steps", str(c["steps"]), "--adapt-lr", str(c["lr"]),
                 "--adapt-scope", c["scope"]]) == 0
    assert json.loads(capsys.readouterr().out)["ndcg@10"] == pytest.approx(got["ndcg@10"], abs=1e-6)
    assert main(["predict", run, "--adapt-steps", "1", "--adapt-lr", "0.05", "--out", str(tmp_path / "top.csv")]) == 0
    assert (tmp_path / "top.csv").read_text().startswith("user_id,rank,item_id,score")


def test_adapt_tunes_on_the_first_seed_applies_to_the_others_and_writes_one_benchmark_row(tmp_path, monkeypatch, capsys):
    import json

    from perseq.cli import main

    monkeypatch.chdir(tmp_path)
    syn = ["--set", "data.synthetic={n_users: 120, n_items: 40, n_clusters: 4, mean_len: 14, max_len: 40, seed: 2}",
           "--set", "model.d=16", "--set", "data.max_len=20", "--set", "train.epochs=2"]
    assert main(["train", *syn, "--name", "r", "--seeds", "0,1", "--no-progress"]) == 0
    runs = ["runs/r-s0", "runs/r-s1"]
    capsys.readouterr()
    assert main(["adapt", *runs, "--steps", "1", "--lr", "0.05", "--bench-name", "x"]) == 2  # needs --test
    assert "add --test" in capsys.readouterr().err
    import shutil  # and finished runs only: a copy of seed 0 without its results.json
    shutil.copytree(tmp_path / "runs/r-s0", tmp_path / "runs/r-s9", ignore=shutil.ignore_patterns("results.json"))
    assert main(["adapt", *runs, "runs/r-s9", "--test", "--bench-name", "x"]) == 2
    assert "needs finished runs; no results.json in runs/r-s9" in capsys.readouterr().err
    assert main(["adapt", *runs, "--steps", "1,2", "--lr", "0.05", "--test", "--bench-name", "x"]) == 0
    row = json.loads((tmp_path / "benchmarks" / "results" / "x.json").read_text())
    a0, a1 = (json.loads((tmp_path / r / "adapt.json").read_text()) for r in runs)
    assert a1["choice"] == a0["choice"] and a1["tuned_on"] == "runs/r-s0" and a1["rows"] == []  # no grid of its own
    assert len(a0["rows"]) == 3 and row["validation_grid"] == a0["rows"]
    assert row["model"] == "sasrec+pcrec-simple" and row["protocol"]["exclude_seen"] is True and row["seeds"] == [0, 1]
    for i, a in enumerate((a0, a1)):
        t = a["test_paired"]
        assert row["paired_gains"][i] == {"seed": i, **t["gain"]}
        assert row["metrics"]["ndcg@10"]["values"][i] == t["adapted"]["ndcg@10"]
        assert row["backbone_metrics"]["ndcg@10"]["values"][i] == t["plain"]["ndcg@10"]
        assert t["adapted"]["ndcg@10"] - t["plain"]["ndcg@10"] == pytest.approx(t["gain"]["mean"], abs=1e-12)
        assert t["gain"]["ci95"][0] <= t["gain"]["mean"] <= t["gain"]["ci95"][1]
    assert set(row["breakdown"]) >= {"head", "tail"} and set(row["backbone_breakdown"]) == set(row["breakdown"])
    capsys.readouterr()
    assert main(["adapt", *runs, "--steps", "1,2", "--lr", "0.05"]) == 0  # the same grid again: reused, not rerun
    assert "reusing the validation grid" in capsys.readouterr().out
    assert json.loads((tmp_path / runs[0] / "adapt.json").read_text())["rows"] == a0["rows"]


def test_the_bootstrap_interval_of_a_mean_difference_approaches_the_normal_one():
    import numpy as np

    from perseq.personalize.compare import bootstrap_ci

    rng = np.random.default_rng(0)
    diff = rng.normal(0.02, 0.1, 4000)
    lo, hi = bootstrap_ci(diff, n_boot=2000)
    se = diff.std() / np.sqrt(len(diff))  # the normal interval the bootstrap should approach
    assert lo < diff.mean() < hi
    assert abs(lo - (diff.mean() - 1.96 * se)) < 0.25 * se and abs(hi - (diff.mean() + 1.96 * se)) < 0.25 * se


def test_hstu_time_buckets_are_the_same_on_the_reference_line_and_batch_under_vmap():
    import warnings

    from perseq.models.hstu import time_buckets

    gaps = torch.tensor([[-5, 0, 1, 10, 1000, 86400, 10**9]])
    with reference_ops():
        ref = time_buckets(gaps)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a batching-rule fallback would warn
            batched = torch.vmap(time_buckets)(gaps.repeat(3, 1))
    assert torch.equal(ref, time_buckets(gaps)) and ref.tolist() == [[5, 0, 0, 7, 22, 37, 68]]
    assert torch.equal(batched, ref.repeat(3, 1))


def test_bench_adapt_times_both_paths_and_the_versus_model(tmp_path):
    import json

    from perseq.bench.adapt import main

    out = tmp_path / "a.json"
    main(["--model", "pcrec", "--versus", "hstu", "--lengths", "12", "--batch", "6", "--n-items", "30", "--repeat", "1",
          "--one-by-one", "3", "--scope", "last_block", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["versus"] == "hstu" and row["plain_ratio"] == pytest.approx(row["plain_alternating_ms"] / row["versus_plain_ms"])
    assert row["max_abs_diff_batched_vs_one"] <= 1e-5  # the batched and one-at-a-time scores agree
    assert row["speedup_batched"] == pytest.approx(row["adapted_one_by_one_ms"] / row["adapted_batched_ms"])
