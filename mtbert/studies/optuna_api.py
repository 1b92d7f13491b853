"""The few places where mtbert reaches past Optuna's public API, each with why.

Everything else in `mtbert/` uses Optuna's public API only
(`tests/test_architecture.py` fails on a private Optuna name anywhere else), and
`tests/test_optuna_api.py` exercises each use here against the installed
Optuna, so that a release that moves one of them fails a test naming it, not a
sweep at run time. `pyproject.toml` bounds Optuna to the releases tested.
"""

from __future__ import annotations

import abc
import copy


def trial_id(trial) -> int:
    """The storage id of a trial (`Trial` or `FrozenTrial`).

    Why private: Optuna keeps a trial's id in `_trial_id`, yet its public storage
    methods (`BaseStorage.get_trial`, `set_trial_state_values`) and the public
    `optuna.trial.Trial(study, trial_id)` constructor take it. The worker claims a
    queued trial by it, and a trial process reports to its trial by it."""
    return trial._trial_id


def shared_storage(storage):
    """The storage object through which a study opened on `storage` reads and writes.

    Why internal: a study wraps an `RDBStorage` in Optuna's private `_CachedStorage`
    (through `optuna.storages.get_storage`, marked for internal use), which knows only
    the trials created through it. The worker claims and creates its trials itself, so
    it opens its study on the wrapped object and keeps it."""
    import optuna

    return optuna.storages.get_storage(storage)


def refresh_trials(study) -> None:
    """Let the sampler see every trial finished so far, before the next trial samples.

    Why private: samplers read a study's trials through a per-thread cache that
    `Study.ask` empties once a trial (`_thread_local.cached_all_trials`). The worker
    creates its trials itself (it chooses which queued trial to take), so it empties
    the cache the same way; without it a sampler in a long-lived worker thread would
    keep sampling from the trials of its first draw."""
    study._thread_local.cached_all_trials = None


class SamplerView:
    """A study as a sampler should see it, its trials rewritten by `show(trials)`.

    Why private: Optuna's samplers read a study's trials through the private
    `Study._get_trials(deepcopy, states, use_cache)`, not `get_trials`; a view that
    changes what a sampler learns from (racing: one trial per configuration, valued by
    its mean over seeds) must answer that method. Everything else is the study's."""

    def __init__(self, study, show):
        self._study, self._show = study, show

    def __getattr__(self, name):
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        every = self._study._get_trials(deepcopy=False, states=None, use_cache=use_cache)
        shown = [t for t in self._show(every) if states is None or t.state in states]
        return [copy.deepcopy(t) for t in shown] if deepcopy else shown

    def get_trials(self, deepcopy: bool = True, states=None):
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self):
        return self._get_trials()


def retrying_storage(storage, call):
    """`storage` (a study's `shared_storage`) with every method, the private ones
    Optuna's own functions reach for included, run through `call(method, *args)`:
    the worker's outage policy (`studies.outage`). `.plain` is the storage itself.

    Why private: `optuna.storages.fail_stale_trials`, which the worker runs before each
    trial as `Study.optimize` does, asks a storage whether it is an instance of the
    private `optuna.storages._heartbeat.BaseHeartbeat` and then calls its private
    `_get_stale_trial_ids`; a wrapper must be both to keep dead workers' trials
    failing and queuing again."""
    from optuna.storages import BaseStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    class Retrying(BaseStorage, BaseHeartbeat):
        plain = storage

        def __getattr__(self, name):
            value = getattr(storage, name)
            if not callable(value):
                return value
            return lambda *args, **kwargs: call(value, *args, **kwargs)

    # Every method the storage has, so that none runs the base class's version on this
    # wrapper instead of the storage's own.
    for name in {n for n in dir(type(storage)) if not n.startswith("__")} | \
            BaseStorage.__abstractmethods__ | BaseHeartbeat.__abstractmethods__:
        if callable(getattr(storage, name, None)):
            setattr(Retrying, name, _through(name))
    abc.update_abstractmethods(Retrying)
    return Retrying()


def _through(name: str):
    def method(self, *args, **kwargs):
        return self.__getattr__(name)(*args, **kwargs)
    method.__name__ = name
    return method


def grid_left(study, sampler) -> int:
    """Points of a grid sampler (`samplers.grid_sampler`) that no trial of `study` has
    taken yet (running, finished or queued as a retry).

    Why internal: `GridSampler` marks the trial it assigns a point with the system
    attributes `grid_id` and `search_space`, names Optuna does not document; its own
    `is_exhausted` counts a running point as not yet visited, so a worker that asked
    it would start a point that another trial is running."""
    grid = sampler.search_space
    points = 1
    for values in grid.values():
        points *= len(values)
    taken = {t.system_attrs["grid_id"] for t in study.get_trials(deepcopy=False)
             if "grid_id" in t.system_attrs and t.system_attrs.get("search_space") == grid}
    return points - len(taken)


def settle_grid_point(study, trial, sampler, rng) -> None:
    """Move `trial` off a grid point that another trial of `study` holds, to one no trial
    holds (a grid sampler's `before_trial`, after Optuna's `GridSampler` chose).

    Why internal: `GridSampler` keeps a trial's point in the system attribute `grid_id`
    (with `search_space`), written through the private `study._storage`; its own choice
    among the points not taken reads the storage before it writes, so two workers that
    choose at once can take the same point (with the same seed they do, in step). Each
    trial writes its point before it looks for another holder, so of two that chose at
    once at least one sees the other and moves; `rng` (each process its own) keeps two
    that both moved from moving to the same point again."""
    storage, points, search_space = study._storage, len(sampler._all_grids), sampler._search_space
    for _ in range(points):
        mine = storage.get_trial(trial._trial_id).system_attrs
        if "grid_id" not in mine or "fixed_params" in mine:
            return
        held = {t.system_attrs["grid_id"] for t in storage.get_all_trials(
                    study._study_id, deepcopy=False)
                if t.number != trial.number and "grid_id" in t.system_attrs
                and t.system_attrs.get("search_space") == search_space}
        free = sorted(set(range(points)) - held)
        if mine["grid_id"] not in held or not free:
            return
        storage.set_trial_system_attr(trial._trial_id, "grid_id", rng.choice(free))
