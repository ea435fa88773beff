"""The leakage probe (perseq.federated.leakage): what a client's update gives away about the
items it touched, plain, as a SecAgg+ sum, and under DP noise."""
import numpy as np
import pytest
import torch

from perseq.config import from_dict
from perseq.data.batching import TrainWindows
from perseq.data.sequences import leave_one_out
from perseq.data.synthetic import make_synthetic
from perseq.federated.client import local_update
from perseq.evaluate import train_item_counts
from perseq.federated.leakage import EMBEDDING, probe, recovered, touched_items, update_norms
from perseq.federated.partition import client_windows, partition
from perseq.losses import get_loss
from perseq.models import build_model


def test_recovered_counts_the_touched_items_among_the_rows_that_moved_most():
    rows = torch.zeros(11, 2)
    rows[0] = 100.0  # the padding row never counts, however far it moved
    rows[3], rows[5], rows[7], rows[9] = 5.0, 4.0, 3.0, 0.5
    assert recovered(rows, {3, 5, 7}) == 1.0
    assert recovered(rows, {3, 9}) == 0.5  # top 2 are 3 and 5
    assert recovered(rows, {1, 2, 4}) == 0.0


def test_without_noise_or_clipping_the_dp_settings_equal_plain_and_secagg():
    g = torch.Generator().manual_seed(0)
    deltas = [{EMBEDDING: torch.randn(21, 4, generator=g), "w": torch.randn(3, generator=g)} for _ in range(5)]
    items = [{1, 2, 3}, {4, 5}, {6}, {7, 8, 9, 10}, {11, 12}]
    out = probe(deltas, items, torch.arange(21.0), clip=1e9, noise_multiplier=0.0)
    assert out["dp"] == out["secagg"] and out["dp_local"] == out["plain"]
    assert out["chance"] == pytest.approx(np.mean([len(i) / 20 for i in items]))
    # the popularity guess: the k most frequent items, here the k highest ids
    assert out["popularity"] == pytest.approx(np.mean([len(i & set(range(21 - len(i), 21))) / len(i) for i in items]))
    with pytest.raises(ValueError, match="no items"):
        recovered(deltas[0][EMBEDDING], set())


def test_clipping_scales_the_whole_update_so_a_large_other_part_drowns_the_table_in_noise():
    # rows 1-3 of the table moved (norm 1 each), the rest did not; the clip is 1, the noise
    # 0.05 x clip per coordinate. With nothing else in the update the clipped table keeps
    # rows of norm 0.58, far above the noise; with a second parameter of norm 100 the whole
    # update is scaled by 1/100 and the table's rows sink into the noise
    table = torch.zeros(201, 8)
    table[1:4, 0] = 1.0
    quiet = {EMBEDDING: table, "w": torch.zeros(4)}
    loud = {EMBEDDING: table, "w": torch.tensor([100.0, 0.0, 0.0, 0.0])}
    counts = torch.zeros(201)
    kept = probe([quiet], [{1, 2, 3}], counts, clip=1.0, noise_multiplier=0.05,
                 generator=torch.Generator().manual_seed(0))
    drowned = probe([loud], [{1, 2, 3}], counts, clip=1.0, noise_multiplier=0.05,
                    generator=torch.Generator().manual_seed(0))
    assert kept["plain"] == drowned["plain"] == 1.0  # the raw update names them either way
    assert kept["dp_local"] == 1.0 and drowned["dp_local"] < 0.5


@pytest.fixture(scope="module")
def round_updates():
    """One round of 24 one-user clients (local SGD, the round-0 SASRec), as the bench runs it."""
    data, _ = make_synthetic(n_users=24, n_items=200, n_clusters=4, mean_len=12, max_len=30, seed=4)
    split = leave_one_out(data)
    cfg = from_dict({"model": {"name": "sasrec", "d": 16}, "data": {"max_len": 20}, "eval": {"exclude_seen": False},
                     "federated": {"local_optimizer": "sgd", "local_lr": 0.1, "local_batch_size": 16}})
    torch.manual_seed(0)
    model = build_model("sasrec", data.n_items, d=16, max_len=20)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    windows = TrainWindows(split, 20)
    mine = client_windows(windows, partition(data.n_users))
    deltas, items = [], []
    for c in range(data.n_users):
        up, _ = local_update(model, start, windows, mine[c], cfg.federated, cfg.train, get_loss(cfg.loss), 0)
        deltas.append(up.delta)
        items.append(touched_items(windows, mine[c]))
    return deltas, items, torch.as_tensor(train_item_counts(split), dtype=torch.float64)


def test_a_plain_update_gives_away_the_clients_items_and_noise_hides_them(round_updates):
    deltas, items, counts = round_updates
    clip = float(np.median(update_norms(deltas)))
    quiet = probe(deltas, items, counts, clip=clip, noise_multiplier=0.0)
    # under the full softmax every row moves a little (p_j · h), the touched rows by far most
    assert quiet["plain"] == 1.0
    # the sum of 24 clients still says more about a client who is in it than about one who
    # is not (here .16 against .09); far less than its own update
    assert quiet["secagg_others"] < quiet["secagg"] < 0.5
    noisy = probe(deltas, items, counts, clip=clip, noise_multiplier=5.0, generator=torch.Generator().manual_seed(1))
    # noise of 5 × clip drowns one clipped update and the sum alike (chance is about 0.03 here)
    assert noisy["dp_local"] < quiet["chance"] + 0.05 and noisy["dp"] < quiet["secagg_others"]
