"""Replay search policies on a table of real runs (bench/make_table.py), without training.

Each replay is one sweep of a policy over the table's configurations on an
in-memory Optuna study: the real sampler (mtbert's `make_sampler`: random, TPE,
GP, QMC) picks among the table's values of each parameter, the real pruner sees
each epoch's value of the objective as a trial reports it, and in a raced policy
the real race (`mtbert.studies.racing.decide`, a seed run queued as the trial
process queues it) decides after each seed. What a run would have scored and cost
is read from the table: its seed's values at every epoch, and the wall seconds of
the epochs it ran (`train_s + eval_s`). The seeds come in an order drawn per
replay (the table's seeds shuffled), as a sweep's seeds are any draws.

The answer is the fixed protocol's: the configuration with the best mean over
all seeds of a run's value (its best epoch, as a trial's value is), or one within
one standard error of it. For each policy, over the replays:

- the cost at which its pick settles on such a configuration (stays there to its
  end), as a share of the fixed protocol's cost (median, 90th percentile);
- the share of replays whose pick is such a configuration at budgets of 1/4 and
  1/10 of the fixed protocol;
- a figure of regret (the answer's mean minus the pick's) against cost.

    python bench/replay.py bench/tables/mission.jsonl
    python bench/replay.py bench/tables/mission.jsonl --replays 20 --policy tpe+median+race0.1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from mtbert.studies import racing
from mtbert.studies.configurations import config_of
from mtbert.studies.job import CONFIG_ID, RACED_OUT, SEED
from mtbert.studies.samplers import make_pruner, make_sampler

OBJECTIVE = "overall/geometric"
CHUNK = 25  # replays of one policy per job of a --jobs pool
GP_REPLAYS = 10  # GP's replays: 13 s each on 2 cores where TPE's take 0.2 s
RACED_BY = "raced_by"  # a raced-out trial's incumbent, as its table key
RESEED_TOP, RESEED_AFTER = 3, 10  # what users do today: 10 trials, then reseed the top 3


@dataclass
class Run:
    values: list[float]  # the objective after each epoch
    costs: list[float]  # wall seconds of each epoch

    @property
    def value(self) -> float:
        return max(self.values)  # a trial's value: its best evaluation


@dataclass
class Table:
    space: dict[str, list]  # each parameter's values
    runs: dict[str, dict[int, Run]]  # configuration key -> table seed -> run
    params: dict[str, dict]  # configuration key -> its parameters
    header: dict

    @classmethod
    def read(cls, path: Path) -> "Table":
        header, runs, params = {}, {}, {}
        by_run: dict[tuple[str, int], list[dict]] = {}
        for number, line in enumerate(path.read_text().splitlines(), 1):
            record = json.loads(line)
            if record.get("kind") == "header":
                header = record
            elif record.get("kind") == "multitask":
                by_run.setdefault((record["config"], record["seed"]), []).append(record)
                params[record["config"]] = record["params"]
        for (config, seed), records in by_run.items():
            records.sort(key=lambda r: r["epoch"])
            runs.setdefault(config, {})[seed] = Run(
                [r["metrics"][OBJECTIVE] for r in records],
                [(r["train_s"] or 0.0) + (r["eval_s"] or 0.0) for r in records])
        seeds = {s for config in runs.values() for s in config}
        complete = {c: r for c, r in runs.items() if set(r) == seeds}
        if len(complete) < len(runs):
            print(f"{len(runs) - len(complete)} configurations without every seed are left "
                  "out (the table is still growing)", file=sys.stderr)
        space: dict[str, list] = {}
        for config in complete:
            for key, value in params[config].items():
                if value not in space.setdefault(key, []):
                    space[key].append(value)
        return cls({k: sorted(v, key=str) for k, v in space.items()}, complete,
                   {c: params[c] for c in complete}, header)

    def points(self) -> int:
        return math.prod(len(v) for v in self.space.values())

    def as_one_choice(self) -> "Table":
        """The table with one categorical parameter, `config`, over its configurations:
        for a table that does not (yet) hold every point of its grid, where a sampler
        could draw a point no run exists for. The samplers then see no structure."""
        runs = {json.dumps({"config": c}): r for c, r in self.runs.items()}
        return Table({"config": sorted(self.runs)}, runs,
                     {k: {"config": c} for k, c in zip(runs, self.runs)}, self.header)

    @property
    def seeds(self) -> list[int]:
        return sorted(next(iter(self.runs.values())))

    def key(self, params: dict) -> str:
        return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True)

    def mean(self, config: str) -> float:
        return statistics.fmean(r.value for r in self.runs[config].values())

    def fixed_cost(self) -> float:
        return sum(sum(r.costs) for config in self.runs.values() for r in config.values())

    def answers(self) -> set[str]:
        """The fixed protocol's best configuration by mean, and every one within one
        standard error of it (the best's seed values)."""
        best = max(self.runs, key=self.mean)
        values = [r.value for r in self.runs[best].values()]
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        return {c for c in self.runs if self.mean(c) >= self.mean(best) - se}


@dataclass
class Policy:
    name: str
    sampler: str | None  # None: the fixed protocol
    pruner: dict = field(default_factory=lambda: {"name": "none"})
    seeds: int = 1  # >1: raced at `alpha`
    alpha: float = 0.1
    reseed: bool = False  # RESEED_AFTER trials of one seed, then the top RESEED_TOP reseeded
    most: int | None = None  # at most this many replays (GP fits a model per trial: slow)


def policies(seeds: int) -> list[Policy]:
    median = {"name": "median", "n_startup_trials": 2}
    halving = {"name": "successive_halving", "min_resource": 1, "reduction_factor": 3}
    hyperband = {"name": "hyperband", "min_resource": 1, "reduction_factor": 3}
    found = [Policy("fixed protocol", None),
             Policy("random, 1 seed, reseed top 3", "random", reseed=True),
             Policy("tpe, 1 seed, reseed top 3", "tpe", reseed=True),
             Policy("tpe+median, 1 seed", "tpe", median),
             Policy("tpe+halving, 1 seed", "tpe", halving),
             Policy("tpe+hyperband, 1 seed", "tpe", hyperband)]
    for alpha in (0.05, 0.1, 0.2):
        found.append(Policy(f"tpe+median+race{alpha:g}", "tpe", median, seeds, alpha))
        found.append(Policy(f"tpe+halving+race{alpha:g}", "tpe", halving, seeds, alpha))
    found.append(Policy("tpe+hyperband+race0.1", "tpe", hyperband, seeds, 0.1))
    found.append(Policy("tpe+race0.1 (no pruner)", "tpe", {"name": "none"}, seeds, 0.1))
    found.append(Policy("random+race0.1 (no pruner)", "random", {"name": "none"}, seeds, 0.1))
    found.append(Policy("random+median+race0.1", "random", median, seeds, 0.1))
    found.append(Policy("random+hyperband+race0.1", "random", hyperband, seeds, 0.1))
    found.append(Policy("grid+hyperband+race0.1", "grid", hyperband, seeds, 0.1))
    found.append(Policy("gp+median+race0.1", "gp", median, seeds, 0.1, most=GP_REPLAYS))
    found.append(Policy("qmc, 1 seed, reseed top 3", "qmc", reseed=True))
    for name, pruner in (("median", median), ("halving", halving), ("hyperband", hyperband)):
        found.append(Policy(f"qmc+{name}+race0.1", "qmc", pruner, seeds, 0.1))
    return found


@dataclass
class Replay:
    """One replay's path: (cost so far, the pick) after every run, and its end."""

    path: list[tuple[float, str | None]] = field(default_factory=list)
    study: optuna.Study | None = None  # the replay's study (None: the fixed protocol)

    def pick_at(self, budget: float) -> str | None:
        pick = None
        for cost, chosen in self.path:
            if cost > budget:
                break
            pick = chosen
        return pick

    def settled(self, answers: set[str]) -> float:
        """The cost from which the pick is an answer to the end (inf: it ends on none)."""
        cost = math.inf
        for spent, pick in reversed(self.path):
            if pick not in answers:
                break
            cost = spent
        return cost


def replay(table: Table, policy: Policy, number: int, cap: float) -> Replay:
    """One sweep of `policy` with sampler seed `number`, until it ends or spends `cap`."""
    order = table.seeds[:]
    random.Random(number).shuffle(order)  # the order in which the seeds come
    if policy.sampler is None:
        return _fixed(table, order)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    options = {"name": policy.sampler, "seed": number}
    if policy.sampler == "qmc":  # Optuna's QMC is unscrambled by default: every seed alike
        options["scramble"] = True
    sampler = make_sampler(options, grid=table.space)
    if policy.seeds > 1:
        sampler = racing.mean_sampler(sampler)
    # A fixed name: Hyperband assigns a trial's bracket by a hash of the study's name.
    study = optuna.create_study(study_name=f"replay-{number}", direction="maximize",
                                sampler=sampler, pruner=make_pruner(policy.pruner))
    result, spent, started = Replay(study=study), 0.0, 0
    limit = 4 * len(table.runs) * max(policy.seeds, 1)  # samplers repeat configurations
    while spent < cap and started < limit:
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if policy.reseed and not waiting and started >= RESEED_AFTER:
            break
        trial = study.ask()
        started += 1
        spent += _run(table, policy, study, trial, order)
        if policy.reseed and started == RESEED_AFTER:
            _queue_reseeds(study, len(order))
        result.path.append((spent, _pick(table, policy, study)))
    return result


def _run(table: Table, policy: Policy, study, trial, order: list[int]) -> float:
    """Run `trial` from the table as a trial process would: report each epoch (pruned
    only on a configuration's first seed), then the race; returns its cost."""
    params = {k: trial.suggest_categorical(k, v) for k, v in table.space.items()}
    seed = trial.user_attrs.get(SEED, 0)
    config = config_of(trial)
    trial.set_user_attr(SEED, seed)
    trial.set_user_attr(CONFIG_ID, config)
    run = table.runs[table.key(params)][order[seed]]
    cost, best = 0.0, -math.inf
    first = config == trial.number
    for epoch, (value, seconds) in enumerate(zip(run.values, run.costs), 1):
        cost += seconds
        best = max(best, value)
        if first:
            trial.report(value, epoch)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                return cost
    if policy.seeds > 1:
        decision = racing.decide(study, config=config, value=best, seeds=policy.seeds,
                                 alpha=policy.alpha, seed=seed)
        if decision.state == racing.RACED:
            trial.set_user_attr(RACED_OUT, True)
            leader = study.get_trials(deepcopy=False)[decision.leader]
            trial.set_user_attr(RACED_BY, table.key({k: leader.params[k] for k in table.space}))
        elif decision.state == racing.CONTINUE:
            racing.queue_seed(study, config=config, params=params, seed=seed + 1)
    study.tell(trial, best)
    return cost


def _queue_reseeds(study, seeds: int) -> None:
    """`mtbert best --reseed`: the top configurations by value get the other seeds."""
    done = [t for t in study.get_trials(deepcopy=False,
                                        states=(optuna.trial.TrialState.COMPLETE,))]
    firsts: dict[int, optuna.trial.FrozenTrial] = {}
    for t in sorted(done, key=lambda t: -t.value):
        firsts.setdefault(config_of(t), t)
    for t in list(firsts.values())[:RESEED_TOP]:
        for seed in range(1, seeds):
            racing.queue_seed(study, config=config_of(t), params=t.params, seed=seed)


def _pick(table: Table, policy: Policy, study) -> str | None:
    """The configuration the study would name best now: by mean over its seeds once
    configurations have several (a race's incumbent; after reseeds, the reseeded ones),
    else the best single value."""
    groups = racing.races(study)
    if not groups:
        return None
    most = max(len(g.values) for g in groups.values())
    if policy.seeds > 1:
        leader = racing.incumbent(groups, policy.seeds, 1)
        chosen = leader.config if leader is not None else None
    else:
        chosen = max((g for g in groups.values() if len(g.values) == most),
                     key=lambda g: g.mean).config
    if chosen is None:
        return None
    trial = study.get_trials(deepcopy=False)[chosen]
    return table.key({k: trial.params[k] for k in table.space})


def _fixed(table: Table, order: list[int]) -> Replay:
    """Every configuration x every seed x every epoch; it names its answer at the end."""
    spent = sum(sum(runs[s].costs) for runs in table.runs.values() for s in order)
    return Replay([(spent, max(table.runs, key=table.mean))])


def summarize(table: Table, name: str, replays: list[Replay]) -> dict:
    fixed, answers = table.fixed_cost(), table.answers()
    settled = sorted(r.settled(answers) / fixed for r in replays)
    best = max(table.mean(c) for c in table.runs)

    def share(budget: float) -> float:
        return statistics.fmean(r.pick_at(budget * fixed) in answers for r in replays)

    return {"policy": name, "replays": len(replays),
            "median_cost": _quantile(settled, 0.5), "p90_cost": _quantile(settled, 0.9),
            "found": statistics.fmean(math.isfinite(s) for s in settled),
            "at_quarter": share(0.25), "at_tenth": share(0.1),
            "final_regret": statistics.fmean(
                best - table.mean(r.path[-1][1]) if r.path and r.path[-1][1] else best
                for r in replays)}


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def figure(table: Table, results: dict[str, list[Replay]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed, best = table.fixed_cost(), max(table.mean(c) for c in table.runs)
    grid = [fixed * 10 ** (k / 20) for k in range(-50, 1)]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for number, (name, replays) in enumerate(results.items()):
        curves = []
        for r in replays:
            curves.append([best - table.mean(p) if (p := r.pick_at(b)) else math.nan
                           for b in grid])
        middle, low, high = [], [], []
        for column in zip(*curves):
            values = sorted(v for v in column if not math.isnan(v))
            middle.append(_quantile(values, 0.5) if values else math.nan)
            low.append(_quantile(values, 0.1) if values else math.nan)
            high.append(_quantile(values, 0.9) if values else math.nan)
        x = [b / fixed for b in grid]
        color = plt.cm.tab20(number % 20)
        style = "--" if "race" in name else "-"
        ax.plot(x, middle, label=name, lw=1.6, color=color, ls=style)
        ax.fill_between(x, low, high, color=color, alpha=0.05)
    ax.set_xscale("log")
    ax.set_xlabel("cost (share of the fixed protocol's wall seconds)")
    ax.set_ylabel(f"regret ({OBJECTIVE}: the best mean minus the pick's)")
    ax.set_title(f"Search policies replayed on {table.header.get('table', 'the table')}: "
                 "median and 10-90% of the replays")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replay_all(table: Table, chosen: list[Policy], replays: int, jobs: int
               ) -> tuple[dict[str, list[Replay]], dict[str, float]]:
    """`replays` replays of each policy, in `jobs` processes (chunks of replays of one
    policy each); every replay's path (not its study), and each policy's summed seconds."""
    counts = {p.name: min(p.most or replays, replays) for p in chosen}
    chunks = [(p, list(range(first, min(first + CHUNK, counts[p.name]))))
              for p in chosen for first in range(0, counts[p.name], CHUNK)]
    results = {p.name: [] for p in chosen}
    seconds = dict.fromkeys(results, 0.0)
    if jobs > 1 and len(chunks) > 1:
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no torch or Optuna state forked
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            done = list(pool.map(_replay_chunk, [(table, p, n) for p, n in chunks]))
    else:
        done = [_replay_chunk((table, p, n)) for p, n in chunks]
    for (policy, _), (paths, spent) in zip(chunks, done):
        results[policy.name] += paths
        seconds[policy.name] = round(seconds[policy.name] + spent, 1)
    return results, seconds


def _replay_chunk(job: tuple) -> tuple[list[Replay], float]:
    table, policy, numbers = job
    tic = time.perf_counter()
    paths = [Replay(replay(table, policy, n, table.fixed_cost()).path) for n in numbers]
    return paths, time.perf_counter() - tic


def markdown(table: Table, summaries: dict[str, dict]) -> str:
    """The summaries as a Markdown table, costs as shares of the fixed protocol's."""
    lines = [f"{len(table.runs)} configurations x {len(table.seeds)} seeds; the fixed protocol "
             f"costs {table.fixed_cost():.0f} s; {len(table.answers())} answer(s).", "",
             "| policy | replays | median cost to the answer | 90th percentile | replays that "
             "reach it | on the answer at 1/4 | at 1/10 | final regret |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries.values():
        lines.append(f"| {s['policy']} | {s['replays']} | {_share(s['median_cost'])} "
                     f"| {_share(s['p90_cost'])} "
                     f"| {s['found']:.0%} | {s['at_quarter']:.0%} | {s['at_tenth']:.0%} "
                     f"| {s['final_regret']:.4f} |")
    return "\n".join(lines)


def _share(cost: float) -> str:
    return f"{cost:.3f}" if math.isfinite(cost) else "never"


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", type=Path)
    parser.add_argument("--replays", type=int, default=100)
    parser.add_argument("--policy", action="append", help="only these (repeatable)")
    parser.add_argument("--figure", type=Path, help="regret against cost (PNG)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes replaying at once (default: one per core)")
    parser.add_argument("--json", action="store_true", help="the summaries as JSON")
    parser.add_argument("--markdown", action="store_true", help="the summaries as a Markdown "
                        "table (for the docs)")
    parser.add_argument("--partial", action="store_true",
                        help="a table without every point of its grid: replay over its "
                        "configurations as one categorical parameter")
    args = parser.parse_args(argv)
    table = Table.read(args.table)
    if len(table.runs) < table.points():
        if not args.partial:
            raise SystemExit(f"{args.table} holds {len(table.runs)} of the {table.points()} "
                             "configurations of its grid with every seed: a sampler could draw "
                             "one it has no run of; finish it (bench/make_table.py), or pass "
                             "--partial")
        table = table.as_one_choice()
    chosen = [p for p in policies(len(table.seeds))
              if not args.policy or p.name in args.policy]
    results, seconds = replay_all(table, chosen, args.replays, args.jobs)
    summaries = {name: {**summarize(table, name, replays), "seconds": seconds[name]}
                 for name, replays in results.items()}
    if args.json:
        print(json.dumps(summaries, indent=1))
    elif args.markdown:
        print(markdown(table, summaries))
    else:
        print(f"{len(table.runs)} configurations x {len(table.seeds)} seeds; the fixed "
              f"protocol costs {table.fixed_cost():.0f} s; {len(table.answers())} answer(s)")
        print(f"{'policy':<30} {'median':>7} {'p90':>7} {'found':>6} {'@1/4':>6} {'@1/10':>6}"
              f" {'regret':>7} {'s':>6}")
        for s in summaries.values():
            print(f"{s['policy']:<30} {s['median_cost']:>7.3f} {s['p90_cost']:>7.3f} "
                  f"{s['found']:>6.0%} {s['at_quarter']:>6.0%} {s['at_tenth']:>6.0%} "
                  f"{s['final_regret']:>7.4f} {s['seconds']:>6.1f}")
    if args.figure:
        figure(table, results, args.figure)
    return summaries


if __name__ == "__main__":
    main()
