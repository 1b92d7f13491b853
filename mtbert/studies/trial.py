"""One sweep trial, run in its own process: `python -m mtbert.studies.trial RUN_DIR`.

The child side of the contract in `mtbert.studies.job`: it reads the job,
trains, reports every evaluation to Optuna for pruning, logs to W&B, keeps its
`TrialProgress` file for the worker's display (`ProgressReport`), writes its
`TrialResult` and exits 0 (complete), 3 (pruned) or 1 (failed). A fresh
process per trial carries no GPU memory from one trial to the next.

How the trial ended is decided once, by `outcome`, and written by this process
into its W&B run before it finishes it: summary `state` (COMPLETE, PRUNED or
FAIL, Optuna's names, or RACED_OUT: completed, and its configuration gets no
more seeds) with `fail_reason`, `prune_reason` or `race_note`, and the state as
a tag, so that dashboards filter on it. Told to stop (SIGTERM from its worker,
Ctrl-C) it ends its run as FAIL, then dies by the signal as before, so that the
worker still sees a trial stopped from outside.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mtbert.live import eta
from mtbert.rundir import CONFIG_FILE, best_metrics, read_metrics
from mtbert.studies.job import (EXIT_PRUNED, EXIT_STORAGE_OUTAGE, PARENT_ENV,
                                PROGRESS_EVERY_S, STORAGE_ENV, TrialJob, TrialProgress,
                                TrialResult)
from mtbert.tasks import METRIC_KEYS

log = logging.getLogger("mtbert")


def die_with_parent() -> None:
    """Get SIGKILL when the sweep worker dies, so that no orphan keeps training (or a GPU).

    Set here rather than in a pre-exec hook: forking a process whose other
    threads (Optuna's heartbeat) may hold locks leaves only async-signal-safe
    work to do before exec.
    """
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG, Linux
    except (OSError, AttributeError):
        return
    if os.environ.get(PARENT_ENV) and os.getppid() != int(os.environ[PARENT_ENV]):
        sys.exit(1)  # the worker died before the signal was armed


class Interrupted(BaseException):
    """The trial process was told to stop by `signum` (its worker's SIGTERM, Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted ({signal.Signals(signum).name})")
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the finish
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


@dataclass
class Outcome:
    """How a trial ended: its exit code for the worker, its state and reason for W&B."""

    state: str  # COMPLETE, PRUNED, FAIL (Optuna's names) or RACED_OUT
    code: int
    reason: str | None = None

    @property
    def summary(self) -> dict[str, str]:
        """The W&B summary keys of the outcome."""
        key = {"FAIL": "fail_reason", "PRUNED": "prune_reason",
               "RACED_OUT": "race_note"}.get(self.state)
        return {"state": self.state, **({key: self.reason} if key and self.reason else {})}


def outcome(error: BaseException | None, race: str | None = None,
            race_note: str | None = None) -> Outcome:
    """The one place that decides how the trial ended, from what its training raised (None:
    it completed) and, in a raced study, the race's decision after it. Its exit code, W&B
    state and tags follow from this alone."""
    import optuna

    from mtbert.errors import MtbertError
    from mtbert.formatting import first_line
    from mtbert.studies.outage import StorageOutage
    from mtbert.studies.racing import RACED

    if error is None:
        # Raced out: COMPLETE for Optuna (its value counts in its configuration's mean),
        # and the seed run after which its configuration got no more seeds.
        return Outcome("RACED_OUT", 0, race_note) if race == RACED else Outcome("COMPLETE", 0)
    if isinstance(error, optuna.TrialPruned):
        return Outcome("PRUNED", EXIT_PRUNED, str(error))
    if isinstance(error, StorageOutage):  # the worker queues it again, to resume
        return Outcome("FAIL", EXIT_STORAGE_OUTAGE, str(error))
    if isinstance(error, (MtbertError, Interrupted)):
        return Outcome("FAIL", 1, str(error))
    return Outcome("FAIL", 1, f"{type(error).__name__}: {first_line(error)}")


class ProgressReport:
    """This trial's progress file (`TrialProgress`): `step` is the training's `on_step`
    (mtbert.train.StepCallback), `evaluated` takes each evaluation. Rewritten at most
    every `every` seconds, after an evaluation at once; a write that fails (a full disk)
    is logged once and never fails the trial: the display shows it as it last was."""

    def __init__(self, run_dir: Path, *, every: float = PROGRESS_EVERY_S, clock=time.time):
        self.run_dir, self.every, self.clock = run_dir, every, clock
        self.progress = TrialProgress(started=clock(),
                                      gpu=os.environ.get("CUDA_VISIBLE_DEVICES"))
        self._since: tuple[float, int] | None = None  # (time, step) of the first step call
        self._written = float("-inf")
        self._failed = False
        self.write()

    def step(self, *, epoch: int, epochs: int, step: int, steps: int,
             loss: float | None) -> None:
        p, now = self.progress, self.clock()
        p.epoch, p.epochs, p.step, p.steps = epoch + 1, epochs, step, steps
        if loss is not None:
            p.loss = loss
        if self._since is None:  # the rate leaves out loading the model and the data
            self._since = (now, step)
        if now - self._written >= self.every:
            self.write(now)

    def evaluated(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        p, now = self.progress, self.clock()
        shown = {k: metrics[k] for k in (*METRIC_KEYS, "train/loss") if k in metrics}
        p.evaluations.append({"epoch": epoch + 1, "step": step,
                              "elapsed_s": round(now - p.started, 1),
                              "eta_s": self._eta(now), **shown})
        self.write(now)

    def _eta(self, now: float) -> float | None:
        return eta(self._since, now, self.progress.step, self.progress.steps)

    def write(self, now: float | None = None) -> None:
        p = self.progress
        p.updated = self.clock() if now is None else now
        p.eta_s = self._eta(p.updated)
        self._written = p.updated
        try:
            p.write(self.run_dir)
        except OSError as err:
            if not self._failed:
                log.warning("the progress file is not written (%s); the sweep's display "
                            "shows this trial as it last was", err)
            self._failed = True


class TrackedTraining:
    """A trial's training: the run config in its run directory, trained and logged to W&B.

    `run` takes any object with these three members (`run_id`, a call with `on_eval`
    and `on_step`, `finish`); the orchestration tests give it a stand-in that writes the
    same run files without a model (tests/stub_trial.py)."""

    def __init__(self, job: TrialJob, run_dir: Path):
        from mtbert.config import load_config
        from mtbert.tracking import Tracker

        self.job, self.run_dir = job, run_dir
        self.config = config = load_config(run_dir / CONFIG_FILE)
        name = f"{job.study}-trial-{job.number}"
        if job.reseed_of is not None:
            name += f"-reseed-of-{job.reseed_of}"
        if job.retry_of is not None:
            name += f"-retry-of-{job.retry_of}"
        self.tracker = Tracker(
            mode=job.wandb.mode, project=job.wandb.project, group=job.study,
            job_type=job.spec, name=name,
            config={**config.to_dict(), "params": job.params, "study": job.study,
                    "size": job.size, "trial": job.number, "config_id": job.config_id,
                    "reseed_of": job.reseed_of, "retry_of": job.retry_of},
            tags=self._tags(), directory=Path(job.wandb.dir), resume_id=job.wandb_resume_id)
        self.run_id = self.tracker.run_id

    def _tags(self) -> list[str]:
        job, config = self.job, self.config
        return [config.train.schedule, config.loss.method] + ["reseed"] * (
            job.reseed_of is not None) + ["retry"] * (job.retry_of is not None)

    def __call__(self, on_eval, on_step) -> dict:
        """Train (resuming when the job says so); the best evaluation's summary keys."""
        from mtbert.tracking import best_summary, train_tracked

        return best_summary(train_tracked(self.config, run_dir=self.run_dir,
                                          tracker=self.tracker, device=self.job.device,
                                          resume=self.job.resume, on_eval=on_eval,
                                          on_step=on_step, finish=False))

    def finish(self, ended: Outcome, summary: dict) -> None:
        """End the W&B run with the trial's outcome as its state and a tag."""
        self.tracker.finish(0 if ended.state != "FAIL" else 1, {**summary, **ended.summary},
                            tags=[*self._tags(), ended.state])


def _history(run_dir: Path, objective: str) -> list[tuple[int, float]]:
    """(epoch, objective value) of the evaluations in the run's metrics.jsonl: what a
    resumed retry took over."""
    return [(r["epoch"], r[objective]) for r in read_metrics(run_dir) if objective in r]


def _race(study, trial, job: TrialJob, run_dir: Path, result: TrialResult) -> None:
    """A raced study: decide, before this seed run ends, whether its configuration gets
    another seed; the worker queues it (studies.racing)."""
    from mtbert.studies.job import RACED_OUT
    from mtbert.studies.racing import RACED, decide

    decision = decide(study, config=job.config_id if job.config_id is not None else job.number,
                      value=best_metrics(run_dir)[job.objectives[0]], seeds=job.seeds,
                      alpha=job.race_alpha, direction=job.direction, seed=job.seed)
    result.race, result.race_note = decision.state, decision.note
    if decision.state == RACED:
        trial.set_user_attr(RACED_OUT, True)


def run(run_dir: Path, training=TrackedTraining) -> int:
    """Run the job in `run_dir`: `training(job, run_dir)` trains, this keeps the progress
    file, reports to Optuna, races, decides the outcome and writes the result; returns
    the exit code."""
    import optuna

    from mtbert.errors import MtbertError
    from mtbert.studies.optuna_api import retrying_storage, shared_storage
    from mtbert.studies.options import SweepOptions
    from mtbert.studies.outage import OUTAGE_ENV, Outage
    from mtbert.studies.samplers import make_pruner
    from mtbert.studies.storage import open_storage

    progress = ProgressReport(run_dir)
    job = TrialJob.read(run_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = os.environ[STORAGE_ENV]
    outage = Outage(url, float(os.environ.get(OUTAGE_ENV) or SweepOptions.storage_outage))
    storage = retrying_storage(shared_storage(open_storage(url, checked=True)), outage.call)
    study = optuna.load_study(study_name=job.study, storage=storage,
                              pruner=make_pruner(job.pruner))
    trial = optuna.trial.Trial(study, job.trial_id)
    objective = job.objectives[0]
    train = training(job, run_dir)
    result = TrialResult(wandb_run_id=train.run_id)

    taken_over = _history(run_dir, objective) if job.resume else []

    def report(epoch: int, step: int, metrics: dict[str, float]) -> None:
        progress.evaluated(epoch, step, metrics)
        if not job.prune:
            return
        # First the evaluations of the epochs taken over (an evaluation the dead trial made
        # after its last saved state is made again), so that the pruner sees one curve.
        for earlier, value in taken_over:
            if earlier <= epoch:
                trial.report(value, earlier)
        taken_over.clear()
        trial.report(metrics[objective], epoch + 1)
        if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: {objective} "
                                         f"{metrics[objective]:.4f}")

    error, summary, previous = None, {}, {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _raise_interrupted)
        summary = train(report, progress.step)
        if job.seeds > 1:
            _race(study, trial, job, run_dir, result)
    except BaseException as err:  # each ends the run with its state; see below which re-raise
        error = err
    if not isinstance(error, Interrupted):
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if isinstance(error, MtbertError):
        print(f"error: {error}", file=sys.stderr)
    ended = outcome(error, race=result.race, race_note=result.race_note)
    train.finish(ended, summary)
    result.reason = ended.reason if ended.code else None  # the worker's FAIL or PRUNED note
    result.write(run_dir)
    if isinstance(error, Interrupted):
        signal.signal(error.signum, signal.SIG_DFL)
        os.kill(os.getpid(), error.signum)  # the worker sees a trial stopped from outside
    if error is not None and not isinstance(error, (optuna.TrialPruned, MtbertError)):
        raise error  # a bug: its traceback goes to trial.log
    return ended.code


def main(training=TrackedTraining) -> None:
    from mtbert.formatting import safe_streams

    safe_streams()  # its trial.log is UTF-8; a terminal's locale may not be
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if len(sys.argv) != 2 or STORAGE_ENV not in os.environ:
        print("usage: MTBERT_STORAGE_URL=... python -m mtbert.studies.trial RUN_DIR (started "
              "by `mtbert sweep`)", file=sys.stderr)
        sys.exit(2)
    die_with_parent()
    from mtbert.errors import MtbertError

    try:
        code = run(Path(sys.argv[1]), training)
    except MtbertError as err:  # before its training started, e.g. the storage is gone
        print(f"error: {err}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
