"""The figures of a study report (`studies.report`), each a matplotlib figure saved as a
PNG: optimization history, parameter importances (Optuna's PED-ANOVA evaluator,
Watanabe et al. 2023, which needs no scikit-learn), parallel coordinates, per-task dev
curves of the top trials, the Pareto front and the reseeded configurations."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

from mtbert.formatting import save_figure
from mtbert.rundir import METRICS_FILE, read_metrics
from mtbert.studies.results import best_trial, complete_trials, pareto_front
from mtbert.tasks import METRIC_KEYS

log = logging.getLogger("mtbert")


TASK_CURVES = (("sst/acc", "SST-5 accuracy (fraction)"), ("qqp/acc", "QQP accuracy (fraction)"),
               ("sts/pearson", "STS-B Pearson r"))


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


def metric_label(key: str) -> str:
    """An axis label with the metric's unit."""
    return f"{key} (Pearson r, -1 to 1)" if key == "sts/pearson" else f"{key} (fraction, 0 to 1)"


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
    if not run_dir or not (Path(run_dir) / METRICS_FILE).exists():
        return None
    return read_metrics(Path(run_dir))


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
