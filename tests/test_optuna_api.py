"""Each reach past Optuna's public API (`mtbert/studies/optuna_api.py`) against the
installed Optuna: a release that moves one fails here, by name."""

from __future__ import annotations

import random
import threading

import optuna
from optuna.distributions import FloatDistribution

from mtbert.studies.optuna_api import (SamplerView, refresh_trials, settle_grid_point,
                                       shared_storage, trial_id)
from mtbert.studies.samplers import grid_sampler
from mtbert.studies.storage import open_storage


def _study(tmp_path, name="api"):
    storage = shared_storage(open_storage(f"sqlite:///{tmp_path / 'api.db'}"))
    return optuna.create_study(study_name=name, storage=storage), storage


def test_trial_id_is_the_storage_id_of_a_trial_and_of_a_frozen_trial(tmp_path):
    study, storage = _study(tmp_path)
    study.ask()
    trial = study.ask()
    frozen = study.trials[1]
    assert trial_id(trial) == trial_id(frozen)
    assert storage.get_trial(trial_id(frozen)).number == 1
    assert optuna.trial.Trial(study, trial_id(frozen)).number == 1


def test_a_trial_created_through_the_shared_storage_samples_and_is_told(tmp_path):
    study, storage = _study(tmp_path)
    assert isinstance(storage, optuna.storages.BaseStorage)
    # The study opened on the shared object uses it as is, not a wrapper of its own.
    assert optuna.storages.get_storage(storage) is storage
    created = storage.create_new_trial(storage.get_study_id_from_name("api"))
    trial = optuna.trial.Trial(study, created)
    x = trial.suggest_float("x", 0.0, 1.0)  # the cache of the study knows the trial
    assert study.tell(trial, x).state.name == "COMPLETE"
    assert study.trials[0].params == {"x": x}


def test_refresh_trials_shows_the_sampler_trials_finished_since_its_last_draw(tmp_path):
    study, storage = _study(tmp_path)
    seen = []

    def thread():  # the sampler's per-thread cache, as a worker thread has it
        seen.append(len(study._get_trials(deepcopy=False, use_cache=True)))
        other = optuna.load_study(study_name="api", storage=storage)
        other.add_trial(optuna.trial.create_trial(
            value=0.5, params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)}))
        seen.append(len(study._get_trials(deepcopy=False, use_cache=True)))
        refresh_trials(study)
        seen.append(len(study._get_trials(deepcopy=False, use_cache=True)))

    worker = threading.Thread(target=thread)
    worker.start()
    worker.join()
    assert seen == [0, 0, 1]


def test_samplers_read_the_study_through_the_view(tmp_path):
    study, _ = _study(tmp_path)
    for x in (0.1, 0.2, 0.3):
        study.add_trial(optuna.trial.create_trial(
            value=x, params={"x": x}, distributions={"x": FloatDistribution(0, 1)}))
    calls = []

    def only_the_best(trials):
        calls.append(len(trials))
        return [max(trials, key=lambda t: t.value if t.value is not None else -1)]

    view = SamplerView(study, only_the_best)
    assert [t.value for t in view.get_trials()] == [0.3]
    assert view.study_name == "api"  # everything else is the study's
    calls.clear()
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2)
    study.ask()
    running = study.trials[-1]
    # TPE reads the finished trials through `_get_trials` of the study it is given.
    sampler.sample_independent(view, running, "x", FloatDistribution(0, 1))
    assert calls, "the sampler did not read the study's trials through _get_trials"


def test_two_workers_that_choose_the_same_grid_point_at_once_end_on_two(tmp_path):
    """Two samplers with the same seed choose in step (each reads the storage before
    either writes): the settling moves one of them off the shared point."""
    study, storage = _study(tmp_path)
    space = {"a": [1, 2, 3], "b": ["x", "y"]}
    sampler = grid_sampler(space, seed=0)
    first = storage.create_new_trial(study._study_id)
    second = storage.create_new_trial(study._study_id)
    for created in (first, second):  # what two workers that chose at once have written
        storage.set_trial_system_attr(created, "search_space", sampler._search_space)
        storage.set_trial_system_attr(created, "grid_id", 2)
    for created in (first, second):
        settle_grid_point(study, storage.get_trial(created), sampler, random.Random(0))
    points = [storage.get_trial(t).system_attrs["grid_id"] for t in (first, second)]
    assert len(set(points)) == 2 and all(0 <= p < 6 for p in points)
    # A queued trial keeps its parameters; one alone on its point stays there.
    queued = storage.create_new_trial(study._study_id)
    storage.set_trial_system_attr(queued, "fixed_params", {"a": 1, "b": "x"})
    storage.set_trial_system_attr(queued, "grid_id", points[0])
    settle_grid_point(study, storage.get_trial(queued), sampler, random.Random(0))
    assert storage.get_trial(queued).system_attrs["grid_id"] == points[0]

