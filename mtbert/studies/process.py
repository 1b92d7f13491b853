"""A sweep's trial processes: each trial's run directory prepared (a fresh configuration,
a reseed, or a retry that takes over its predecessor's run and resumes it), its
`python -m mtbert.studies.trial RUN_DIR` process run in a GPU slot, its result
recorded in the study, and a trial stopped or killed from outside queued again.
The worker loop (`studies.worker`) calls a `TrialRunner` as its objective."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from mtbert.config import load_config, save_config
from mtbert.errors import ConfigError
from mtbert.formatting import first_line
from mtbert.rundir import (CONFIG_FILE, MODEL_DIR, RESUME_FILE, RUN_FILES, TRIAL_LOG,
                           best_metrics, read_metrics)
from mtbert.runtime import device_label, wandb_dir
from mtbert.studies.budget import DEVICE, GPU_SHARE, WALL_S, device_share
from mtbert.studies.constraints import record_feasibility, study_constraints
from mtbert.studies.job import (CHECKPOINT, CONFIG_ID, EXIT_PRUNED, EXIT_STORAGE_OUTAGE,
                                FAIL_REASON, FAILED_TRIAL,
                                GPU, PARENT_ENV, RESEED_OF, RESUMED_FROM_EPOCH, RETRY_HISTORY,
                                RETRY_OF, RETRY_REASON, RUN_DIR, SEED, STORAGE_ENV,
                                WANDB_RUN_ID, TrialJob, TrialResult, WandbSettings,
                                retried_from, trial_command, trial_dir)
from mtbert.studies.configurations import config_of, first_trial
from mtbert.studies.optuna_api import trial_id
from mtbert.studies.folders import check_not_anothers
from mtbert.studies.options import SweepOptions
from mtbert.studies.outage import OUTAGE_ENV
from mtbert.studies.racing import CONTINUE, next_seed, queue_seed
from mtbert.studies.slots import DeviceSlots, Slot
from mtbert.studies.spec import SweepSpec, suggest, trial_config
from mtbert.studies.storage import with_driver
from mtbert.studies.worker import TrialFailed
from mtbert.tasks import METRIC_KEYS

log = logging.getLogger("mtbert")

OUT_OF_MEMORY = "out of GPU memory"  # the reason train() gives (mtbert.train)


def _last_line(path: Path) -> str:
    if not path.exists():
        return "the trial process wrote no log"
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "the trial process wrote no log"


def best_record(run_dir: Path, metric: str, direction: str = "maximize") -> dict | None:
    """The evaluation of a run with the best `metric` (from metrics.jsonl)."""
    records = [r for r in read_metrics(run_dir) if metric in r]
    if not records:
        return None
    sign = 1 if direction == "maximize" else -1
    return max(records, key=lambda r: sign * r[metric])


def _frozen(trial):
    """A running trial's record as the storage holds it (system attributes included)."""
    return trial.storage.get_trial(trial_id(trial))


def record_cost(trial, options: SweepOptions, wall_s: float | None = None) -> None:
    """Set a trial's cost attributes: the device type it trains on and its share of it
    (from its start, so that a running trial counts in the study's hours), and, once its
    process ended, the seconds it ran."""
    device = device_label(options.device)  # the device the trial process uses
    trial.set_user_attr(DEVICE, device)
    trial.set_user_attr(GPU_SHARE, device_share(device, options.trials_per_gpu))
    if wall_s is not None:
        trial.set_user_attr(WALL_S, round(wall_s, 3))


class TrialRunner:
    """The objective: sample, write the trial's run dir, train in a child process."""

    def __init__(self, spec: SweepSpec, options: SweepOptions, study_name: str, *,
                 folder: str | None = None, uid: str | None = None):
        self.spec, self.options, self.study_name = spec, options, study_name
        self.folder = options.out / (folder or study_name)  # the trials' run directories
        self.uid = uid  # the study's identity, written into every job.json
        self.wandb_dir = wandb_dir(options.out)
        # With trials_per_gpu > 1 Optuna calls this object from several threads at once;
        # these track the live trial processes so that a stop ends all of them.
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self._by_trial: dict[int, subprocess.Popen] = {}  # trial number -> its process
        self._lost: set[int] = set()  # trials stopped for want of a heartbeat
        self._run_dirs: dict[int, Path] = {}
        self._resumable: set[int] = set()  # queued again: their resume state stays
        self.stopping = False
        self.slots = DeviceSlots(options.gpus, options.trials_per_gpu)

    def stop(self) -> None:
        """End every running trial process (the worker was told to stop)."""
        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        for proc in procs:
            proc.terminate()

    def lost_heartbeat(self, trial) -> None:
        """The worker could not record `trial`'s heartbeat for the grace period: another
        worker may fail it and run its retry, so this one stops it (its retry resumes)."""
        with self._lock:
            proc = self._by_trial.get(trial.number)
            self._lost.add(trial.number)
        log.warning("trial %d: its heartbeat could not be recorded for %d s; stopping it so "
                    "that it never runs twice at once (its retry resumes it)", trial.number,
                    self.options.grace)
        if proc is not None:
            proc.terminate()

    def ended(self, trial, told: bool) -> None:
        """After the study was told how `trial` ended: a finished trial is never resumed,
        so its resume state goes; a trial queued again, or one another worker failed
        (`told` False), keeps it for the retry."""
        run_dir = self._run_dirs.pop(trial.number, None)
        if told and run_dir is not None and trial.number not in self._resumable:
            (run_dir / RESUME_FILE).unlink(missing_ok=True)

    def _child_env(self, slot: Slot) -> dict[str, str]:
        env = {**os.environ, STORAGE_ENV: with_driver(self.options.url),
               PARENT_ENV: str(os.getpid()), OUTAGE_ENV: str(self.options.storage_outage)}
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
            study=self.study_name, trial_id=trial_id(trial), number=trial.number,
            spec=self.spec.name, objectives=self.spec.objectives,
            # A reseed is never pruned, so that its group's mean is over every seed and
            # not only over the seeds that started well.
            prune=(reseed_of is None and not self.spec.multi_objective
                   and self.spec.pruner["name"] != "none"),
            pruner=self.spec.pruner, params=params, seed=seed, device=self.options.device,
            reseed_of=reseed_of, config_id=config_of(trial),
            seeds=spec.seeds, race_alpha=spec.race_alpha, direction=spec.directions[0],
            size=spec.size,
            wandb=WandbSettings(self.options.wandb_mode, self.options.wandb_project,
                                str(self.wandb_dir)))

    def __call__(self, trial) -> float | list[float]:
        import optuna

        record_cost(trial, self.options)  # its share: it counts in the hours while it runs
        params = suggest(trial, self.spec)
        run_dir = trial_dir(self.folder, trial.number)
        check_not_anothers(run_dir, uid=self.uid, study=self.study_name)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._run_dirs[trial.number] = run_dir
        job = self._prepare(trial, params, run_dir)
        trial.set_user_attr(RUN_DIR, str(run_dir))
        trial.set_user_attr(CHECKPOINT, str(run_dir / MODEL_DIR))
        alone = trial.user_attrs.get(RETRY_REASON) == "oom"
        slot = self.slots.acquire(alone=alone)
        try:
            if slot.gpu is not None:
                trial.set_user_attr(GPU, slot.gpu)
            code = self._run_process(trial, run_dir, slot)
        finally:
            self.slots.release(slot)
        result = self._record(trial, run_dir)
        if code < 0 or code == EXIT_STORAGE_OUTAGE:
            # Killed by a signal this worker did not send (a scheduler signalling the whole
            # job, the OOM killer), stopped for want of a heartbeat, or its storage gone:
            # like a dead worker's trial, queued again to resume.
            reason = (f"its heartbeat could not be recorded for {self.options.grace} s"
                      if trial.number in self._lost else
                      "its storage stayed unreachable" if code == EXIT_STORAGE_OUTAGE else
                      f"killed by signal {-code}")
            trial.set_user_attr(FAIL_REASON, reason)
            self._queue_retry(trial)
            raise TrialFailed(reason)
        reason = result.reason or _last_line(run_dir / TRIAL_LOG)
        if code not in (0, EXIT_PRUNED) and OUT_OF_MEMORY in reason and slot.neighbours \
                and not alone:
            # Out of memory beside other trials on its GPU: once more, alone on a GPU, from
            # its last epoch, so that the study does not learn whom it shared the GPU with.
            trial.set_user_attr(FAIL_REASON, reason)
            self._queue_retry(trial, retry_reason="oom")
            raise TrialFailed(f"{reason} (beside {slot.neighbours} other trials: queued to "
                              "run again alone)")
        # A finished trial (complete, pruned or failed) is never resumed: its resume state
        # goes once the study is told (`ended`); a stopped or killed one keeps it.
        if code == EXIT_PRUNED:
            raise optuna.TrialPruned(reason)
        if code != 0:
            trial.set_user_attr(FAIL_REASON, reason)
            raise TrialFailed(reason)
        return self._values(trial, job, run_dir, result)

    def _values(self, trial, job: TrialJob, run_dir: Path, result: TrialResult):
        """A complete trial's objective values (its race's next seed queued)."""
        best = best_metrics(run_dir)
        if best is None or any(key not in best for key in job.objectives):
            reason = f"its summary.json in {run_dir} is missing or damaged"
            trial.set_user_attr(FAIL_REASON, reason)
            raise TrialFailed(reason)
        values = [best[key] for key in job.objectives]
        if result.race:
            self._next_seed(trial, job, result)
        return values[0] if len(values) == 1 else values

    def _result_stands(self, run_dir: Path) -> bool:
        """Whether the run's training finished and its result can be read: summary.json
        with the objectives (and, in a raced study, the race's decision after it)."""
        try:
            best = best_metrics(run_dir)
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if not best or any(key not in best for key in self.spec.objectives):
            return False
        return self.spec.seeds == 1 or TrialResult.read(run_dir).race is not None

    def finished(self, trial) -> float | list[float] | None:
        """The values of a trial stopped after its training finished, with its result
        there to read: it is told COMPLETE and not queued again (a retry would only read
        the same result again, at the cost of one of --max-retries). None otherwise."""
        run_dir = self._run_dirs.get(trial.number)
        if run_dir is None or not self._result_stands(run_dir):
            return None
        log.info("trial %d was stopped after its training finished: its result stands",
                 trial.number)
        return self._values(trial, TrialJob.read(run_dir), run_dir,
                            self._record(trial, run_dir))

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
        config = self._taken_over_config(trial, retry_of, run_dir) if epochs else None
        if config is None:
            epochs = 0
            # A reseed (`mtbert best --reseed`) is an enqueued copy of a finished trial's
            # parameters with another train.seed.
            seed = trial.user_attrs.get(SEED)
            config = trial_config(self.spec, params if trial.user_attrs.get(RESEED_OF) is None
                                  else {**params, "train.seed": int(seed)})
            save_config(config, run_dir / CONFIG_FILE)
        trial.set_user_attr(SEED, config.train.seed)
        trial.set_user_attr(CONFIG_ID, first_trial(trial))  # a retry's copy replaced
        if retry_of is not None:
            trial.set_user_attr(RETRY_OF, retry_of)
            trial.set_user_attr(FAIL_REASON, None)  # copied from the trial it retries
        trial.set_user_attr(RESUMED_FROM_EPOCH, epochs)
        job = self._job(trial, params, config.train.seed)
        job.retry_of, job.resume = retry_of, epochs > 0
        job.wandb_resume_id = trial.user_attrs.get(WANDB_RUN_ID) if retry_of is not None \
            else None
        job.study_uid = self.uid
        job.write(run_dir)
        return job

    def _taken_over_config(self, trial, retry_of: int, run_dir: Path):
        """The config of the run a retry took over; None when it is unreadable: the retry
        then starts from the beginning, with none of that run's files, and says so."""
        try:
            return load_config(run_dir / CONFIG_FILE)
        except ConfigError as err:
            log.warning("trial %d retries trial %d from the start: the config.yaml of its run "
                        "is unreadable (%s)", trial.number, retry_of, first_line(err))
            for name in RUN_FILES:
                target = run_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            return None

    def _take_over(self, trial, retry_of: int, run_dir: Path) -> int:
        """Copy the retried trial's run (config, metrics, best model, resume state) into
        `run_dir`; returns the epochs it had finished, 0 when it cannot be continued."""
        from mtbert.train import epochs_finished

        dead = Path(trial.user_attrs.get(RUN_DIR) or "")
        if not (dead / RESUME_FILE).is_file() or not (dead / CONFIG_FILE).is_file():
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
            log.warning("trial %d retries trial %d from the start: its resume state at %s is "
                        "unreadable", trial.number, retry_of, dead)
            (run_dir / RESUME_FILE).unlink(missing_ok=True)
        return epochs

    def _queue_retry(self, trial, retry_reason: str | None = None) -> None:
        """Queue a stopped trial again, as Optuna queues a dead worker's (the same system
        attributes), so that the next worker resumes it; at most `max_retries` times.
        `retry_reason` "oom": the retry runs alone on a GPU."""
        import optuna

        self._resumable.add(trial.number)
        frozen = _frozen(trial)
        if frozen.state != optuna.trial.TrialState.RUNNING:
            log.info("trial %d was %s by another worker, which queued its retry",
                     trial.number, frozen.state.name)
            return
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
        with open(run_dir / TRIAL_LOG, "w", encoding="utf-8") as log_file:
            with self._lock:
                if self.stopping:
                    raise KeyboardInterrupt
                started = time.monotonic()
                proc = subprocess.Popen(trial_command(run_dir), stdout=log_file,
                                        stderr=subprocess.STDOUT, env=self._child_env(slot))
                self._procs.add(proc)
                self._by_trial[trial.number] = proc
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
                if not self._result_stands(run_dir):  # else told COMPLETE (`finished`)
                    trial.set_user_attr(FAIL_REASON, "interrupted")
                    self._queue_retry(trial)  # resumes from run_dir's resume state
                raise
            finally:
                with self._lock:
                    self._procs.discard(proc)
                    self._by_trial.pop(trial.number, None)
                record_cost(trial, self.options, time.monotonic() - started)

    def _record(self, trial, run_dir: Path) -> TrialResult:
        """Set the metric and W&B user attributes; returns the trial process's result."""
        best = best_metrics(run_dir)  # the evaluation whose model was kept
        if best is None:  # pruned or failed: its best evaluation so far
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
