"""`--stop-after-flat M [--min-delta D]`: a study ends once M finished configurations in
a row did not beat the incumbent by more than the noise; every worker stops. Controlled
per-configuration values (tests/test_racing.py), in this process and in two real worker
processes (slow)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.studies.flat import FLAT_RULE, flat_streak
from mtbert.studies.racing import config_of
from mtbert.studies.runner import SweepOptions, TrialRunner, run_sweep
from mtbert.studies.spec import load_spec
from test_racing import SPEC, VALUES, controlled_process

runner = CliRunner()
TESTS = Path(__file__).resolve().parent
FIVE = SPEC.replace("  - {train.lr: 3.0e-5}\n", "  - {train.lr: 3.0e-5}\n"
                    "  - {train.lr: 4.0e-5}\n  - {train.lr: 5.0e-5}\n")


@pytest.fixture
def controlled(monkeypatch):
    monkeypatch.setattr(TrialRunner, "_run_process", controlled_process)


def _spec(tmp_path, seeds: int) -> Path:
    path = tmp_path / "flat.yaml"
    path.write_text(FIVE.replace("seeds: 3\n", f"seeds: {seeds}\n"))
    return path


def test_flat_stop_without_seeds_uses_min_delta(tmp_path, controlled):
    # Values in order: 0.800, 0.751, 0.803, 0.700, 0.200: with --min-delta 0.01 neither the
    # 2nd nor the 3rd beats 0.800 (the 3rd by 0.003 only).
    options = SweepOptions(trials=5, out=tmp_path / "runs", device="cpu", stop_after_flat=2,
                           min_delta=0.01)
    run = run_sweep(load_spec(str(_spec(tmp_path, 1))), options)
    assert [t.state.name for t in run.study.trials] == ["COMPLETE"] * 3 + ["WAITING"] * 2
    assert run.stopped == ("study race stopped: the last 2 finished configurations did not "
                           "beat trial 0's 0.8000 by more than 0.0100 (--min-delta); "
                           "--stop-after-flat 2 (`mtbert studies --resume race` lifts it)")
    # Every later worker reads the stop before its first trial.
    again = run_sweep(load_spec(str(_spec(tmp_path, 1))),
                      SweepOptions(trials=5, out=tmp_path / "runs", device="cpu"))
    assert again.ran is False and "did not beat trial 0's" in again.stopped
    # Without a min-delta the 3rd beats the 1st and leads: no streak.
    assert flat_streak(run.study, 0.01)[0] == 2
    streak, leader, _ = flat_streak(run.study)
    assert streak == 0 and leader.number == 2


def test_flat_stop_with_seeds_uses_the_incumbents_seed_std(tmp_path, controlled):
    result = runner.invoke(app, ["-q", "sweep", str(_spec(tmp_path, 3)), "--trials", "7",
                                 "--stop-after-flat", "1", "--out", str(tmp_path / "runs"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # 1e-5 leads once it has its seeds; the next configuration to finish does not beat
    # it by more than its seed std: one flat configuration ends the study.
    best = VALUES[1e-5]
    assert (f"did not beat trial 0's {statistics.fmean(best):.4f} by more than "
            f"{statistics.stdev(best):.4f} (its seed standard deviation); "
            "--stop-after-flat 1") in result.stderr
    study = optuna.load_study(study_name="race",
                              storage=f"sqlite:///{tmp_path / 'runs' / 'mtbert.db'}")
    assert study.user_attrs[FLAT_RULE] == {"m": 1, "min_delta": 0.0}
    # It stopped before the first of the two sampled configurations (the queue first).
    assert len({config_of(t) for t in study.trials}) == 5
    # `studies --resume` lifts the stop.
    resumed = runner.invoke(app, ["-q", "studies", "--out", str(tmp_path / "runs"),
                                  "--resume", "race"])
    assert resumed.exit_code == 0, resumed.output
    study = optuna.load_study(study_name="race",
                              storage=f"sqlite:///{tmp_path / 'runs' / 'mtbert.db'}")
    assert not study.user_attrs.get("stop_requested") and not study.user_attrs["flat_stop"]


@pytest.mark.parametrize("args, message", [
    (["--stop-after-flat", "0"], "bad --stop-after-flat 0"),
    (["--min-delta", "0.1"], "--min-delta goes with --stop-after-flat M"),
    (["--stop-after-flat", "2", "--min-delta", "-1"], "bad --min-delta -1"),
])
def test_bad_flat_options_are_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["sweep", str(_spec(tmp_path, 1)), "--out",
                                 str(tmp_path / "runs"), *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


DRIVER = """import sys, time
sys.path.insert(0, {tests!r})
import test_racing
from mtbert.studies.runner import TrialRunner

def slow(self, trial, run_dir, slot):
    time.sleep(1.0)  # both workers' trials overlap
    return test_racing.controlled_process(self, trial, run_dir, slot)

TrialRunner._run_process = slow
from mtbert.cli import run
sys.argv = ["mtbert", *sys.argv[1:]]
run()
"""


@pytest.mark.slow
def test_two_workers_both_stop(tmp_path):
    driver = tmp_path / "worker.py"
    driver.write_text(DRIVER.format(tests=str(TESTS)))
    spec = _spec(tmp_path, 1)
    args = [sys.executable, str(driver), "-q", "sweep", str(spec), "--trials", "5",
            "--stop-after-flat", "2", "--out", str(tmp_path / "runs"), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    workers = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    for _, err in outputs:
        assert "did not beat trial" in err and "--stop-after-flat 2" in err
    study = optuna.load_study(study_name="race",
                              storage=f"sqlite:///{tmp_path / 'runs' / 'mtbert.db'}")
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(finished) < 10  # neither worker ran its five trials
