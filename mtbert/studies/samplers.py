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
from mtbert.safeyaml import shown

SAMPLERS = ("tpe", "random", "nsga2", "gp", "qmc")
PRUNERS = ("median", "hyperband", "successive_halving", "none")
CONSTRAINED_SAMPLERS = ("tpe", "nsga2", "gp")  # those that take Optuna's constraints_func
log = logging.getLogger("mtbert")


def trials_record_constraints() -> bool:
    """Whether the installed Optuna (5 and later) takes constraint values from the trial
    itself (`Trial.set_constraint`) rather than from a sampler's `constraints_func`."""
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def make_sampler(options: dict[str, Any], constraints_func=None):
    """An Optuna sampler from a spec's `sampler: {name: ..., **arguments}`. With
    `constraints_func` (a study with constraints), the samplers that model constraints
    get it where the installed Optuna wants it (before 5: from 5 on, each trial records
    its constraint values itself, `constraints.record_feasibility`); the others warn."""
    import optuna

    classes = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "nsga2": optuna.samplers.NSGAIISampler, "gp": optuna.samplers.GPSampler,
               "qmc": optuna.samplers.QMCSampler}
    if constraints_func is not None:
        if options.get("name") in CONSTRAINED_SAMPLERS:
            if not trials_record_constraints():
                options = {**options, "constraints_func": constraints_func}
        else:
            log.warning("sampler %s ignores constraints (those of %s do not): it samples "
                        "as if there were none; the ranking still leaves infeasible trials "
                        "out", options.get("name"), ", ".join(CONSTRAINED_SAMPLERS))
    return _construct("sampler", classes, options)


def make_pruner(options: dict[str, Any]):
    """An Optuna pruner from a spec's `pruner: {name: ..., **arguments}`."""
    import optuna

    classes = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "none": optuna.pruners.NopPruner}
    return _construct("pruner", classes, options)


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
