"""Optuna samplers and pruners by the names a sweep spec gives them.

Torch-free, so that a trial process can build its study's pruner without the
training stack (the stand-in trial of the orchestration tests imports no torch).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from mtbert.errors import ConfigError

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


def _construct(kind: str, classes: dict[str, type], options: dict[str, Any]):
    from optuna.exceptions import ExperimentalWarning

    name = options.get("name")
    arguments = {k: v for k, v in options.items() if k != "name"}
    if name not in classes:
        raise ConfigError(f"{kind} '{name}'; valid: {', '.join(classes)}")
    try:
        with warnings.catch_warnings():
            # Optuna marks QMCSampler experimental at every construction; the README says so
            # once, where it documents the sampler.
            warnings.simplefilter("ignore", ExperimentalWarning)
            return classes[name](**arguments)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{kind} {name}: {err}") from None
