"""Study reports: figures and one self-contained `index.html`, readable with no network.

`mtbert report` draws, from the study storage and the trials' run directories:
the optimization history, parameter importances, parallel coordinates of
parameters against the objective, per-task dev curves of the top trials, the
Pareto front of multi-objective studies, and a table of every trial (in a study with
constraints, the trials that miss them marked infeasible; figures that name a best
trial name the best feasible one). Each
figure is also written as a PNG next to `index.html`, which embeds them as
data URIs so that the file opens anywhere, offline, on its own.

Figures are matplotlib (a core dependency), drawn by `studies.figures`.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mtbert.errors import MtbertError
from mtbert.rundir import atomic_write_text, naming
from mtbert.formatting import first_line, format_mean_std
from mtbert.studies.budget import (BUDGET_HOURS, STOP_REQUESTED, WALL_S, format_hours,
                                   trial_hours)
from mtbert.studies.constraints import describe_all, study_constraints, violated
from mtbert.studies.figures import (importances, plot_curves, plot_history, plot_importances,
                                   plot_parallel, plot_pareto, plot_seed_groups, read_curves)
from mtbert.studies.job import GPU, RACED_OUT, RESEED_OF, RUN_DIR, SEED, TrialResult
from mtbert.studies.results import (best_trial, complete_trials, fail_reason, pareto_front,
                                    ranked, seed_groups, state_counts, study_objectives,
                                    study_size)
from mtbert.tasks import METRIC_KEYS

log = logging.getLogger("mtbert")

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
    size: str | None = None  # the study's size (studies.sizes); None: made without one

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


@contextmanager
def destination(dest: Path, *, overwrite: bool, given: bool):
    """Hold the report directory `dest` while a report is written into it: one report
    at a time (a lock file beside it), and a `given` (--to) directory that holds files
    already is written over only with `overwrite`."""
    import filelock

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(dest.parent / f".{dest.name}.lock", timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise MtbertError(f"another `mtbert report` is writing into {dest}; wait for it, or "
                          "pick another --to") from None
    try:
        if given:
            check_destination(dest, overwrite=overwrite)
        with naming(dest):  # a full disk names the report directory
            yield dest
    finally:
        lock.release()


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
    report = Report(dest, study.study_name, objectives, rows, counts=state_counts(study),
                    size=study_size(study))
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
    atomic_write_text(report.index, render_html(study, report, storage))  # UTF-8, whole
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
    if report.size is not None:
        summary.insert(2, f"size: <b>{html.escape(report.size)}</b> (its spec's base at that "
                          "size: mtbert sweep --size)")
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
                         config={"study": report.study, "objectives": report.objectives,
                                 "size": report.size},
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
