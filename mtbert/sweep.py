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
import statistics
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
# User attributes of a reseeded trial: the original trial's number and the new train.seed.
RESEED_OF = "reseed_of"
RESEED_SEED = "seed"
# Study user attribute holding the resolved spec (base with the sweep's --set), so that
# `best --reseed` runs new trials exactly as the sweep ran its own.
SPEC_ATTR = "spec_def"


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
        # A reseed (`mtbert best --reseed`) is an enqueued copy of a finished trial's
        # parameters with another train.seed; it is never pruned, so that its group's
        # mean is over every seed and not only over the seeds that started well.
        reseed_of = trial.user_attrs.get(RESEED_OF)
        seed = trial.user_attrs.get(RESEED_SEED)
        config = trial_config(self.spec, params if reseed_of is None else
                              {**params, "train.seed": int(seed)})
        run_dir = (self.options.out / self.study_name / f"trial-{trial.number:04d}").resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        job = {"study": self.study_name, "trial_id": trial._trial_id, "number": trial.number,
               "spec": self.spec.name, "objectives": self.spec.objectives,
               "prune": (reseed_of is None and not self.spec.multi_objective
                         and self.spec.pruner["name"] != "none"),
               "reseed_of": reseed_of, "seed": config.train.seed,
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
    # Reseeded configurations compete by their mean: every seed run of the best
    # `keep_top` of them keeps its model, and so does every member of a group whose
    # seeds are still running (its mean, and so its rank, is not known yet).
    for group in (seed_groups(study, reseeded_only=True)[:keep_top]
                  if not spec.multi_objective else []):
        keep |= {t.number for t in group.trials}
    for t in trials:
        if RESEED_OF in t.user_attrs and t.state in (TrialState.RUNNING, TrialState.WAITING):
            keep.add(t.user_attrs[RESEED_OF])
            keep |= {u.number for u in trials
                     if u.user_attrs.get(RESEED_OF) == t.user_attrs[RESEED_OF]}
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
    if RESEED_OF in t.user_attrs:
        line = (f"trial {t.number} (trial {t.user_attrs[RESEED_OF]} with seed "
                f"{t.user_attrs.get(RESEED_SEED)}) {t.state.name} in {seconds:.0f}s")
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
    if SPEC_ATTR not in study.user_attrs:
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
    for params in spec.enqueue:  # known configurations run first, and once per study
        study.enqueue_trial(params, skip_if_exists=True)
    optuna.storages.fail_stale_trials(study)
    log.info("study %s in %s: %d trials so far; running %s more", name, mask_url(url), before,
             options.trials if options.trials is not None else "until the timeout")

    _optimize(study, spec, options, url, n_trials=options.trials, timeout=options.timeout)
    return study, before


def _optimize(study, spec: SweepSpec, options: SweepOptions, url: str, *,
              n_trials: int | None, timeout: float | None) -> None:
    """Run trials of `study` in this worker: each in its own process, with the checkpoint
    pruning after each and Ctrl-C / SIGTERM ending the running trials."""
    import sqlalchemy.exc

    runner = TrialRunner(spec, options, study.study_name, url)
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
        study.optimize(runner, n_trials=n_trials, timeout=timeout,
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


@dataclass
class SeedGroup:
    """One configuration of a study: an original trial and its reseeded copies."""

    number: int  # the original trial
    params: dict[str, Any]
    trials: list  # COMPLETE members, the original first
    key: str | None  # the metric ranked by; None = the study's (first) objective
    pending: int = 0  # reseeds WAITING or RUNNING

    def values(self, key: str | None = None) -> list[float]:
        """Each member's `key` metric (default: the ranking value), in member order."""
        key = key or self.key
        if key is None:
            return [t.values[0] for t in self.trials]
        return [t.user_attrs[key] for t in self.trials if key in t.user_attrs]

    def mean(self, key: str | None = None) -> float:
        values = self.values(key)
        return statistics.fmean(values) if values else float("nan")

    def std(self, key: str | None = None) -> float:
        """Sample standard deviation (n - 1); nan for one seed."""
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else float("nan")

    @property
    def seeds(self) -> list[int | None]:
        return [t.user_attrs.get(RESEED_SEED) for t in self.trials]

    def representative(self):
        """The member whose value is closest to the group mean (the lower trial number on
        a tie): a model whose dev score is what the configuration gives on average, not
        its luckiest seed."""
        mean = self.mean()
        pairs = zip(self.values(), self.trials)
        return min(pairs, key=lambda p: (abs(p[0] - mean), p[1].number))[1]


def seed_groups(study, metric: str | None = None, *, reseeded_only: bool = False
                ) -> list[SeedGroup]:
    """The study's configurations best first by the mean over their seeds of the (first)
    objective, or of `metric` (every metric is higher-better). `reseeded_only` leaves out
    the configurations that ran with one seed only."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values
                and not any(math.isnan(v) for v in t.values)
                and (metric is None or metric in t.user_attrs)]
    groups = {t.number: SeedGroup(t.number, dict(t.params), [t], metric)
              for t in complete if RESEED_OF not in t.user_attrs}
    reseeded = set()
    done = {t.number for t in complete}
    for t in trials:
        origin = t.user_attrs.get(RESEED_OF)
        if origin is None or origin not in groups:
            continue
        reseeded.add(origin)
        if t.number in done:
            groups[origin].trials.append(t)
        elif t.state in (TrialState.WAITING, TrialState.RUNNING):
            groups[origin].pending += 1
    chosen = [g for g in groups.values() if g.number in reseeded or not reseeded_only]
    sign = -1 if metric is not None or study.directions[0].name == "MAXIMIZE" else 1
    return sorted(chosen, key=lambda g: (sign * g.mean(), g.number))


def reseed_seeds(base_seed: int, k: int) -> list[int]:
    """The K new seeds of a trial whose train.seed is `base_seed`: base+1 .. base+K,
    distinct from it and from each other; `--reseed 3` after `--reseed 2` adds one."""
    return [base_seed + i for i in range(1, k + 1)]


def study_spec(study, overrides: list[str] | None = None) -> SweepSpec:
    """The spec a study was swept with (stored by `mtbert sweep`), `overrides` on its base.

    Studies from before the spec was stored fall back to the shipped spec of the same
    name, whose base may differ from the sweep's --set: pass them again."""
    from mtbert.spec import load_spec, spec_from_dict

    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is not None:
        return spec_from_dict(stored, overrides, where=f"the spec of study {study.study_name}",
                              source=f"study {study.study_name}")
    name = study.user_attrs.get("spec")
    if name is None:
        raise ConfigError(f"study {study.study_name} was not made by `mtbert sweep` (no spec "
                          "stored); reseeding needs its spec")
    log.warning("study %s stores only its spec's name; using the shipped spec '%s' with "
                "this command's --set (pass the sweep's --set again)", study.study_name, name)
    return load_spec(name, overrides)


def reseed(study, spec: SweepSpec, options: SweepOptions, url: str, *, top: int,
           seeds: int, metric: str | None = None) -> list[SeedGroup]:
    """Re-run the `top` best original COMPLETE trials with `seeds` new seeds each, as new
    trials of the study (user attributes `reseed_of`, `seed`); returns their groups.

    A seed that completed, or is queued or running (here or in another worker), is not
    run again; a failed or interrupted one is queued anew. Any worker of the study runs
    queued reseeds exactly like this one (the objective reads the attributes).
    """
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if spec.multi_objective and metric is None:
        raise ConfigError("a multi-objective study has no single ranking; reseed by one "
                          "metric with --metric")
    originals = [t for t in _ranked(study, metric) if RESEED_OF not in t.user_attrs][:top]
    if not originals:
        raise ConfigError(f"study {study.study_name} has no COMPLETE trial to reseed")
    # A reseed whose worker died is RUNNING until its heartbeat is stale: fail it (and
    # queue its retry) first, so that it does not count as running elsewhere.
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    queued = 0
    for original in originals:
        base_seed = trial_config(spec, original.params).train.seed
        for seed in reseed_seeds(base_seed, seeds):
            states = {t.state for t in trials if t.user_attrs.get(RESEED_OF) == original.number
                      and t.user_attrs.get(RESEED_SEED) == seed}
            if states & {TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING}:
                continue
            study.enqueue_trial(original.params,
                                user_attrs={RESEED_OF: original.number, RESEED_SEED: seed})
            queued += 1
    chosen = {t.number for t in originals}
    log.info("reseeding trials %s with %d seeds each: %d runs queued",
             ", ".join(map(str, sorted(chosen))), seeds, queued)

    def waiting() -> int:
        return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                   if t.user_attrs.get(RESEED_OF) in chosen)

    left = waiting()
    while left:
        # Optuna runs queued trials oldest first: trials enqueued earlier by others run
        # too (they belong to the study), then these.
        _optimize(study, spec, options, url, n_trials=left, timeout=None)
        now = waiting()
        if now >= left:  # another worker holds the queue's head; it runs them
            break
        left = now
    return [g for g in seed_groups(study, metric) if g.number in chosen]


def groups_table(groups: list[SeedGroup]) -> list[str]:
    """Text table of configurations, in the order given: their number of seeds and the
    mean ± sample std over the seeds of every metric key."""
    width = 17
    rows = [f"{'trial':>5}  {'seeds':>5}  " + "  ".join(f"{k:>{width}}" for k in METRIC_KEYS)
            + "  params"]
    for g in groups:
        cells = "  ".join(f"{format_mean_std(g.mean(k), g.std(k)):>{width}}" for k in METRIC_KEYS)
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in g.params.items())
        note = f"  ({g.pending} more queued or running)" if g.pending else ""
        rows.append(f"{g.number:>5}  {len(g.trials):>5}  {cells}  {params}{note}")
    return rows


def format_mean_std(mean: float, std: float) -> str:
    """"mean ± std", "mean" without a std (one seed), "-" without a value."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f}"
