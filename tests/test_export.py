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
    mixed = ref.advance(ref.unpack(*fast.pack(a)), items[:10])
    assert (mixed["h"] - fast.advance(a, items[:10])["h"]).abs().max() <= 1e-5


def test_export_refuses_models_without_a_fixed_size_state(tmp_path):
    assert main(["train", "--set", "data.synthetic={n_users: 30, n_items: 40, n_clusters: 4, mean_len: 20, max_len: 40}",
                 "--set", "model.d=16", "--set", "train.epochs=1", "--out", str(tmp_path), "--name", "s",
                 "--no-progress"]) == 0
    assert main(["export", str(tmp_path / "s-s0"), "--onnx", str(tmp_path / "m.onnx")]) == 2  # SASRec: a KV cache
