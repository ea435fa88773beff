"""perseq.quickstart on a small synthetic config: the result's structure, the table beside
the generator's own Bayes ceiling, replaced run folders, and the CLI's demo names."""
import json

import pytest

from perseq.cli import build_parser
from perseq.data.sequences import leave_one_out
from perseq.data.synthetic import make_synthetic
from perseq.quickstart import DEMOS, MODELS, model_config, run_quickstart

# n_items above the table's largest k (50): bayes_ceiling sums the k most likely items
SMALL = {"n_users": 150, "n_items": 60, "n_clusters": 4, "mean_len": 12, "max_len": 40, "seed": 3}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    lines = []
    r = run_quickstart(epochs=3, out=str(out), log=lines.append, synthetic=SMALL, threads=1)
    return r, lines, out


def test_result_structure_and_table_with_the_ceiling(small_run):
    r, lines, out = small_run
    data, gen = make_synthetic(**SMALL)
    ceiling = gen.bayes_ceiling(data, leave_one_out(data).test_pos)
    assert r["ceiling"] == ceiling
    assert [row["name"].split()[0] for row in r["rows"]] == [*MODELS, "Bayes-optimal"]
    assert r["rows"][-1] == {"name": "Bayes-optimal ceiling", **ceiling}
    for name in MODELS:
        m = r["models"][name]
        assert 1 <= m["best_epoch"] <= m["epochs"] <= 3
        assert 0.0 <= m["test"]["ndcg@10"] <= m["test"]["hr@10"] <= 1.0
        assert m["test"]["n_users"] == data.n_users and m["test"]["exclude_seen"] is False
        assert f"{name} (epoch {m['best_epoch']} of {m['epochs']})" in [row["name"] for row in r["rows"]]
        assert json.loads((out / name / "results.json").read_text())["test"]["ndcg@10"] == m["test"]["ndcg@10"]
    table = "\n".join(lines)
    assert f"| Bayes-optimal ceiling | {ceiling['ndcg@10']:.4f} | {ceiling['hr@10']:.4f} |" in table
    assert lines.count("  threads: 1 (as requested)") == len(MODELS)  # fit's log line, per model
    assert r["seconds"] > 0


def test_runs_again_into_its_own_folders_but_never_over_another_run(small_run, tmp_path):
    _, _, out = small_run
    again = run_quickstart(epochs=1, out=str(out), log=lambda s: None, synthetic=SMALL, threads=1, models=("gru4rec",))
    assert json.loads((out / "gru4rec" / "results.json").read_text())["epochs"] == again["models"]["gru4rec"]["epochs"] == 1
    other = tmp_path / "gru4rec"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"run": {"data": {"dataset": "ml-1m"}}}))
    with pytest.raises(ValueError, match="not the quickstart's"):
        run_quickstart(epochs=1, out=str(tmp_path), log=lambda s: None, synthetic=SMALL, threads=1, models=("gru4rec",))
    assert (other / "config.json").exists()


def test_settings_early_stop_with_patience_at_least_5_and_an_epoch_cap_above_convergence():
    for name in MODELS:
        cfg = model_config(name)
        assert cfg["train"]["patience"] >= 5 and cfg["train"]["eval_every"] == 1
        assert cfg["train"]["epochs"] >= 50  # the quickstart's models stop near 20
        assert cfg["model"]["name"] == name
    assert model_config("sasrec", epochs=7, lr=0.5)["train"] == {**model_config("sasrec")["train"], "epochs": 7, "lr": 0.5}


def test_cli_demo_names_are_the_library_demos():
    parser = build_parser()
    assert parser.parse_args(["quickstart"]).method == "baselines"
    for name in DEMOS:
        assert parser.parse_args(["quickstart", name, "--epochs", "2"]).method == name
    sub = next(a for a in parser._actions if a.dest == "command").choices["quickstart"]
    assert sorted(next(a for a in sub._actions if a.dest == "method").choices) == sorted(DEMOS)
    with pytest.raises(SystemExit):
        parser.parse_args(["quickstart", "no-such-method"])


def test_the_pcrec_demo_compares_hstu_its_adaptation_and_pcrec(tmp_path):
    from perseq.quickstart import PCREC_SIMPLE_GRID, run_pcrec_demo

    lines = []
    r = run_pcrec_demo(epochs=2, out=str(tmp_path), log=lines.append, synthetic=SMALL, threads=1)
    names = [row["name"].split(" (")[0] for row in r["rows"]]
    assert names == ["hstu", "hstu + PCRec-simple", "pcrec", "Bayes-optimal ceiling"]
    ad = r["models"]["hstu+pcrec-simple"]
    # the choice comes from the validation grid (or is "no adaptation"), and the reported
    # gain is the adapted minus the plain test metric of the same checkpoint
    assert ad["choice"]["steps"] in (0, *PCREC_SIMPLE_GRID["steps"]) and ad["choice"]["lr"] in PCREC_SIMPLE_GRID["lrs"]
    assert ad["test"]["ndcg@10"] - r["models"]["hstu"]["test"]["ndcg@10"] == pytest.approx(ad["gain"]["mean"], abs=1e-9)
    assert (tmp_path / "pcrec" / "results.json").exists()
    assert build_parser().parse_args(["quickstart", "pcrec"]).method == "pcrec"


def test_the_federated_demo_compares_centralized_fedavg_and_pfsr(tmp_path):
    from perseq.quickstart import run_federated_demo

    r = run_federated_demo(epochs=2, out=str(tmp_path), log=lambda s: None,
                           synthetic={"n_users": 40, "n_items": 60, "n_clusters": 4, "mean_len": 10, "max_len": 20}, threads=1)
    names = [row["name"].split(" (")[0] for row in r["rows"]]
    assert names == ["mamba4rec", "mamba4rec + FedAvg", "PFSR", "Bayes-optimal ceiling"]
    assert r["models"]["PFSR"]["of"] == 2 and (tmp_path / "pfsr" / "personal.safetensors").exists()
    assert json.loads((tmp_path / "fedavg" / "results.json").read_text())["model"] == "mamba4rec+fedavg"
    assert build_parser().parse_args(["quickstart", "federated"]).method == "federated"
