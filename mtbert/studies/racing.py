"""Racing configurations over seeds inside a study (`mtbert sweep --seeds N`).

Each configuration is evaluated on up to N seeds, `train.seed` s, s+1, ...;
after each seed it is compared with the incumbent and gets no more seeds
("raced out") once it is worse at level `race_alpha`.

Design: one Optuna trial per seed run, grouped by configuration (user
attribute `config_id`, the number of the configuration's first trial; its
later seeds are queued with `reseed_of` pointing there, exactly like the seed
runs of `mtbert best --reseed`). So every seed run is a run directory, a W&B
run, a process with its own retry, resume, GPU slot, heartbeat and cost like
any trial, and many workers share the seeds of one configuration through the
storage's queue, a seed never run twice (a queued trial is handed to one
worker). The first seed is sampled, and pruned by epochs like any trial; the
later ones are queued only after the previous seed finished and the race let
the configuration go on, and are never pruned by epochs. The sampler learns
from each configuration's mean: `SeedMeanSampler` shows it one trial per
configuration whose value is the mean over the seeds that completed.

The test. After each seed, configuration c is compared with the incumbent I
(the best mean among the configurations with all N seeds; before there is
one, the best mean so far; never a raced-out or infeasible one) by a
one-sided t-test on their shared seeds S (every configuration runs s, s+1,
..., so c's seeds are I's first ones):
    d = mean over S of (x_I,s - x_c,s),   t = d / (σ · sqrt(2 / |S|)),
    p = P(T_df > t),
where σ² is the study's pooled seed variance: the residual variance of the
additive model x_c,s = μ_c + β_s + ε over all configurations with >= 2 seeds
(df = observations - configurations - seeds + 1). c is raced out when
p < race_alpha.

Why paired, and why pooled. A seed is the same draw for every configuration
(the same data order, the same head initialisation), and on these tasks its
shared effect is most of the seed noise: on minilm-l6 the seed standard
deviation within a configuration was 0.031 and what is left after the shared
seed effect 0.007 (`bench/seed_effects.py`, README "Measured"). Comparing
configurations seed by seed removes it; comparing means over seeds would
leave it in and race out almost nothing. Pooling σ² over the study is what
lets the test decide at N = 3: a test on the pair's own 2-3 differences could
not (an exact Wilcoxon signed-rank test on 3 pairs never gets below p = 0.125;
a paired t-test on 2 pairs has one degree of freedom). A first seed can be
raced out once the pooled estimate exists. Configurations with no seed in
common (a space that samples `train.seed`) fall back to the two-sample t-test
with the pooled within-configuration variance, Σ(n_i - 1) df.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from mtbert.studies.configurations import config_of
from mtbert.studies.job import FEASIBLE, RACED_OUT, RESEED_OF, RETRY_HISTORY, SEED

CONTINUE, COMPLETE, RACED = "continue", "complete", "raced out"
RACE_ALPHA = 0.1  # the default level at which a configuration is raced out
MAX_SEEDS = 100  # seed runs per configuration: far above any race, refuses a typo


@dataclass
class Race:
    """One configuration's seed values so far, as the race sees them."""

    config: int
    values: list[float] = field(default_factory=list)
    raced_out: bool = False
    feasible: bool = True
    by_seed: dict[int, float] = field(default_factory=dict)  # seed -> value

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)


def races(study, *, extra: tuple[int, int | None, float] | None = None) -> dict[int, Race]:
    """Every configuration with a COMPLETE seed run, by its first trial's number;
    `extra` (configuration, seed, value) adds a seed run that is about to complete."""
    from optuna.trial import TrialState

    found: dict[int, Race] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if not t.values or math.isnan(t.values[0]):
            continue
        race = found.setdefault(config_of(t), Race(config_of(t)))
        race.values.append(t.values[0])
        if t.user_attrs.get(SEED) is not None:
            race.by_seed[int(t.user_attrs[SEED])] = t.values[0]
        race.raced_out |= bool(t.user_attrs.get(RACED_OUT))
        race.feasible &= t.user_attrs.get(FEASIBLE, True) is not False
    if extra is not None:
        config, seed, value = extra
        race = found.setdefault(config, Race(config))
        race.values.append(value)
        if seed is not None:
            race.by_seed[seed] = value
    return found


def pooled_variance(groups) -> tuple[float, int] | None:
    """The within-configuration variance pooled over configurations with >= 2 seeds, and
    its degrees of freedom; None before any configuration has two seeds."""
    squares, df = 0.0, 0
    for race in groups:
        if len(race.values) >= 2:
            mean = statistics.fmean(race.values)
            squares += sum((v - mean) ** 2 for v in race.values)
            df += len(race.values) - 1
    return (squares / df, df) if df else None


def residual_variance(groups) -> tuple[float, int] | None:
    """The residual variance of the additive model value = configuration + seed over the
    configurations with >= 2 seeds (fitted by alternating means, which also fits an
    unbalanced table), and its degrees of freedom; None while there are none."""
    rows = {r.config: r.by_seed for r in groups if len(r.by_seed) >= 2}
    seeds = {s for row in rows.values() for s in row}
    df = sum(len(row) for row in rows.values()) - len(rows) - len(seeds) + 1
    if not rows or df < 1:
        return None
    beta = dict.fromkeys(seeds, 0.0)
    for _ in range(100):
        mu = {c: statistics.fmean(v - beta[s] for s, v in row.items()) for c, row in rows.items()}
        new = {s: statistics.fmean(row[s] - mu[c] for c, row in rows.items() if s in row)
               for s in seeds}
        done = max(abs(new[s] - beta[s]) for s in seeds) < 1e-12
        beta = new
        if done:
            break
    squares = sum((v - mu[c] - beta[s]) ** 2 for c, row in rows.items() for s, v in row.items())
    return squares / df, df


def p_paired(race: Race, leader: Race, residual: tuple[float, int], sign: int
             ) -> tuple[float, int, float]:
    """One-sided p-value of "`race` is no worse than `leader`" on their shared seeds
    (module docstring), how many seeds they share, and how far behind it is on them."""
    from scipy.stats import t as student_t

    shared = sorted(set(race.by_seed) & set(leader.by_seed))
    gap = sign * statistics.fmean(leader.by_seed[s] - race.by_seed[s] for s in shared)
    variance, df = residual
    scale = math.sqrt(2 * variance / len(shared))
    if scale == 0.0:  # no residual noise at all: any gap is certain
        return (0.0 if gap > 0 else 1.0), len(shared), gap
    return float(student_t.sf(gap / scale, df)), len(shared), gap


def incumbent(groups: dict[int, Race], seeds: int, sign: int) -> Race | None:
    """The best mean among configurations with all `seeds` seeds, else the best mean so
    far; raced-out and infeasible configurations never lead."""
    eligible = [r for r in groups.values() if not r.raced_out and r.feasible]
    complete = [r for r in eligible if len(r.values) >= seeds]
    pool = complete or eligible
    return max(pool, key=lambda r: (sign * r.mean, -r.config)) if pool else None


def p_worse(race: Race, leader: Race, pooled: tuple[float, int], sign: int) -> float:
    """One-sided p-value of "`race` is no worse than `leader`" (module docstring)."""
    from scipy.stats import t as student_t

    variance, df = pooled
    gap = sign * (leader.mean - race.mean)
    scale = math.sqrt(variance * (1 / len(race.values) + 1 / len(leader.values)))
    if scale == 0.0:  # every seed gave the same value: any gap is certain
        return 0.0 if gap > 0 else 1.0
    return float(student_t.sf(gap / scale, df))


@dataclass
class Decision:
    """What the race says after a seed run: go on, done (all seeds), or raced out."""

    state: str
    seeds_done: int
    note: str = ""
    leader: int | None = None  # the incumbent it was compared with (its first trial)


def decide(study, *, config: int, value: float, seeds: int, alpha: float,
           direction: str = "maximize", seed: int | None = None) -> Decision:
    """The race's decision for `config` after its seed run with train.seed `seed` scored
    `value` (not yet stored as COMPLETE): COMPLETE at `seeds` seeds, RACED when worse
    than the incumbent at level `alpha`, else CONTINUE."""
    sign = 1 if direction == "maximize" else -1
    groups = races(study, extra=(config, seed, value))
    race = groups[config]
    n = len(race.values)
    if n >= seeds:
        return Decision(COMPLETE, n, f"all {seeds} seeds: mean {race.mean:.4f}")
    leader = incumbent(groups, seeds, sign)
    paired = leader is not None and bool(set(race.by_seed) & set(leader.by_seed))
    noise = (residual_variance if paired else pooled_variance)(groups.values())
    if leader is None or leader.config == config or noise is None:
        why = ("no pooled seed variance yet" if noise is None else "it leads")
        return Decision(CONTINUE, n, f"{n} of {seeds} seeds, mean {race.mean:.4f} ({why})")
    if paired:
        p, shared, gap = p_paired(race, leader, noise, sign)
        versus = (f"{gap:+.4f} behind trial {leader.config} on {shared} shared "
                  f"seed{'s' * (shared != 1)}, p = {p:.3g}")
    else:
        p = p_worse(race, leader, noise, sign)
        versus = (f"mean {race.mean:.4f} over {n} seed{'s' * (n != 1)} against trial "
                  f"{leader.config}'s {leader.mean:.4f} over {len(leader.values)}, "
                  f"p = {p:.3g}")
    if p < alpha:
        return Decision(RACED, n, f"raced out: {versus} < {alpha:g}", leader.config)
    return Decision(CONTINUE, n, f"{n} of {seeds} seeds: {versus}", leader.config)


def check_racing(seeds: Any, alpha: Any, fail,
                 names: tuple[str, str] = ("seeds", "race_alpha")) -> tuple[int, float]:
    """A spec's seeds per configuration and race level, named `names` in an error (the
    spec's keys, or the options `--seeds` / `--race-alpha`)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise fail(f"{names[0]} must be a whole number from 1 to {MAX_SEEDS}, got "
                   f"{str(seeds)[:40]}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < 1:
        raise fail(f"{names[1]} must be a number from 0 (no configuration raced out: every "
                   f"one runs all its seeds) to below 1, got {alpha!r}")
    return seeds, float(alpha)


def next_seed(study, *, config: int, first_seed: int, seeds: int) -> int | None:
    """The configuration's next seed to queue: the lowest of first_seed + 1 ..
    first_seed + seeds - 1 that no seed run of it holds (COMPLETE, queued or running);
    None when every one is held."""
    from optuna.trial import TrialState

    held = {t.user_attrs.get(SEED) for t in study.get_trials(deepcopy=False)
            if config_of(t) == config and t.state in
            (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)}
    return next((first_seed + k for k in range(1, seeds) if first_seed + k not in held), None)


def queue_seed(study, *, config: int, params: dict, seed: int) -> None:
    """Queue a seed run of configuration `config` (any worker of the study runs it)."""
    study.enqueue_trial(params, user_attrs={RESEED_OF: config, SEED: seed})


def is_new_configuration(trial) -> bool:
    """A trial that starts a configuration: neither a seed run of another trial's
    configuration nor the retry of an earlier trial."""
    return RESEED_OF not in trial.user_attrs and not trial.system_attrs.get(RETRY_HISTORY)


@dataclass
class Spend:
    """Seed runs a raced study spent, against the fixed protocol on its configurations."""

    spent: int  # finished seed runs (COMPLETE or PRUNED)
    fixed: int  # N seeds for every configuration that finished its first seed
    configurations: int  # those that finished their first seed
    seeds: int

    def line(self) -> str:
        saved = 1 - self.spent / self.fixed if self.fixed else 0.0
        return (f"seed runs: {self.spent} spent by racing; the fixed protocol ({self.seeds} "
                f"seeds for each of the {self.configurations} configurations that finished "
                f"a first seed) would spend {self.fixed} ({saved:.0%} saved)")


def spend(study, seeds: int) -> Spend:
    """Count the study's seed runs (a pruned first seed costs both protocols one run)."""
    from optuna.trial import TrialState

    spent, fixed, configs = 0, 0, 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        spent += 1
        if RESEED_OF in t.user_attrs:
            continue
        configs += 1
        fixed += seeds if t.state == TrialState.COMPLETE else 1
    return Spend(spent, fixed, configs, seeds)


def _by_mean(trials: list) -> list:
    """What a sampler of a raced study learns from: one trial per configuration, valued by
    its mean over the seeds that completed; the later seed runs left out."""
    groups = races(_Listed(trials))
    shown = []
    for t in trials:
        if RESEED_OF in t.user_attrs:
            continue
        race = groups.get(t.number)
        if race is not None and len(race.values) > 1 and t.values:
            t = copy.copy(t)
            t.values = [race.mean, *t.values[1:]]
        shown.append(t)
    return shown


class _Listed:
    """A fixed list of trials with the study's `get_trials` signature."""

    def __init__(self, trials):
        self._trials = trials

    def get_trials(self, deepcopy: bool = False, states=None):
        return [t for t in self._trials if states is None or t.state in states]


def mean_view(study):
    """The study as the sampler of a raced study sees it (`_by_mean`)."""
    from mtbert.studies.optuna_api import SamplerView

    return SamplerView(study, _by_mean)


def mean_sampler(base):
    """Wrap an Optuna sampler so that it learns from configurations' means (`_by_mean`)."""
    import optuna


    class SeedMeanSampler(optuna.samplers.BaseSampler):
        def __init__(self, inner):
            self.inner = inner

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(mean_view(study), trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(mean_view(study), trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(mean_view(study), trial, param_name,
                                                 param_distribution)

        def before_trial(self, study, trial):
            self.inner.before_trial(study, trial)

        def after_trial(self, study, trial, state, values):
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self):
            self.inner.reseed_rng()

    return SeedMeanSampler(base)
