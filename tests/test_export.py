"""On-device export (perseq export --onnx): the incremental step in onnxruntime matches torch."""
import json

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from perseq.checkpoint import load_model  # noqa: E402
from perseq.cli import main  # noqa: E402


@pytest.mark.parametrize("name", ["gru4rec", "mamba4rec"])
def test_onnx_step_matches_torch_after_200_events(name, tmp_path):
    assert main(["train", "--set", "data.synthetic={n_users: 30, n_items: 40, n_clusters: 4, mean_len: 20, max_len: 40}",
                 "--set", f"model.name={name}", "--set", "model.d=16", "--set", "train.epochs=1", "--out", str(tmp_path),
                 "--name", name, "--no-progress"]) == 0
    run = str(tmp_path / f"{name}-s0")
    assert main(["export", run, "--onnx", str(tmp_path / "m.onnx")]) == 0
    info = json.loads((tmp_path / "m.json").read_text())
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    model, _, items = load_model(run)
    assert info["item_ids"] == [str(x) for x in items]
    state_np = [np.zeros(s, dtype=np.float32) for s in info["state_shapes"]]
    state = model.init_state(1)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for t in range(200):
        item = torch.randint(1, model.n_items + 1, (1,), generator=g)
        out = sess.run(None, {"item": item.numpy(), **{n: s for n, s in zip(info["inputs"][1:], state_np)}})
        scores, state_np = out[0], out[1:]
        with torch.no_grad():
            state, h = model.step(state, item)
            want = (h @ model.output_embeddings().T).numpy()
        assert scores[0, 0] == -np.inf  # padding is never recommended
        worst = max(worst, float(np.abs(scores[:, 1:] - want[:, 1:]).max()))
    assert worst <= 1e-4, worst

    # the server's fast step (onnxruntime, hidden state out) against the torch step, through
    # the engine: the same states and scores after 200 events, either state read by either path
    from perseq.serve.engine import Engine

    fast, ref = Engine(run, step="onnx"), Engine(run, step="torch")
    assert (fast.step_backend, ref.step_backend) == ("onnx", "torch") and not fast.model.training
    items = torch.randint(1, model.n_items + 1, (200,), generator=g).tolist()
    a, b = fast.advance(fast.init(), items), ref.advance(ref.init(), items)
    assert (fast.state_hidden(a) - ref.state_hidden(b)).abs().max() <= 1e-5
    mixed = ref.advance(ref.unpack(*fast.pack(a)), items[:10])  # onnx's state read by torch ...
    assert (mixed["h"] - fast.advance(a, items[:10])["h"]).abs().max() <= 1e-5
    back = fast.advance(fast.unpack(*ref.pack(b)), items[:10])  # ... and torch's by onnx
    assert (back["h"] - ref.advance(b, items[:10])["h"]).abs().max() <= 1e-5


def test_export_refuses_models_without_a_fixed_size_state(tmp_path, capsys):
    assert main(["train", "--set", "data.synthetic={n_users: 30, n_items: 40, n_clusters: 4, mean_len: 20, max_len: 40}",
                 "--set", "model.d=16", "--set", "train.epochs=1", "--out", str(tmp_path), "--name", "s",
                 "--no-progress"]) == 0
    assert main(["export", str(tmp_path / "s-s0"), "--onnx", str(tmp_path / "m.onnx")]) == 2  # SASRec: a KV cache
    assert "on-device export takes" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_pfsr_users_are_served_and_exported_with_their_own_personal_parameters(tmp_path, monkeypatch):
    """A federated PFSR run: the server's state for a user the run trained carries that
    user's personal.* (as the evaluation scores them), the ONNX step takes them as inputs,
    and ``--user`` exports them."""
    from perseq.federated.personal import personal_by_user
    from perseq.serve.engine import Engine

    monkeypatch.chdir(tmp_path)
    assert main(["federated", "simulate", "--set", "model.name=pfsr", "--set", "model.d=8", "--set", "model.memory_slots=4",
                 "--set", "data.synthetic={n_users: 40, n_items: 30, n_clusters: 3, mean_len: 10, max_len: 30, seed: 1}",
                 "--set", "data.max_len=12", "--set", "federated.rounds=2", "--set", "federated.clients_per_round=20",
                 "--name", "pfsr", "--no-progress"]) == 0
    run = "runs/pfsr-s0"
    fast, ref = Engine(run, step="onnx"), Engine(run, step="torch")
    _, meta, _ = load_model(run)
    table = personal_by_user(run, meta, [f"u{u}" for u in range(40)])
    user = sorted(table)[0]
    assert fast.step_backend == "onnx" and set(fast._personal) == set(table) and 0 < len(table) < 40
    assert table[user]["personal.scale"].abs().sum() > 0  # trained on the device: not the identity any more
    items = torch.randint(1, 31, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    a, b = fast.advance(fast.init(user), items), ref.advance(ref.init(user), items)
    assert (fast.state_hidden(a) - ref.state_hidden(b)).abs().max() <= 1e-5
    # the same as `perseq evaluate` scores that user (with_personal: its own user -> client map)
    from perseq.federated.personal import with_personal

    model = ref.model
    scorer = with_personal(model, run, meta, 40)
    with torch.no_grad():
        want_scores = scorer.scores(torch.tensor([items]), torch.tensor([len(items)]), users=np.array([int(user[1:])]))[0]
        got_scores = ref.state_hidden(b) @ model.output_embeddings().T
    assert (got_scores[1:] - want_scores[1:]).abs().max() <= 1e-4
    alone = type(model)(model.cfg).eval()
    alone.load_state_dict({**model.state_dict(), **table[user]})
    with torch.no_grad():
        want = alone.encode(torch.tensor([items]))[0, -1]
    # through the service: the user's posts build their state with their own parameters
    from perseq.serve.service import Service
    from perseq.serve.store import SQLiteStore

    svc = Service(fast, SQLiteStore(tmp_path / "s.sqlite"))
    ids = [fast.item_ids[i] for i in items]
    got = svc.post_events(user, [{"id": str(t), "item_id": it} for t, it in enumerate(ids)], k=3, exclude_seen=False)
    top = (want @ model.output_embeddings().T)[1:].topk(3)
    assert [r["item_id"] for r in got["recommendations"]["items"]] == [str(fast.item_ids[i + 1]) for i in top.indices.tolist()]
    # erased, then back: the run's copy of their response is not used again
    assert svc.delete(user)
    again = svc.post_events(user, [{"id": str(t), "item_id": it} for t, it in enumerate(ids)], k=3, exclude_seen=False)
    with svc.store.user(user, write=False) as tx:
        personal = fast.unpack(*tx.state()[1:])["personal"]
    assert torch.equal(personal["personal.scale"], dict(model.named_parameters())["personal.scale"].detach())
    assert again["recommendations"] != got["recommendations"]
    other = ref.advance(ref.init(None), items)  # a user without a device history: the model's own response
    assert (ref.state_hidden(other) - ref.state_hidden(b)).abs().max() > 1e-4
    info = export_onnx_cli(run, tmp_path / "p.onnx", user)
    assert info["personal"]["user"] == user and info["personal"]["trained"]
    assert info["inputs"][:3] == ["item", "personal_scale", "personal_shift"]
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"))
    state = [np.zeros(s, dtype=np.float32) for s in info["state_shapes"]]
    mine = [np.array(info["personal"]["values"][n], dtype=np.float32) for n in ("personal_scale", "personal_shift")]
    for it in items:
        scores, *state = sess.run(None, dict(zip(info["inputs"], [np.array([it]), *mine, *state])))
    want_scores = (want @ model.output_embeddings().T).detach().numpy()
    assert np.abs(scores[0, 1:] - want_scores[1:]).max() <= 1e-4


def export_onnx_cli(run, out, user):
    assert main(["export", str(run), "--onnx", str(out), "--user", user]) == 0
    return json.loads(out.with_suffix(".json").read_text())
