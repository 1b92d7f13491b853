"""Running a study: each trial a training in its own process, Optuna's storage the only
coordinator.

Every worker runs the same `mtbert sweep` command against the same storage.
The worker process keeps its trials' heartbeats; a worker that dies leaves a
trial whose heartbeat stops, which the next worker to start or finish a trial
marks FAIL and retries once with the same parameters. With `trials_per_gpu`
K > 1 one worker runs K trials at once (Optuna's `n_jobs` threads, each
waiting on its own trial process on the same device). Ctrl-C or SIGTERM ends
every running trial process, records it as FAIL ("interrupted") and exits.
`best --reseed` queues copies of the best trials with new seeds and runs them
through the same loop. Before its first trial and after every trial a worker
reads the study's stop request and budget from the storage (`budget`); either
ends the loop once the running trials finish.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtbert.config import load_config, save_config
from mtbert.errors import ConfigError, TrainingError
from mtbert.runtime import resolve_device, wandb_dir
from mtbert.studies.budget import (DEVICE, GPU_SHARE, WALL_S, check_budget, device_share,
                                   set_budget, stop_reason)
from mtbert.studies.constraints import (constraints_func, describe_all, record_feasibility,
                                        resolve_constraints, store_constraints,
                                        study_constraints)
from mtbert.studies.job import (CHECKPOINT, CONFIG_ID, EXIT_PRUNED, FAIL_REASON, FAILED_TRIAL,
                                GPU, PARENT_ENV, RESEED_OF, RESUMED_FROM_EPOCH, RETRY_HISTORY,
                                RETRY_OF, RETRY_REASON, RUN_DIR, SEED, STORAGE_ENV,
                                STUDY_OBJECTIVES, STUDY_SPEC, STUDY_SPEC_NAME, WANDB_RUN_ID,
                                WORKERS_STARTED, TrialJob, TrialResult, WandbSettings,
                                retried_from, trial_command)
from mtbert.studies.flat import check_flat, check_flat_stop, set_flat_rule
from mtbert.studies.racing import (CONTINUE, config_of, is_new_configuration, mean_sampler,
                                   next_seed, queue_seed)
from mtbert.studies.results import (SeedGroup, complete_trials, describe_trial,
                                    feasible_trials, new_finished, ranked, reseed_seeds,
                                    seed_groups)
from mtbert.studies.retention import prune_checkpoints
from mtbert.studies.slots import DeviceSlots, Slot
from mtbert.studies.samplers import make_pruner, make_sampler
from mtbert.studies.spec import SweepSpec, stored_spec, suggest, trial_config
from mtbert.studies.storage import (check_study_name, enqueue_once, mask_url, open_storage,
                                    select_study, setup_lock, storage_errors, storage_url,
                                    with_driver)
from mtbert.studies.warmstart import WARM_TOP, warm_start
from mtbert.tasks import METRIC_KEYS

log = logging.getLogger("mtbert")


OUT_OF_MEMORY = "out of GPU memory"  # the reason train() gives (mtbert.train)


class TrialFailed(Exception):
    """A trial's training failed; Optuna records it as FAIL and the study goes on."""


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
    max_retries: int = 2  # a killed or stopped trial is queued again this many times
    gpus: list[str] | None = None  # CUDA_VISIBLE_DEVICES of each GPU; None: one device
    budget_hours: float | None = None  # stored in the study; None keeps the stored one
    stop_after_flat: int | None = None  # stored in the study (studies.flat); None keeps it
    min_delta: float | None = None
    baseline: Path | None = None  # a `mtbert compare` JSON: `baseline` in constraints
    warm_start: str | None = None  # an earlier study whose best configurations run first
    warm_storage: str | None = None  # its storage URL; None: the sweep's own
    warm_top: int = WARM_TOP  # how many of its best configurations

    @property
    def url(self) -> str:
        return storage_url(self.storage, self.out)


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


def _frozen(trial):
    """A running trial's record as the storage holds it (system attributes included)."""
    return trial.storage.get_trial(trial._trial_id)


def record_cost(trial, options: SweepOptions, wall_s: float | None = None) -> None:
    """Set a trial's cost attributes: the device type it trains on and its share of it
    (from its start, so that a running trial counts in the study's hours), and, once its
    process ended, the seconds it ran."""
    try:
        device = resolve_device(options.device).type  # the device the trial process uses
    except TrainingError:  # --device cuda without one: the trial fails; the asked name
        device = options.device
    trial.set_user_attr(DEVICE, device)
    trial.set_user_attr(GPU_SHARE, device_share(device, options.trials_per_gpu))
    if wall_s is not None:
        trial.set_user_attr(WALL_S, round(wall_s, 3))


class TrialRunner:
    """The objective: sample, write the trial's run dir, train in a child process."""

    def __init__(self, spec: SweepSpec, options: SweepOptions, study_name: str):
        self.spec, self.options, self.study_name = spec, options, study_name
        self.wandb_dir = wandb_dir(options.out)
        # With trials_per_gpu > 1 Optuna calls this object from several threads at once;
        # these track the live trial processes so that a stop ends all of them.
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping = False
        self.slots = DeviceSlots(options.gpus, options.trials_per_gpu)
        self.new_configurations = 0  # a raced worker's configurations started (race_queue)

    def stop(self) -> None:
        """End every running trial process (the worker was told to stop)."""
        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        for proc in procs:
            proc.terminate()

    def _child_env(self, slot: Slot) -> dict[str, str]:
        env = {**os.environ, STORAGE_ENV: with_driver(self.options.url),
               PARENT_ENV: str(os.getpid())}
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.gpu
        # Fewer fragmentation OOMs when batch shapes vary (PyTorch's CUDA caching allocator);
        # the user's own setting wins.
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        k = self.slots.total
        if k > 1 and "OMP_NUM_THREADS" not in os.environ:
            # K trials share the machine's cores: K x all-cores threads would oversubscribe
            # them (each GPU is shared as is, its trials' processes side by side).
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // k))
        return env

    def _job(self, trial, params: dict[str, Any], seed: int) -> TrialJob:
        reseed_of = trial.user_attrs.get(RESEED_OF)
        spec = self.spec
        return TrialJob(
            study=self.study_name, trial_id=trial._trial_id, number=trial.number,
            spec=self.spec.name, objectives=self.spec.objectives,
            # A reseed is never pruned, so that its group's mean is over every seed and
            # not only over the seeds that started well.
            prune=(reseed_of is None and not self.spec.multi_objective
                   and self.spec.pruner["name"] != "none"),
            pruner=self.spec.pruner, params=params, seed=seed, device=self.options.device,
            reseed_of=reseed_of, config_id=config_of(trial),
            seeds=spec.seeds, race_alpha=spec.race_alpha, direction=spec.directions[0],
            wandb=WandbSettings(self.options.wandb_mode, self.options.wandb_project,
                                str(self.wandb_dir)))

    def __call__(self, trial) -> float | list[float]:
        import optuna

        params = suggest(trial, self.spec)
        run_dir = (self.options.out / self.study_name / f"trial-{trial.number:04d}").resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        job = self._prepare(trial, params, run_dir)
        trial.set_user_attr(RUN_DIR, str(run_dir))
        trial.set_user_attr(CHECKPOINT, str(run_dir / "model"))
        alone = trial.user_attrs.get(RETRY_REASON) == "oom"
        slot = self.slots.acquire(alone=alone)
        try:
            if slot.gpu is not None:
                trial.set_user_attr(GPU, slot.gpu)
            code = self._run_process(trial, run_dir, slot)
        finally:
            self.slots.release(slot)
        result = self._record(trial, run_dir)
        if code < 0:
            # Killed by a signal this worker did not send (a scheduler signalling the whole
            # job, the OOM killer): like a dead worker's trial, queued again to resume.
            reason = f"killed by signal {-code}"
            trial.set_user_attr(FAIL_REASON, reason)
            self._queue_retry(trial)
            raise TrialFailed(reason)
        reason = result.reason or _last_line(run_dir / "trial.log")
        if code not in (0, EXIT_PRUNED) and OUT_OF_MEMORY in reason and slot.neighbours \
                and not alone:
            # Out of memory beside other trials on its GPU: once more, alone on a GPU, from
            # its last epoch, so that the study does not learn whom it shared the GPU with.
            trial.set_user_attr(FAIL_REASON, reason)
            self._queue_retry(trial, retry_reason="oom")
            raise TrialFailed(f"{reason} (beside {slot.neighbours} other trials: queued to "
                              "run again alone)")
        # A finished trial (complete, pruned or failed) is never resumed; a stopped or
        # killed one keeps its resume state for its retry.
        (run_dir / "resume.pt").unlink(missing_ok=True)
        if code == EXIT_PRUNED:
            raise optuna.TrialPruned(reason)
        if code != 0:
            trial.set_user_attr(FAIL_REASON, reason)
            raise TrialFailed(reason)
        summary = json.loads((run_dir / "summary.json").read_text())
        values = [summary["best"]["metrics"][key] for key in job.objectives]
        if result.race:
            self._next_seed(trial, job, result)
        return values[0] if len(values) == 1 else values

    def _next_seed(self, trial, job: TrialJob, result: TrialResult) -> None:
        """A raced study: queue the configuration's next seed when the race goes on."""
        log.info("trial %d (configuration %d, seed %d): %s", trial.number, job.config_id,
                 job.seed, result.race_note)
        if result.race != CONTINUE:
            return
        config = trial.study.get_trials(deepcopy=False)[job.config_id] \
            if job.config_id != trial.number else trial
        first = int(config.user_attrs.get(SEED, job.seed))
        seed = next_seed(trial.study, config=job.config_id, first_seed=first,
                         seeds=self.spec.seeds)
        if seed is not None:
            queue_seed(trial.study, config=job.config_id, params=job.params, seed=seed)

    def _prepare(self, trial, params: dict[str, Any], run_dir: Path) -> TrialJob:
        """The run directory's config.yaml and job.json: a fresh trial's from the spec; a
        retry's taken over from the trial it retries when that one's run directory (and its
        resume state) is reachable from here, so that it goes on from its last epoch."""
        retry_of = retried_from(_frozen(trial))
        epochs = self._take_over(trial, retry_of, run_dir) if retry_of is not None else 0
        if epochs:
            config = load_config(run_dir / "config.yaml")
        else:
            # A reseed (`mtbert best --reseed`) is an enqueued copy of a finished trial's
            # parameters with another train.seed.
            seed = trial.user_attrs.get(SEED)
            config = trial_config(self.spec, params if trial.user_attrs.get(RESEED_OF) is None
                                  else {**params, "train.seed": int(seed)})
            save_config(config, run_dir / "config.yaml")
        trial.set_user_attr(SEED, config.train.seed)
        trial.set_user_attr(CONFIG_ID, config_of(trial))
        if retry_of is not None:
            trial.set_user_attr(RETRY_OF, retry_of)
            trial.set_user_attr(FAIL_REASON, None)  # copied from the trial it retries
        trial.set_user_attr(RESUMED_FROM_EPOCH, epochs)
        job = self._job(trial, params, config.train.seed)
        job.retry_of, job.resume = retry_of, epochs > 0
        job.wandb_resume_id = trial.user_attrs.get(WANDB_RUN_ID) if retry_of is not None \
            else None
        job.write(run_dir)
        return job

    def _take_over(self, trial, retry_of: int, run_dir: Path) -> int:
        """Copy the retried trial's run (config, metrics, best model, resume state) into
        `run_dir`; returns the epochs it had finished, 0 when it cannot be continued."""
        from mtbert.train import RUN_FILES, epochs_finished

        dead = Path(trial.user_attrs.get(RUN_DIR) or "")
        if not (dead / "resume.pt").is_file() or not (dead / "config.yaml").is_file():
            log.info("trial %d retries trial %d from the start: no resume state of it at %s "
                     "on this machine", trial.number, retry_of, dead)
            return 0
        for name in RUN_FILES:
            source = dead / name
            if source.is_dir():
                shutil.copytree(source, run_dir / name, dirs_exist_ok=True)
            elif source.is_file():
                shutil.copy2(source, run_dir / name)
        epochs = epochs_finished(run_dir)
        if epochs:
            log.info("trial %d resumes trial %d after epoch %d", trial.number, retry_of, epochs)
        else:
            log.info("trial %d retries trial %d from the start: its resume state at %s is "
                     "unreadable", trial.number, retry_of, dead)
            (run_dir / "resume.pt").unlink(missing_ok=True)
        return epochs

    def _queue_retry(self, trial, retry_reason: str | None = None) -> None:
        """Queue a stopped trial again, as Optuna queues a dead worker's (the same system
        attributes), so that the next worker resumes it; at most `max_retries` times.
        `retry_reason` "oom": the retry runs alone on a GPU."""
        import optuna

        frozen = _frozen(trial)
        history = [*frozen.system_attrs.get(RETRY_HISTORY, []), trial.number]
        if len(history) > self.options.max_retries:
            log.warning("trial %d was stopped; not queued again: retried %d times already "
                        "(--max-retries %d)", trial.number, len(history) - 1,
                        self.options.max_retries)
            return
        trial.study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=frozen.params,
            distributions=frozen.distributions,
            user_attrs={**frozen.user_attrs,
                        **({RETRY_REASON: retry_reason} if retry_reason else {})},
            system_attrs={**frozen.system_attrs, FAILED_TRIAL: history[0],
                          RETRY_HISTORY: history}))

    def _run_process(self, trial, run_dir: Path, slot: Slot) -> int:
        """Train in `python -m mtbert.studies.trial RUN_DIR`; its exit code. A stop (signal
        or another thread's `stop()`) ends the process and fails the trial as interrupted."""
        with open(run_dir / "trial.log", "w") as log_file:
            with self._lock:
                if self.stopping:
                    raise KeyboardInterrupt
                started = time.monotonic()
                proc = subprocess.Popen(trial_command(run_dir), stdout=log_file,
                                        stderr=subprocess.STDOUT, env=self._child_env(slot))
                self._procs.add(proc)
            try:
                code = proc.wait()
                if self.stopping:  # another thread's stop() ended this trial
                    raise KeyboardInterrupt
                return code
            except BaseException:  # Ctrl-C, SIGTERM: end the training, then let Optuna fail it
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                trial.set_user_attr(FAIL_REASON, "interrupted")
                self._queue_retry(trial)  # resumes from run_dir's resume state
                raise
            finally:
                with self._lock:
                    self._procs.discard(proc)
                record_cost(trial, self.options, time.monotonic() - started)

    def _record(self, trial, run_dir: Path) -> TrialResult:
        """Set the metric and W&B user attributes; returns the trial process's result."""
        summary_file = run_dir / "summary.json"
        if summary_file.exists():  # the evaluation whose model was kept
            best = json.loads(summary_file.read_text())["best"]["metrics"]
        else:  # pruned or failed: its best evaluation so far
            best = best_record(run_dir, self.spec.objectives[0], self.spec.directions[0])
        for key in METRIC_KEYS:
            if best and key in best:
                trial.set_user_attr(key, best[key])
        constraints = study_constraints(trial.study)
        if constraints:  # before the trial completes: the sampler reads them then
            record_feasibility(trial, constraints, best or {})
        result = TrialResult.read(run_dir)
        if result.wandb_run_id:
            trial.set_user_attr(WANDB_RUN_ID, result.wandb_run_id)
        return result


def study_sampler(spec: SweepSpec, constraints: list | None = None, worker: int = 0):
    """The spec's sampler (told the study's constraints); in a raced study it learns from
    configurations' means. The study's `worker`-th worker (from 0) draws with the spec's
    sampler seed + `worker`."""
    options = spec.sampler
    if worker and options.get("seed") is not None:
        options = {**options, "seed": options["seed"] + worker}
    sampler = make_sampler(options, constraints_func(constraints) if constraints else None)
    return mean_sampler(sampler) if spec.seeds > 1 else sampler


def join_study(study, url: str) -> int:
    """This worker's number among every worker that ran the study so far (0: the first),
    counted in the study (`workers_started`) under the setup lock.

    Workers whose samplers share one seed draw the same random configurations: the
    first trials of every worker (TPE's and GP's random start, `random` throughout) would
    be one configuration run once per worker, and a sweep run again would repeat the
    first run's. Worker k draws with seed + k instead; a study run by one worker once
    draws as before."""
    with setup_lock(url, f"joining study {study.study_name}"):
        worker = study.user_attrs.get(WORKERS_STARTED, 0)
        study.set_user_attr(WORKERS_STARTED, worker + 1)
    return worker


def create_study(spec: SweepSpec, options: SweepOptions):
    """Create the sweep's study, or load it to add trials; returns it and its number of
    trials before this sweep and the numbers of those that had finished (whatever is
    queued, by the spec's enqueue or as a retry, is this sweep's to run)."""
    import optuna

    name = check_study_name(options.study or spec.name)
    constraints = resolve_constraints(spec.constraints, options.baseline, spec.base_values)
    storage = open_storage(options.url, heartbeat=options.heartbeat, grace=options.grace,
                           max_retries=options.max_retries)
    directions = spec.directions
    try:
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                    sampler=study_sampler(spec, constraints),
                                    pruner=make_pruner(spec.pruner), directions=directions)
    except ValueError as err:  # e.g. the existing study has other directions
        raise ConfigError(f"study '{name}': {err}") from None
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise ConfigError(f"study '{name}' exists with other directions; use --study NEW_NAME")
    trials = study.get_trials(deepcopy=False)
    before = (len(trials), {t.number for t in trials if t.state.is_finished()})
    if STUDY_SPEC_NAME not in study.user_attrs:
        study.set_user_attr(STUDY_SPEC_NAME, spec.name)
        study.set_user_attr(STUDY_OBJECTIVES, spec.objectives)
    stored = study.user_attrs.get(STUDY_SPEC)
    if stored is None:
        study.set_user_attr(STUDY_SPEC, spec.to_dict())
    elif stored.get("seeds", 1) != spec.seeds:
        raise ConfigError(f"study '{name}' races each configuration over "
                          f"{stored.get('seeds', 1)} seed(s), this sweep over {spec.seeds}; "
                          f"pass --seeds {stored.get('seeds', 1)}, or use --study NEW_NAME")
    store_constraints(study, constraints)
    if constraints:
        log.info("constraints: %s", describe_all(constraints))
    if options.warm_start:  # the earlier study's best run first, before the spec's enqueue
        warm_start(study, spec, source=options.warm_start,
                   url=options.warm_storage or options.url, top=options.warm_top,
                   own_url=options.url)
    for params in spec.enqueue:  # known configurations run first, and once per study
        enqueue_once(study, options.url, params)
    worker = join_study(study, options.url)
    if worker and spec.sampler.get("seed") is not None:
        study.sampler = study_sampler(spec, constraints, worker)
        log.info("worker %d of study %s: sampler seed %d (the spec's + %d, so that workers "
                 "draw different configurations)", worker, name,
                 spec.sampler["seed"] + worker, worker)
    return study, before


@dataclass
class SweepRun:
    """What `run_sweep` did: the study, which trials had finished before, and why it started
    no more trials than it did (a stop asked for, the budget spent; None: it ran them)."""

    study: Any
    before: set[int]  # the numbers of the trials that had finished before
    stopped: str | None = None
    ran: bool = True  # False: stopped before its first trial

    @property
    def failed(self) -> bool:
        """It ran trials and none of them finished (COMPLETE or PRUNED)."""
        return self.ran and not new_finished(self.study, self.before)


def run_sweep(spec: SweepSpec, options: SweepOptions) -> SweepRun:
    """Create or resume the study, store `options.budget_hours` in it, and run
    `options.trials` more trials (or until the timeout, a stop or the budget)."""
    import optuna

    if options.budget_hours is not None:
        check_budget(options.budget_hours)
    check_flat(options.stop_after_flat, options.min_delta)
    if options.stop_after_flat is not None and spec.multi_objective:
        raise ConfigError("--stop-after-flat compares one objective; this spec has "
                          f"{len(spec.objectives)}")
    # mtbert prints one line per trial itself; Optuna's would add tracebacks of failures.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    options.out.mkdir(parents=True, exist_ok=True)
    with storage_errors(options.url):
        study, (count, before) = create_study(spec, options)
        if options.budget_hours is not None:
            set_budget(study, options.budget_hours)
        if options.stop_after_flat is not None:
            set_flat_rule(study, options.stop_after_flat, options.min_delta)
        optuna.storages.fail_stale_trials(study)
        stopped = stop_reason(study)
    if stopped:
        return SweepRun(study, before, stopped, ran=False)
    log.info("study %s in %s: %d trials so far; running %s more", study.study_name,
             mask_url(options.url), count,
             options.trials if options.trials is not None else "until the timeout")
    if spec.seeds > 1 and options.trials is not None:
        stopped = race_configurations(study, spec, options)
    else:
        stopped = optimize(study, spec, options, n_trials=options.trials,
                           timeout=options.timeout)
    with storage_errors(options.url):
        constraints = study_constraints(study)
        done = complete_trials(study) if constraints else []
        feasible = feasible_trials(study, constraints) if done else []
    if done and not feasible:  # the sweep ran; `mtbert best` has nothing to rank
        log.warning("none of the %d complete trials of study %s meets its constraints (%s)",
                    len(done), study.study_name, describe_all(constraints))
    return SweepRun(study, before, stopped)


def race_configurations(study, spec: SweepSpec, options: SweepOptions) -> str | None:
    """A raced study: start `options.trials` new configurations and run the seed runs the
    race queues (theirs and any other queued trial of the study) until none is left.

    Each round runs as many trials as there are configurations still to start plus
    queued trials that start none (seed runs, retries): queued trials run first, so
    this worker never starts more configurations than asked."""
    from optuna.trial import TrialState

    runner = TrialRunner(spec, options, study.study_name)
    race_queue(study, runner, options.trials)
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    while True:
        with storage_errors(options.url):
            queued = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                         if not is_new_configuration(t))
        todo = max(0, options.trials - runner.new_configurations) + queued
        left = None if deadline is None else deadline - time.monotonic()
        if todo == 0 or (left is not None and left <= 0):
            return None
        try:
            stopped = optimize(study, spec, options, n_trials=todo, timeout=left, runner=runner)
        except NoQueuedTrial:
            continue  # another worker took the queued trials counted: count again
        if stopped:
            return stopped


class NoQueuedTrial(Exception):
    """A raced worker that started its configurations found no queued trial to run."""


def race_queue(study, runner: TrialRunner, configurations: int) -> None:
    """Let this raced worker take queued trials so that it starts exactly
    `configurations` new configurations, counted in `runner.new_configurations`.

    Optuna takes the first queued (WAITING) trial, and samples a new one when another
    worker took them all since this one counted them: a worker would start a
    configuration more than asked, or take a queued configuration (the spec's
    `enqueue:`, a warm start) where it wanted a seed run. This worker instead takes,
    one thread at a time, the first queued trial it may run (a new configuration only
    while it has configurations to start) and lets Optuna sample only then; once its
    configurations are started, finding nothing queued ends the round (NoQueuedTrial,
    raised before Optuna creates a trial) instead of starting another."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage, lock = study._storage, threading.Lock()

    def take() -> int | None:
        with lock:
            started = runner.new_configurations >= configurations
            for t in storage.get_all_trials(study._study_id, deepcopy=False,
                                            states=(TrialState.WAITING,)):
                new = is_new_configuration(t)
                if new and started:
                    continue
                try:  # another worker may take it first: then it is not WAITING here
                    if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                        continue
                except UpdateFinishedTrialError:
                    continue
                runner.new_configurations += new
                return t._trial_id
            if started:
                raise NoQueuedTrial
            runner.new_configurations += 1  # Optuna samples a new configuration
            return None

    study._pop_waiting_trial_id = take


def optimize(study, spec: SweepSpec, options: SweepOptions, *, n_trials: int | None,
             timeout: float | None, runner: TrialRunner | None = None) -> str | None:
    """Run trials of `study` in this worker: each in its own process, with the checkpoint
    pruning after each and Ctrl-C / SIGTERM ending the running trials. Returns why it
    started no more (a stop asked for, the budget spent: checked before the first trial
    and after every trial, running trials finish), or None."""
    with storage_errors(options.url):
        stopped = stop_reason(study)
    if stopped:
        return stopped
    runner = runner or TrialRunner(spec, options, study.study_name)
    prune_lock = threading.Lock()
    reasons: list[str] = []

    def objective(trial):
        record_cost(trial, options)  # its share, so that it counts in the hours while it runs
        return runner(trial)

    def on_trial_end(study, trial) -> None:
        log.info("%s", describe_trial(trial, spec.objectives))
        with prune_lock:  # callbacks run in Optuna's worker threads with trials_per_gpu > 1
            removed = prune_checkpoints(study, keep_top=options.keep_top,
                                        multi_objective=spec.multi_objective)
            check_flat_stop(study)  # stores a stop when the study went flat
            reason = stop_reason(study)
            if reason and not reasons:
                reasons.append(reason)
        if removed:
            log.info("removed %d checkpoints outside the top %d", removed, options.keep_top)
        if reason:
            study.stop()  # this worker's other running trials finish; none starts

    def on_stop(signum, frame):
        runner.stop()
        if runner.slots.total == 1:
            raise KeyboardInterrupt  # the trial runs in this thread: end it here
        # Several trials: Optuna's threads end their trials, record them as FAIL and
        # re-raise KeyboardInterrupt, which reaches this thread through their futures.
        # Raising here instead would leave the process while they still record.

    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with storage_errors(options.url):
            study.optimize(objective, n_trials=n_trials, timeout=timeout,
                           n_jobs=runner.slots.total, catch=(TrialFailed,),
                           callbacks=[on_trial_end], gc_after_trial=False)
        if runner.stopping:
            raise KeyboardInterrupt
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return reasons[0] if reasons else None


def reseed(study, spec: SweepSpec, options: SweepOptions, *, top: int, seeds: int,
           metric: str | None = None) -> list[SeedGroup]:
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
    if spec.seeds > 1:  # a raced study: its best configurations by mean, none raced out
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        originals = [by_number[g.number] for g in seed_groups(study, metric)
                     if not g.raced_out][:top]
    else:
        originals = [t for t in ranked(study, metric) if RESEED_OF not in t.user_attrs][:top]
    if not originals:
        raise ConfigError(f"study {study.study_name} has no COMPLETE trial to reseed")
    # A reseed whose worker died is RUNNING until its heartbeat is stale: fail it (and
    # queue its retry) first, so that it does not count as running elsewhere.
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    queued = 0
    for original in originals:
        base_seed = trial_config(spec, original.params).train.seed
        for seed in reseed_seeds(base_seed, seeds, spec.seeds):
            states = {t.state for t in trials if t.user_attrs.get(RESEED_OF) == original.number
                      and t.user_attrs.get(SEED) == seed}
            if states & {TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING}:
                continue
            study.enqueue_trial(original.params, user_attrs={RESEED_OF: original.number,
                                                             SEED: seed})
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
        stopped = optimize(study, spec, options, n_trials=left, timeout=None)
        if stopped:  # the queued reseeds stay queued for a later worker
            log.warning("%s", stopped)
            break
        now = waiting()
        if now >= left:  # another worker holds the queue's head; it runs them
            break
        left = now
    return [g for g in seed_groups(study, metric, feasible_only=False) if g.number in chosen]


def reseed_study(options: SweepOptions, *, top: int, seeds: int, metric: str | None,
                 overrides: list[str]) -> tuple[str, str, list[SeedGroup]]:
    """`mtbert best --reseed`: the study of `options`, swept with its stored spec (and
    `overrides` on its base), its `top` trials reseeded; returns its name, what the
    groups are ranked by, and the groups."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = open_storage(options.url, heartbeat=options.heartbeat, grace=options.grace,
                       max_retries=options.max_retries, must_exist=True)
    with storage_errors(options.url):
        name = select_study(rdb, options.study)
        stored = optuna.load_study(study_name=name, storage=rdb)
        spec, constraints = stored_spec(stored, overrides), study_constraints(stored)
        study = optuna.load_study(study_name=name, storage=rdb,
                                  sampler=study_sampler(spec, constraints),
                                  pruner=make_pruner(spec.pruner))
        groups = reseed(study, spec, options, top=top, seeds=seeds, metric=metric)
    for g in groups:
        if len(g.trials) < seeds + spec.seeds:
            log.warning("trial %d: %d of %d seeds complete%s; run the command again to retry "
                        "the others", g.number, len(g.trials), seeds + spec.seeds,
                        f" ({g.pending} queued or running)" if g.pending else "")
    return name, metric or spec.objectives[0], groups


def interrupted_table(options: SweepOptions, spec_name: str) -> list[str]:
    """The table of an interrupted sweep's study, as far as it got (empty when there is
    none to show: the interruption is what gets reported)."""
    import optuna
    import sqlalchemy.exc

    from mtbert.studies.results import trials_table

    try:
        study = optuna.load_study(study_name=options.study or spec_name,
                                  storage=with_driver(options.url))
    except (KeyError, ValueError, sqlalchemy.exc.SQLAlchemyError) as err:
        log.debug("no table of the interrupted study: %s", mask_url(str(err)))
        return []
    return trials_table(study) if complete_trials(study) else []
