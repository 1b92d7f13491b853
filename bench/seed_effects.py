"""Where the seed noise of a study comes from, and what a seed-paired race would decide.

Reads a study whose configurations ran on the same seeds s, s+1, ... (e.g. the
one `bench/racing.py` leaves behind, every configuration completed to N
seeds) and prints, over the configurations with all N seeds:

- the two-way split of the objective's variance: configuration, seed (a seed
  effect shared by every configuration: the same data order and head
  initialisation), and what is left (configuration × seed);
- a replay of the race in the order a single worker ran it (configuration by
  configuration, seed by seed), with the race's own test (seed-paired
  differences, residual variance of the additive configuration + seed model,
  `mtbert.studies.racing`) and with the two-sample test on means (pooled
  within-configuration variance, which leaves the shared seed effect in the
  noise): the seed runs each spends and which configurations each races out.
  Seed runs are deterministic, so the replay sees the values a live race
  would have seen.

    python bench/seed_effects.py --storage sqlite:///bench-racing/mtbert.db --study race-bench
"""

from __future__ import annotations

import argparse
import math
import statistics

import optuna
from mtbert.studies.job import SEED
from mtbert.studies.configurations import config_of
from mtbert.studies.racing import (Race, incumbent, p_paired, p_worse, pooled_variance,
                                   residual_variance)


def table(study) -> dict[int, dict[int, float]]:
    """configuration -> seed -> objective value, COMPLETE seed runs only."""
    values: dict[int, dict[int, float]] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        values.setdefault(config_of(t), {})[t.user_attrs[SEED]] = t.value
    return values


def split(values: dict[int, dict[int, float]]) -> tuple[float, float, float, int]:
    """Mean squares of configuration, seed and residual over a full configuration × seed
    table (balanced two-way ANOVA without replication), and the residual df."""
    configs, seeds = list(values), sorted(next(iter(values.values())))
    grand = statistics.fmean(v for row in values.values() for v in row.values())
    c_mean = {c: statistics.fmean(values[c].values()) for c in configs}
    s_mean = {s: statistics.fmean(values[c][s] for c in configs) for s in seeds}
    ss_c = len(seeds) * sum((m - grand) ** 2 for m in c_mean.values())
    ss_s = len(configs) * sum((m - grand) ** 2 for m in s_mean.values())
    ss_r = sum((values[c][s] - c_mean[c] - s_mean[s] + grand) ** 2
               for c in configs for s in seeds)
    df_r = (len(configs) - 1) * (len(seeds) - 1)
    return (ss_c / (len(configs) - 1), ss_s / (len(seeds) - 1), ss_r / df_r, df_r)


def replay(values, seeds: int, alpha: float, paired: bool) -> tuple[int, list[int]]:
    """Race the table again, configuration by configuration; (seed runs, raced out)."""
    seen: dict[int, dict[int, float]] = {}
    out: list[int] = []
    spent = 0
    for c in sorted(values):
        for s in sorted(values[c])[:seeds]:
            seen.setdefault(c, {})[s] = values[c][s]
            spent += 1
            races = {k: Race(k, list(r.values()), raced_out=k in out, by_seed=dict(r))
                     for k, r in seen.items()}
            if len(seen[c]) >= seeds:
                break
            leader = incumbent(races, seeds, 1)
            if leader is None or leader.config == c:
                continue
            if paired:
                residual = residual_variance(races.values())
                p = None if residual is None else p_paired(races[c], leader, residual, 1)[0]
            else:
                pooled = pooled_variance(races.values())
                p = None if pooled is None else p_worse(races[c], leader, pooled, 1)
            if p is not None and p < alpha:
                out.append(c)
                break
    return spent, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.1)
    args = parser.parse_args()

    values = {c: r for c, r in table(optuna.load_study(study_name=args.study,
                                                        storage=args.storage)).items()
              if len(r) >= args.seeds}
    ms_c, ms_s, ms_r, df_r = split(values)
    print(f"{len(values)} configurations x {args.seeds} seeds; mean squares: configuration "
          f"{ms_c:.3g}, seed {ms_s:.3g}, residual {ms_r:.3g} ({df_r} df)")
    seed_means = {s: statistics.fmean(values[c][s] for c in values)
                  for s in sorted(next(iter(values.values())))}
    print("seed means: " + ", ".join(f"seed {s} {m:.4f}" for s, m in seed_means.items()))
    within = statistics.fmean(statistics.variance(r.values()) for r in values.values())
    print(f"seed std within a configuration {math.sqrt(within):.4f}; left after the shared "
          f"seed effect {math.sqrt(ms_r):.4f}")
    fixed = len(values) * args.seeds
    for name, paired in (("seed-paired, residual variance (the race's test)", True),
                         ("two-sample on means, pooled within-configuration variance", False)):
        spent, out = replay(values, args.seeds, args.alpha, paired)
        print(f"replay, {name}: {spent} of {fixed} seed runs, raced out "
              f"{', '.join(map(str, out)) or 'none'}")


if __name__ == "__main__":
    main()
