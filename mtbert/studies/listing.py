"""`mtbert studies`: one summary per study of a storage (trials by state, the best value
per objective, hours against the budget, configurations and seed runs), from which both
the table and `--json` are made, so that they cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mtbert.studies.budget import BUDGET_HOURS, STOP_REQUESTED, format_hours, study_hours
from mtbert.studies.configurations import config_of
from mtbert.studies.job import RETRY_HISTORY, STUDY_SPEC
from mtbert.studies.results import complete_trials, state_counts, study_objectives, study_size


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
    size: str | None = None  # its spec's size (studies.sizes); None: made without one
    # FAIL trials that were queued again (stopped, killed, a dead worker's): a later trial
    # retries each, so the study lost nothing. The table's `fail` counts the others.
    retried: int = 0

    @property
    def trials(self) -> int:
        return sum(self.states.values())

    @property
    def failed(self) -> int:
        """FAIL trials that no retry took over: the study's real failures."""
        return self.states["FAIL"] - self.retried

    @property
    def budget_left_hours(self) -> float | None:
        return None if self.budget_hours is None else max(self.budget_hours - self.hours, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """`mtbert studies --json`: one element of its array."""
        return {"name": self.name, "trials": self.trials, "states": self.states,
                "best": self.best, "pareto_front": self.pareto_front, "hours": self.hours,
                "budget_hours": self.budget_hours, "budget_left_hours": self.budget_left_hours,
                "stop_requested": self.stop_requested, "seeds": self.seeds,
                "configurations": self.configurations, "seed_runs": self.seed_runs,
                "size": self.size, "retried": self.retried}

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
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    # A retry's history names every trial of its series before it (studies.job).
    taken_over = {number for t in trials for number in t.system_attrs.get(RETRY_HISTORY, [])}
    # A configuration: its seed runs share config_id; reseeds name their original.
    configurations = {config_of(t)
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
        configurations=len(configurations), seed_runs=len(finished), size=study_size(study),
        retried=sum(t.state.name == "FAIL" and t.number in taken_over for t in trials))


def study_summaries(rdb) -> list[StudySummary]:
    """Every study of a storage, summarised at one moment."""
    import optuna

    now = datetime.now()
    return [study_summary(optuna.load_study(study_name=name, storage=rdb), now)
            for name in optuna.study.get_all_study_names(rdb)]


def studies_table(summaries: list[StudySummary]) -> list[str]:
    """`mtbert studies`: every study, its trials by state (FAIL split into real failures and
    trials stopped and retried), its hours (and budget), its size, best values, and
    whether it was asked to stop."""
    rows = [f"{'study':<24} {'trials':>6} {'complete':>8} {'pruned':>6} {'fail':>4} "
            f"{'retried':>7} {'running':>7} {'hours':>9} {'budget':>9}  {'size':<5}  best"]
    for s in summaries:
        budget = "-" if s.budget_hours is None else format_hours(s.budget_hours)
        rows.append(f"{s.name:<24} {s.trials:>6} {s.states['COMPLETE']:>8} "
                    f"{s.states['PRUNED']:>6} {s.failed:>4} {s.retried:>7} "
                    f"{s.states['RUNNING']:>7} "
                    f"{format_hours(s.hours):>9} {budget:>9}  {s.size or '-':<5}  "
                    f"{s.best_cell()}"
                    + ("  (stop requested)" if s.stop_requested else ""))
    return rows
