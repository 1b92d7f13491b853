"""`mtbert compare`: run configs trained with the same seeds, compared by mean ± std and a
paired test against a baseline.

One seed is not a result: on these tasks the spread between seeds of one configuration
(about ±0.02 SST accuracy) is larger than most differences between configurations. Every
configuration here trains once per seed, with the same seeds for all of them, so that the
difference to the baseline can be taken seed by seed and tested as paired samples
(Student's paired t-test; the Wilcoxon signed-rank test too from 6 seeds on).

Presets: `multitask` is the default run config; `individual` is one single-task model per
task of data.tasks, its per-task dev metrics combined into the overall scores, the
reference every multitask result is measured against.

Runs go to OUT/<config>/seed<k>/ (individual: OUT/individual/seed<k>/<task>/). A run with
a summary.json is finished and not trained again; a killed run continues from its last
finished epoch; a failed run is reported and the others go on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtbert.config import SEED_MAX, RunConfig, build_config, flatten, load_config
from mtbert.errors import ConfigError, MtbertError
from mtbert.formatting import (aligned_table, first_line, format_mean_std, markdown_table,
                               save_figure)
from mtbert.live import LiveBlock, duration, eta, is_live, logging_above, position_line
from mtbert.rundir import read_summary
from mtbert.runtime import wandb_dir
from mtbert.safeyaml import file_problem, shown
from mtbert.tasks import METRIC_KEYS, TASKS, overall_scores
from mtbert.tracking import Tracker, train_tracked

log = logging.getLogger("mtbert")
PRESETS = {"individual": "one single-task model per task of data.tasks, combined",
           "multitask": "the default run config (one model, every task of data.tasks)"}
# Below this many pairs the Wilcoxon signed-rank test cannot reach p < 0.05 at all.
WILCOXON_MIN_PAIRS = 6
MAX_SEEDS = 1000  # trainings per config: far above any comparison, refuses a typo
REFRESH_S = 1.0  # the terminal display redraws the running training at most this often


@dataclass
class Candidate:
    """One configuration to compare: a run config, trained as is or one model per task."""

    name: str
    config: RunConfig
    individual: bool = False

    def members(self, seed: int) -> list[tuple[str | None, RunConfig]]:
        """The runs of one seed: (task, config) per single-task model, or (None, config)."""
        data = self.config.to_dict()
        data["train"]["seed"] = seed
        if not self.individual:
            return [(None, build_config(data))]
        runs = []
        for task in self.config.data.tasks:
            single = json.loads(json.dumps(data))
            single["data"]["tasks"] = [task]
            single["train"]["select_metric"] = TASKS[task].metric_key
            runs.append((task, build_config(single)))
        return runs


def _per_config(items: list[str], names: list[str]) -> dict[str, list[str]]:
    """`--set-for CONFIG:KEY=VALUE` items as KEY=VALUE overrides per config name."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ConfigError(f"bad --set-for {item!r}; expected CONFIG:KEY=VALUE, e.g. "
                              "multitask:train.steps_per_epoch=120")
        if name not in names:
            raise ConfigError(f"--set-for {item!r} names no config of this comparison; "
                              f"configs: {', '.join(names)}")
        out.setdefault(name, []).append(override)
    return out


def resolve_candidates(names: list[str], overrides: list[str],
                       extra: dict[str, Any] | None = None, *,
                       per_config: list[str] | None = None) -> list[Candidate]:
    """Each name a preset or a run-config YAML file (named by its stem); `overrides`
    (`--set`) and `extra` (`--data-dir`) apply to every one, then `per_config`
    (`--set-for CONFIG:KEY=VALUE`) to the config it names."""
    if not names:
        raise ConfigError("name the configs to compare, e.g. `mtbert compare "
                          f"individual multitask`; presets: {', '.join(PRESETS)}")
    own = _per_config(per_config or [], [n if n in PRESETS else Path(n).stem for n in names])
    candidates = []
    for name in names:
        path = Path(name)
        if name in PRESETS:
            config = load_config(None, overrides + own.get(name, []), extra=extra)
            candidates.append(Candidate(name, config, individual=name == "individual"))
        elif path.suffix in (".yaml", ".yml") or path.exists():
            problem = file_problem(path)
            if problem:
                raise ConfigError(f"config file {path} {problem}")
            candidates.append(Candidate(path.stem, load_config(
                path, overrides + own.get(path.stem, []), extra=extra)))
        else:
            raise ConfigError(f"unknown config or preset '{name}'; presets: "
                              f"{', '.join(PRESETS)}, or a path to a run-config YAML file")
    seen: set[str] = set()
    for c in candidates:
        if c.name in seen:
            raise ConfigError(f"two configs are named '{c.name}'; each needs its own name "
                              "(the file stem)")
        seen.add(c.name)
    return candidates


@dataclass
class SeedResult:
    status: str  # done, failed
    metrics: dict[str, float] = field(default_factory=dict)
    run_dir: str = ""
    reason: str = ""


@dataclass
class Paired:
    """A candidate minus the baseline on one metric, seed by seed."""

    pairs: int
    diff: float  # mean of the per-seed differences
    p_ttest: float | None
    p_wilcoxon: float | None
    note: str = ""  # why there is no p-value


@dataclass
class Comparison:
    name: str
    configs: list[str]
    baseline: str
    seeds: list[int]
    metric: str
    runs: dict[str, dict[int, SeedResult]]

    def values(self, config: str, key: str) -> dict[int, float]:
        return {seed: r.metrics[key] for seed, r in self.runs[config].items()
                if r.status == "done" and key in r.metrics}

    def mean_std(self, config: str, key: str) -> tuple[float, float, int]:
        """Mean, sample standard deviation (n - 1; nan for one seed) and n."""
        values = list(self.values(config, key).values())
        if not values:
            return float("nan"), float("nan"), 0
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        return statistics.fmean(values), std, len(values)

    def paired(self, config: str, key: str) -> Paired:
        """`config` minus the baseline on `key` over the seeds where both finished."""
        from scipy import stats

        ours, base = self.values(config, key), self.values(self.baseline, key)
        seeds = [s for s in self.seeds if s in ours and s in base]
        a, b = [ours[s] for s in seeds], [base[s] for s in seeds]
        diffs = [x - y for x, y in zip(a, b)]
        if not diffs:
            return Paired(0, float("nan"), None, None, "no seed finished for both")
        diff = sum(diffs) / len(diffs)
        if len(diffs) < 2:
            return Paired(1, diff, None, None, "1 pair; a paired test needs 2 or more seeds")
        if max(diffs) - min(diffs) == 0:
            return Paired(len(diffs), diff, None, None,
                          "the difference is the same on every seed (no variance to test)")
        p_t = float(stats.ttest_rel(a, b).pvalue)
        p_w = None
        if len(diffs) >= WILCOXON_MIN_PAIRS:
            p_w = float(stats.wilcoxon(a, b).pvalue)
        return Paired(len(diffs), diff, p_t, p_w)

    def to_json(self) -> dict[str, Any]:
        summary = {c: {k: dict(zip(("mean", "std", "n"), self.mean_std(c, k)))
                       for k in METRIC_KEYS} for c in self.configs}
        paired = {c: {k: vars(self.paired(c, k)) for k in METRIC_KEYS}
                  for c in self.configs if c != self.baseline}
        return {"name": self.name, "configs": self.configs, "baseline": self.baseline,
                "seeds": self.seeds, "metric": self.metric,
                "runs": {c: {str(s): vars(r) for s, r in runs.items()}
                         for c, runs in self.runs.items()},
                "summary": _no_nan(summary), "paired": _no_nan(paired)}


def _no_nan(data: Any) -> Any:
    """JSON has no NaN: missing values are null."""
    if isinstance(data, dict):
        return {k: _no_nan(v) for k, v in data.items()}
    if isinstance(data, float) and math.isnan(data):
        return None
    return data


def _config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    try:
        # Keys added to mtbert since the run was saved take their defaults, as they did.
        saved = build_config(saved).to_dict()
    except ConfigError:
        pass  # a key this version does not know: compared as written
    a, b = flatten(saved), flatten(wanted)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _plan(candidates: list[Candidate], seeds: list[int], out: Path):
    """Every run as (candidate, seed, task, config, run_dir); a run directory that holds
    another config is bad input, found before anything trains."""
    from mtbert.safeyaml import load_yaml

    plan = []
    for c in candidates:
        for seed in seeds:
            for task, config in c.members(seed):
                run_dir = out / c.name / f"seed{seed}" / (task or "")
                saved = run_dir / "config.yaml"
                if saved.exists():
                    text = saved.read_text(encoding="utf-8")
                    differ = _config_differences(load_yaml(text, str(saved)) or {},
                                                 config.to_dict())
                    if differ:
                        raise ConfigError(
                            f"{run_dir} holds a run of another config ({', '.join(differ[:4])}"
                            f"{' ...' if len(differ) > 4 else ''} differ); compare into a new "
                            "--out, or remove it")
                plan.append((c, seed, task, config, run_dir))
    return plan


class CompareDisplay:
    """`mtbert compare` in a terminal (`live.is_live`): a block at the bottom of stderr
    with the running training's line (config, seed, device, epoch and step of the total,
    elapsed and an estimate of the rest, loss, latest dev value of its selection metric)
    and the comparison's (runs done of all, failed), redrawn as it steps, at most every
    REFRESH_S seconds; the log lines, each run's result among them, scroll above it.
    Elsewhere (`live` False) it draws nothing: the runs' log lines are the plain lines,
    `mtbert train`'s one per evaluation and one per finished run."""

    def __init__(self, *, live: bool, name: str, total: int, device: str):
        self.block = LiveBlock(sys.stderr) if live else None
        self.name, self.total, self.device = name, total, device
        self.done = self.failed = 0
        self.label: str | None = None
        self._drawn = float("-inf")

    @contextlib.contextmanager
    def shown(self):
        if self.block is None:
            yield
            return
        with logging_above(self.block, log):
            try:
                yield
            finally:
                self.block.close()

    def start(self, label: str, metric: str) -> None:
        self.label, self.metric, self.started = label, metric, time.time()
        self.position = {"epoch": 0, "epochs": 0, "step": 0, "steps": 0}
        self.loss, self.dev, self._since = None, "", None
        self._draw()

    def step(self, *, epoch: int, epochs: int, step: int, steps: int,
             loss: float | None) -> None:
        """`train`'s on_step."""
        now = time.time()
        self._since = self._since or (now, step)
        self.position = {"epoch": epoch + 1, "epochs": epochs, "step": step, "steps": steps}
        self.loss = self.loss if loss is None else loss
        if now - self._drawn >= REFRESH_S:
            self._draw(now)

    def evaluated(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """`train`'s on_eval."""
        if self.metric in metrics:
            self.dev = f"{self.metric} {metrics[self.metric]:.4f} (epoch {epoch + 1})"
        self._draw()

    def end(self, *, failed: bool = False) -> None:
        self.label = None
        self.done += 1
        self.failed += failed
        self._draw()

    def _draw(self, now: float | None = None) -> None:
        self._drawn = now = time.time() if now is None else now
        if self.block is None:
            return
        lines = [f"compare {self.name}: {self.done}/{self.total} runs done" +
                 (f", {self.failed} failed" if self.failed else "")]
        if self.label is not None and not self.position["epoch"]:
            lines.insert(0, f"{self.label}  starting  {duration(now - self.started)}")
        elif self.label is not None:
            lines.insert(0, position_line(
                self.label, self.device, **self.position, elapsed_s=now - self.started,
                eta_s=eta(self._since, now, self.position["step"], self.position["steps"]),
                loss=self.loss, dev=self.dev))
        self.block.update(lines)


def run_compare(candidates: list[Candidate], *, seeds: list[int], out: Path, baseline: str,
                metric: str = "overall/geometric", device: str = "auto",
                progress: bool = True, wandb_mode: str = "disabled",
                wandb_project: str = "mtbert") -> Comparison:
    """Train every candidate with every seed (finished runs are read, not trained again)
    and write OUT/compare.json; returns the comparison. With `progress`, a terminal on
    stderr shows the running training and the comparison (`CompareDisplay`)."""
    from mtbert.rundir import RESUME_FILE
    from mtbert.runtime import device_label

    names = [c.name for c in candidates]
    if baseline not in names:
        raise ConfigError(f"baseline '{baseline}' is not one of the configs: {', '.join(names)}")
    if metric not in METRIC_KEYS:
        raise ConfigError(f"unknown metric '{metric}'; valid: {', '.join(METRIC_KEYS)}")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError(f"seeds must be distinct and at least one; got {seeds}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
            raise ConfigError(f"bad seed {seed!r} in {seeds}; valid range: 0..{SEED_MAX}")
    out = Path(out)
    plan = _plan(candidates, seeds, out)
    name = out.resolve().name
    directory = wandb_dir(out)
    members: dict[tuple[str, int], dict[str | None, dict]] = {}
    failures: dict[tuple[str, int], list[str]] = {}
    display = CompareDisplay(live=progress and is_live(sys.stderr), name=name,
                             total=len(plan), device=device_label(device))
    with display.shown():
        for i, (c, seed, task, config, run_dir) in enumerate(plan, 1):
            label = f"{c.name} seed {seed}" + (f" {task}" if task else "")
            what = f"[{i}/{len(plan)}] {label}"
            summary = read_summary(run_dir)
            if summary is not None:
                log.info("%s: finished earlier, read from %s", what, run_dir)
                display.end()
            else:
                resume = (run_dir / RESUME_FILE).exists()
                log.info("%s: %s in %s", what, "resuming" if resume else "training", run_dir)
                tic = time.perf_counter()
                display.start(label, config.train.select_metric)
                try:
                    tracker = Tracker(mode=wandb_mode, project=wandb_project, group=name,
                                      job_type="compare",
                                      name=f"{name}-{c.name}-seed{seed}" + (f"-{task}" if task
                                                                            else ""),
                                      config=config.to_dict(), tags=["compare"],
                                      directory=directory)
                    # No progress bar: the display is the bar in a terminal, and a log
                    # file gets no carriage returns.
                    summary = train_tracked(config, run_dir=run_dir, tracker=tracker,
                                            device=device, resume=resume, progress=False,
                                            on_step=display.step, on_eval=display.evaluated)
                except (MtbertError, RuntimeError) as err:
                    reason = first_line(err)
                    log.warning("%s: FAILED: %s", what, reason)
                    failures.setdefault((c.name, seed), []).append(
                        f"{task + ': ' if task else ''}{reason}")
                    display.end(failed=True)
                    continue
                log.info("%s: done in %.0fs, %s %.4f", what, time.perf_counter() - tic,
                         summary["selection_metric"], summary["best"]["metrics"].get(
                             summary["selection_metric"], float("nan")))
                display.end()
            members.setdefault((c.name, seed), {})[task] = {
                "metrics": summary["best"]["metrics"], "run_dir": str(run_dir)}

    runs: dict[str, dict[int, SeedResult]] = {c.name: {} for c in candidates}
    for c in candidates:
        for seed in seeds:
            where = str(out / c.name / f"seed{seed}")
            if (c.name, seed) in failures:
                runs[c.name][seed] = SeedResult("failed", run_dir=where,
                                                reason="; ".join(failures[(c.name, seed)]))
                continue
            done = members[(c.name, seed)]
            if c.individual:
                # Each single-task model's own dev metric, then the overall scores over them.
                scores = {TASKS[t].metric_key: done[t]["metrics"][TASKS[t].metric_key]
                          for t in c.config.data.tasks}
                metrics = {**scores, **overall_scores(scores)}
            else:
                metrics = {k: v for k, v in done[None]["metrics"].items() if k in METRIC_KEYS}
            runs[c.name][seed] = SeedResult("done", metrics, where)
    result = Comparison(name, names, baseline, list(seeds), metric, runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")
    return result


def _mean_std_n(mean: float, std: float, n: int) -> str:
    """A comparison cell: "mean ± std (n)", "mean (1)" for one seed, "-" for none."""
    return "-" if n == 0 else f"{format_mean_std(mean, std)} ({n})"


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _rows(result: Comparison) -> tuple[list[str], list[list[str]], list[str], list[list[str]],
                                       list[str]]:
    """The two tables as cells: (head, rows) of mean ± std per config, (head, rows) of the
    paired differences per config and metric, and the notes on missing p-values."""
    head = ["config", "seeds"] + list(METRIC_KEYS) + [f"Δ {result.metric}", "p (paired t)"]
    rows, notes = [], []
    for c in result.configs:
        done = sum(1 for r in result.runs[c].values() if r.status == "done")
        row = [c, f"{done}/{len(result.seeds)}"]
        row += [_mean_std_n(*result.mean_std(c, k)) for k in METRIC_KEYS]
        if c == result.baseline:
            row += ["baseline", ""]
        else:
            p = result.paired(c, result.metric)
            row += ["-" if math.isnan(p.diff) else f"{p.diff:+.4f}", _p(p.p_ttest)]
        rows.append(row)
    wilcoxon = len(result.seeds) >= WILCOXON_MIN_PAIRS
    phead = ["config", "metric", "Δ mean", "p (paired t)"] + (["p (Wilcoxon)"] if wilcoxon
                                                              else []) + ["pairs"]
    prows = []
    for c in result.configs:
        if c == result.baseline:
            continue
        why: dict[str, list[str]] = {}
        for k in METRIC_KEYS:
            p = result.paired(c, k)
            prow = [c, k, "-" if math.isnan(p.diff) else f"{p.diff:+.4f}", _p(p.p_ttest)]
            if wilcoxon:
                prow.append(_p(p.p_wilcoxon))
            prows.append(prow + [str(p.pairs)])
            if p.note:
                why.setdefault(p.note, []).append(k)
        for note, keys in why.items():
            what = "every metric" if len(keys) == len(METRIC_KEYS) else ", ".join(keys)
            notes.append(f"({c}: {what}): {note}")
    return head, rows, phead, prows, notes


def _intro(result: Comparison) -> str:
    return (f"{' vs '.join(result.configs)}: seeds {', '.join(map(str, result.seeds))}; "
            f"mean ± sample std (n seeds) of the dev metrics at each run's best evaluation; "
            f"Δ = config minus {result.baseline}, seed by seed")


def text_table(result: Comparison) -> list[str]:
    head, rows, phead, prows, notes = _rows(result)
    lines = [f"compare {result.name}: {_intro(result)}", *aligned_table(head, rows, left=2)]
    if prows:
        lines += ["", f"paired differences vs {result.baseline}:", *aligned_table(phead, prows, left=2)]
    lines += [f"n/a {note}" for note in notes]
    failed = [f"{c} seed {s}: {r.reason}" for c in result.configs
              for s, r in result.runs[c].items() if r.status == "failed"]
    lines += [f"failed: {f}" for f in failed]
    return lines


def plot_comparison(result: Comparison, path: Path) -> Path | None:
    """One panel per metric: each seed's value per config, a grey line joining the configs
    of one seed (the pairs the test compares), and the mean ± sample std in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    keys = [k for k in METRIC_KEYS if any(result.values(c, k) for c in result.configs)]
    if not keys:
        return None
    x = range(len(result.configs))
    fig, axes = plt.subplots(1, len(keys), figsize=(2.2 + 1.2 * len(result.configs) * len(keys),
                                                    3.8), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("tab10")
    for ax, key in zip(axes[0], keys):
        for i, seed in enumerate(result.seeds):
            points = [(j, result.values(c, key)[seed]) for j, c in enumerate(result.configs)
                      if seed in result.values(c, key)]
            if points:
                ax.plot(*zip(*points), color="0.75", lw=1, zorder=1)
                ax.scatter(*zip(*points), color=cmap(i % 10), s=22, zorder=2,
                           label=f"seed {seed}")
        for j, config in enumerate(result.configs):
            mean, std, n = result.mean_std(config, key)
            if n:
                ax.errorbar(j + 0.18, mean, yerr=std if n > 1 else None, fmt="_", color="k",
                            ms=14, capsize=4, zorder=3)
        ax.set_title(key, fontsize=9)
        ax.set_xticks(list(x), result.configs, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(result.configs) - 0.5)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if len(result.seeds) <= 10 and handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"{result.name}: dev metrics per seed (grey lines join one seed's runs; "
                 "black: mean ± sample std)", fontsize=10)
    return save_figure(fig, path)


def markdown(result: Comparison, figure: Path | None = None) -> str:
    """The tables as Markdown; `figure` (a path relative to the Markdown file) is linked."""
    head, rows, phead, prows, notes = _rows(result)


    def table(h: list[str], body: list[list[str]]) -> list[str]:
        return markdown_table(h, body, right_from=2)

    lines = [f"# mtbert compare: {result.name}", "", _intro(result) + ".", "",
             *table(head, rows)]
    if figure is not None:
        lines += ["", f"![per-seed dev metrics]({figure.as_posix()})"]
    if prows:
        lines += ["", f"## Paired differences vs {result.baseline}", "", *table(phead, prows)]
    if notes:
        lines += [""] + [f"- n/a {note}" for note in notes]
    lines += ["", "The p-value is the chance of a mean paired difference at least this large "
              "(either sign) if the configs were equally good (paired t-test over seeds). "
              "With 2 or 3 seeds "
              "the test has almost no power: a large p says little, and only differences "
              "far beyond the seed spread reach p < 0.05.", ""]
    return "\n".join(lines)


def parse_seeds(count: int, seed_list: str | None) -> list[int]:
    """--seeds K (0..K-1) or --seed-list "3,7,11"; at most MAX_SEEDS seeds."""
    if seed_list is None:
        if count > MAX_SEEDS:
            raise ConfigError(f"bad --seeds {count}; valid: 1 to {MAX_SEEDS} (each seed is "
                              "a training per config)")
        return list(range(count))
    try:
        seeds = [int(s) for s in seed_list.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"bad --seed-list {shown(seed_list)}; expected integers such as "
                          "0,1,2") from None
    if len(seeds) > MAX_SEEDS:  # each seed's range: run_compare checks it
        raise ConfigError(f"bad --seed-list {shown(seed_list)}; valid: at most {MAX_SEEDS} "
                          "seeds")
    return seeds


def write_reports(result: Comparison, out: Path, markdown_file: Path | None = None
                  ) -> tuple[Path, Path | None]:
    """compare.md (default OUT/compare.md) linking compare.png; returns both paths."""
    import os

    md = markdown_file or out / "compare.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    figure = plot_comparison(result, out / "compare.png")
    link = Path(os.path.relpath(figure.resolve(), md.parent.resolve())) if figure else None
    md.write_text(markdown(result, link), encoding="utf-8")
    return md, figure


def failed_runs(result: Comparison) -> int:
    return sum(r.status == "failed" for runs in result.runs.values() for r in runs.values())
