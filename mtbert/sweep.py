"""Sweeps: a spec becomes an Optuna study; each trial is a training in its own process.

Optuna runs the optimisation locally and its RDB storage (SQLite by default,
PostgreSQL for many workers) is the only coordinator: every worker runs the
same `mtbert sweep` command against the same storage. The worker process keeps
the trial's heartbeat; a worker that dies leaves a trial whose heartbeat
stops, which the next worker to start or finish a trial marks FAIL and
retries once with the same parameters. W&B is a logger only.
With `trials_per_gpu` K > 1 one worker runs K trials at once (Optuna's
`n_jobs` threads, each waiting on its own trial process on the same device).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtbert.config import save_config
from mtbert.errors import ConfigError, MtbertError
from mtbert.spec import SweepSpec, make_pruner, make_sampler, suggest, trial_config
from mtbert.tasks import METRIC_KEYS
from mtbert.trial import EXIT_PRUNED, PARENT_ENV, RESULT_FILE, STORAGE_ENV

log = logging.getLogger("mtbert")
STORAGE_FILE = "mtbert.db"


class StorageError(MtbertError):
    """The study storage cannot be reached."""

    exit_code = 1


class TrialFailed(Exception):
    """A trial's training failed; Optuna records it as FAIL and the study goes on."""


def mask_url(url: str) -> str:
    """A storage URL with its password replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def with_driver(url: str) -> str:
    """`postgresql://` through psycopg2 (a core dependency) when psycopg 3 is absent.

    SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; users write the
    bare form, and it must work with the driver mtbert installs.
    """
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres") and \
            importlib.util.find_spec("psycopg") is None:
        return f"postgresql+psycopg2://{rest}"
    return url


def default_storage(out: Path) -> str:
    return f"sqlite:///{(Path(out) / STORAGE_FILE).resolve()}"


def open_storage(url: str, *, heartbeat: int | None = None, grace: int | None = None,
                 must_exist: bool = False):
    """Optuna's RDB storage for `url`, with heartbeat and one retry of stale trials."""
    import warnings

    import optuna
    import sqlalchemy.exc

    # Heartbeats are "experimental" in Optuna since v2.9; mtbert relies on them on purpose.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    if must_exist and url.startswith("sqlite:///") and not Path(url[10:]).exists():
        raise ConfigError(f"no study storage at {url[10:]}; run `mtbert sweep` first or pass "
                          "--storage / --out")
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=heartbeat, grace_period=grace or 3 * heartbeat,
                      heartbeat_stale_trial_callback=(
                          optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)))
    engine = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # Workers on one machine wait for SQLite's lock instead of failing at once.
        engine = {"connect_args": {"timeout": 60}}
    try:
        return optuna.storages.RDBStorage(with_driver(url), engine_kwargs=engine, **kwargs)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"bad storage URL {mask_url(url)}; e.g. sqlite:///runs/mtbert.db or "
                          "postgresql://user:password@host:5432/db") from None
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StorageError(f"cannot reach the study storage {mask_url(url)}: "
                           f"{mask_url(first)}") from None


def select_study(storage, study: str | None) -> str:
    """`study`, else the storage's only study; several -> exit 2 listing them."""
    import optuna

    names = optuna.study.get_all_study_names(storage)
    if study is not None:
        if study not in names:
            raise ConfigError(f"no study '{study}' in this storage; studies: "
                              f"{', '.join(names) or 'none'}")
        return study
    if len(names) == 1:
        return names[0]
    if not names:
        raise ConfigError("this storage holds no study yet; run `mtbert sweep` first")
    raise ConfigError(f"this storage holds {len(names)} studies, pick one with --study: "
                      f"{', '.join(names)}")


@dataclass
class SweepOptions:
    trials: int | None = None
    timeout: float | None = None
    study: str | None = None
    storage: str | None = None
    out: Path = Path("mtbert-runs")
    wandb_mode: str = "disabled"
    wandb_project: str = "mtbert"
    keep_top: int = 3
    heartbeat: int = 10
    grace: int = 30
    device: str = "auto"
    trials_per_gpu: int = 1


def _last_line(path: Path) -> str:
    if not path.exists():
        return "the trial process wrote no log"
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "the trial process wrote no log"


def best_record(run_dir: Path, metric: str, direction: str = "maximize") -> dict | None:
    """The evaluation of a run with the best `metric` (from metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return None
    sign = 1 if direction == "maximize" else -1
    return max(records, key=lambda r: sign * r[metric])


class TrialRunner:
    """The objective: sample, write the trial's run dir, train in a child process."""

    def __init__(self, spec: SweepSpec, options: SweepOptions, study_name: str, url: str):
        self.spec, self.options, self.study_name, self.url = spec, options, study_name, url
        self.wandb_dir = Path(os.environ.get("WANDB_DIR") or options.out).resolve()
        # With trials_per_gpu > 1 Optuna calls this object from several threads at once;
        # these track the live trial processes so that a stop ends all of them.
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping = False

    def stop(self) -> None:
        """End every running trial process (the worker was told to stop)."""
        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        for proc in procs:
            proc.terminate()

    def _child_env(self) -> dict[str, str]:
        env = {**os.environ, STORAGE_ENV: with_driver(self.url), PARENT_ENV: str(os.getpid())}
        k = self.options.trials_per_gpu
        if k > 1 and "OMP_NUM_THREADS" not in env:
            # K trials share the machine's cores: K x all-cores threads would oversubscribe
            # them (the GPU is shared as is, K processes, no device settings changed).
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // k))
        return env

    def __call__(self, trial) -> float | list[float]:
        import optuna

        params = suggest(trial, self.spec)
        config = trial_config(self.spec, params)
        run_dir = (self.options.out / self.study_name / f"trial-{trial.number:04d}").resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        job = {"study": self.study_name, "trial_id": trial._trial_id, "number": trial.number,
               "spec": self.spec.name, "objectives": self.spec.objectives,
               "prune": not self.spec.multi_objective and self.spec.pruner["name"] != "none",
               "pruner": self.spec.pruner, "params": params, "device": self.options.device,
               "wandb": {"mode": self.options.wandb_mode, "project": self.options.wandb_project,
                         "dir": str(self.wandb_dir)}}
        (run_dir / "job.json").write_text(json.dumps(job, indent=2))
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("checkpoint", str(run_dir / "model"))
        log_path = run_dir / "trial.log"
        with open(log_path, "w") as log_file:
            with self._lock:
                if self.stopping:
                    raise KeyboardInterrupt
                proc = subprocess.Popen([sys.executable, "-m", "mtbert.trial", str(run_dir)],
                                        stdout=log_file, stderr=subprocess.STDOUT,
                                        env=self._child_env())
                self._procs.add(proc)
            try:
                code = proc.wait()
                if self.stopping:  # another thread's stop() ended this trial
                    raise KeyboardInterrupt
            except BaseException:  # Ctrl-C, SIGTERM: end the training, then let Optuna fail it
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                trial.set_user_attr("fail_reason", "interrupted")
                (run_dir / "resume.pt").unlink(missing_ok=True)
                raise
            finally:
                with self._lock:
                    self._procs.discard(proc)
        result = self._record(trial, run_dir)
        (run_dir / "resume.pt").unlink(missing_ok=True)  # a trial is never resumed
        reason = result.get("reason") or (f"killed by signal {-code}" if code < 0 else
                                          _last_line(log_path))
        if code == EXIT_PRUNED:
            raise optuna.TrialPruned(reason)
        if code != 0:
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason)
        summary = json.loads((run_dir / "summary.json").read_text())
        values = [summary["best"]["metrics"][key] for key in self.spec.objectives]
        return values[0] if len(values) == 1 else values

    def _record(self, trial, run_dir: Path) -> dict:
        """Set the metric and W&B user attributes; returns the trial process's result."""
        summary_file = run_dir / "summary.json"
        if summary_file.exists():  # the evaluation whose model was kept
            best = json.loads(summary_file.read_text())["best"]["metrics"]
        else:  # pruned or failed: its best evaluation so far
            best = best_record(run_dir, self.spec.objectives[0], self.spec.directions[0])
        for key in METRIC_KEYS:
            if best and key in best:
                trial.set_user_attr(key, best[key])
        info = run_dir / RESULT_FILE
        result = json.loads(info.read_text()) if info.exists() else {}
        if "wandb_run_id" in result:
            trial.set_user_attr("wandb_run_id", result["wandb_run_id"])
        return result


def _ranked(study, metric: str | None = None) -> list:
    """COMPLETE trials, best first by the study's first objective, or by the metric
    attribute `metric` (every metric is higher-better)."""
    from optuna.trial import TrialState

    sign = -1 if study.directions[0].name == "MAXIMIZE" else 1
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and not any(math.isnan(v) for v in t.values)]
    if metric is not None:
        return sorted((t for t in done if metric in t.user_attrs),
                      key=lambda t: -t.user_attrs[metric])
    return sorted(done, key=lambda t: sign * t.values[0])


def prune_checkpoints(study, spec: SweepSpec, keep_top: int) -> int:
    """Remove the model directories of every finished trial outside the top `keep_top`
    (and, for multi-objective studies, the Pareto front). Returns how many were removed."""
    from optuna.trial import TrialState

    # Snapshot first, rank second: a trial that finishes in between (another thread,
    # another worker) is RUNNING in the snapshot and left alone, never removed unranked.
    trials = study.get_trials(deepcopy=False)
    keep = {t.number for t in _ranked(study)[:keep_top]}
    if spec.multi_objective:
        keep |= {t.number for t in study.best_trials}
    removed = 0
    for t in trials:
        if t.state == TrialState.RUNNING or t.state == TrialState.WAITING or t.number in keep:
            continue
        checkpoint = t.user_attrs.get("checkpoint")
        if checkpoint and Path(checkpoint).is_dir():
            shutil.rmtree(checkpoint, ignore_errors=True)
            removed += 1
        if t.user_attrs.get("run_dir"):  # the state of a killed worker's trial
            (Path(t.user_attrs["run_dir"]) / "resume.pt").unlink(missing_ok=True)
    return removed


def _describe_trial(t, spec: SweepSpec) -> str:
    metrics = "  ".join(f"{k} {t.user_attrs[k]:.4f}" for k in METRIC_KEYS if k in t.user_attrs)
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
    seconds = (t.duration.total_seconds() if t.duration else 0.0)
    line = f"trial {t.number} {t.state.name} in {seconds:.0f}s"
    if t.values:
        line += " " + " ".join(f"{k}={v:.4f}" for k, v in zip(spec.objectives, t.values))
    if t.state.name == "FAIL":
        reason = t.user_attrs.get("fail_reason") or t.system_attrs.get("fail_reason", "")
        line += f": {str(reason).splitlines()[0] if reason else 'failed'}"
    return f"{line}  [{params}]" + (f"  {metrics}" if metrics else "")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_sweep(spec: SweepSpec, options: SweepOptions) -> tuple[Any, int]:
    """Create or resume the study and run `options.trials` more trials (or until the
    timeout); returns the study and its number of trials before this run."""
    import optuna
    import sqlalchemy.exc

    # mtbert prints one line per trial itself; Optuna's would add tracebacks of failures.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    options.out.mkdir(parents=True, exist_ok=True)
    url = options.storage or default_storage(options.out)
    storage = open_storage(url, heartbeat=options.heartbeat, grace=options.grace)
    name = options.study or spec.name
    directions = spec.directions
    try:
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                    sampler=make_sampler(spec.sampler),
                                    pruner=make_pruner(spec.pruner), directions=directions)
    except ValueError as err:  # e.g. the existing study has other directions
        raise ConfigError(f"study '{name}': {err}") from None
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise ConfigError(f"study '{name}' exists with other directions; use --study NEW_NAME")
    before = len(study.trials)
    if "spec" not in study.user_attrs:
        study.set_user_attr("spec", spec.name)
        study.set_user_attr("objectives", spec.objectives)
    for params in spec.enqueue:  # known configurations run first, and once per study
        study.enqueue_trial(params, skip_if_exists=True)
    optuna.storages.fail_stale_trials(study)
    log.info("study %s in %s: %d trials so far; running %s more", name, mask_url(url), before,
             options.trials if options.trials is not None else "until the timeout")

    runner = TrialRunner(spec, options, name, url)
    prune_lock = threading.Lock()

    def on_trial_end(study, trial) -> None:
        log.info("%s", _describe_trial(trial, spec))
        with prune_lock:  # callbacks run in Optuna's worker threads with trials_per_gpu > 1
            removed = prune_checkpoints(study, spec, options.keep_top)
        if removed:
            log.info("removed %d checkpoints outside the top %d", removed, options.keep_top)

    def on_stop(signum, frame):
        runner.stop()
        if options.trials_per_gpu == 1:
            raise KeyboardInterrupt  # the trial runs in this thread: end it here
        # Several trials: Optuna's threads end their trials, record them as FAIL and
        # re-raise KeyboardInterrupt, which reaches this thread through their futures.
        # Raising here instead would leave the process while they still record.

    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        study.optimize(runner, n_trials=options.trials, timeout=options.timeout,
                       n_jobs=options.trials_per_gpu, catch=(TrialFailed,),
                       callbacks=[on_trial_end], gc_after_trial=False)
        if runner.stopping:
            raise KeyboardInterrupt
    except sqlalchemy.exc.SQLAlchemyError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StorageError(f"the study storage {mask_url(url)} failed: {mask_url(first)}") \
            from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return study, before


def trials_table(study, *, limit: int = 5, metric: str | None = None,
                 front: bool = True) -> list[str]:
    """Text table of the best COMPLETE trials, best first: by `metric` when given, else
    the Pareto front of a multi-objective study (`front`) or the first objective's ranking."""
    multi = len(study.directions) > 1
    done = study.best_trials if front and multi and metric is None else _ranked(study, metric)
    rows = ["trial  " + "  ".join(f"{k:>18}" for k in METRIC_KEYS) + "  params"]
    for t in done[:limit]:
        values = "  ".join(f"{t.user_attrs.get(k, float('nan')):>18.4f}" for k in METRIC_KEYS)
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        rows.append(f"{t.number:>5}  {values}  {params}")
    return rows

