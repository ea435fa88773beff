"""benchmarks/campaign.py: a queue of `perseq train` runs that resumes and collects finished configs."""
import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("campaign", ROOT / "benchmarks" / "campaign.py")
campaign = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(campaign)

TINY = ["--set", "data.synthetic={n_users: 120, n_items: 30, n_clusters: 3, mean_len: 10, max_len: 30}",
        "--set", "data.max_len=16", "--set", "model.d=16", "--set", "train.epochs=2"]


def test_campaign_runs_resumes_and_collects(tmp_path, capsys):
    out, logs, results, keep = tmp_path / "runs", tmp_path / "logs", tmp_path / "results", tmp_path / "keep"
    config = ROOT / "configs" / "synthetic" / "sasrec.yaml"
    args = [str(config), "--seeds", "0,1", "--jobs", "2", "--out", str(out), "--logs", str(logs),
            "--results", str(results), "--keep", str(keep), *TINY]
    assert campaign.main(args) == 0
    runs = [out / f"synthetic-sasrec-s{s}" for s in (0, 1)]
    per_seed = [json.loads((d / "results.json").read_text()) for d in runs]
    collected = json.loads((results / "synthetic_sasrec.json").read_text())
    assert collected["seeds"] == [0, 1]
    assert collected["metrics"]["ndcg@10"]["values"] == [r["test"]["ndcg@10"] for r in per_seed]
    assert all((logs / f"synthetic-sasrec-s{s}.log").stat().st_size > 0 for s in (0, 1))

    # a second campaign over finished runs trains nothing: the weights are not rewritten
    stamps = [(d / "model.safetensors").stat().st_mtime_ns for d in runs]
    assert campaign.main(args) == 0
    assert [(d / "model.safetensors").stat().st_mtime_ns for d in runs] == stamps
    assert "resumed from" in (logs / "synthetic-sasrec-s0.log").read_text()

    # a later session whose checkout has no runs/ restores the kept result files (no checkpoints
    # are kept) instead of training again, and collects the same row
    assert sorted(p.name for p in (keep / "synthetic-sasrec-s0").iterdir()) == ["config.json", "results.json"]
    shutil.rmtree(out)
    (results / "synthetic_sasrec.json").unlink()
    capsys.readouterr()
    assert campaign.main(args) == 0
    assert "restored synthetic-sasrec-s1" in capsys.readouterr().out
    assert not (runs[0] / "model.safetensors").exists()
    assert json.loads((results / "synthetic_sasrec.json").read_text())["metrics"] == collected["metrics"]

    # a run that fails is reported, the exit status says so, and its config is not collected
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("name: sasrec", "name: no-such-model"))
    capsys.readouterr()
    assert campaign.main([str(bad), "--seeds", "0", "--jobs", "1", "--out", str(out), "--logs", str(logs),
                          "--results", str(results), "--keep", str(keep), *TINY]) == 1
    printed = capsys.readouterr().out
    assert "FAILED (exit" in printed and "failed: synthetic-bad-s0" in printed
    assert not (results / "synthetic_bad.json").exists()


def test_render_writes_one_row_per_protocol(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("render", ROOT / "benchmarks" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    m = {k: {"mean": 0.5, "std": 0.0} for k in render.KEYS}
    before = {k: {"mean": 0.25, "std": 0.0} for k in render.KEYS}
    base = {"dataset": "d", "model": "m", "seeds": [0], "epoch_seconds": 1.0, "best_epochs": [3], "metrics": m}
    files = {"plain": {**base, "protocol": {"exclude_seen": True, "refit": False}},
             "refit": {**base, "protocol": {"exclude_seen": True, "refit": True}, "metrics_before_refit": before},
             "only": {**base, "protocol": {"exclude_seen": True, "refit": True, "refit_epochs": 101}}}
    for name, payload in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
    capsys.readouterr()
    render.main([str(tmp_path / f"{n}.json") for n in files])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| `")]
    cells = [[c.strip() for c in r.split("|")[1:-1]] for r in rows]
    assert [(c[0], c[5], c[6]) for c in cells] == [
        ("`plain`", "no", "0.5000 ± 0.0000"), ("`refit`", "no", "0.2500 ± 0.0000"),
        ("`refit`", "yes", "0.5000 ± 0.0000"), ("`only`", "only (101 epochs)", "0.5000 ± 0.0000")]
