"""perseq.progress: timed plain lines without a terminal (nohup, CI, a log file)."""
import io
import time

from perseq.progress import heartbeat, progress


def test_progress_prints_done_rate_eta_and_postfix_at_most_every_interval(monkeypatch):
    import perseq.progress as mod

    clock = iter(range(0, 10_000, 3))  # every item takes 3 s on this clock
    monkeypatch.setattr(mod.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setenv("PERSEQ_PROGRESS_SECONDS", "5")
    out = io.StringIO()  # not a terminal
    bar = progress(range(6), "epoch 3", stream=out)
    for _ in bar:
        bar.set_postfix(loss="1.2345")
    lines = out.getvalue().splitlines()
    # items end at 3, 6, ..., 18 s: a line at 6 (6 >= 5), 12 and 18 (6 s after the last)
    assert [line.split(",")[0] for line in lines] == ["epoch 3: 2/6 batches", "epoch 3: 4/6 batches", "epoch 3: 6/6 batches"]
    assert lines[0] == "epoch 3: 2/6 batches, 0.33/s, ETA 12s, loss=1.2345"
    assert all(line.startswith("epoch 3: ") and "/6 batches" in line and "/s, ETA " in line and "loss=1.2345" in line
               for line in lines)
    silent = io.StringIO()
    assert list(progress(range(3), "x", stream=silent, enabled=False)) == [0, 1, 2] and silent.getvalue() == ""


def test_heartbeat_names_the_stage_while_a_block_runs():
    out = io.StringIO()
    with heartbeat("preparing ml-20m", stream=out, every=0.05) as hb:
        hb.stage = "k-core"
        time.sleep(0.5)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("preparing ml-20m (k-core): still working, ") for line in lines)
    n = len(lines)
    time.sleep(0.12)
    assert len(out.getvalue().splitlines()) == n  # it stops with the block
