import json
import os

from perseq.bench import epoch, speed


def test_speed_point_and_outputs(tmp_path):
    p = speed.measure_point("gru4rec", 8, batch=2, device="cpu", repeat=1)
    assert p["train_step_s"] > 0 and p["reencode_latency_s"] > 0 and p["step_latency_s"] > 0 and p["peak_memory_mib"] > 0
    s = speed.measure_step("mamba4rec", 5, device="cpu", repeat=3)
    assert s["history"] == 5 and s["step_latency_s"] > 0
    speed.write_outputs([p, {"model": "x", "length": 8, "error": "boom"}], tmp_path / "speed", [s])
    out = json.loads((tmp_path / "speed.json").read_text())
    assert out["points"][0]["model"] == "gru4rec" and out["step_vs_history"][0]["model"] == "mamba4rec"
    md = (tmp_path / "speed.md").read_text()
    assert "| gru4rec | 8 |" in md and "boom" in md and "| mamba4rec | 5 |" in md
    assert (tmp_path / "speed.png").stat().st_size > 1000
    # --render redraws the table and plot from the JSON alone
    assert speed.main(["--render", str(tmp_path / "speed.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again.md").read_text() == md and json.loads((tmp_path / "again.json").read_text()) == out
    # every file says what produced it; a redraw keeps the original's provenance, and a file
    # from before provenance was recorded stays without one instead of getting today's
    from perseq.report import git_commit

    assert out["provenance"]["commit"] == git_commit() and out["provenance"]["torch"]
    old = {"points": out["points"], "step_vs_history": out["step_vs_history"]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert speed.main(["--render", str(tmp_path / "old.json"), "--out", str(tmp_path / "old_drawn")]) == 0
    assert json.loads((tmp_path / "old_drawn.json").read_text())["provenance"] == {}


def test_epoch_benchmark_measures_hstu_with_the_reference_attention_and_restores_the_kernels(tmp_path, monkeypatch):
    """--hstu-attention torch times the torch line: the kernel is not called during the
    epoch, the setting is recorded, and the fused path is back afterwards."""
    from perseq.models import hstu
    from perseq.ops import hstu_numba

    calls = []
    real = hstu_numba.CausalSiluAttention.apply
    monkeypatch.setattr(hstu_numba.CausalSiluAttention, "apply", lambda *a: calls.append(1) or real(*a))
    args = ["--dataset", "synthetic", "--model", "hstu", "--max-len", "12", "--d", "8", "--windows", "last",
            "--batch-size", "1024", "--loss", "sampled",
            "--negatives", "per_row", "--temperature", "0.05"]
    r = epoch.main(args + ["--hstu-attention", "torch"])
    assert r["hstu_attention"] == "torch" and r["loss"] == "sampled(128, per_row, t=0.05)" and not calls
    assert hstu._hstu_numba is hstu_numba
    r = epoch.main(args)
    assert r["hstu_attention"] == "fused" and calls
    # the row names the blocks the model has: --blocks sets SASRec's and BERT4Rec's only
    assert r["blocks"] == 2 and epoch.main(args + ["--model", "gru4rec", "--blocks", "3"])["blocks"] == 1


def test_epoch_benchmark_counts_every_training_target(tmp_path):
    r = epoch.main(["--dataset", "synthetic", "--max-len", "20", "--d", "16", "--out", str(tmp_path / "e.json")])
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved == r
    # synthetic: 2000 users, leave-one-out -> every user contributes len - 3 targets
    from perseq.data.synthetic import make_synthetic

    data, _ = make_synthetic()
    assert r["train_targets"] == int((data.lengths - 3).sum())
    assert r["epoch_seconds"] > 0 and r["sequences_per_second"] > 0
    assert r["gomp_spincount"] == os.environ.get("GOMP_SPINCOUNT")  # the OpenMP spin it ran under


def test_a_point_killed_by_the_oom_killer_says_so(monkeypatch):
    import subprocess
    from types import SimpleNamespace

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=-9, stdout="", stderr=""))
    args = SimpleNamespace(batch=4, device="cpu", repeat=1, threads=1, timeout=10)
    r = speed._run_point(args, "hstu-large", 8192)
    assert r == {"model": "hstu-large", "length": 8192, "error": "killed by signal 9 (SIGKILL: most likely the kernel's out-of-memory killer)"}


def test_scan_benchmark_times_every_implementation(tmp_path):
    from perseq.bench import scan

    out = tmp_path / "scan.json"
    assert scan.main(["--batch", "2", "--length", "40", "--inner", "8", "--state", "4", "--impls", "torch,numba,reference",
                      "--repeat", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["impls"]) == {"torch", "numba", "reference"} and r["length"] == 40
    assert all(v["forward_s"] > 0 and v["backward_s"] > 0 for v in r["impls"].values())


def test_epoch_benchmark_times_several_epochs_and_reports_the_last(tmp_path):
    r = epoch.main(["--dataset", "synthetic", "--max-len", "20", "--d", "16", "--epochs", "2"])
    assert len(r["epoch_seconds_each"]) == 2 and all(x > 0 for x in r["epoch_seconds_each"])
    assert r["epoch_seconds"] == r["epoch_seconds_each"][-1]
    # the rate is the last epoch's too: some epoch time within epoch_seconds' rounding (0.01 s)
    # gives it within its own (0.1 sequences/s), at any speed
    n, e, rate = r["train_sequences"], r["epoch_seconds"], r["sequences_per_second"]
    assert n / (e + 0.005) - 0.05 <= rate <= n / (e - 0.005) + 0.05, r


def test_a_sweep_stopped_part_way_keeps_the_points_it_measured(tmp_path, monkeypatch):
    """The JSON is rewritten after every point, so a sweep killed by a time limit keeps them
    and --render draws them."""
    done = []

    def fake_point(args, model, length, step=False):
        if len(done) == 2:
            raise KeyboardInterrupt  # what a time limit's signal does to the sweep
        done.append(length)
        return {"model": model, "length": length, "device": "cpu", "train_step_s": 0.1 * length,
                "reencode_latency_s": 0.01, "peak_memory_mib": 10.0}

    monkeypatch.setattr(speed, "_run_point", fake_point)
    out = tmp_path / "sweep"
    try:
        speed.main(["--models", "gru4rec", "--lengths", "8,16,32", "--out", str(out)])
    except KeyboardInterrupt:
        pass
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [p["length"] for p in saved["points"]] == [8, 16] and saved["complete"] is False
    assert speed.main(["--render", str(out.with_suffix(".json")), "--out", str(tmp_path / "drawn")]) == 0
    assert "| gru4rec | 16 |" in (tmp_path / "drawn.md").read_text()


def test_persrec_cost_benchmark_rows_and_flat_persrec_cost(tmp_path):
    """Every method at every length; PerSRec's FLOPs per request do not depend on the
    history length, re-encoding's grow, and the point past --max-reencode is extrapolated."""
    import json

    from perseq.bench import persrec

    out = tmp_path / "pc"
    persrec.main(["--lengths", "48,96,192", "--history", "16", "--recent", "8", "--tokens", "2", "--fold", "4",
                  "--requests", "8", "--max-reencode", "96", "--out", str(out)])
    r = json.loads(out.with_suffix(".json").read_text())
    rows = {(x["method"], x["history"]): x for x in r["rows"]}
    assert {m for m, _ in rows} == set(persrec.METHODS) and {n for _, n in rows} == {48, 96, 192}
    for m in ("persrec", "persrec_stream", "recent", "mamba4rec_step"):
        assert rows[(m, 48)]["flops"] == rows[(m, 192)]["flops"], m
    assert rows[("reencode", 96)]["flops"] > 1.9 * rows[("reencode", 48)]["flops"]
    assert rows[("kv_step", 192)]["flops"] > rows[("kv_step", 48)]["flops"]
    assert rows[("reencode", 192)]["extrapolated"] and rows[("reencode", 192)]["flops"] == 4 * rows[("reencode", 96)]["flops"]
    assert out.with_suffix(".png").exists()


def test_wrk_output_is_read_into_milliseconds_rates_and_every_kind_of_error():
    from perseq.bench.serve import parse_wrk

    out = """Running 10s test @ http://127.0.0.1:8000/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.02ms    4.10ms  61.00ms   80.00%
  Latency Distribution
     50%  850.00us
     75%    9.10ms
     90%   12.30ms
     99%    1.20s
  6512 requests in 10.01s, 2.10MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:    650.55
Transfer/sec:    214.90KB
"""
    r = parse_wrk(out)
    assert r == {"p50_ms": 0.85, "p99_ms": 1200.0, "rps": 650.55, "errors": 2 + 3 + 4}
    clean = out.replace("  Socket errors: connect 0, read 2, write 0, timeout 3\n", "").replace(
        "  Non-2xx or 3xx responses: 4\n", "")
    assert parse_wrk(clean)["errors"] == 0
