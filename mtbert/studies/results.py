"""What a study found: its complete trials ranked, its configurations over seeds, and the
choice of `mtbert best` (which trial, chosen how, printed how).

One definition of a usable result (COMPLETE with finite values,
`configurations.usable`) serves the ranking, the report, checkpoint retention and the export. A study with
reseeds (`mtbert best --reseed`) ranks configurations by their mean over
seeds; its representative model is the seed run closest to that mean, not the
luckiest one.

A study with constraints (`mtbert.studies.constraints`) ranks feasible results only,
and says how many it left out: a trial when its metrics meet every constraint, a
configuration over seeds when its means do (a seed run that misses a bound by noise
neither sinks its configuration nor leaves a flattering mean behind). Two functions
hold that filter, `feasible_trials` and `configurations.seed_groups`; everything that ranks goes
through them, while the report still shows every trial, the infeasible ones marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtbert.config import flatten
from mtbert.errors import ConfigError, MtbertError
from mtbert.formatting import first_line, format_params
from mtbert.studies.budget import format_hours, study_hours
from mtbert.studies.configurations import (SeedGroup, groups_table, seed_groups, study_seeds,
                                           usable)
from mtbert.studies.constraints import NoFeasibleResult, describe_all, meets, study_constraints
from mtbert.studies.job import (FAIL_REASON, FEASIBLE, GPU, RESEED_OF, RUN_DIR, SEED,
                                STUDY_OBJECTIVES, STUDY_SIZE, STUDY_SPEC)
from mtbert.tasks import METRIC_KEYS, TASKS


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


def study_objectives(study) -> list[str]:
    """The metric keys a study optimises, as `mtbert sweep` stored them."""
    return list(study.user_attrs.get(STUDY_OBJECTIVES) or
                [f"objective {i}" for i in range(len(study.directions))])


def study_size(study) -> str | None:
    """The size of its spec a study was made with (None: made before sizes, or from a spec
    without them)."""
    return study.user_attrs.get(STUDY_SIZE)


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
                        f"{'feasible ' * bool(note)}complete trials by {by}{_size(study)}",
                        *rows], single, [note] if note else [])
    kind = "raced" if study_seeds(study) > 1 else "reseeded"
    ranking = Ranking([f"study {study.study_name}: top {min(top, len(groups))} of "
                       f"{len(groups)} {'feasible ' * bool(note)}{kind} configurations by "
                       f"mean {by} over their seeds (mean ± std){_size(study)}",
                       *groups_table(groups[:top])],
                      groups[:top], [note] if note else [])
    singles = len(seed_groups(study, metric)) - len(groups)
    if singles:
        ranking.notes.append(f"{singles} configuration{'s' * (singles != 1)} ran with one "
                             "seed only, not ranked here (`--by-trial` ranks single trials)")
    return ranking


def _size(study) -> str:
    """A ranking title's note of the study's size."""
    size = study_size(study)
    return "" if size is None else f", size {size}"


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
        size = study_size(self.study)
        sized = [f"  size   {size}"] if size is not None else []
        if self.trial is None:
            front = pareto_front(self.study)
            return [f"study {name}: Pareto front of {len(front)} trials", *sized,
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
        lines += sized
        if RESEED_OF in t.user_attrs:
            lines.append(f"  seed   {t.user_attrs.get(SEED)} (reseed of trial "
                         f"{t.user_attrs[RESEED_OF]})")
        lines += [f"  param  {key:<22} {value}" for key, value in t.params.items()]
        lines += loss_weights_lines(self.study, t.params)
        lines += [f"  metric {key:<22} {t.user_attrs[key]:.4f}" for key in METRIC_KEYS
                  if key in t.user_attrs]
        lines.append(f"  run    {t.user_attrs.get(RUN_DIR, '?')}")
        return lines + [self.hours_line()]

    def hours_line(self) -> str:
        return f"hours: {format_hours(study_hours(self.study))}"


def loss_weights_lines(study, params: dict[str, Any]) -> list[str]:
    """The task weights a trial's `loss.weights.*` parameters imply with the spec's base
    (a spec that searches ratios fixes one weight there), each with its share."""
    if not any(key.startswith("loss.weights.") for key in params):
        return []
    base = flatten((study.user_attrs.get(STUDY_SPEC) or {}).get("base") or {})
    tasks = base.get("data.tasks") or list(TASKS)
    weights = {task: float(params.get(f"loss.weights.{task}",
                                      base.get(f"loss.weights.{task}", 1.0))) for task in tasks}
    total = sum(weights.values()) or 1.0
    return ["  weights " + "  ".join(f"{task} {w:.4g} ({w / total:.0%})"
                                     for task, w in weights.items())]


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


