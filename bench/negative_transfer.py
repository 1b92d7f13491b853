"""Negative transfer, from a table of real runs: each multitask configuration against
the three single-task baselines, task by task, paired over seeds.

A run's model is its best evaluation by the objective (the checkpoint a trial keeps);
its task metrics are read at that epoch, for a multitask run and a baseline alike.
For each configuration and task, over the seeds both have (seed s against seed s:
the same data order and head initialisation): the mean and standard deviation of the
difference, and the two-sided paired t-test's p. A configuration **loses no task**
when no task's mean difference is below 0; the table marks the tasks significantly
below (p < 0.05).

    python bench/negative_transfer.py bench/tables/mission.jsonl
    python bench/negative_transfer.py bench/tables/mission.jsonl --out docs/negative-transfer/README.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

OBJECTIVE = "overall/geometric"
TASK_METRICS = {"sst": "sst/acc", "qqp": "qqp/acc", "sts": "sts/pearson"}
LEVEL = 0.05


@dataclass
class Versus:
    """One configuration against one task's baseline over their shared seeds."""

    task: str
    differences: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.differences) if len(self.differences) > 1 else math.nan

    @property
    def p(self) -> float:
        """Two-sided paired t-test (the differences' one-sample test against 0)."""
        if len(self.differences) < 2:
            return math.nan
        if self.sd == 0:
            return 0.0 if self.mean != 0 else 1.0
        return float(stats.ttest_1samp(self.differences, 0.0).pvalue)

    def cell(self) -> str:
        mark = " **↓**" if self.mean < 0 and self.p < LEVEL else ""
        return f"{self.mean:+.4f} ± {self.sd:.4f} (p {self.p:.2g}){mark}"


def selected(records: list[dict]) -> dict:
    """The metrics of a run's best evaluation by the objective (the earliest on a tie)."""
    return max(sorted(records, key=lambda r: r["epoch"]),
               key=lambda r: r["metrics"][OBJECTIVE])["metrics"]


def read(path: Path) -> tuple[dict, dict[str, dict[int, dict]], dict[str, dict[int, dict]],
                              dict[str, float]]:
    """The header, each configuration's and each baseline task's selected metrics by seed,
    and each configuration's cost (wall seconds of all its runs)."""
    header, runs, costs = {}, {}, {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "header":
            header = record
            continue
        key = (record["kind"], record["study"], record["config"], record["seed"])
        runs.setdefault(key, []).append(record)
    configs: dict[str, dict[int, dict]] = {}
    baselines: dict[str, dict[int, dict]] = {}
    for (kind, study, config, seed), records in runs.items():
        if kind == "multitask":
            configs.setdefault(config, {})[seed] = selected(records)
            costs[config] = costs.get(config, 0.0) + sum(
                (r["train_s"] or 0) + (r["eval_s"] or 0) for r in records)
        else:
            task = study.rsplit("-", 1)[1]
            baselines.setdefault(task, {})[seed] = selected(records)
    return header, configs, baselines, costs


def compare(configs, baselines) -> dict[str, list[Versus]]:
    found = {}
    for config, by_seed in configs.items():
        found[config] = []
        for task, metric in TASK_METRICS.items():
            shared = sorted(set(by_seed) & set(baselines.get(task, {})))
            found[config].append(Versus(task, [by_seed[s][metric] - baselines[task][s][metric]
                                               for s in shared]))
    return found


def report(path: Path) -> str:
    header, configs, baselines, costs = read(path)
    missing = [t for t in TASK_METRICS if t not in baselines]
    if missing:
        raise SystemExit(f"{path}: no single-task baseline of {', '.join(missing)} yet "
                         "(bench/make_table.py runs them once the grid is done)")
    versus = compare(configs, baselines)
    overall = {c: statistics.fmean(m[OBJECTIVE] for m in by_seed.values())
               for c, by_seed in configs.items()}
    order = sorted(configs, key=lambda c: -overall[c])
    keep = [c for c in order if all(v.mean >= 0 for v in versus[c])]
    lines = [f"# Negative transfer on `{header.get('table', path.stem)}`", "",
             f"From `{path}` (mtbert {header.get('commit', '?')[:10]}, {header.get('date', '?')}"
             f"): {len(configs)} multitask configurations against the single-task "
             "baselines, each task's metric at the run's best evaluation by "
             f"{OBJECTIVE}, paired over seeds (mean ± sd of the difference, two-sided "
             f"paired t-test p; **↓**: below at p < {LEVEL}). Made by "
             f"`python bench/negative_transfer.py {path} --out ...`.", "",
             "| baseline | " + " | ".join(TASK_METRICS.values()) + " |", "|---|---|---|---|",
             "| single task (mean ± sd over seeds) | " + " | ".join(
                 _mean_sd([m[metric] for m in baselines[t].values()])
                 for t, metric in TASK_METRICS.items()) + " |", "",
             f"| configuration | {OBJECTIVE} | " + " | ".join(
                 f"Δ {m}" for m in TASK_METRICS.values()) + " | loses no task |",
             "|---|---|---|---|---|---|"]
    for c in order:
        params = ", ".join(f"{k}={v}" for k, v in json.loads(c).items())
        lines.append(f"| {params} | {overall[c]:.4f} | " + " | ".join(
            v.cell() for v in versus[c]) + f" | {'yes' if c in keep else 'no'} |")
    lines += ["", f"**{len(keep)} of {len(configs)} configurations lose no task** (no task's "
              "mean difference below 0)."]
    if not keep:
        least = max(order, key=lambda c: min(v.mean for v in versus[c]))
        worst = min(versus[least], key=lambda v: v.mean)
        lines.append(f"Every configuration is below a baseline on at least one task. The one "
                     f"whose worst task loses least: "
                     f"{', '.join(f'{k}={v}' for k, v in json.loads(least).items())} "
                     f"({worst.task} {worst.mean:+.4f}).")
    if keep:
        best = keep[0]
        lines.append(f"The best of them by {OBJECTIVE} ({overall[best]:.4f}): "
                     f"{', '.join(f'{k}={v}' for k, v in json.loads(best).items())}; its "
                     f"{len(configs[best])} seed runs cost {costs[best]:.0f} wall seconds "
                     f"({costs[best] / sum(costs.values()):.1%} of the table's multitask runs).")
    lines += ["", *caveats(header)]
    return "\n".join(lines) + "\n"


def caveats(header: dict) -> list[str]:
    """What the comparison can and cannot say, from the table's own settings."""
    spec = (header.get("specs") or {}).get(header.get("table", ""), {})
    base = spec.get("base", {})
    model, data, train = base.get("model", {}), base.get("data", {}), base.get("train", {})
    epochs, steps = train.get("epochs", "?"), train.get("steps_per_epoch", "?")
    batches, batch = train.get("batches_per_step", 1), train.get("batch_size", "?")
    try:
        examples = f"{epochs * steps * batches * batch:,}"
    except TypeError:
        examples = "?"
    machine = header.get("machine", {})
    return [
        "## Caveats", "",
        f"- **A small encoder.** Every run fine-tunes `{model.get('encoder', '?')}`, not "
        "BERT-base: what transfers between the tasks in a 6-layer sentence encoder need not "
        "be what transfers in the model the research protocol trains.",
        f"- **A CPU budget.** A run is {epochs} epochs of {steps} optimizer steps of {batches} "
        f"batch(es) of {batch}: {examples} training examples, a small fraction of one pass "
        f"over the training files (on {machine.get('cpus', '?')} cores of "
        f"{machine.get('processor', '?')}). The models are far from converged; a "
        "configuration that loses no task here may lose one after full training, and the "
        "other way round.",
        f"- **Capped dev sets.** Each task is scored on {data.get('max_eval_examples', '?')} "
        "dev examples (the same ones for every run), so one SST or QQP example moves accuracy "
        "by 1/" + str(data.get("max_eval_examples", "?")) + ".",
        "- **Baselines at the same examples.** Each single-task baseline trains its task on "
        "as many examples as the multitask runs saw of it on average, one task per step; "
        "a multitask configuration whose schedule gives a task more or fewer examples than "
        "that average is compared at a different amount of that task's data.",
        f"- **Three seeds.** A paired t-test on 3 pairs has 2 degrees of freedom: only large, "
        f"consistent differences reach p < {LEVEL}. \"Loses no task\" reads the mean "
        "differences, not the tests: a configuration marked yes may still lose a task by "
        "less than the seed noise, and one marked no may lose nothing real.",
    ]


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", type=Path)
    parser.add_argument("--out", type=Path, help="write the Markdown here (else stdout)")
    args = parser.parse_args(argv)
    text = report(args.table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
