"""The README's tour and the first command of each guide (docs/guides/) run as written,
with the tiny test model and task files swapped in (`--set model.encoder=...`, the data
directory), or parse with the real CLI where they cannot run here, for the reason named."""

import glob
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtbert.cli import app

from conftest import parse_cli

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ROOT / "docs" / "guides"
SHARED = "../shared/data/cs224n-qqp16k"
runner = CliRunner()

# Guides whose first command is not run here, and why (each still parses with the CLI).
NOT_RUN = {
    "constraints.md": "trains 3 seeds of every single-task and multitask model, then sweeps a "
                      "spec of the reader's; the compare runs in the seeds guide's test and "
                      "constraints in tests/test_constraints.py",
    "clusters.md": "two workers against a PostgreSQL server: tests/test_worker.py runs "
                   "workers on PostgreSQL",
    "tests.md": "runs this test suite itself",
}


def _tour_and_firsts() -> dict[str, list[str]]:
    """The README tour's commands and each guide's first code block's commands, by page."""
    pages = {"README.md": (ROOT / "README.md").read_text().split("## A five-minute tour", 1)[1]}
    pages |= {path.name: path.read_text() for path in sorted(GUIDES.glob("*.md"))}
    commands = {}
    for name, text in pages.items():
        block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
        lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
        # The commands (not `wait`, nor a file written by a here-document), each without
        # the file its output is sent to.
        commands[name] = [re.sub(r"\s+>\s*\S+$", "", line) for line in lines
                          if line.startswith(("mtbert ", "python ", "wandb "))]
    return commands


COMMANDS = _tour_and_firsts()


def _argv(line: str, data: Path) -> list[str]:
    """`mtbert ...` as arguments, the shared data replaced by the tiny task files."""
    line = re.sub(r"\s*(&|; echo .*)$", "", line)
    words = shlex.split(line)
    assert words[0] == "mtbert", line
    return [str(data) if word == SHARED else word for word in words[1:]]


def _tiny(tiny_encoder, cache: Path) -> list[str]:
    return ["--set", f"model.encoder={tiny_encoder}", "--set", f"data.cache_dir={cache}",
            "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2",
            "--set", "train.batch_size=8", "--set", "model.max_length=32",
            "--set", "data.max_train_examples=0", "--set", "data.max_eval_examples=0"]


def _run(argv: list[str]):
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, (argv, result.output)
    return result


def test_every_guide_is_linked_from_the_readme_and_the_site_and_starts_from_a_command():
    readme, nav = (ROOT / "README.md").read_text(), (ROOT / "mkdocs.yml").read_text()
    guides = sorted(path.name for path in GUIDES.glob("*.md"))
    assert len(guides) >= 10
    for name in guides:
        assert f"(docs/guides/{name})" in readme, name
        assert f"guides/{name}" in nav, name
        first = COMMANDS[name][0]
        assert first.startswith(("mtbert ", "python ")), (name, first)
        if name not in ("tests.md", "measurements.md"):
            assert all(SHARED in c for c in COMMANDS[name] if "--data-dir" in c), name
    assert len(readme.splitlines()) <= 250


def test_every_first_command_and_the_tour_parse_with_the_real_cli(tmp_path):
    parsed = [parse_cli(_argv(line, tmp_path)).command.name
              for lines in COMMANDS.values() for line in lines if line.startswith("mtbert ")]
    assert len(parsed) >= 15
    assert {"sweep", "best", "report", "predict", "train", "compare"} <= set(parsed)
    assert set(NOT_RUN) <= set(COMMANDS)


def test_the_output_guide_checks_a_shipped_spec(tiny_encoder, task_dir, tmp_path):
    (line,) = COMMANDS["output.md"]
    _run([*_argv(line, task_dir), *_tiny(tiny_encoder, tmp_path / "cache")])


def test_the_training_data_and_measurements_guides_train_the_quickstart(
        tiny_encoder, task_dir, tmp_path):
    (line,) = COMMANDS["training.md"]
    assert COMMANDS["data.md"] == COMMANDS["measurements.md"] == [line]
    out = tmp_path / "run"
    _run(["-q", *_argv(line, task_dir), "--out", str(out), "--device", "cpu",
          *_tiny(tiny_encoder, tmp_path / "cache")])
    assert (out / "summary.json").is_file() and (out / "model" / "model.safetensors").is_file()


def test_the_seeds_guide_compares_two_presets_over_two_seeds(tiny_encoder, task_dir,
                                                             tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (line,) = COMMANDS["seeds.md"]
    _run(["-q", *_argv(line, task_dir), "--device", "cpu", "--wandb-mode", "disabled",
          *_tiny(tiny_encoder, tmp_path / "cache")])
    assert (tmp_path / "cmp" / "compare.json").is_file()


@pytest.mark.slow
def test_the_readme_tour_and_the_sweep_models_and_wandb_guides_run(tiny_encoder, task_dir,
                                                                   tmp_path, monkeypatch):
    """sweep (real trial processes, W&B offline as without an API key) -> best -> export
    -> predict -> report, in a fresh folder; `wandb sync` needs the network: its runs are
    checked to be where the command looks."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tour = COMMANDS["README.md"]
    assert tour[0] == COMMANDS["sweeps.md"][0] and COMMANDS["wandb.md"][-1] == tour[-1]
    assert [c for c in COMMANDS["models.md"] if c in tour] == COMMANDS["models.md"][:2]
    tiny = _tiny(tiny_encoder, tmp_path / "cache")
    for line in tour + COMMANDS["models.md"][2:]:
        if line.startswith("wandb sync "):
            assert glob.glob(line.split()[-1]), line
            continue
        argv = _argv(line, task_dir)
        if argv[0] == "sweep":
            argv += ["--device", "cpu", *tiny]
        elif argv[0] in ("predict", "analyze"):
            argv += ["--device", "cpu"]
        _run(["-q", *argv])
    assert (tmp_path / "best-model" / "encoder" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir())
    assert (tmp_path / "best-model" / "analysis" / "analysis.md").is_file()
    assert list((tmp_path / "mtbert-runs").glob("*/report/index.html"))
