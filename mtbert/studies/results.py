"""What a study found: its complete trials ranked, its configurations over seeds, and the
choice of `mtbert best` (which trial, chosen how, printed how).

One definition of a usable result (COMPLETE with finite values) serves the
ranking, the report, checkpoint retention and the export. A study with
reseeds (`mtbert best --reseed`) ranks configurations by their mean over
seeds; its representative model is the seed run closest to that mean, not the
luckiest one.

A study with constraints (`mtbert.studies.constraints`) ranks feasible results only,
and says how many it left out: a trial when its metrics meet every constraint, a
configuration over seeds when its means do (a seed run that misses a bound by noise
neither sinks its configuration nor leaves a flattering mean behind). Two functions
hold that filter, `feasible_trials` and `seed_groups`; everything that ranks goes
through them, while the report still shows every trial, the infeasible ones marked.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mtbert.errors import ConfigError, MtbertError
from mtbert.formatting import first_line, format_mean_std, format_params
from mtbert.studies.budget import BUDGET_HOURS, STOP_REQUESTED, format_hours, study_hours
from mtbert.studies.constraints import NoFeasibleResult, describe_all, meets, study_constraints
from mtbert.studies.job import (CONFIG_ID, FAIL_REASON, FEASIBLE, GPU, RACED_OUT, RESEED_OF,
                                RUN_DIR, SEED, STUDY_OBJECTIVES, STUDY_SPEC)
from mtbert.tasks import METRIC_KEYS


def usable(trial) -> bool:
    """COMPLETE with values that are all numbers (a NaN objective ranks nowhere)."""
    return (trial.state.name == "COMPLETE" and bool(trial.values)
            and not any(math.isnan(v) for v in trial.values))


def complete_trials(study) -> list:
    """The study's usable trials (`usable`)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if usable(t)]


def feasible_trials(study, constraints: list | None = None) -> list:
    """The complete trials the ranking ranks: those whose metric attributes meet the
    study's constraints (`constraints`: those, already read), all when it has none."""
    constraints = study_constraints(study) if constraints is None else constraints
    return [t for t in complete_trials(study) if meets(constraints, t.user_attrs)]


def ranked(study, metric: str | None = None) -> list:
    """Feasible complete trials, best first by the study's first objective, or by the
    metric attribute `metric` (every metric is higher-better)."""
    done = feasible_trials(study)
    if metric is not None:
        return sorted((t for t in done if metric in t.user_attrs),
                      key=lambda t: -t.user_attrs[metric])
    sign = -1 if study.directions[0].name == "MAXIMIZE" else 1
    return sorted(done, key=lambda t: sign * t.values[0])


def best_trial(study):
    """The best feasible complete trial of a single-objective study (None: none, or a
    multi-objective study)."""
    if len(study.directions) > 1:
        return None
    best = ranked(study)[:1]
    return best[0] if best else None


def pareto_front(study) -> list:
    """The Pareto front of a multi-objective study: among its feasible trials when it has
    constraints (whatever the sampler recorded), else Optuna's."""
    constraints = study_constraints(study)
    if not constraints:
        return study.best_trials
    signs = [1 if d.name == "MAXIMIZE" else -1 for d in study.directions]
    scored = [(t, [s * v for s, v in zip(signs, t.values)])
              for t in feasible_trials(study, constraints)]

    def dominated(a: list[float]) -> bool:
        return any(b != a and all(y >= x for x, y in zip(a, b)) for _, b in scored)

    return [t for t, a in scored if not dominated(a)]


def infeasible_note(study, total: int, feasible: int, what: str = "complete trials") -> str:
    """What to say of the results the ranking left out ('' when none); no feasible one
    of `total`: NoFeasibleResult (exit 1)."""
    if feasible == total:
        return ""
    constraints = describe_all(study_constraints(study))
    if not feasible:
        raise NoFeasibleResult(f"study {study.study_name}: none of its {total} {what} meets "
                               f"the constraints ({constraints})")
    return f"{total - feasible} of {total} {what} infeasible, not ranked ({constraints})"


def new_finished(study, finished_before: set[int]) -> list:
    """Trials that COMPLETEd or were PRUNED (finished as planned) since the numbers
    `finished_before` had finished."""
    return [t for t in study.get_trials(deepcopy=False) if t.number not in finished_before
            and t.state.name in ("COMPLETE", "PRUNED")]


def state_counts(study) -> dict[str, int]:
    """Trials by state name, in the order states first occur."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def study_seeds(study) -> int:
    """The seeds each configuration of a study races over (`--seeds`; 1: not raced)."""
    return int((study.user_attrs.get(STUDY_SPEC) or {}).get("seeds", 1))


def study_objectives(study) -> list[str]:
    """The metric keys a study optimises, as `mtbert sweep` stored them."""
    return list(study.user_attrs.get(STUDY_OBJECTIVES) or
                [f"objective {i}" for i in range(len(study.directions))])


def fail_reason(trial) -> str:
    """The first line of why a trial failed, from its attributes ('' when unknown)."""
    reason = trial.user_attrs.get(FAIL_REASON) or trial.system_attrs.get(FAIL_REASON)
    return first_line(str(reason)) if reason else ""


def describe_trial(t, objectives: list[str]) -> str:
    """One log line for a finished trial: state, time, values, why it failed, params."""
    metrics = "  ".join(f"{k} {t.user_attrs[k]:.4f}" for k in METRIC_KEYS if k in t.user_attrs)
    seconds = (t.duration.total_seconds() if t.duration else 0.0)
    line = f"trial {t.number} {t.state.name} in {seconds:.0f}s"
    if RESEED_OF in t.user_attrs:
        line = (f"trial {t.number} (trial {t.user_attrs[RESEED_OF]} with seed "
                f"{t.user_attrs.get(SEED)}) {t.state.name} in {seconds:.0f}s")
    if t.values:
        line += " " + " ".join(f"{k}={v:.4f}" for k, v in zip(objectives, t.values))
    if t.state.name == "FAIL":
        line += f": {fail_reason(t) or 'failed'}"
    if t.user_attrs.get(FEASIBLE) is False:
        line += " infeasible"
    return f"{line}  [{format_params(t.params)}]" + (f"  {metrics}" if metrics else "")


def trials_table(study, *, limit: int = 5, metric: str | None = None,
                 front: bool = True) -> list[str]:
    """Text table of the best complete trials, best first: by `metric` when given, else
    the Pareto front of a multi-objective study (`front`) or the first objective's ranking.
    A `gpu` column when the trials ran on several GPUs (`--gpus`)."""
    multi = len(study.directions) > 1
    done = (pareto_front(study) if front and multi and metric is None else
            ranked(study, metric))[:limit]
    gpu = any(GPU in t.user_attrs for t in done)
    rows = ["trial  " + "  ".join(f"{k:>18}" for k in METRIC_KEYS) + "  gpu" * gpu + "  params"]
    for t in done:
        values = "  ".join(f"{t.user_attrs.get(k, float('nan')):>18.4f}" for k in METRIC_KEYS)
        where = f"  {t.user_attrs.get(GPU, '-'):>3}" if gpu else ""
        rows.append(f"{t.number:>5}  {values}{where}  {format_params(t.params)}")
    return rows


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


def sweep_table(study, limit: int = 5) -> list[str]:
    """What a sweep prints at its end: its best trials; in a raced study its best
    configurations by mean over their seeds, and the seed runs racing spent."""
    from mtbert.studies.racing import spend

    seeds = study_seeds(study)
    if seeds < 2:
        return trials_table(study, limit=limit)
    return [*groups_table(seed_groups(study)[:limit]), spend(study, seeds).line()]


def check_metric(metric: str | None) -> None:
    if metric is not None and metric not in METRIC_KEYS:
        raise ConfigError(f"unknown metric '{metric}'; valid: {', '.join(METRIC_KEYS)}")


@dataclass
class Ranking:
    """What `mtbert best --top N` prints: a title and table lines, and notes for the log."""

    lines: list[str]
    groups: list[SeedGroup]  # the configurations shown, best first (one trial each when
    # ranked by trial)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """`mtbert best --json`: the configurations shown, as a JSON array."""
        import json

        return json.dumps([g.to_dict() for g in self.groups], indent=2)


def _reseeded_groups(study, metric: str | None, by_trial: bool) -> tuple[list[SeedGroup], str]:
    """Configurations ranked by their mean over seeds, when the study holds reseeds and
    the ranking is by one value; those with one seed only are left out (their single
    score is the noisy one). The feasible ones, and what to say of the others."""
    multi = len(study.directions) > 1
    if by_trial or (multi and metric is None):
        return [], ""
    every = seed_groups(study, metric, reseeded_only=True, feasible_only=False)
    groups = [g for g in every if g.feasible]
    return groups, infeasible_note(study, len(every), len(groups), "reseeded configurations")


def _require_complete(study) -> list:
    done = complete_trials(study)
    if not done:
        raise MtbertError(f"study {study.study_name} has no COMPLETE trial yet")
    return done


def rank(study, *, top: int, metric: str | None = None, by_trial: bool = False) -> Ranking:
    """The `top` best configurations by mean over seeds (a study with reseeds), else the
    `top` best complete trials by the (first) objective or `metric`."""
    check_metric(metric)
    done = _require_complete(study)
    by = metric or study_objectives(study)[0]
    groups, note = _reseeded_groups(study, metric, by_trial)
    if not groups:
        feasible = len(feasible_trials(study))
        note = infeasible_note(study, len(done), feasible)
        rows = trials_table(study, limit=top, metric=metric, front=False)
        single = [SeedGroup(t.number, dict(t.params), [t], metric)
                  for t in ranked(study, metric)[:top]]
        return Ranking([f"study {study.study_name}: top {len(rows) - 1} of {feasible} "
                        f"{'feasible ' * bool(note)}complete trials by {by}", *rows], single,
                       [note] if note else [])
    kind = "raced" if study_seeds(study) > 1 else "reseeded"
    ranking = Ranking([f"study {study.study_name}: top {min(top, len(groups))} of "
                       f"{len(groups)} {'feasible ' * bool(note)}{kind} configurations by "
                       f"mean {by} over their seeds (mean ± std)", *groups_table(groups[:top])],
                      groups[:top], [note] if note else [])
    singles = len(seed_groups(study, metric)) - len(groups)
    if singles:
        ranking.notes.append(f"{singles} configuration{'s' * (singles != 1)} ran with one "
                             "seed only, not ranked here (`--by-trial` ranks single trials)")
    return ranking


@dataclass
class Choice:
    """The trial `mtbert best` shows and exports (None: a multi-objective study's front),
    with how it was chosen."""

    study: Any
    trial: Any | None
    by: str | None = None  # what it was ranked by: --metric, or the objective of a group
    group: SeedGroup | None = None  # its configuration, when chosen by mean over seeds
    note: str = ""  # the results left out as infeasible (a study with constraints)

    def selection(self) -> dict[str, str] | None:
        """How the trial was chosen, for the model card (None: plainly the best)."""
        if self.group is None:
            return None
        g = self.group
        return {"chosen": f"configuration of trial {g.number}, best mean {self.by} over "
                          f"{len(g.trials)} seeds ({g.mean():.4f} ± {g.std():.4f}); this is "
                          "its seed run closest to the mean",
                "seed runs": ", ".join(str(t.number) for t in g.trials)}

    @property
    def seeds(self) -> list[int | None] | None:
        """The seeds of its configuration's seed runs (None: not chosen by mean over seeds;
        None in the list: a trial older than the `seed` attribute)."""
        return self.group.seeds if self.group is not None else None

    def lines(self) -> list[str]:
        name = self.study.study_name
        if self.trial is None:
            front = pareto_front(self.study)
            return [f"study {name}: Pareto front of {len(front)} trials",
                    *([f"  {self.note}"] if self.note else []),
                    *trials_table(self.study, limit=len(front)), self.hours_line()]
        t = self.trial
        if self.group is not None:
            g = self.group
            seed = t.user_attrs.get(SEED)
            lines = [f"study {name}: best configuration trial {g.number} by mean {self.by} "
                     f"over {len(g.trials)} seeds: {g.mean():.4f} ± {g.std():.4f}",
                     f"  its seed run closest to the mean: trial {t.number}"
                     + (f" (seed {seed})" if seed is not None else " (the original seed)")
                     + f", {self.by} {g.values()[g.trials.index(t)]:.4f}"]
        else:
            lines = [f"study {name}: best trial {t.number}"
                     + (f" by {self.by}" if self.by else "")]
        if self.note:
            lines.append(f"  {self.note}")
        if RESEED_OF in t.user_attrs:
            lines.append(f"  seed   {t.user_attrs.get(SEED)} (reseed of trial "
                         f"{t.user_attrs[RESEED_OF]})")
        lines += [f"  param  {key:<22} {value}" for key, value in t.params.items()]
        lines += [f"  metric {key:<22} {t.user_attrs[key]:.4f}" for key in METRIC_KEYS
                  if key in t.user_attrs]
        lines.append(f"  run    {t.user_attrs.get(RUN_DIR, '?')}")
        return lines + [self.hours_line()]

    def hours_line(self) -> str:
        return f"hours: {format_hours(study_hours(self.study))}"


def choose(study, *, metric: str | None = None, trial: int | None = None,
           by_trial: bool = False) -> Choice:
    """The trial to show and export: `trial` when given; else, in a study with reseeds,
    the seed run closest to the best configuration's mean; else the best trial by
    `metric` or the objective; a multi-objective study without `metric` has none."""
    check_metric(metric)
    done = _require_complete(study)
    by = metric or study_objectives(study)[0]
    if trial is not None:
        chosen = next((t for t in study.get_trials(deepcopy=False) if t.number == trial), None)
        if chosen is None:
            raise MtbertError(f"study {study.study_name} has no trial {trial}")
        return Choice(study, chosen, by=metric)
    groups, note = _reseeded_groups(study, metric, by_trial)
    if groups:
        return Choice(study, groups[0].representative(), by=by, group=groups[0], note=note)
    if metric is not None:
        if not any(metric in t.user_attrs for t in done):
            raise MtbertError(f"no complete trial of study {study.study_name} recorded "
                              f"{metric}")
    note = infeasible_note(study, len(done), len(feasible_trials(study)))
    if metric is not None:
        scored = ranked(study, metric)
        if not scored:
            raise MtbertError(f"no feasible complete trial of study {study.study_name} "
                              f"recorded {metric}")
        return Choice(study, scored[0], by=metric, note=note)
    if len(study.directions) > 1:
        return Choice(study, None, note=note)
    return Choice(study, ranked(study)[0], note=note)


@dataclass
class StudySummary:
    """One study as `mtbert studies` lists it: the table and `--json` are both made from
    it, so that they cannot disagree."""

    name: str
    states: dict[str, int]  # trials by state name, every state (0 when none)
    best: list[dict[str, Any]]  # per objective: objective, direction, value, trial
    pareto_front: list[int] | None  # trial numbers on the front (multi-objective only)
    hours: float
    budget_hours: float | None
    stop_requested: bool
    seeds: int  # seed runs per configuration, as the study's spec says
    configurations: int  # configurations with a finished (COMPLETE, PRUNED) seed run
    seed_runs: int  # finished (COMPLETE, PRUNED) trials

    @property
    def trials(self) -> int:
        return sum(self.states.values())

    @property
    def budget_left_hours(self) -> float | None:
        return None if self.budget_hours is None else max(self.budget_hours - self.hours, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """`mtbert studies --json`: one element of its array."""
        return {"name": self.name, "trials": self.trials, "states": self.states,
                "best": self.best, "pareto_front": self.pareto_front, "hours": self.hours,
                "budget_hours": self.budget_hours, "budget_left_hours": self.budget_left_hours,
                "stop_requested": self.stop_requested, "seeds": self.seeds,
                "configurations": self.configurations, "seed_runs": self.seed_runs}

    def best_cell(self) -> str:
        if self.pareto_front is not None:
            return f"{len(self.pareto_front)} on the front"
        best = self.best[0]
        return "-" if best["trial"] is None else f"{best['value']:.4f} (trial {best['trial']})"


def _best_per_objective(study) -> list[dict[str, Any]]:
    """Each objective's best value over the complete trials and the trial that reached it
    (the lower number on a tie); value and trial None while none is complete."""
    done = complete_trials(study)
    best = []
    for i, (objective, direction) in enumerate(zip(study_objectives(study), study.directions)):
        sign = -1 if direction.name == "MAXIMIZE" else 1
        top = min(done, key=lambda t: (sign * t.values[i], t.number), default=None)
        best.append({"objective": objective, "direction": direction.name.lower(),
                     "value": None if top is None else top.values[i],
                     "trial": None if top is None else top.number})
    return best


def study_summary(study, now: datetime | None = None) -> StudySummary:
    """What `mtbert studies` shows of one study (`now`: when running trials are counted)."""
    from optuna.trial import TrialState

    counts = {state.name: 0 for state in TrialState}
    counts.update(state_counts(study))
    finished = [t for t in study.get_trials(deepcopy=False)
                if t.state.name in ("COMPLETE", "PRUNED")]
    # A configuration: its seed runs share config_id; reseeds name their original.
    configurations = {t.user_attrs.get(CONFIG_ID, t.user_attrs.get(RESEED_OF, t.number))
                      for t in finished}
    attrs = study.user_attrs
    spec = attrs.get(STUDY_SPEC) or {}
    budget = attrs.get(BUDGET_HOURS)
    return StudySummary(
        name=study.study_name, states=counts, best=_best_per_objective(study),
        pareto_front=(sorted(t.number for t in study.best_trials)
                      if len(study.directions) > 1 else None),
        hours=study_hours(study, now), budget_hours=None if budget is None else float(budget),
        stop_requested=bool(attrs.get(STOP_REQUESTED)), seeds=int(spec.get("seeds", 1)),
        configurations=len(configurations), seed_runs=len(finished))


def study_summaries(rdb) -> list[StudySummary]:
    """Every study of a storage, summarised at one moment."""
    import optuna

    now = datetime.now()
    return [study_summary(optuna.load_study(study_name=name, storage=rdb), now)
            for name in optuna.study.get_all_study_names(rdb)]


def studies_table(summaries: list[StudySummary]) -> list[str]:
    """`mtbert studies`: every study, its trials by state, its hours (and budget), best
    values, and whether it was asked to stop."""
    rows = [f"{'study':<24} {'trials':>6} {'complete':>8} {'pruned':>6} {'fail':>4} "
            f"{'running':>7} {'hours':>9} {'budget':>9}  best"]
    for s in summaries:
        budget = "-" if s.budget_hours is None else format_hours(s.budget_hours)
        rows.append(f"{s.name:<24} {s.trials:>6} {s.states['COMPLETE']:>8} "
                    f"{s.states['PRUNED']:>6} {s.states['FAIL']:>4} {s.states['RUNNING']:>7} "
                    f"{format_hours(s.hours):>9} {budget:>9}  {s.best_cell()}"
                    + ("  (stop requested)" if s.stop_requested else ""))
    return rows
