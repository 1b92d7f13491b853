"""Optuna samplers and pruners by the names a sweep spec gives them.

Torch-free, so that a trial process can build its study's pruner without the
training stack (the stand-in trial of the orchestration tests imports no torch).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any

from mtbert.errors import ConfigError
from mtbert.studies.grid import GRID
from mtbert.safeyaml import shown

SAMPLERS = ("tpe", "random", "nsga2", "gp", "qmc", "grid")
PRUNERS = ("median", "hyperband", "successive_halving", "none")
CONSTRAINED_SAMPLERS = ("tpe", "nsga2", "gp")  # those that take Optuna's constraints_func
log = logging.getLogger("mtbert")


def trials_record_constraints() -> bool:
    """Whether the installed Optuna (5 and later) takes constraint values from the trial
    itself (`Trial.set_constraint`) rather than from a sampler's `constraints_func`."""
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def make_sampler(options: dict[str, Any], constraints_func=None,
                 grid: dict[str, list] | None = None):
    """An Optuna sampler from a spec's `sampler: {name: ..., **arguments}`; the grid
    sampler's values are the space's `grid` (`studies.grid.grid_values`). With
    `constraints_func` (a study with constraints), the samplers that model constraints
    get it where the installed Optuna wants it (before 5: from 5 on, each trial records
    its constraint values itself, `constraints.record_feasibility`); the others warn."""
    if options.get("name") == "grid":
        options = {**options, "search_space": grid or {}}
    if constraints_func is not None:
        if options.get("name") in CONSTRAINED_SAMPLERS:
            if not trials_record_constraints():
                options = {**options, "constraints_func": constraints_func}
        else:
            log.warning("sampler %s ignores constraints (those of %s do not): it samples "
                        "as if there were none; the ranking still leaves infeasible trials "
                        "out", options.get("name"), ", ".join(CONSTRAINED_SAMPLERS))
    return _construct("sampler", sampler_classes(), options)


def sampler_classes() -> dict[str, Any]:
    """What builds each sampler of SAMPLERS: an Optuna class, or for grid a function that
    takes the space's values as `search_space`."""
    import optuna

    return {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "nsga2": optuna.samplers.NSGAIISampler, "gp": optuna.samplers.GPSampler,
            "qmc": optuna.samplers.QMCSampler, "grid": grid_sampler}


def worker_seed(sampler: dict, worker: int) -> int | None:
    """The sampler seed of the study's `worker`-th worker where it is not the spec's: the
    spec's + `worker`. None for the first worker, a spec without a seed, and the grid
    sampler, whose seed orders the grid's points: every worker must number them alike."""
    if not worker or sampler.get("seed") is None or sampler.get("name") == GRID:
        return None
    return sampler["seed"] + worker


def grid_sampler(search_space: dict[str, list], seed: int | None = None):
    """Optuna's `GridSampler` over the space's values (`grid:`, a categorical's choices).

    Optuna's ends its study by `Study.stop` when the last point is told; that call is for
    `Study.optimize`, and the sweep's worker asks and tells trials itself: it starts no
    trial once the grid is done (`optuna_api.grid_left`). Workers that share the study
    take each point once: a trial that chose a point another holds moves to a free one
    (`optuna_api.settle_grid_point`)."""
    import os
    import random

    import optuna

    from mtbert.studies import optuna_api

    class GridSampler(optuna.samplers.GridSampler):
        def __init__(self, search_space, seed=None):
            super().__init__(search_space, seed=seed)
            self.search_space = {k: list(v) for k, v in sorted(search_space.items())}
            # Only a point another worker took is chosen again: by this process's own draw.
            self._settle = random.Random(f"{seed}:{os.getpid()}")

        def before_trial(self, study, trial) -> None:
            super().before_trial(study, trial)
            optuna_api.settle_grid_point(study, trial, self, self._settle)

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return GridSampler(search_space, seed=seed)


def make_pruner(options: dict[str, Any]):
    """An Optuna pruner from a spec's `pruner: {name: ..., **arguments}`."""
    return _construct("pruner", pruner_classes(), options)


def pruner_classes() -> dict[str, type]:
    """The Optuna class of each pruner of PRUNERS."""
    import optuna

    return {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
            "none": optuna.pruners.NopPruner}


def _check_types(kind: str, name: str, cls: type, arguments: dict[str, Any]) -> None:
    """A boolean argument is a boolean and an int one a whole number: Optuna takes
    `multivariate: "false"` as true and `n_startup_trials: 2.5` until it compares."""
    parameters = inspect.signature(cls).parameters
    for argument, value in arguments.items():
        if argument not in parameters or value is None:
            continue  # an unknown argument: the constructor names it
        wanted = str(parameters[argument].annotation).removeprefix("<class '")
        wanted = wanted.removesuffix("'>").replace(" | None", "")
        if wanted == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{kind} {name}: {argument} must be true or false (unquoted), "
                              f"got {shown(value)}")
        if wanted == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{kind} {name}: {argument} must be a whole number, got "
                              f"{shown(value)}")


def _construct(kind: str, classes: dict[str, type], options: dict[str, Any]):
    from optuna.exceptions import ExperimentalWarning

    name = options.get("name")
    arguments = {k: v for k, v in options.items() if k != "name"}
    if name not in classes:
        raise ConfigError(f"{kind} '{name}'; valid: {', '.join(classes)}")
    _check_types(kind, name, classes[name], arguments)
    try:
        with warnings.catch_warnings():
            # Optuna marks QMCSampler experimental at every construction; the README says so
            # once, where it documents the sampler.
            warnings.simplefilter("ignore", ExperimentalWarning)
            return classes[name](**arguments)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{kind} {name}: {err}") from None
