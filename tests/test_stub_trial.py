"""The stand-in trial program of the orchestration tests (tests/stub_trial.py) keeps the
contract a worker relies on: it imports no torch, its resume state is what the worker
reads, and a sweep through it leaves the real trial process's files and attributes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.errors import ResumeStateError
from mtbert.train import epochs_finished, read_resume_file
from stub_trial import read_resume_state, stub_metrics, write_resume_state

TESTS = Path(__file__).resolve().parent


def test_the_stand_in_and_everything_a_trial_process_imports_need_no_torch():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import stub_trial; "
            "import optuna, mtbert.studies.samplers, mtbert.studies.storage, "
            "mtbert.studies.racing, mtbert.formatting; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    shown = subprocess.run([sys.executable, "-c", code, str(TESTS)], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "[]"


def test_its_resume_state_is_a_pytorch_file_the_worker_reads(tmp_path):
    path = tmp_path / "resume.pt"
    state = {"epoch": 1, "best": None, "history": [{"epoch": 1}, {"epoch": 2}]}
    write_resume_state(path, state)
    assert epochs_finished(tmp_path) == 2  # torch.load(weights_only=True), as for a training
    assert read_resume_state(path) == state
    assert not (tmp_path / "resume.pt.tmp").exists()
    # The trainer's own reader refuses it by name: it is a stand-in's, not a training's.
    with pytest.raises(ResumeStateError, match="no model"):
        read_resume_file(path)


def test_its_metrics_are_fixed_by_configuration_seed_and_epoch():
    a = stub_metrics({"train.lr": 1e-5}, 0, 0, {})
    assert a == stub_metrics({"train.lr": 1e-5}, 0, 0, {})
    assert a != stub_metrics({"train.lr": 2e-5}, 0, 0, {})
    assert a != stub_metrics({"train.lr": 1e-5}, 1, 0, {})
    assert stub_metrics({"train.lr": 1e-5}, 0, 2, {})["sst/acc"] > a["sst/acc"]
    controlled = {"values": {"key": "train.lr", "1e-05": [0.8, 0.7]}}
    assert stub_metrics({"train.lr": 1e-5}, 1, 0, controlled)["sst/acc"] == 0.7


@pytest.mark.slow
def test_a_sweep_through_it_leaves_the_trial_processes_files_and_attributes(
        stub_trials, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nspace:\n  train.lr: {type: categorical, choices: [1.0e-5, "
                    "2.0e-5]}\npruner: {name: none}\n")
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["-q", "sweep", str(spec), "--trials", "2", "--out",
                                      str(out), "--device", "cpu", "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{out}/mtbert.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        run = out / "s" / f"trial-{t.number:04d}"
        assert sorted(p.name for p in run.iterdir()) == [
            "config.yaml", "job.json", "metrics.jsonl", "model", "progress.json",
            "summary.json", "trial.json", "trial.log"]  # resume.pt removed: never resumed
        expected = stub_metrics(t.params, 0, 1, {})
        assert t.values == [expected["overall/geometric"]]
        assert t.user_attrs["sst/acc"] == expected["sst/acc"]
        assert t.intermediate_values == {}  # pruner none: nothing reported
        log = (run / "trial.log").read_text()
        assert "epoch 1/2: " in log and "epoch 2/2: " in log
        assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 2
