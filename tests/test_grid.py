"""The grid sampler (`sampler: {name: grid}`): spec checks, every point once, the end."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.errors import ConfigError
from mtbert.studies import racing
from mtbert.studies.grid import grid_points, grid_values
from mtbert.studies.inert import combinations
from mtbert.studies.optuna_api import grid_left
from mtbert.studies.samplers import make_sampler
from mtbert.studies.spec import load_spec, spec_from_dict
from mtbert.studies.worker import NextTrial, Worker

from conftest import tiny_sweep_args, use_stub_trials

runner = CliRunner()
# The worker fails stale trials through Optuna's experimental call; sweeps silence it.
quiet_optuna = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

GRID = {"name": "grid", "base": {"train.schedule": "triple_batch", "loss.method": "weighted"},
        "space": {"loss.weights.qqp": {"type": "float", "low": 0.1, "high": 10.0, "log": True,
                                       "grid": [0.5, 2.0]},
                  "train.epochs": {"type": "int", "low": 1, "high": 9, "step": 2,
                                   "grid": [1, 3, 5]},
                  "model.head_hidden": {"type": "categorical", "choices": [0, 64]}},
        "sampler": {"name": "grid", "seed": 0}, "pruner": {"name": "none"}}


def _spec(**changes):
    raw = {**GRID, **changes}
    return spec_from_dict(raw, where="spec grid", source="test")


def test_a_grid_is_every_combination_of_choices_and_grid_values():
    spec = _spec()
    assert grid_values(spec.space) == {"loss.weights.qqp": [0.5, 2.0], "train.epochs": [1, 3, 5],
                                       "model.head_hidden": [0, 64]}
    assert grid_points(spec.space) == 12
    # --check walks the grid's values, not the numeric ranges
    assert len(list(combinations(spec))) == 12


@pytest.mark.parametrize("entry, message", [
    ({"type": "float", "low": 0.1, "high": 10.0, "grid": [0.5, 20.0]}, "20.0 is outside [0.1, 10]"),
    ({"type": "int", "low": 1, "high": 9, "grid": [1, 2.5]}, "2.5 is not a whole number"),
    ({"type": "int", "low": 1, "high": 9, "step": 2, "grid": [1, 4]},
     "4 is not on the step 1 + k * 2"),
    ({"type": "float", "low": 0.1, "high": 10.0, "grid": []}, "must be a non-empty list"),
    ({"type": "float", "low": 0.1, "high": 10.0, "grid": ["abc"]}, "'abc' is not a number"),
    ({"type": "float", "low": 0.1, "high": 10.0, "grid": [True]}, "True is not a number"),
    ({"type": "float", "low": 0.1, "high": 10.0, "grid": [1.0, 1.0]}, "lists a value twice"),
    ({"type": "categorical", "choices": [0.5, 1.0], "grid": [0.5]}, "grid do not go with a categorical"),
])
def test_bad_grid_values_are_one_line_naming_the_key(entry, message):
    with pytest.raises(ConfigError, match="space.loss.weights.qqp") as err:
        _spec(space={**GRID["space"], "loss.weights.qqp": entry})
    assert message in str(err.value)


def test_the_grid_sampler_is_optunas_and_a_bad_argument_fails_at_load():
    assert type(make_sampler(_spec().sampler, grid=grid_values(_spec().space))).__mro__[1] \
        is optuna.samplers.GridSampler
    with pytest.raises(ConfigError, match=r"^spec grid: sampler grid: .*'seeds'"):
        _spec(sampler={"name": "grid", "seeds": 1})


def test_the_grid_sampler_needs_every_numeric_value_and_no_condition():
    space = {**GRID["space"], "train.lr": {"type": "float", "low": 1e-5, "high": 1e-3}}
    with pytest.raises(ConfigError, match=r"space.train.lr: the grid sampler needs its values"):
        _spec(space=space)
    space = {**GRID["space"], "train.alpha": {"type": "categorical", "choices": [0.5, 1.0],
                                              "when": {"train.schedule": "proportional"}}}
    with pytest.raises(ConfigError, match="the grid sampler takes no when:"):
        _spec(space=space)
    # Other samplers ignore grid: values (a spec can switch samplers with one line).
    assert _spec(sampler={"name": "tpe", "seed": 0}).space["train.epochs"].grid == [1, 3, 5]


def test_printed_grid_spec_loads_back_the_same(tmp_path):
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump(GRID))
    printed = runner.invoke(app, ["sweep", str(spec), "--print"])
    assert printed.exit_code == 0, printed.output
    again = tmp_path / "again.yaml"
    again.write_text(printed.stdout)
    assert load_spec(str(again)).to_dict() == load_spec(str(spec)).to_dict()
    assert yaml.safe_load(printed.stdout)["space"]["train.epochs"]["grid"] == [1, 3, 5]


def test_race_alpha_zero_races_nothing_out(tmp_path):
    spec = _spec(seeds=3, race_alpha=0)
    assert (spec.seeds, spec.race_alpha) == (3, 0.0)
    with pytest.raises(ConfigError, match="race_alpha must be a number from 0"):
        _spec(seeds=3, race_alpha=-0.1)
    study = optuna.create_study(direction="maximize")
    for config, values in ((0, [0.9, 0.91, 0.92]), (3, [0.1])):
        for seed, value in enumerate(values):
            trial = optuna.trial.create_trial(
                value=value, params={}, distributions={},
                user_attrs={"seed": seed, "config_id": config,
                            **({racing.RESEED_OF: config} if seed else {})})
            study.add_trial(trial)
    # Configuration 3 trails by 0.8 on both shared seeds: any level above 0 races it out.
    assert racing.decide(study, config=3, value=0.11, seeds=3, alpha=0.5, seed=1).state \
        == racing.RACED
    assert racing.decide(study, config=3, value=0.11, seeds=3, alpha=0.0, seed=1).state \
        == racing.CONTINUE


def _worker_study(tmp_path: Path, seed: int = 0):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/grid.db")
    sampler = make_sampler({"name": "grid", "seed": seed}, grid={"x": [1, 2, 3], "y": ["a", "b"]})
    study = optuna.create_study(study_name="grid", storage=storage, sampler=sampler)
    return study, storage


@quiet_optuna
def test_a_worker_runs_each_grid_point_once_then_stops(tmp_path):
    study, storage = _worker_study(tmp_path)

    def objective(trial):
        return trial.suggest_int("x", 1, 3) + len(trial.suggest_categorical("y", ["a", "b"]))

    next_trial = NextTrial()
    worker = Worker(study, storage, objective=objective, slots=1, next_trial=next_trial)
    assert worker.optimize(n_trials=None) is None  # the end of the grid, not a stop
    points = sorted((t.params["x"], t.params["y"]) for t in study.trials)
    assert points == [(x, y) for x in (1, 2, 3) for y in ("a", "b")]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert grid_left(study, study.sampler) == 0 and next_trial.grid_done
    # A second worker on the finished grid starts nothing.
    again = Worker(study, storage, objective=objective, slots=1, next_trial=NextTrial())
    assert again.optimize(n_trials=None) is None
    assert len(study.trials) == 6


@quiet_optuna
def test_a_running_point_is_taken(tmp_path):
    study, storage = _worker_study(tmp_path)
    running = study.ask()  # the grid assigns it a point; it has not finished
    taken = (running.suggest_int("x", 1, 3), running.suggest_categorical("y", ["a", "b"]))
    assert grid_left(study, study.sampler) == 5
    Worker(study, storage, objective=lambda t: t.suggest_int("x", 1, 3)
           + len(t.suggest_categorical("y", ["a", "b"])), slots=1,
           next_trial=NextTrial()).optimize(n_trials=None)
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    points = {(t.params["x"], t.params["y"]) for t in finished}
    assert len(points) == 5 and taken not in points  # the running point is not run twice


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_grid_sweep_with_every_seed_runs_the_fixed_protocol(tiny_encoder, task_dir, tmp_path,
                                                              monkeypatch):
    """The protocol a table of real runs is made with: every grid point, every seed
    (race_alpha 0), every epoch (no pruner), and the sweep ends on its own."""
    use_stub_trials(monkeypatch)
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "grid", "base": {"train": {"seed": 3, "schedule": "triple_batch"},
                 "loss": {"method": "weighted"}},
        "space": {"loss.weights.qqp": {"type": "float", "low": 0.1, "high": 10.0,
                                       "grid": [0.5, 2.0]},
                  "model.head_hidden": {"type": "categorical", "choices": [0, 64]}},
        "sampler": {"name": "grid", "seed": 0}, "pruner": {"name": "none"},
        "seeds": 3, "race_alpha": 0}))
    out = tmp_path / "runs"
    args = tiny_sweep_args(spec, tiny_encoder, task_dir, out, 1)
    args = [a for i, a in enumerate(args) if a != "--trials" and args[i - 1] != "--trials"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="grid", storage=f"sqlite:///{out}/mtbert.db").trials
    runs = sorted((t.params["loss.weights.qqp"], t.params["model.head_hidden"],
                   t.user_attrs["seed"]) for t in trials)
    assert runs == [(w, h, s) for w in (0.5, 2.0) for h in (0, 64) for s in (3, 4, 5)]
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert result.stderr == ""  # -q: nothing to warn of
