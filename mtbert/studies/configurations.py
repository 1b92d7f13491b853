"""A configuration and its seed runs: the one home of that concept.

A configuration is the parameters of a study's original trial (one that is neither a
seed run of another trial nor a retry); its seed runs are that trial and the trials
queued with `reseed_of` pointing at it (racing's later seeds, `mtbert best --reseed`).
`first_trial` is the one rule for a trial's configuration id, recorded as its user
attribute `config_id` and read back by `config_of`; `SeedGroup` is a configuration with its complete seed runs, and
`seed_groups` ranks them by their mean. Racing, the results, the flat stop, warm
starts, reseeding and the export all read configurations from here.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from mtbert.formatting import format_mean_std, format_params
from mtbert.studies.constraints import meets, study_constraints
from mtbert.studies.job import CONFIG_ID, RACED_OUT, RESEED_OF, SEED, STUDY_SPEC
from mtbert.tasks import METRIC_KEYS


def usable(trial) -> bool:
    """COMPLETE with values that are all numbers (a NaN objective ranks nowhere)."""
    return (trial.state.name == "COMPLETE" and bool(trial.values)
            and not any(math.isnan(v) for v in trial.values))


def study_seeds(study) -> int:
    """The seeds each configuration of a study races over (`--seeds`; 1: not raced)."""
    return int((study.user_attrs.get(STUDY_SPEC) or {}).get("seeds", 1))


@dataclass
class SeedGroup:
    """One configuration of a study: an original trial and its reseeded copies."""

    number: int  # the original trial
    params: dict[str, Any]
    trials: list  # COMPLETE members, the original first
    key: str | None  # the metric ranked by; None = the study's (first) objective
    pending: int = 0  # reseeds WAITING or RUNNING
    planned: int = 1  # seeds a raced study gives a configuration that is not raced out
    feasible: bool = True  # its means meet the study's constraints

    @property
    def raced_out(self) -> bool:
        return any(t.user_attrs.get(RACED_OUT) for t in self.trials)

    @property
    def complete(self) -> bool:
        """It has every seed the race plans for it (always, in a study without racing)."""
        return len(self.trials) >= self.planned

    def means(self) -> dict[str, float]:
        """The mean over seeds of every metric key (nan: none recorded)."""
        return {k: self.mean(k) for k in METRIC_KEYS}

    def values(self, key: str | None = None) -> list[float]:
        """Each member's `key` metric (default: the ranking value), in member order."""
        key = key or self.key
        if key is None:
            return [t.values[0] for t in self.trials]
        return [t.user_attrs[key] for t in self.trials if key in t.user_attrs]

    def mean(self, key: str | None = None) -> float:
        values = self.values(key)
        return statistics.fmean(values) if values else float("nan")

    def std(self, key: str | None = None) -> float:
        """Sample standard deviation (n - 1); nan for one seed."""
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else float("nan")

    @property
    def seeds(self) -> list[int | None]:
        return [t.user_attrs.get(SEED) for t in self.trials]

    @property
    def state(self) -> str:
        """"raced out", "seeds pending", "complete" (every planned seed) or "incomplete"."""
        if self.raced_out:
            return "raced out"
        if self.pending:
            return "seeds pending"
        return "complete" if self.complete else "incomplete"

    def to_dict(self) -> dict[str, Any]:
        """One element of `mtbert best --json` (a NaN, e.g. the std of one seed, is null)."""
        def number(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {"params": self.params, "n_seeds": len(self.trials), "seeds": self.seeds,
                "trials": [t.number for t in self.trials],
                "mean": {k: number(self.mean(k)) for k in METRIC_KEYS},
                "std": {k: number(self.std(k)) for k in METRIC_KEYS},
                "state": self.state, "raced_out": self.raced_out, "feasible": self.feasible,
                "representative_trial": self.representative().number}

    def representative(self):
        """The member whose value is closest to the group mean (the lower trial number on
        a tie): a model whose dev score is what the configuration gives on average, not
        its luckiest seed."""
        mean = self.mean()
        pairs = zip(self.values(), self.trials)
        return min(pairs, key=lambda p: (abs(p[0] - mean), p[1].number))[1]


def seed_groups(study, metric: str | None = None, *, reseeded_only: bool = False,
                feasible_only: bool = True) -> list[SeedGroup]:
    """The study's configurations best first by the mean over their seeds of the (first)
    objective, or of `metric` (every metric is higher-better). `reseeded_only` leaves out
    the configurations that ran with one seed only; `feasible_only` those whose means
    miss the study's constraints (`SeedGroup.feasible` says which)."""
    from optuna.trial import TrialState

    # One snapshot: a trial that completes meanwhile (another thread or worker) is either
    # in it as COMPLETE with its values or not yet counted.
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if usable(t) and (metric is None or metric in t.user_attrs)]
    planned = study_seeds(study)
    groups = {t.number: SeedGroup(t.number, dict(t.params), [t], metric, planned=planned)
              for t in complete if RESEED_OF not in t.user_attrs}
    reseeded = set()
    done = {t.number for t in complete}
    for t in trials:
        origin = t.user_attrs.get(RESEED_OF)
        if origin is None or origin not in groups:
            continue
        reseeded.add(origin)
        if t.number in done:
            groups[origin].trials.append(t)
        elif t.state in (TrialState.WAITING, TrialState.RUNNING):
            groups[origin].pending += 1
    constraints = study_constraints(study)
    for g in groups.values():
        g.feasible = meets(constraints, g.means())
    chosen = [g for g in groups.values()
              if (g.number in reseeded or not reseeded_only or planned > 1)
              and (g.feasible or not feasible_only)]
    sign = -1 if metric is not None or study.directions[0].name == "MAXIMIZE" else 1
    # A raced study: the configurations that ran every seed first, those raced out last.
    return sorted(chosen, key=lambda g: (g.raced_out, not g.complete, sign * g.mean(),
                                         g.number))


def reseed_seeds(base_seed: int, k: int, raced: int = 1) -> list[int]:
    """The seeds of a configuration whose first train.seed is `base_seed` beyond it, after
    `--reseed K`: base+1 .. base+K, or, in a study raced over `raced` seeds, its seeds
    after the race's, base+1 .. base+raced-1+K (those it has are not run again);
    `--reseed 3` after `--reseed 2` adds one."""
    return [base_seed + i for i in range(1, raced + k)]


def groups_table(groups: list[SeedGroup]) -> list[str]:
    """Text table of configurations, in the order given: their number of seeds and the
    mean ± sample std over the seeds of every metric key."""
    width = 17
    rows = [f"{'trial':>5}  {'seeds':>5}  " + "  ".join(f"{k:>{width}}" for k in METRIC_KEYS)
            + "  params"]
    for g in groups:
        cells = "  ".join(f"{format_mean_std(g.mean(k), g.std(k)):>{width}}" for k in METRIC_KEYS)
        note = (f"  ({g.pending} more queued or running)" if g.pending else
                "  (raced out)" if g.raced_out else "")
        note += "" if g.feasible else "  (infeasible)"
        rows.append(f"{g.number:>5}  {len(g.trials):>5}  {cells}  "
                    f"{format_params(g.params)}{note}")
    return rows


def first_trial(trial) -> int:
    """The rule: a seed run belongs to its first trial's configuration (`reseed_of`); any
    other trial starts its own. A worker records it as `config_id` when the trial runs."""
    origin = trial.user_attrs.get(RESEED_OF)
    return trial.number if origin is None else int(origin)


def config_of(trial) -> int:
    """The configuration a trial is a seed run of: the `config_id` it recorded when it ran
    (studies of every version), else by the rule (`first_trial`: a queued seed run)."""
    recorded = trial.user_attrs.get(CONFIG_ID)
    return first_trial(trial) if recorded is None else int(recorded)
