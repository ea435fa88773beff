from pathlib import Path

import pytest

from perseq.config import load_config, parse_override
from perseq.models import build_model

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_every_config_loads_and_builds_its_model(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# perseq "), f"{path}: first line must be the command that runs it"
    assert str(path.relative_to(path.parent.parent.parent)) in first
    cfg = load_config(path)
    params = {k: v for k, v in cfg.model.items() if k != "name"}
    m = build_model(cfg.model["name"], n_items=100, max_len=cfg.data.max_len, **params)
    assert sum(p.numel() for p in m.parameters()) > 0


def test_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "model.name=gru4rec", "eval.ks=[5,20]", "data.dataset=ml-1m"])
    assert cfg.train.lr == 3e-4 and cfg.model["name"] == "gru4rec" and cfg.eval.ks == (5, 20)
    with pytest.raises(ValueError, match="valid"):
        load_config(None, ["train.learning_rate=1"])
    with pytest.raises(ValueError, match="key=value"):
        parse_override("train.lr")
    p = tmp_path / "c.yaml"
    p.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ValueError, match="unknown section"):
        load_config(p)


def test_config_show_explains_every_key_of_every_model(capsys):
    """`perseq config show` prints each setting with its default and a line of help, for
    the run sections and for every registry model's own keys."""
    from perseq.cli import main
    from perseq.config import describe, load_config
    from perseq.models.registry import MODELS

    for name in MODELS:
        rows = describe(load_config(None, [f"model.name={name}"]))
        assert [k for k, _, _, h in rows if not h] == [], name
    assert main(["config", "show", "--set", "train.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "train.lr = 0.01   (default 0.001)\n    AdamW learning rate" in out
    # one section: only its keys, all of them
    assert main(["config", "show", "federated"]) == 0
    keys = [line.split(" = ")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert keys == [k for k, *_ in describe(load_config(None, [])) if k.startswith("federated.")] and "federated.rounds" in keys
    # the section may also come after the options
    assert main(["config", "show", "--set", "federated.rounds=7", "federated"]) == 0
    assert capsys.readouterr().out.startswith("federated.rounds = 7   (default 100)\n")
    assert main(["config", "show", "fed"]) == 2
    assert "error: no config section 'fed'; the sections are data, eval, federated" in capsys.readouterr().err
