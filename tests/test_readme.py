"""Every command README.md shows is run here, so the README and the code cannot drift apart.

The commands are read from the README's ```bash and ```python blocks, in order, and run
in one scratch folder (with `configs/` beside them), so `evaluate runs/...` finds what the
`train` line above it wrote. Each keeps its arguments; a few get overrides that make them
small (one epoch, one seed, one sequence length), listed in SMALL. Lines that cannot run in
a test are in NOT_RUN with the reason; a README line that is neither run nor listed fails.
"""
import re
import shlex
import shutil
from pathlib import Path

import pytest

from perseq.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

NOT_RUN = {
    "python3 -m venv .venv": "environment setup; .ci/run creates a fresh venv and installs the project the same way",
    ". .venv/bin/activate": "environment setup (see above)",
    "pip install -e .": "environment setup (see above)",
    'pip install -e ".[test]"': "environment setup (see above)",
    "python -m pytest -q": "the test suite itself; CI runs exactly this line",
    "torchrun --nproc_per_node 2 -m perseq.cli train": "two processes under torchrun; data-parallel training is "
                                                        "tested in test_train.py::test_two_process_gloo_training_equals_one_process",
    "python benchmarks/campaign.py": "a benchmark queue of full trainings (hours); its queue/collect logic is tested "
                                     "in test_campaign.py",
    "python benchmarks/test_curve.py": "needs an HSTU-large run trained with eval.monitor_test (hours); the script is "
                                       "tested in test_test_curve.py",
    "perseq serve": "a server that runs until stopped; test_serve.py drives the same app through its HTTP API and "
                    "test_serve_server.py starts this command on loopback",
    "python benchmarks/quickstart.py": "measures the quickstart's wall time idle and under load (minutes, needs an idle "
                                       "machine); its output is benchmarks/results/quickstart.json",
}

# overrides that keep a command small; every one is a setting --resume may change (or a
# count of repetitions), so run-folder names and results' meaning stay those of the README
EPOCH1 = ["--set", "train.epochs=1", "--no-progress"]
SMALL = {
    "perseq train": lambda a: [x if x != "0,1,2" else "0" for x in a] + EPOCH1,
    "perseq quickstart": lambda a: a + ["--epochs", "2"],
    "perseq bench speed": lambda a: a + ["--repeat", "1", "--step-models", "gru4rec", "--step-histories", "100"],
    "perseq bench adapt": lambda a: a + ["--repeat", "1", "--one-by-one", "2"],
    "perseq bench persrec": lambda a: a + ["--lengths", "256,512", "--requests", "64", "--max-reencode", "256"],
}


def _commands() -> list[tuple[str, str]]:
    """(kind, text) for every command line of the README's bash blocks and every python block."""
    text = README.read_text()
    out = []
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S):
        if lang == "python":
            out.append(("python", body))
            continue
        for line in body.splitlines():
            line = re.split(r"\s#\s", line)[0].strip()  # a trailing comment
            if line:
                out += [("bash", part.strip()) for part in line.split("&&")]
    return out


def _not_run(cmd: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if cmd.startswith(prefix)), None)


def test_every_readme_command_is_run_or_listed():
    for kind, cmd in _commands():
        if kind == "bash":
            assert _not_run(cmd) or cmd.startswith("perseq "), f"README line neither run nor listed: {cmd!r}"


@pytest.mark.slow
def test_readme_commands_run(shared_datasets, tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    # the user's own rating file of `perseq data prepare --path ratings.csv --format table`
    rows = [(u, i, 3 + (u + i) % 3, 1_000_000 + 60 * (u * 37 + k)) for u in range(1, 41) for k, i in
            enumerate(range(u % 7 + 1, u % 7 + 13))]
    Path("ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    ran = 0
    for kind, cmd in _commands():
        if kind == "python":
            exec(compile(cmd.replace('"train.epochs=5"', '"train.epochs=1"'), "README.md", "exec"), {})
            ran += 1
            continue
        if _not_run(cmd):
            continue
        args = shlex.split(cmd)[1:]
        small = next((f for prefix, f in SMALL.items() if cmd.startswith(prefix)), lambda a: a)
        rc = main(small(args))
        out = capsys.readouterr()
        assert rc in (0, None), f"{cmd}\n{out.err[-2000:]}"
        ran += 1
    assert ran >= 12
    assert Path("top10.csv").read_text().startswith("user_id,rank,item_id,score")
    assert Path("curves.png").exists()
