"""Make (or grow) a table of real runs: every configuration x seed x epoch of a grid.

The table is what `bench/replay.py` replays search policies on. It is made by
ordinary sweeps, resumed where they stopped:

1. `mtbert sweep bench/tables/NAME.yaml` - the grid sampler, `seeds: 3` with
   `race_alpha: 0` (every configuration runs every seed) and no pruner (every
   epoch): the fixed protocol on the grid.
2. Once that grid is done, the single-task baselines, `mtbert sweep
   bench/tables/NAME-single.yaml` once per task (`data.tasks`), each trained on as
   many examples of its task as the multitask runs saw of it on average (its
   `train.steps_per_epoch` batches of one task an epoch).
3. The export, after each sweep and with `--export`: `bench/tables/NAME.jsonl`, a
   header record, then one line per run x epoch (`bench/tables/README.md` lists the
   fields).

Kill it at any time (Ctrl-C, a reboot) and run it again: the sweeps resume their
studies (a killed trial's retry resumes from its last epoch) and the export
rewrites the table from every finished run. Commit the table as it grows.

    python bench/make_table.py --data-dir ../shared/data/cs224n-qqp16k
    python bench/make_table.py --export            # rewrite the table, run nothing
    python bench/make_table.py --verify 3          # train 3 of its runs again, compare
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna

from mtbert.studies.job import RUNS_FOLDER, SEED, STUDY_SPEC, trial_dir
from mtbert.studies.configurations import config_of
from mtbert.tasks import METRIC_KEYS, TASKS

TASK_NAMES = tuple(TASKS)

TABLES = Path(__file__).resolve().parent / "tables"
LOAD_LOG = "load.jsonl"  # in the runs folder: the load averages of every minute of making
ROOT = TABLES.parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="mission", help="the table: bench/tables/NAME.yaml")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" /
                        "cs224n-qqp16k")
    parser.add_argument("--runs", type=Path, default=TABLES / ".runs",
                        help="where the sweeps keep their study and runs (not committed)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads of a run")
    parser.add_argument("--workers", type=int, default=2,
                        help="runs at once (workers of one study; the baselines' studies side "
                        "by side): on 2 cores, 2 runs of 1 thread do 1.5x the work of 1 run "
                        "of 2 threads")
    parser.add_argument("--export", action="store_true", help="only rewrite the table")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        metavar="KEY=VALUE", help="a config key of every run (tests: a tiny "
                        "encoder); a table made with one says so in its specs")
    parser.add_argument("--tables", type=Path, default=TABLES,
                        help="where the specs are and the table goes")
    parser.add_argument("--verify", type=int, metavar="K",
                        help="run K of the table's runs again (chosen at random, seed 0) "
                        "and print how far their metrics are from the table's")
    args = parser.parse_args()
    storage = f"sqlite:///{args.runs.resolve() / 'mtbert.db'}"
    if args.verify:
        sys.exit(verify(args, args.verify))
    if not args.export:
        args.runs.mkdir(parents=True, exist_ok=True)
        threading.Thread(target=_log_load, args=(args.runs / LOAD_LOG,), daemon=True).start()
        grid = [args.tables / f"{args.name}.yaml", args.name]
        code = sweeps(args, [grid] * args.workers)
        export(args, storage)
        if code != 0:
            sys.exit(code)
        single = args.tables / f"{args.name}-single.yaml"
        baselines = [[single, f"{args.name}-single-{task}", "--set", f"data.tasks={task}",
                      "--set", f"train.steps_per_epoch={steps}"]
                     for task, steps in baseline_steps(args.name, storage).items()]
        for first in range(0, len(baselines), args.workers):
            if sweeps(args, baselines[first:first + args.workers]) != 0:
                break
    lines = export(args, storage)
    print(f"{args.tables / (args.name + '.jsonl')}: {lines} lines")


def sweeps(args, sweeps: list[list]) -> int:
    """Ordinary sweeps of the table side by side, each [spec, study, *options] (resumed
    where a study exists; workers of one study share its grid); the worst exit code.
    Each after the first starts once the first has made its study."""
    processes = []
    for spec, study, *extra in sweeps:
        command = [sys.executable, "-m", "mtbert", "sweep", str(spec), "--study", study,
                   "--out", str(args.runs), "--data-dir", str(args.data_dir), "--device",
                   "cpu", "--wandb-mode", "disabled", "--keep-top", "0",
                   *[a for o in args.overrides for a in ("--set", o)], *extra]
        print("$", " ".join(command), flush=True)
        processes.append(subprocess.Popen(command, env=_threads(args)))
        if len(processes) == 1 and len(sweeps) > 1:
            _wait_for_study(args, study, processes[0])
    return max(process.wait() for process in processes)


def _wait_for_study(args, study: str, process: subprocess.Popen) -> None:
    """Until `study` exists in the table's storage (or its sweep has ended)."""
    storage = f"sqlite:///{args.runs.resolve() / 'mtbert.db'}"
    while process.poll() is None:
        if (args.runs / "mtbert.db").exists():
            try:
                optuna.load_study(study_name=study, storage=storage)
                return
            except KeyError:
                pass
        time.sleep(2)


def _log_load(path: Path) -> None:
    """Append the load averages to `path` every minute while the table is being made."""
    while True:
        with path.open("a") as log:
            log.write(json.dumps({"time": round(time.time()),
                                  "load": [round(x, 2) for x in os.getloadavg()]}) + "\n")
        time.sleep(60)


def _load_seen(path: Path) -> dict | None:
    """The 1-minute load average while the runs were made: its minimum, median and
    maximum over the minutes sampled (None where no sitting here sampled it)."""
    try:
        loads = sorted(json.loads(line)["load"][0] for line in path.read_text().splitlines()
                       if line.strip())
    except (OSError, ValueError, KeyError, IndexError):
        return None
    if not loads:
        return None
    return {"minutes": len(loads), "min": loads[0], "median": statistics.median(loads),
            "max": loads[-1]}


def _threads(args) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads),
            "MKL_NUM_THREADS": str(args.threads)}


def baseline_steps(name: str, storage: str) -> dict[str, int]:
    """Each task's batches a multitask run saw an epoch, on average over the table:
    the steps of its single-task baseline (one batch a step). Nothing while the grid
    has points left (the average would move)."""
    records = list(runs(storage, name))
    study = optuna.load_study(study_name=name, storage=storage)
    points = grid_points(study.user_attrs[STUDY_SPEC])
    seeds = int(study.user_attrs[STUDY_SPEC].get("seeds", 1))
    if len({(r["config"], r["seed"]) for r in records}) < points * seeds:
        print(f"the grid of {name} is not done: no baselines yet")
        return {}
    batch = int(study.user_attrs[STUDY_SPEC]["base"]["train"]["batch_size"])
    return {task: max(1, round(statistics.fmean(r["epoch_examples"][task] for r in records)
                               / batch)) for task in TASK_NAMES}


def grid_points(spec: dict) -> int:
    points = 1
    for entry in spec["space"].values():
        points *= len(entry.get("choices") or entry.get("grid") or [None])
    return points


def runs(storage: str, study_name: str):
    """Every epoch of every COMPLETE trial of the study, as table lines."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    folder = Path(storage.removeprefix("sqlite:///")).parent / study.user_attrs.get(
        RUNS_FOLDER, study_name)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        path = trial_dir(folder, trial.number) / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        made_by = _run_commit(path.parent)
        params = {k: trial.params[k] for k in sorted(trial.params)}
        seen = dict.fromkeys(TASK_NAMES, 0)
        for record in records:
            epoch_examples = {t: int(record.get(f"train/examples/{t}", 0)) for t in TASK_NAMES}
            seen = {t: seen[t] + epoch_examples[t] for t in TASK_NAMES}
            yield {"study": study_name, "config": json.dumps(params, sort_keys=True),
                   "params": params, "seed": int(trial.user_attrs[SEED]),
                   "trial": trial.number, "config_id": config_of(trial),
                   "epoch": int(record["epoch"]), "steps": int(record["step"]),
                   "metrics": {k: record.get(k) for k in METRIC_KEYS},
                   "train_s": record.get("time/train_s"), "eval_s": record.get("time/eval_s"),
                   "epoch_examples": epoch_examples, "examples": seen, "commit": made_by}


def export(args, storage: str) -> int:
    """Rewrite bench/tables/NAME.jsonl from every finished run; returns its lines."""
    name = args.name
    studies = [s.study_name for s in optuna.get_all_study_summaries(storage)
               if s.study_name == name or s.study_name.startswith(f"{name}-single-")]
    specs, lines = {}, []
    for study_name in sorted(studies):
        study = optuna.load_study(study_name=study_name, storage=storage)
        specs[study_name] = study.user_attrs.get(STUDY_SPEC)
        kind = "multitask" if study_name == name else "single"
        lines += [{"kind": kind, **line} for line in runs(storage, study_name)]
    lines = _with_committed(args.tables / f"{name}.jsonl", lines, specs)
    lines.sort(key=lambda r: (r["kind"], r["study"], r["config"], r["seed"], r["epoch"]))
    made_by = sorted({r["commit"] for r in lines if r.get("commit")})
    header = {"kind": "header", "table": name, "commit": ", ".join(made_by) or None,
              "exported_at": _git("rev-parse", "HEAD"),
              "uncommitted_changes": bool(_git("status", "--porcelain", "--", "mtbert")),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "processor": _cpu_model(),
                          "cpus": os.cpu_count()},
              "threads": args.threads, "workers": args.workers,
              "load_seen": _load_seen(args.runs / LOAD_LOG),
              "load_at_export": [round(x, 2) for x in os.getloadavg()],
              "cost": "train_s + eval_s: wall seconds of the epoch on this machine; steps "
                      "and examples count the work without its noise",
              "specs": specs}
    path = args.tables / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in [header, *lines]))
    tmp.replace(path)
    return len(lines) + 1


def verify(args, k: int) -> int:
    """Train K of the table's runs again from their config.yaml, each in a temporary
    directory, and compare every epoch's metrics with the table's lines."""
    import random
    import tempfile

    lines = [json.loads(x) for x in (args.tables / f"{args.name}.jsonl").read_text().splitlines()]
    runs_of: dict[tuple, list[dict]] = {}
    for line in lines[1:]:
        runs_of.setdefault((line["study"], line["trial"]), []).append(line)
    chosen = random.Random(0).sample(sorted(runs_of), min(k, len(runs_of)))
    worst = 0.0
    for study_name, number in chosen:
        study = optuna.load_study(study_name=study_name,
                                  storage=f"sqlite:///{args.runs.resolve() / 'mtbert.db'}")
        folder = args.runs / study.user_attrs.get(RUNS_FOLDER, study_name)
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "mtbert", "-q", "train",
                       str(trial_dir(folder, number) / "config.yaml"), "--out", f"{tmp}/run",
                       "--device", "cpu"]
            subprocess.run(command, env=_threads(args), check=True)
            again = [json.loads(x) for x in Path(f"{tmp}/run/metrics.jsonl").read_text()
                     .splitlines()]
        for line, record in zip(sorted(runs_of[(study_name, number)], key=lambda r: r["epoch"]),
                                again):
            diff = max(abs(line["metrics"][m] - record[m]) for m in METRIC_KEYS
                       if line["metrics"].get(m) is not None)
            worst = max(worst, diff)
        print(f"{study_name} trial {number}: {len(again)} epochs again, the largest "
              f"difference so far {worst:.3g}", flush=True)
    print(f"largest difference of a metric over {len(chosen)} runs: {worst:.3g}")
    return 0 if worst <= 1e-6 else 1


def _with_committed(path: Path, lines: list[dict], specs: dict) -> list[dict]:
    """`lines` and every line of the table at `path` that they do not hold (a run of an
    earlier checkout, whose study folder is not here): the table never shrinks. A study
    not found here keeps the spec the table recorded for it; one whose spec here differs
    from the recorded one (the table was remade with other runs) keeps none of its old
    lines."""
    if not path.exists():
        return lines
    old = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    recorded = old[0].get("specs") or {} if old and old[0].get("kind") == "header" else {}
    remade = {study for study, spec in recorded.items()
              if study in specs and _other_runs(spec, specs[study])}
    for study, spec in recorded.items():
        specs.setdefault(study, spec)
    held = {(r["study"], r["config"], r["seed"], r["epoch"]) for r in lines}
    return lines + [r for r in old[1:] if r["study"] not in remade and
                    (r["study"], r["config"], r["seed"], r["epoch"]) not in held]


def _other_runs(recorded: dict | None, here: dict | None) -> bool:
    """Whether two resolved specs differ in what their runs train (the data folder's
    path aside: another checkout has it elsewhere)."""
    def runs_of(spec):
        spec = json.loads(json.dumps(spec or {}))
        spec.get("base", {}).get("data", {}).pop("dir", None)
        return spec
    return runs_of(recorded) != runs_of(here)


def _run_commit(run_dir: Path) -> str | None:
    """The mtbert commit that trained a run (its summary.json's env.git)."""
    try:
        return json.loads((run_dir / "summary.json").read_text())["env"]["git"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
