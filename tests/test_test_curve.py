"""benchmarks/test_curve.py: reading results off monitored validation and test curves."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("test_curve", ROOT / "benchmarks" / "test_curve.py")
tc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tc)


def _rec(epoch, valid, test):
    r = {"epoch": epoch, "loss": 1.0, "test_monitor": {"ndcg@10": test}}
    if valid is not None:
        r["valid"] = {"ndcg@10": valid}
    return r


def test_each_reading_takes_its_own_epoch():
    # validation peaks (first) at epoch 2, the test at epoch 3, the run ends at epoch 4
    h = [_rec(1, 0.10, 0.09), _rec(2, 0.14, 0.12), _rec(3, 0.14, 0.15), _rec(4, 0.13, 0.11)]
    s = tc.summarize(h, "ndcg@10")
    assert s["at_valid_best"] == {"epoch": 2, "ndcg@10": 0.12, "valid": 0.14}  # ties keep the earlier epoch, as fit
    assert s["at_last"] == {"epoch": 4, "ndcg@10": 0.11}
    assert s["peek_best"] == {"epoch": 3, "ndcg@10": 0.15}
    assert s["curve"]["test"] == [0.09, 0.12, 0.15, 0.11]


def test_a_fixed_epoch_run_has_no_validation_reading_and_unmonitored_runs_are_refused():
    h = [_rec(1, None, 0.05), _rec(2, 0.30, 0.08)]  # validated once, on events it trained on
    s = tc.summarize(h, "ndcg@10")
    assert "at_valid_best" not in s and s["at_last"]["ndcg@10"] == 0.08
    with pytest.raises(ValueError, match="monitor_test"):
        tc.summarize([{"epoch": 1, "loss": 1.0, "valid": {"ndcg@10": 0.1}}], "ndcg@10")
