"""YAML read safely: alias bombs, deep nesting and huge documents are one line, exit 2,
within a second, in every place a user's YAML enters (spec, run config, --set,
--enqueue)."""

import time

import pytest
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.errors import ConfigError
from mtbert.safeyaml import MAX_VALUES, load_yaml

runner = CliRunner()

# "Billion laughs": nine levels of ten aliases, 10^9 strings in a few hundred bytes.
BOMB = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10))


def test_a_bomb_is_refused_fast_and_a_spec_with_a_few_aliases_reads():
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"expands to more than {MAX_VALUES:,} values"):
        load_yaml(BOMB, "the bomb")
    assert time.monotonic() - started < 1
    shared = load_yaml("lr: &lr 1.0e-4\nhead_lr: {sst: *lr, qqp: *lr}\n", "ok")
    assert shared["head_lr"] == {"sst": 1e-4, "qqp": 1e-4}


def test_deep_nesting_and_huge_documents_are_refused():
    with pytest.raises(ConfigError, match="nests deeper than 50 levels"):
        load_yaml("[" * 60 + "]" * 60, "deep")
    with pytest.raises(ConfigError, match="nests deeper than 50 levels"):
        load_yaml("[" * 5000 + "]" * 5000, "deeper")  # PyYAML's own recursion
    with pytest.raises(ConfigError, match="at most 1,000,000"):
        load_yaml("x: " + "y" * 1_000_001, "huge")


def _one_line_exit_2(result, started) -> str:
    assert result.exit_code == 2, result.output
    assert time.monotonic() - started < 5
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_bomb_in_a_spec_is_one_line(tmp_path):
    spec = tmp_path / "bomb.yaml"
    spec.write_text(BOMB + "space:\n  train.lr: {type: float, low: 1e-5, high: 1e-4}\n")
    started = time.monotonic()
    line = _one_line_exit_2(runner.invoke(app, ["sweep", str(spec), "--print"]), started)
    assert f"sweep spec {spec} expands to more than" in line


def test_a_bomb_in_a_run_config_is_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(BOMB)
    started = time.monotonic()
    line = _one_line_exit_2(runner.invoke(app, ["train", str(config), "--out",
                                                str(tmp_path / "run")]), started)
    assert "expands to more than" in line


def test_a_bomb_in_a_set_value_is_one_line():
    value = "{" + BOMB.replace("\n", ", ").rstrip(", ") + "}"
    started = time.monotonic()
    line = _one_line_exit_2(runner.invoke(app, ["sweep", "lr-decay", "--print", "--set",
                                                f"train.lr={value}"]), started)
    assert "--set train.lr expands to more than" in line


def test_a_bomb_in_an_enqueue_file_is_one_line(tmp_path):
    enqueue = tmp_path / "enqueue.yaml"
    enqueue.write_text(BOMB)
    started = time.monotonic()
    line = _one_line_exit_2(runner.invoke(app, ["sweep", "lr-decay", "--print", "--enqueue",
                                                str(enqueue)]), started)
    assert f"enqueue file {enqueue} expands to more than" in line
