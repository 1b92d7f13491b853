"""The spec contract of every sampler and pruner a spec may name: checked at spec load,
sampling inside the spec's space (conditional parameters only when their condition
holds), reproducible from the spec's seed, pruning a trial far behind; and a 2-trial
sweep (stand-in trial processes, tests/stub_trial.py) with each of gp, qmc and
successive_halving."""

from __future__ import annotations

import optuna
import pytest
from typer.testing import CliRunner

from mtbert.cli import app
from mtbert.errors import ConfigError
from mtbert.studies.samplers import PRUNERS, SAMPLERS, make_pruner, make_sampler
from mtbert.studies.spec import load_spec, spec_from_dict, suggest

from conftest import tiny_sweep_args
from stub_trial import stub_metrics

runner = CliRunner()

SPACE = {"train.schedule": {"type": "categorical", "choices": ["annealed", "proportional"]},
         "train.alpha": {"type": "float", "low": 0.0, "high": 1.0,
                         "when": {"train.schedule": "proportional"}},
         "train.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
         "model.head_hidden": {"type": "int", "low": 0, "high": 64, "step": 16}}
# Each sampler as a spec would name it, with few startup trials so that the model-based
# ones (tpe, gp) sample from their model within the trials run here.
SAMPLER_SPECS = {"tpe": {"seed": 0, "n_startup_trials": 2}, "random": {"seed": 0},
                 "nsga2": {"seed": 0, "population_size": 4}, "gp": {"seed": 0,
                                                                     "n_startup_trials": 2},
                 "qmc": {"seed": 0, "scramble": True}}
CLASSES = {"tpe": "TPESampler", "random": "RandomSampler", "nsga2": "NSGAIISampler",
           "gp": "GPSampler", "qmc": "QMCSampler", "median": "MedianPruner",
           "hyperband": "HyperbandPruner", "successive_halving": "SuccessiveHalvingPruner",
           "none": "NopPruner"}
PRUNER_SPECS = {"median": {"n_startup_trials": 2},
                "hyperband": {"min_resource": 1, "max_resource": 3, "reduction_factor": 3},
                "successive_halving": {"min_resource": 1, "reduction_factor": 2}, "none": {}}
BAD_ARGUMENTS = {"tpe": {"n_startup": 3}, "random": {"seeds": 1},
                 "nsga2": {"population_size": 1}, "gp": {"n_startup": 3},
                 "qmc": {"qmc_type": "lattice"}, "median": {"n_startup_trials": -1},
                 "hyperband": {"max_resource": "fast"},
                 "successive_halving": {"reduction_factor": 1}, "none": {"patience": 2}}


def _spec(sampler: dict | None = None, pruner: dict | None = None, objectives=None):
    raw = {"name": "contract", "space": SPACE, "sampler": sampler, "pruner": pruner}
    if objectives:
        raw.update(objective=objectives, directions=["maximize"] * len(objectives))
    return spec_from_dict(raw, where="spec", source="test")


# The grid sampler takes no `when:` and needs every value listed: tests/test_grid.py.
CONTRACT_SAMPLERS = tuple(s for s in SAMPLERS if s != "grid")


def test_the_contract_covers_every_sampler_and_pruner():
    assert set(SAMPLER_SPECS) == set(CONTRACT_SAMPLERS) and set(PRUNER_SPECS) == set(PRUNERS)
    assert set(BAD_ARGUMENTS) == set(CONTRACT_SAMPLERS) | set(PRUNERS)


@pytest.mark.parametrize("name", CONTRACT_SAMPLERS + PRUNERS)
def test_a_spec_names_each_strategy_and_a_bad_argument_fails_at_load(name):
    kind = "sampler" if name in SAMPLERS else "pruner"
    arguments = SAMPLER_SPECS.get(name) if kind == "sampler" else PRUNER_SPECS[name]
    spec = _spec(**{kind: {"name": name, **arguments}})
    made = (make_sampler if kind == "sampler" else make_pruner)(getattr(spec, kind))
    assert type(made).__name__ == CLASSES[name]
    with pytest.raises(ConfigError, match=rf"^spec: {kind} {name}: "):
        _spec(**{kind: {"name": name, **BAD_ARGUMENTS[name]}})


def _sample(spec, n: int) -> list[dict]:
    """`n` trials of the spec's space, each told a value that prefers a high alpha and a
    learning rate near 1e-4 (and, for a second objective, a small head)."""
    study = optuna.create_study(study_name="contract", sampler=make_sampler(spec.sampler),
                                directions=spec.directions)
    sampled = []
    for _ in range(n):
        trial = study.ask()
        params = suggest(trial, spec)
        value = params.get("train.alpha", 0.5) - abs(params["train.lr"] - 1e-4) * 100
        study.tell(trial, [value, -params["model.head_hidden"] / 64][:len(spec.objectives)])
        sampled.append(params)
    return sampled


@pytest.mark.parametrize("objectives", [["overall/geometric"], ["sst/acc", "qqp/acc"]],
                         ids=["single", "multi"])
@pytest.mark.parametrize("name", CONTRACT_SAMPLERS)
def test_every_sampler_stays_in_the_space_and_repeats_with_its_seed(name, objectives):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = _spec({"name": name, **SAMPLER_SPECS[name]}, objectives=objectives)
    sampled = _sample(spec, 5)
    for params in sampled:
        assert params["train.schedule"] in ("annealed", "proportional")
        assert ("train.alpha" in params) == (params["train.schedule"] == "proportional")
        assert 0.0 <= params.get("train.alpha", 0.0) <= 1.0
        assert 1e-5 <= params["train.lr"] <= 1e-3
        assert params["model.head_hidden"] in (0, 16, 32, 48, 64)
    assert len({tuple(sorted(p.items())) for p in sampled}) == 5  # no configuration twice
    assert _sample(spec, 5) == sampled  # the spec's seed makes the study repeatable


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_keeps_improving_trials_and_prunes_one_far_behind(name):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = _spec(pruner={"name": name, **PRUNER_SPECS[name]})
    study = optuna.create_study(study_name="contract", direction="maximize",
                                pruner=make_pruner(spec.pruner))
    for i in range(6):  # each better than the ones before it at every epoch
        trial = study.ask()
        for epoch in (1, 2, 3):
            trial.report(0.5 + 0.1 * i + 0.01 * epoch, epoch)
            assert not trial.should_prune()
        study.tell(trial, 0.53 + 0.1 * i)
    behind = study.ask()
    pruned_at = None
    for epoch in (1, 2, 3):  # Hyperband's brackets first compare after 1 or 3 epochs
        behind.report(0.1, epoch)
        if behind.should_prune():
            pruned_at = epoch
            break
    if name == "none":
        assert pruned_at is None
    elif name == "hyperband":  # this trial's bracket compares after 3 epochs
        assert pruned_at == 3
    else:
        assert pruned_at == 1


def _sweep(tmp_path, tiny_encoder, task_dir, sampler: str):
    spec = tmp_path / f"{sampler}.yaml"
    spec.write_text(
        f"name: {sampler}\nspace:\n  model.dropout: {{type: float, low: 0.0, high: 0.3}}\n"
        "  train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "  model.head_hidden: {type: categorical, choices: [0, 16, 32]}\n"
        f"sampler: {{name: {sampler}, seed: 0, "
        + ("n_startup_trials: 1}\n" if sampler == "gp" else "scramble: true}\n")
        + "pruner: {name: successive_halving, min_resource: 1, reduction_factor: 2}\n")
    out = tmp_path / "runs"
    result = runner.invoke(app, tiny_sweep_args(spec, tiny_encoder, task_dir, out, 2))
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name=sampler, storage=f"sqlite:///{out}/mtbert.db").trials
    assert [t.number for t in trials] == [0, 1]
    return trials, load_spec(str(spec))


def _replayed(spec, first) -> dict:
    """What the spec's sampler proposes after the study's first trial: the second trial
    of a sweep sampled by the sampler itself (not its random start)."""
    study = optuna.create_study(study_name=spec.name, sampler=make_sampler(spec.sampler),
                                direction="maximize")
    study.add_trial(first)
    return suggest(study.ask(), spec)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["gp", "qmc"])
def test_a_two_trial_sweep_samples_with_the_sampler_and_halves_successively(
        sampler, stub_trials, tiny_encoder, task_dir, tmp_path):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    trials, spec = _sweep(tmp_path, tiny_encoder, task_dir, sampler)
    first, second = trials
    assert first.state.name == "COMPLETE"  # alone in its rung: promoted
    assert second.params == _replayed(spec, first) != first.params
    # Each trial reported its own objective after epoch 1 (the stand-in's, seed 0).
    for t in trials:
        assert t.intermediate_values == {
            1: pytest.approx(stub_metrics(t.params, 0, 0, {})["overall/geometric"])}
    # Rung 0 (epoch 1) with reduction factor 2 promotes the better half of its two
    # trials: the second trial goes on only when it beats the first (on the stand-in's
    # values gp's second trial is ahead and qmc's behind: both cases run).
    behind = second.intermediate_values[1] < first.intermediate_values[1]
    assert second.state.name == ("PRUNED" if behind else "COMPLETE")
    assert second.system_attrs["completed_rung_0"] == second.intermediate_values[1]
