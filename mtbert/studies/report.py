"""Study reports: figures and one self-contained `index.html`, readable with no network.

`mtbert report` draws, from the study storage and the trials' run directories:
the optimization history, parameter importances, parallel coordinates of
parameters against the objective, per-task dev curves of the top trials, the
Pareto front of multi-objective studies, and a table of every trial (in a study with
constraints, the trials that miss them marked infeasible; figures that name a best
trial name the best feasible one). Each
figure is also written as a PNG next to `index.html`, which embeds them as
data URIs so that the file opens anywhere, offline, on its own.

Figures are matplotlib (a core dependency); importances use Optuna's PED-ANOVA
evaluator (Watanabe et al. 2023), which needs no scikit-learn.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mtbert.errors import MtbertError
from mtbert.formatting import first_line, format_mean_std, save_figure
from mtbert.studies.budget import (BUDGET_HOURS, STOP_REQUESTED, WALL_S, format_hours,
                                   trial_hours)
from mtbert.studies.constraints import describe_all, study_constraints, violated
from mtbert.studies.job import GPU, RACED_OUT, RESEED_OF, RUN_DIR, SEED, TrialResult
from mtbert.studies.results import (best_trial, complete_trials, fail_reason, pareto_front,
                                    ranked, seed_groups, state_counts, study_objectives)
from mtbert.tasks import METRIC_KEYS

log = logging.getLogger("mtbert")

TASK_CURVES = (("sst/acc", "SST-5 accuracy (fraction)"), ("qqp/acc", "QQP accuracy (fraction)"),
               ("sts/pearson", "STS-B Pearson r"))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
CAPTIONS = {
    "history": "Optimization history: each trial's objective value; the line is the best "
               "value so far, the star the best trial.",
    "importances": "Parameter importances for the objective (PED-ANOVA over the complete "
                   "trials): how much each parameter separates the best trials from the rest.",
    "parallel": "Parallel coordinates: one line per complete trial through its parameter "
                "values, coloured by objective; the best trial in red.",
    "curves": "Dev-set metrics after every epoch of the top trials, from their run "
              "directories' metrics.jsonl.",
    "pareto": "Pareto front of the first two objectives: trials no other trial beats on "
              "both.",
    "seeds": "Reseeded configurations (mtbert best --reseed), best mean first: each seed's "
             "objective value (dots; the original trial's ringed) and the mean ± sample std "
             "over the seeds (black).",
}


def metric_label(key: str) -> str:
    """An axis label with the metric's unit."""
    return f"{key} (Pearson r, -1 to 1)" if key == "sts/pearson" else f"{key} (fraction, 0 to 1)"


@dataclass
class TrialRow:
    number: int
    state: str
    values: list[float] | None
    params: dict[str, Any]
    metrics: dict[str, float]
    duration_s: float | None
    note: str
    run_dir: str | None
    gpu: str | None = None  # with --gpus: the GPU it ran on
    wall_s: float | None = None  # the trial process's wall time (None: not recorded)
    hours: float = 0.0  # wall time × device share; a running trial's so far
    feasible: bool | None = None  # a COMPLETE trial of a study with constraints: met them


@dataclass
class Report:
    directory: Path
    study: str
    objectives: list[str]
    rows: list[TrialRow]
    figures: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    groups: list = field(default_factory=list)  # reseeded configurations, best mean first
    counts: dict[str, int] = field(default_factory=dict)  # trials by state

    @property
    def index(self) -> Path:
        return self.directory / "index.html"


def trial_note(trial) -> str:
    """Why a trial failed or was pruned: its attributes, else its run's trial.json."""
    if trial.state.name == "COMPLETE":
        return ""
    if trial.state.name == "RUNNING":
        return "running"
    reason = fail_reason(trial)
    if not reason and trial.user_attrs.get(RUN_DIR):
        reason = first_line(TrialResult.read(Path(trial.user_attrs[RUN_DIR])).reason)
    return reason


def trial_rows(study) -> list[TrialRow]:
    rows = []
    now = datetime.now()  # Optuna's naive local time: running trials' hours so far
    constraints = study_constraints(study)
    for t in study.get_trials(deepcopy=False):
        missed = violated(constraints, t.user_attrs) if t.state.name == "COMPLETE" else []
        rows.append(TrialRow(
            number=t.number, state=t.state.name, values=list(t.values) if t.values else None,
            params=dict(t.params),
            metrics={k: t.user_attrs[k] for k in METRIC_KEYS if k in t.user_attrs},
            duration_s=t.duration.total_seconds() if t.duration else None,
            note=_reseed_note(t) or trial_note(t), run_dir=t.user_attrs.get(RUN_DIR),
            gpu=t.user_attrs.get(GPU), wall_s=t.user_attrs.get(WALL_S),
            hours=trial_hours(t, now),
            feasible=None if not constraints or t.state.name != "COMPLETE" else not missed))
        if missed:
            note = "infeasible, misses " + "; ".join(c.describe() for c in missed)
            rows[-1].note = f"{note}; {rows[-1].note}" if rows[-1].note else note
    return rows


def _reseed_note(trial) -> str:
    raced = "raced out" if trial.user_attrs.get(RACED_OUT) else ""
    if RESEED_OF not in trial.user_attrs:
        return raced
    note = f"trial {trial.user_attrs[RESEED_OF]} with seed {trial.user_attrs.get(SEED)}"
    reason = trial_note(trial) or raced
    return f"{note}: {reason}" if reason else note


def _sign(study, index: int = 0) -> int:
    return 1 if study.directions[index].name == "MAXIMIZE" else -1


def plot_history(study, objectives: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False)
    done = complete_trials(study)
    multi = len(objectives) > 1
    fig, axes = plt.subplots(len(objectives), 1, figsize=(9, 3.6 * len(objectives)),
                             squeeze=False)
    best = best_trial(study)
    for i, (ax, key) in enumerate(zip(axes[:, 0], objectives)):
        xs = [t.number for t in done]
        ys = [t.values[i] for t in done]
        ax.scatter(xs, ys, color="tab:blue", s=36, zorder=3, label="complete")
        pruned = [t for t in trials if t.state.name == "PRUNED" and t.intermediate_values]
        if pruned and i == 0:
            ax.scatter([t.number for t in pruned],
                       [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                       marker="x", color="tab:gray", s=40, zorder=3,
                       label="pruned (last reported value)")
        if not multi and done:
            sign = _sign(study)
            running, line = -math.inf, []
            for t in sorted(done, key=lambda t: t.number):
                running = max(running, sign * t.values[0])
                line.append((t.number, sign * running))
            ax.step([x for x, _ in line], [y for _, y in line], where="post",
                    color="tab:orange", label="best so far")
        failed = [t.number for t in trials if t.state.name == "FAIL"]
        if failed:
            for n, x in enumerate(failed):
                ax.axvline(x, color="tab:red", alpha=0.25, lw=6,
                           label="failed" if n == 0 else None)
        if multi:
            front = pareto_front(study)
            ax.scatter([t.number for t in front], [t.values[i] for t in front], s=150,
                       facecolor="none", edgecolor="tab:red", lw=2, zorder=4,
                       label="on the Pareto front")
        if best is not None:
            ax.scatter([best.number], [best.values[0]], marker="*", s=260, color="tab:red",
                       edgecolor="black", zorder=4, label=f"best: trial {best.number}")
            ax.annotate(f"trial {best.number}: {best.values[0]:.4f}",
                        (best.number, best.values[0]), textcoords="offset points",
                        xytext=(8, 8), fontsize=10)
        ax.margins(y=0.18)  # room for the best trial's label
        ax.set_xlabel("trial number")
        ax.set_ylabel(metric_label(key))
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(loc="best", fontsize=9)
    axes[0, 0].set_title(f"Optimization history of study {study.study_name} "
                         f"({len(trials)} trials)")
    fig.tight_layout()
    return save_figure(fig, path)


def importances(study) -> dict[str, float]:
    """PED-ANOVA importances of the parameters for the first objective."""
    import optuna

    n = len(complete_trials(study))
    # PED-ANOVA compares the top quantile with all trials; keep at least 2 trials on top.
    quantile = min(0.5, max(0.1, 2 / n))
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
    if len(study.directions) == 1:  # Optuna takes the study's direction into account
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            values = optuna.importance.get_param_importances(study, evaluator=evaluator)
        for message in sorted({str(w.message) for w in caught}):
            log.warning("importances: %s", message)  # e.g. too few trials for a parameter
        return values
    sign = _sign(study)
    with warnings.catch_warnings():
        # With a target, PED-ANOVA explains low values (and says so): the sign sees to it.
        warnings.simplefilter("ignore", UserWarning)
        return optuna.importance.get_param_importances(
            study, evaluator=evaluator, target=lambda t: -sign * t.values[0])


def plot_importances(study, objective: str, values: dict[str, float], path: Path) -> Path:
    import matplotlib.pyplot as plt

    names = list(values)[::-1]  # largest on top
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(names)))
    bars = ax.barh(names, [values[k] for k in names], color="tab:blue")
    for bar, name in zip(bars, names):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {values[name]:.2f}",
                va="center", fontsize=10)
    ax.set_xlabel("importance (fraction of the total, sums to 1)")
    ax.set_xlim(0, max(1e-9, max(values.values())) * 1.18)
    ax.set_title(f"Parameter importances for {objective}\n(PED-ANOVA over "
                 f"{len(complete_trials(study))} complete trials)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _axis(trials, key: str):
    """(normalise, ticks) for one parameter axis: values to [0, 1], labelled ticks."""
    import optuna.distributions as d

    dist = next(t.distributions[key] for t in trials if key in t.distributions)
    if isinstance(dist, d.CategoricalDistribution):
        choices = list(dist.choices)
        span = max(1, len(choices) - 1)
        return (lambda v: choices.index(v) / span,
                [(i / span, str(c)) for i, c in enumerate(choices)])
    low, high = float(dist.low), float(dist.high)
    log_scale = bool(getattr(dist, "log", False))
    f = math.log10 if log_scale else (lambda v: v)
    a, b = f(low), f(high)
    width = (b - a) or 1.0

    def normalise(v):
        return (f(float(v)) - a) / width

    ticks = [(k / 2, a + k / 2 * width) for k in range(3)]
    return normalise, [(p, f"{(10 ** v) if log_scale else v:.3g}") for p, v in ticks]


def plot_parallel(study, objective: str, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    done = complete_trials(study)
    keys = sorted({k for t in done for k in t.params})
    axes_info = [_axis(done, k) for k in keys]
    values = [t.values[0] for t in done]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    norm = colors.Normalize(vmin=low, vmax=high if high > low else low + 1e-9)
    cmap = cm.get_cmap("viridis") if hasattr(cm, "get_cmap") else plt.get_cmap("viridis")
    best = best_trial(study)
    fig, ax = plt.subplots(figsize=(max(7, 2.4 * (len(keys) + 1)), 5))
    n_axes = len(keys) + 1
    for t in sorted(done, key=lambda t: t is best):  # the best trial drawn last, on top
        ys = [normalise(t.params[k]) if k in t.params else math.nan
              for k, (normalise, _) in zip(keys, axes_info)]
        ys.append((t.values[0] - low) / span)
        # A conditional parameter the trial did not use: its line goes straight past that axis.
        xs = [x for x, y in enumerate(ys) if not math.isnan(y)]
        ys = [y for y in ys if not math.isnan(y)]
        is_best = best is not None and t.number == best.number
        ax.plot(xs, ys, color="tab:red" if is_best else cmap(norm(t.values[0])),
                lw=3.5 if is_best else 1.6, alpha=1.0 if is_best else 0.8,
                zorder=3 if is_best else 2, marker="o", ms=4)
    for x, (_, ticks) in enumerate(axes_info):
        ax.axvline(x, color="black", lw=1)
        for pos, text in ticks:
            ax.text(x + 0.03, pos, text, fontsize=9, va="center", zorder=5,
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    ax.axvline(n_axes - 1, color="black", lw=1)
    for k in range(3):
        ax.text(n_axes - 1 + 0.03, k / 2, f"{low + k / 2 * span:.3f}", fontsize=9, va="center",
                zorder=5, bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    ax.set_xticks(range(n_axes))
    ax.set_xticklabels([*keys, objective], fontsize=10)
    ax.set_yticks([])
    ax.set_xlim(-0.2, n_axes - 0.6)
    ax.set_ylim(-0.06, 1.06)
    best_text = f"; red: best trial {best.number}" if best is not None else ""
    ax.set_title(f"Parameters vs {objective}: {len(done)} complete trials{best_text}\n"
                 "(each axis spans its parameter's search range, log scale for log-uniform "
                 "ones; a line skips the parameters its trial did not use)", fontsize=11)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02,
                 label=metric_label(objective))
    fig.tight_layout()
    return save_figure(fig, path)


def read_curves(run_dir: str | None) -> list[dict] | None:
    """The evaluations in a run's metrics.jsonl; None when the run is not on this machine."""
    if not run_dir:
        return None
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by a killed run
                continue
    return records


def plot_curves(curves: dict[int, list[dict]], best_number: int | None, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASK_CURVES), figsize=(5 * len(TASK_CURVES), 4.2))
    # Red is the best trial's alone.
    palette = ["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:cyan",
               "tab:olive", "tab:pink", "tab:gray"]
    for ax, (key, label) in zip(axes, TASK_CURVES):
        for rank, (number, records) in enumerate(curves.items()):
            points = [(r["epoch"], r[key]) for r in records if key in r]
            if not points:
                continue
            is_best = number == best_number
            # Trials often tie (e.g. every model at SST-5's majority class): the best is a
            # wide translucent band underneath, the others thin lines with their own
            # markers on top, so that coinciding curves stay visible.
            ax.plot([e for e, _ in points], [v for _, v in points],
                    marker="o" if is_best else MARKERS[rank % len(MARKERS)],
                    ms=11 if is_best else max(4, 9 - rank),
                    color="tab:red" if is_best else palette[rank % len(palette)],
                    lw=5 if is_best else 1.6, alpha=0.55 if is_best else 1.0,
                    zorder=1 if is_best else 2,
                    label=f"trial {number}" + (" (best)" if is_best else f" (#{rank + 1})"))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(key)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=10,
               frameon=False)
    fig.suptitle(f"Per-task dev curves of the top {len(curves)} trials (#rank by the "
                 "objective)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save_figure(fig, path)


def plot_pareto(study, objectives: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    done = complete_trials(study)
    front = {t.number for t in pareto_front(study)}
    fig, ax = plt.subplots(figsize=(7, 5.5))
    rest = [t for t in done if t.number not in front]
    on = sorted((t for t in done if t.number in front), key=lambda t: t.values[0])
    ax.scatter([t.values[0] for t in rest], [t.values[1] for t in rest], color="tab:gray",
               s=36, label="dominated trials")
    ax.plot([t.values[0] for t in on], [t.values[1] for t in on], color="tab:red", marker="o",
            ms=8, lw=1.5, label="Pareto front")
    for t in on:
        ax.annotate(f"trial {t.number}", (t.values[0], t.values[1]), textcoords="offset points",
                    xytext=(6, 6), fontsize=9)
    arrows = ["higher is better" if d.name == "MAXIMIZE" else "lower is better"
              for d in study.directions]
    ax.set_xlabel(f"{metric_label(objectives[0])}, {arrows[0]}")
    ax.set_ylabel(f"{metric_label(objectives[1])}, {arrows[1]}")
    ax.set_title(f"Pareto front of study {study.study_name}: {len(on)} of {len(done)} "
                 "complete trials")
    ax.margins(0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_seed_groups(groups: list, objective: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 + 0.9 * len(groups)), 4.0),
                           layout="constrained")
    raced = any(g.planned > 1 for g in groups)
    first_out = next((g for g in groups if g.raced_out), None)  # labelled once
    for x, group in enumerate(groups):
        values = group.values()
        n = len(values)
        jitter = [x + (0.3 * i / (n - 1) - 0.15 if n > 1 else 0.0) for i in range(n)]
        ax.scatter(jitter, values, s=24, color="tab:gray" if group.raced_out else "tab:blue",
                   alpha=0.8, zorder=2, label="raced out" if group is first_out else None)
        ax.scatter(jitter[:1], values[:1], s=90, facecolors="none", edgecolors="tab:red",
                   zorder=3, label="original trial" if x == 0 else None)
        std = group.std()
        ax.errorbar(x + 0.32, group.mean(), yerr=None if math.isnan(std) else std, fmt="_",
                    color="k", ms=14, capsize=4, zorder=3,
                    label="mean ± std" if x == 0 else None)
    ax.set_xticks(range(len(groups)),
                  [f"trial {g.number}\n{len(g.trials)} seeds" + "\nraced out" * g.raced_out
                   for g in groups], fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(metric_label(objective) if objective in METRIC_KEYS else objective)
    ax.set_title(f"Configurations raced over {groups[0].planned} seeds, best mean first" if raced
                 else "Reseeded configurations, best mean first", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def check_destination(dest: Path, *, overwrite: bool) -> None:
    """A report directory given by the user that holds files already is written over only
    with `overwrite`: it may be another study's report, or anything else."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise MtbertError(f"{dest} exists and is not empty; pass --overwrite to write the "
                          "report over it, or pick another --to")


def build_report(study, *, dest: Path, storage: str, top: int = 5) -> Report:
    """Write the figures and index.html of `study` into `dest`; returns what was written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    rows = trial_rows(study)
    if not rows:
        raise MtbertError(f"study {study.study_name} has no trials yet; run `mtbert sweep` "
                          "first")
    objectives = study_objectives(study)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    report = Report(dest, study.study_name, objectives, rows, counts=state_counts(study))
    done = complete_trials(study)
    multi = len(study.directions) > 1
    if not done:
        report.notes.append("No trial is COMPLETE yet: there is no objective value to plot, "
                            "rank or explain; the table below lists every trial and why it "
                            "stopped.")
    else:
        report.figures["history"] = plot_history(study, objectives, dest / "history.png")
        if multi:
            report.figures["pareto"] = plot_pareto(study, objectives, dest / "pareto.png")
            if len(objectives) > 2:
                report.notes.append(f"The Pareto figure shows the first two of "
                                    f"{len(objectives)} objectives.")
            report.notes.append("A multi-objective study has no single best trial; the "
                                "importances, parallel coordinates and curves use the first "
                                f"objective, {objectives[0]}.")
        varying = {k for k in {k for t in done for k in t.params}
                   if len({json.dumps(t.params.get(k)) for t in done}) > 1}
        if len(done) < 2:
            report.notes.append(f"Parameter importances need at least 2 complete trials; "
                                f"this study has {len(done)}.")
        elif not varying:
            report.notes.append("Parameter importances need parameters that vary between "
                                "complete trials; these all share the same values.")
        else:
            values = importances(study)
            report.figures["importances"] = plot_importances(study, objectives[0], values,
                                                             dest / "importances.png")
        if any(t.params for t in done):
            report.figures["parallel"] = plot_parallel(study, objectives[0],
                                                       dest / "parallel.png")
        curves: dict[int, list[dict]] = {}
        for t in ranked(study)[:top]:  # the ranking of `mtbert best --top`
            records = read_curves(t.user_attrs.get("run_dir"))
            if records:
                curves[t.number] = records
            else:
                report.notes.append(f"Trial {t.number}: no metrics.jsonl at "
                                    f"{t.user_attrs.get('run_dir', '(no run_dir)')} on this "
                                    "machine (run elsewhere?); its dev curves are left out.")
        if curves:
            best = best_trial(study)
            best_number = best.number if best is not None else None
            report.figures["curves"] = plot_curves(curves, best_number, dest / "curves.png")
        if not multi:
            report.groups = seed_groups(study, reseeded_only=True)
            if report.groups:
                report.figures["seeds"] = plot_seed_groups(report.groups, objectives[0],
                                                           dest / "seeds.png")
    report.index.write_text(render_html(study, report, storage))
    return report


def _html_cell(value: Any) -> str:
    """A value in an HTML table cell: numbers to 4 places (4 significant digits when very
    large or small), text escaped."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) \
            else f"{value:.4f}"
    return html.escape(str(value))


def _with_gpus(report: Report) -> bool:
    return any(row.gpu is not None for row in report.rows)


def table_columns(report: Report) -> list[str]:
    return ["trial", "state", *report.objectives, "duration (s)", "wall (s)", "hours",
            *(["gpu"] if _with_gpus(report) else []), "params", *METRIC_KEYS, "note"]


def table_values(report: Report, row: TrialRow) -> list[Any]:
    """One table row of plain values (shared by the HTML and the W&B table)."""
    values = row.values or [None] * len(report.objectives)
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.params.items())
    return [row.number, row.state, *values,
            None if row.duration_s is None else round(row.duration_s),
            None if row.wall_s is None else round(row.wall_s, 1), row.hours,
            *([row.gpu] if _with_gpus(report) else []), params,
            *[row.metrics.get(k) for k in METRIC_KEYS], row.note]


def render_html(study, report: Report, storage: str) -> str:
    counts = report.counts
    directions = ", ".join(f"{o} ({d.name.lower()})"
                           for o, d in zip(report.objectives, study.directions))
    summary = [f"<b>{len(report.rows)}</b> trials: "
               + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())),
               f"objective: {html.escape(directions)}",
               _hours_item(study, report), f"storage: <code>{html.escape(storage)}</code>"]
    done = complete_trials(study)
    constraints = study_constraints(study)
    if constraints:
        infeasible = sum(row.feasible is False for row in report.rows)
        summary.append(f"constraints: {html.escape(describe_all(constraints))}; "
                       f"<b>{infeasible}</b> of {len(done)} complete trials infeasible "
                       "(marked below, not ranked)")
    best = best_trial(study)
    if best is not None:
        params = ", ".join(f"{html.escape(k)}={_html_cell(v)}" for k, v in best.params.items())
        summary.append(f"best: trial <b>{best.number}</b>, {html.escape(report.objectives[0])} "
                       f"= <b>{best.values[0]:.4f}</b> ({params})")
    elif done and len(study.directions) > 1:
        summary.append(f"Pareto front: trials "
                       f"{', '.join(str(t.number) for t in pareto_front(study))}")
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>mtbert study {html.escape(report.study)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
        "color:#222}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 6px;text-align:left;vertical-align:top}th{background:#eee}"
        "tr.COMPLETE td{background:#fff}tr.PRUNED td{background:#f6f6f6}"
        "tr.FAIL td{background:#fde8e8}tr.infeasible td{background:#fff3cd}tr.best td{background:#e7f4e4;font-weight:bold}"
        "img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}"
        "figcaption{color:#555;font-size:14px}</style></head><body>",
        f"<h1>Study {html.escape(report.study)}</h1>",
        f"<p>Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by mtbert "
        f"report.</p><ul>" + "".join(f"<li>{s}</li>" for s in summary) + "</ul>",
    ]
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>"
                                                    for n in report.notes) + "</ul>")
    parts.append("<h2>Figures</h2>")
    for name, path in report.figures.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure id=\"{name}\"><img alt=\"{name}\" src=\"data:image/png;base64,"
                     f"{data}\"><figcaption>{html.escape(CAPTIONS[name])} "
                     f"(<code>{path.name}</code>)</figcaption></figure>")
    if report.groups:
        parts += ["<h2>Configurations over seeds</h2>",
                  "<p>Each reseeded configuration (its original trial and the reseeds of "
                  "<code>mtbert best --reseed</code>): the mean ± sample standard deviation "
                  "over its seeds, best mean first; <code>mtbert best</code> exports from "
                  "the first.</p>", _groups_table(report.groups)]
    best_number = best.number if best is not None else None
    header = "".join(f"<th>{html.escape(c)}</th>" for c in table_columns(report))
    body = []
    for row in report.rows:
        css = row.state + (" best" if row.number == best_number else "") \
            + (" infeasible" if row.feasible is False else "")
        cells = "".join(f"<td>{_html_cell(v)}</td>" for v in table_values(report, row))
        body.append(f"<tr class=\"{css}\">{cells}</tr>")
    parts += ["<h2>Trials</h2>", f"<table id=\"trials\"><tr>{header}</tr>", *body, "</table>",
              "</body></html>", ""]
    return "\n".join(parts)


def _hours_item(study, report: Report) -> str:
    """The summary's cost line: the study's hours, its budget, a stop asked for."""
    attrs = study.user_attrs
    item = (f"hours: <b>{format_hours(sum(r.hours for r in report.rows))}</b> (each trial's "
            "wall time × its share of the device, running trials so far)")
    if attrs.get(BUDGET_HOURS) is not None:
        item += f"; budget {format_hours(attrs[BUDGET_HOURS])} hours"
    if attrs.get(STOP_REQUESTED):
        item += "; asked to stop (mtbert studies --stop)"
    return item


def _groups_table(groups: list) -> str:
    header = "".join(f"<th>{html.escape(c)}</th>"
                     for c in ("trial", "seeds", "state", *METRIC_KEYS, "params"))
    rows = []
    for g in groups:
        seeds = ", ".join("original" if s is None else str(s) for s in g.seeds)
        cells = [str(g.number), f"{len(g.trials)} ({seeds})", g.state]
        cells += [format_mean_std(g.mean(key), g.std(key)) for key in METRIC_KEYS]
        cells.append(", ".join(f"{k}={_html_cell(v)}" for k, v in g.params.items()))
        rows.append("<tr>" + "".join(f"<td>{html.escape(c) if i < len(cells) - 1 else c}</td>"
                                     for i, c in enumerate(cells)) + "</tr>")
    return f"<table id=\"seeds\"><tr>{header}</tr>" + "".join(rows) + "</table>"


def log_study_report(report, *, mode: str, project: str, directory: Path) -> str | None:
    """Log a study report as one extra W&B run in the study's group: the trials table and
    every figure. Returns the run id; a W&B failure is a warning, never an error."""
    if mode == "disabled":
        return None
    run = None
    try:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=project, group=report.study, job_type="report",
                         name=f"{report.study}-report", dir=str(directory), mode=mode,
                         config={"study": report.study, "objectives": report.objectives},
                         tags=["report"])
        # One type per column for W&B's table schema: numbers stay numbers, the rest text.
        columns = table_columns(report)
        rows = [[v if v is None or isinstance(v, (int, float)) else str(v)
                 for v in table_values(report, row)] for row in report.rows]
        run.log({"trials": wandb.Table(columns=columns, data=rows),
                 **{f"report/{name}": wandb.Image(str(path))
                    for name, path in report.figures.items()}})
        run.summary.update({f"trials/{state.lower()}": n
                            for state, n in report.counts.items()})
        run_id = run.id
        run.finish()
        return run_id
    except Exception as err:  # noqa: BLE001 - a W&B failure must not lose the report
        from mtbert.tracking import failed_run

        return failed_run(run, err, "the report", "the report files are written")
