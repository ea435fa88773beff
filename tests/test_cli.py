import csv
import json
from pathlib import Path

import numpy as np
import pytest

from perseq.cli import main
from perseq.report import hardware_of

SMALL = ["--set", "data.synthetic={n_users: 150, n_items: 40, n_clusters: 4, mean_len: 12, max_len: 40}",
         "--set", "data.max_len=20", "--set", "model.d=16", "--set", "train.epochs=2", "--set", "eval.exclude_seen=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *SMALL, "--out", str(out), "--no-progress", "--seeds", "0,1", "--name", "synthetic-sasrec"]) == 0
    return out


def test_train_writes_runs_for_each_seed(run_dir):
    for s in (0, 1):
        d = run_dir / f"synthetic-sasrec-s{s}"
        res = json.loads((d / "results.json").read_text())
        assert res["seed"] == s and 0 <= res["test"]["ndcg@10"] <= 1
        assert (d / "model.safetensors").exists() and (d / "vocab" / "items.parquet").exists()


def test_evaluate_reproduces_training_metrics(run_dir, capsys):
    d = run_dir / "synthetic-sasrec-s0"
    capsys.readouterr()
    assert main(["evaluate", str(d), "--breakdown"]) == 0
    out = json.loads(capsys.readouterr().out)
    res = json.loads((d / "results.json").read_text())
    assert out["ndcg@10"] == res["test"]["ndcg@10"]
    assert "head" in out["breakdown"] and sum(v["n_users"] for k, v in out["breakdown"].items() if k.startswith("len")) == out["n_users"]


def test_predict_writes_ranked_raw_ids(run_dir, tmp_path):
    d = run_dir / "synthetic-sasrec-s0"
    out = tmp_path / "top.csv"
    assert main(["predict", str(d), "--out", str(out), "--k", "5"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["user_id", "rank", "item_id", "score"]
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user_id"], []).append(r)
    for user, rs in by_user.items():
        assert [int(r["rank"]) for r in rs] == [1, 2, 3, 4, 5]
        scores = [float(r["score"]) for r in rs]
        assert scores == sorted(scores, reverse=True)
        assert user.startswith("u") and all(r["item_id"].startswith("i") for r in rs)
        assert len({r["item_id"] for r in rs}) == 5
    # default excludes seen items: no recommendation may already be in the user's test input
    from perseq.checkpoint import load_model
    from perseq.cli import _rebuild_split

    _, meta, _ = load_model(d)
    _, split = _rebuild_split(meta)
    data = split.data
    uid = {u: i for i, u in enumerate(data.user_ids)}
    for user, rs in list(by_user.items())[:30]:
        u = uid[user]
        seen = set(data.item_ids[data.seq(u)[: split.test_pos[u]]])
        assert not seen & {r["item_id"] for r in rs}


def test_bad_config_is_one_clear_line(capsys, tmp_path):
    assert main(["train", "--set", "train.lerning_rate=1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key(s) ['lerning_rate']") and "Traceback" not in err


def test_unknown_dataset_lists_names(capsys, tmp_path):
    assert main(["train", "--set", "data.dataset=nope", "--out", str(tmp_path)]) == 2
    assert "ml-1m" in capsys.readouterr().err


def test_data_stats_on_shared_beauty(shared_datasets, capsys):
    capsys.readouterr()
    assert main(["data", "stats", "amazon-beauty"]) == 0
    out = capsys.readouterr().out
    stats = json.loads(out[out.index("{"):])
    assert (stats["users"], stats["items"], stats["interactions"]) == (22363, 12101, 198502)


def test_data_prepare_roundtrip(tmp_path, capsys):
    f = tmp_path / "log.csv"
    f.write_text("u,i,t\na,x,3\na,y,1\nb,x,2\nb,z,5\nb,y,9\n")
    out = tmp_path / "prep"
    assert main(["data", "prepare", "--path", str(f), "--format", "table", "--out", str(out)]) == 2
    assert "column mapping" in capsys.readouterr().err
    assert main(["data", "prepare", "--path", str(f), "--format", "table", "--columns", "user=u,item=i,time=t", "--out", str(out)]) == 0
    from perseq.data.sequences import SequenceData

    d = SequenceData.load(out)
    assert [d.item_ids[i] for i in d.seq(0)] == ["y", "x"]  # sorted by time
    assert np.array_equal(d.lengths, [2, 3]) and list(d.user_ids) == ["a", "b"]


def test_bench_collect_writes_mean_and_std_over_seeds(run_dir, tmp_path):
    runs = [str(run_dir / f"synthetic-sasrec-s{s}") for s in (0, 1)]
    assert main(["bench", "collect", "--name", "syn", "--out-dir", str(tmp_path), *runs]) == 0
    out = json.loads((tmp_path / "syn.json").read_text())
    vals = [json.loads((run_dir / f"synthetic-sasrec-s{s}" / "results.json").read_text())["test"]["ndcg@10"] for s in (0, 1)]
    assert out["seeds"] == [0, 1] and out["dataset"] == "synthetic" and out["model"] == "sasrec"
    assert out["protocol"] == {**out["protocol"], "split": "leave_one_out", "ranking": "full", "exclude_seen": False}
    assert abs(out["metrics"]["ndcg@10"]["mean"] - np.mean(vals)) < 1e-12
    assert abs(out["metrics"]["ndcg@10"]["std"] - np.std(vals, ddof=1)) < 1e-12
    for key in ("hr@10", "ndcg@50", "hr@50", "mrr"):
        assert key in out["metrics"]
    hw = {json.loads((run_dir / f"synthetic-sasrec-s{s}" / "results.json").read_text())["hardware"] for s in (0, 1)}
    assert out["epoch_seconds"] > 0 and hw == {out["hardware"]} and out["commit"]
    assert hardware_of([{"hardware": "A"}, {"hardware": "A + B"}, {"hardware": "B"}]) == "A + B"
    assert set(out["breakdown"]) >= {"head", "tail"}
    heads = [json.loads((run_dir / f"synthetic-sasrec-s{s}" / "results.json").read_text())["test"]["breakdown"]["head"]["ndcg@10"] for s in (0, 1)]
    assert abs(out["breakdown"]["head"]["ndcg@10"] - np.mean(heads)) < 1e-12


def test_bench_collect_adds_the_seeds_of_an_earlier_result_file(run_dir, tmp_path, capsys):
    """Seed 0 collected alone into a file, then that file plus seed 1's run folder: the same
    row as both run folders collected together (metrics, best epochs, breakdown means)."""
    s0, s1 = (str(run_dir / f"synthetic-sasrec-s{s}") for s in (0, 1))
    assert main(["bench", "collect", "--name", "both", "--out-dir", str(tmp_path), s0, s1]) == 0
    assert main(["bench", "collect", "--name", "first", "--out-dir", str(tmp_path), s0]) == 0
    first = str(tmp_path / "first.json")
    assert main(["bench", "collect", "--name", "merged", "--out-dir", str(tmp_path), "--earlier", first, s1]) == 0
    both, merged = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("both", "merged"))
    assert merged["seeds"] == [0, 1] and merged["best_epochs"] == both["best_epochs"]
    for k, v in both["metrics"].items():
        assert np.allclose(merged["metrics"][k]["values"], v["values"], rtol=0, atol=1e-15), k
        assert abs(merged["metrics"][k]["std"] - v["std"]) < 1e-12
    for g, row in both["breakdown"].items():
        assert all(abs(merged["breakdown"][g][k] - row[k]) < 1e-12 for k in row), g
    # a seed counted twice, or a file of another configuration, is refused
    capsys.readouterr()
    with pytest.raises(SystemExit, match="seed appears twice"):
        main(["bench", "collect", "--name", "x", "--out-dir", str(tmp_path), "--earlier", first, s0])
    other = json.loads(Path(first).read_text())
    other["config"]["model"]["d"] = 999
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="differ in more than the seed"):
        main(["bench", "collect", "--name", "x", "--out-dir", str(tmp_path), "--earlier", str(tmp_path / "other.json"), s1])


def test_refit_via_resume_then_collect_reports_both_protocols(run_dir, tmp_path):
    import shutil

    work = tmp_path / "runs"  # a copy: the module's run folders stay as the other tests expect
    shutil.copytree(run_dir, work)
    # switch refit on for the finished runs: only the refit phase trains
    assert main(["train", *SMALL, "--set", "train.refit=true", "--out", str(work), "--no-progress", "--seeds", "0,1", "--resume",
                 "--name", "synthetic-sasrec"]) == 0
    runs = [work / f"synthetic-sasrec-s{s}" for s in (0, 1)]
    res = [json.loads((d / "results.json").read_text()) for d in runs]
    assert all((d / "refit" / "model.safetensors").exists() for d in runs)
    assert main(["bench", "collect", "--name", "syn-refit", "--out-dir", str(tmp_path), *map(str, runs)]) == 0
    out = json.loads((tmp_path / "syn-refit.json").read_text())
    assert out["protocol"]["refit"] is True
    assert out["metrics"]["ndcg@10"]["values"] == [r["refit"]["test"]["ndcg@10"] for r in res]
    assert out["metrics_before_refit"]["ndcg@10"]["values"] == [r["test"]["ndcg@10"] for r in res]


def test_bench_curves_writes_each_runs_validation_history(run_dir, tmp_path, capsys):
    runs = [run_dir / f"synthetic-sasrec-s{s}" for s in (0, 1)]
    out = tmp_path / "curves"
    capsys.readouterr()
    assert main(["bench", "curves", *map(str, runs), "--out", str(out), "--metric", "hr@10"]) == 0
    assert out.with_suffix(".png").stat().st_size > 10_000
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    for d in runs:
        hist = json.loads((d / "trainer_state.json").read_text())["history"]
        mine = [r for r in rows if r["run"] == d.name]
        assert [int(r["epoch"]) for r in mine] == [h["epoch"] for h in hist] == [1, 2]
        assert [float(r["hr@10"]) for r in mine] == pytest.approx([h["valid"]["hr@10"] for h in hist], abs=1e-6)
        # seconds are cumulative training time
        assert [float(r["seconds"]) for r in mine] == pytest.approx(np.cumsum([h["seconds"] for h in hist]), abs=0.051)
    assert "synthetic-sasrec-s1: 2 epochs (finished)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no validation metric 'ndcg@7'"):
        main(["bench", "curves", str(runs[0]), "--out", str(out), "--metric", "ndcg@7"])
    with pytest.raises(SystemExit, match="no trainer_state.json"):
        main(["bench", "curves", str(tmp_path), "--out", str(out)])


def test_git_commit_says_when_tracked_files_differ_from_it(tmp_path, monkeypatch):
    import subprocess

    from perseq.report import git_commit

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # even if TMPDIR lies in a repository
    assert git_commit() == "unknown"  # not a repository
    git = ["git", "-c", "user.email=t@example.org", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "a.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert git_commit() == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit() == head + "+dirty"
