"""What a study costs, `sweep --budget-hours` and `studies --stop`: the hours arithmetic
on studies built through Optuna's API, then sweeps (stand-in trial processes, SQLite)
stopped by a budget and by a stop another process asks for."""

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.studies.budget import set_budget, stop_reason, study_hours

from conftest import tiny_sweep_args as _args, use_stub_trials, write_task_files
from test_report import _parse

runner = CliRunner()
SPEC = "name: cost\nspace:\n  model.dropout: {type: float, low: 0.0, high: 0.3}\n" \
       "pruner: {name: none}\n"
START = datetime(2025, 1, 1, 12, 0, 0)


def _study(out, name="cost"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out}/mtbert.db")


def _has_complete(out) -> bool:
    """Whether the worker's study holds a COMPLETE trial; False while the worker is still
    creating the file's tables (opening it then can collide with that: try again)."""
    import sqlalchemy.exc

    try:
        return any(t.state.name == "COMPLETE" for t in _study(out).trials)
    except (KeyError, sqlalchemy.exc.SQLAlchemyError):
        return False


def _trial(number, state, seconds, **attrs):
    """A finished trial that ran `seconds` by its timestamps."""
    return FrozenTrial(number=number, state=state, value=0.5 if state.name == "COMPLETE" else None,
                       datetime_start=START, datetime_complete=START + timedelta(seconds=seconds),
                       params={"x": 0.1}, distributions={"x": FloatDistribution(0, 1)},
                       user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=number)


def _recomputed(study) -> float:
    return sum(t.user_attrs["wall_s"] * t.user_attrs["gpu_share"] for t in study.trials) / 3600


def test_hours_are_wall_time_times_share_running_trials_so_far(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="h", storage=f"sqlite:///{tmp_path}/mtbert.db",
                                direction="maximize")
    # 1800 s at a quarter GPU (--trials-per-gpu 4): 0.125 h; wall_s wins over timestamps.
    study.add_trial(_trial(0, TrialState.COMPLETE, 9999, wall_s=1800.0, gpu_share=0.25,
                           device="cuda"))
    study.add_trial(_trial(1, TrialState.PRUNED, 400, wall_s=360.0, gpu_share=1.0,
                           device="cpu"))  # 0.1 h
    study.add_trial(_trial(2, TrialState.FAIL, 720))  # a dead worker's: its duration, 0.2 h
    study.enqueue_trial({"x": 0.2})  # waiting: nothing yet
    running = study.ask()
    running.set_user_attr("gpu_share", 0.5)
    started = study.trials[-1].datetime_start
    # Two hours in, at half a GPU: 1 h so far.
    assert study_hours(study, now=started + timedelta(hours=2)) == pytest.approx(1.425)
    assert study_hours(study) == pytest.approx(0.425, abs=1e-3)
    assert stop_reason(study) is None
    set_budget(study, 0.5)
    assert stop_reason(study) is None
    set_budget(study, 0.4)  # a later budget replaces the stored one
    assert stop_reason(study) == ("study h has spent its budget: 0.4250 of 0.4000 hours; no "
                                  "new trial starts (a higher --budget-hours raises it)")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_budget_that_is_no_positive_number_exits_2_before_the_study(tmp_path, value):
    result = runner.invoke(app, ["sweep", "alpha", "--wandb-mode", "disabled", "--out",
                                 str(tmp_path), "--budget-hours", value])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"mtbert: error: bad --budget-hours {float(value)}; "
                                     "valid: a finite number of hours > 0")
    assert not (tmp_path / "mtbert.db").exists()


def test_studies_stop_and_resume_are_one_at_a_time(tmp_path):
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/mtbert.db")
    both = runner.invoke(app, ["studies", "--out", str(tmp_path), "--stop", "s",
                               "--resume", "s"])
    assert both.exit_code == 2
    assert both.stderr.strip() == "mtbert: error: --stop and --resume do not go together; " \
                                  "pick one"
    unknown = runner.invoke(app, ["studies", "--out", str(tmp_path), "--stop", "t"])
    assert unknown.exit_code == 2 and "no study 't' in this storage; studies: s" in \
        unknown.stderr


@pytest.fixture(scope="module")
def budgeted(tiny_encoder, tmp_path_factory):
    """A study whose first sweep (6 trials asked, 2 at a time) met a budget of 3.6 s of
    compute, then a second sweep without --budget-hours."""
    root = tmp_path_factory.mktemp("budget")
    task_dir = write_task_files(root / "data")
    (root / "cost.yaml").write_text(SPEC)
    out = root / "runs"
    args = _args(root / "cost.yaml", tiny_encoder, task_dir, out, 6, "--trials-per-gpu", "2")
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_stub_trials(monkeypatch, epoch_s=1.0)  # 2 trials at a time: 3.6 s by the 2nd pair
        first = runner.invoke(app, [*args, "--budget-hours", "0.001"])
        trials = len(_study(out).trials)
        second = runner.invoke(app, args)
    return out, first, trials, second


@pytest.mark.slow
def test_the_budget_stops_a_sweep_early_for_every_worker(budgeted):
    out, first, trials_after_first, second = budgeted
    assert first.exit_code == 0, first.output
    message = "study cost has spent its budget: "
    assert first.stderr.count(message) == 1, first.stderr
    assert "no new trial starts (a higher --budget-hours raises it)" in first.stderr
    assert first.stdout.splitlines()[0].split()[0] == "trial"  # the table, as usual
    study = _study(out)
    assert study.user_attrs["budget_hours"] == 0.001
    assert 1 <= trials_after_first < 6
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert study_hours(study) >= 0.001
    for t in study.trials:
        assert t.user_attrs["device"] == "cpu" and t.user_attrs["gpu_share"] == 1.0
        assert 0 < t.user_attrs["wall_s"] <= t.duration.total_seconds()
    # A worker started without --budget-hours obeys the stored budget: exit 0, no trial.
    assert second.exit_code == 0, second.output
    assert message in second.stderr and "no trial could finish" not in second.stderr
    assert len(study.trials) == trials_after_first
    assert second.stdout.splitlines()[0].split()[0] == "trial"


@pytest.mark.slow
def test_studies_best_and_report_show_the_hours_of_the_trials(budgeted, tmp_path):
    out = budgeted[0]
    hours = f"{_recomputed(_study(out)):.4f}"
    listed = runner.invoke(app, ["studies", "--out", str(out)])
    assert listed.exit_code == 0, listed.output
    header, row = listed.stdout.splitlines()
    names = header.split()
    at = names.index("hours")  # the columns before it change as the table grows
    assert names[at:at + 4] == ["hours", "budget", "size", "best"]
    assert row.split()[:1] + row.split()[at:at + 2] == ["cost", hours, "0.0010"]
    best = runner.invoke(app, ["best", "--out", str(out)])
    assert best.exit_code == 0, best.output
    assert best.stdout.splitlines()[-1] == f"hours: {hours}"
    report = runner.invoke(app, ["report", "--out", str(out), "--to", str(tmp_path / "r")])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "r" / "index.html").read_text()
    assert f"<li>hours: <b>{hours}</b>" in text and "budget 0.0010 hours" in text
    header, *rows = _parse(tmp_path / "r" / "index.html").rows
    wall, per_trial = header.index("wall (s)"), header.index("hours")
    trials = _study(out).trials
    assert [float(r[wall]) for r in rows] == [round(t.user_attrs["wall_s"], 1)
                                              for t in trials]
    assert sum(float(r[per_trial]) for r in rows) == pytest.approx(float(hours), abs=1e-3)


def _wait_for(predicate, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (KeyError, ValueError):  # the study is not created yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_studies_stop_ends_another_worker_after_its_running_trial(tiny_encoder, task_dir,
                                                                  tmp_path, monkeypatch):
    use_stub_trials(monkeypatch, epoch_s=0.5)
    (tmp_path / "cost.yaml").write_text(SPEC)
    out = tmp_path / "runs"
    args = _args(tmp_path / "cost.yaml", tiny_encoder, task_dir, out, 20)
    worker = subprocess.Popen([sys.executable, "-m", "mtbert", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        # The worker creates the storage: never open it before it exists.
        _wait_for(lambda: (out / "mtbert.db").exists() and _has_complete(out),
                  "the worker's first complete trial")
        stopped = runner.invoke(app, ["studies", "--out", str(out), "--stop", "cost"])
        assert stopped.exit_code == 0, stopped.output
        assert stopped.stdout.startswith("study cost: asked to stop;")
        _, err = worker.communicate(timeout=300)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, err
    assert "mtbert: study cost was asked to stop (mtbert studies --stop)" in err
    trials = _study(out).trials
    assert 1 <= len(trials) < 20
    assert all(t.state.name == "COMPLETE" for t in trials)  # none left RUNNING
    listed = runner.invoke(app, ["studies", "--out", str(out)])
    assert listed.stdout.splitlines()[1].endswith("(stop requested)")

    # A new sweep of the stopped study runs nothing and says so; --resume lifts the stop.
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "study cost was asked to stop (mtbert studies --stop)" in again.stderr
    assert len(_study(out).trials) == len(trials)
    resumed = runner.invoke(app, ["studies", "--out", str(out), "--resume", "cost"])
    assert resumed.exit_code == 0, resumed.output
    after = runner.invoke(app, _args(tmp_path / "cost.yaml", tiny_encoder, task_dir, out, 1))
    assert after.exit_code == 0, after.output
    assert "asked to stop" not in after.stderr
    assert len(_study(out).trials) == len(trials) + 1
