"""A noise-aware stop: `mtbert sweep ... --stop-after-flat M [--min-delta D]`.

The study ends once M finished configurations in a row failed to beat the
incumbent by more than the noise: the incumbent's standard deviation over its
seeds in a raced study (`--seeds`), else D (default 0); both given, the larger.
A configuration is finished when it can no longer change: in a raced study
when it has all its seeds or was raced out, otherwise when its trial (and any
reseed of it) ended. A raced-out configuration, an infeasible one (the spec's
constraints) and a pruned first seed are finished but never lead; before
there is a leader they count for nothing. They
are taken in the order they finished, so every worker computes the same
streak from the storage; the first to see it reach M stores the stop in the
study, the others read it before their next trial (`budget.stop_reason`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtbert.errors import ConfigError
from mtbert.studies.budget import FLAT_STOP, STOP_REQUESTED
from mtbert.studies.job import RESEED_OF
from mtbert.studies.configurations import seed_groups, study_seeds

FLAT_RULE = "stop_after_flat"  # study user attribute: {"m": M, "min_delta": D}


def check_flat(m: int | None, min_delta: float | None) -> None:
    if m is not None and m < 1:
        raise ConfigError(f"bad --stop-after-flat {m}; valid: a whole number >= 1")
    if min_delta is not None and not (math.isfinite(min_delta) and min_delta >= 0):
        raise ConfigError(f"bad --min-delta {min_delta}; valid: a number >= 0")
    if min_delta is not None and m is None:
        raise ConfigError("--min-delta goes with --stop-after-flat M")


def set_flat_rule(study, m: int, min_delta: float | None) -> None:
    """Store the rule in the study (every worker follows it); a later one replaces it."""
    study.set_user_attr(FLAT_RULE, {"m": m, "min_delta": min_delta or 0.0})


@dataclass
class Finished:
    number: int  # the configuration's first trial
    when: float  # when its last seed run ended (a timestamp)
    mean: float  # -inf for a pruned first seed
    std: float  # nan with one seed
    can_lead: bool = True  # False: raced out or pruned


def finished_configurations(study) -> list[Finished]:
    """The study's finished configurations, in the order they finished (module docstring)."""
    from optuna.trial import TrialState

    raced = study_seeds(study) > 1
    done = []
    for g in seed_groups(study, feasible_only=False):
        if g.pending or (raced and not (g.complete or g.raced_out)):
            continue
        when = max(t.datetime_complete.timestamp() for t in g.trials)
        done.append(Finished(g.number, when, g.mean(), g.std(),
                             can_lead=g.feasible and not g.raced_out))
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        if RESEED_OF not in t.user_attrs and t.datetime_complete is not None:
            done.append(Finished(t.number, t.datetime_complete.timestamp(), -math.inf,
                                 math.nan, can_lead=False))
    return sorted(done, key=lambda f: (f.when, f.number))


def flat_streak(study, min_delta: float = 0.0) -> tuple[int, Finished | None, float]:
    """How many finished configurations in a row, up to now, failed to beat the
    incumbent by more than the noise; the incumbent and that noise."""
    sign = 1 if study.directions[0].name == "MAXIMIZE" else -1
    leader, streak, noise = None, 0, min_delta
    for f in finished_configurations(study):
        if leader is not None and (not f.can_lead or not sign * (f.mean - leader.mean) > noise):
            streak += 1
            continue
        if not f.can_lead:
            continue  # nothing to beat yet, and it leads nothing
        leader, streak = f, 0
        noise = max(min_delta, 0.0 if math.isnan(f.std) else f.std)
    return streak, leader, noise


def check_flat_stop(study) -> str | None:
    """Apply the study's rule after a trial: store a stop (read by `budget.stop_reason`)
    and return why when the streak reached M; None otherwise (or without a rule)."""
    rule = study.user_attrs.get(FLAT_RULE)
    if not rule or study.user_attrs.get(STOP_REQUESTED):
        return None
    if len(study.directions) > 1:
        return None
    streak, leader, noise = flat_streak(study, float(rule.get("min_delta") or 0.0))
    if streak < rule["m"] or leader is None:
        return None
    what = "its seed standard deviation" if study_seeds(study) > 1 else "--min-delta"
    reason = (f"study {study.study_name} stopped: the last {streak} finished configurations "
              f"did not beat trial {leader.number}'s {leader.mean:.4f} by more than "
              f"{noise:.4f} ({what}); --stop-after-flat {rule['m']}")
    study.set_user_attr(FLAT_STOP, reason)
    study.set_user_attr(STOP_REQUESTED, True)
    return reason
